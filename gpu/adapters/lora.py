r"""LoRA in PyTorch: ``y = x W0ᵀ + b + s (dropout(x) Aᵀ) Bᵀ`` with autograd for the backward.

Same config, same names and shapes as :mod:`lowrank_ref.adapters.lora`: ``A (r, in)``,
``B (out, r)``, ``s = α/r`` (``α/√r`` with rsLoRA). Wraps any ``torch.nn.Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.config import LoRAConfig

__all__ = ["LoRALinear", "init_lora_A"]


def init_lora_A(r: int, in_features: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """A's initial value (r, in), float64, for ``"kaiming"`` (U(±1/√in), i.e. kaiming_uniform with
    a = √5) or ``"gaussian"`` (N(0, 1/r²)): the same schemes as the NumPy ``init_lora_A``."""
    if init == "gaussian":
        return torch.randn((r, in_features), generator=generator, dtype=torch.float64) / r
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand((r, in_features), generator=generator, dtype=torch.float64) * 2 - 1) * bound


class LoRALinear(AdapterLinear):
    """A frozen ``torch.nn.Linear`` (or a 4-bit ``QuantizedLinear``: QLoRA) plus ``s · B A``."""

    CONFIG = LoRAConfig

    def __init__(self, base: nn.Linear, config: LoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        r, dtype, device = config.r, self.weight_dtype, self._base_device()
        g = generator_from(rng, device="cpu")
        if config.init == "pissa" and self.quantized:
            raise ValueError("LoRA on a quantised base supports init 'kaiming' or 'gaussian'; PiSSA on a "
                             "quantised base needs its residual quantised after the split (not provided)")
        if config.init == "pissa":
            from lowrank_gpu.adapters.pissa import pissa_init

            A, B = pissa_init(base, config)
        else:
            A = init_lora_A(r, self.in_features, config.init, g)
            B = torch.zeros((self.out_features, r), dtype=torch.float64)  # B = 0
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))  # (r, in)
        self.B = nn.Parameter(B.to(device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # ΔW = s B A   (out, in)

    def _delta_weight_f64(self) -> torch.Tensor:
        return self.scaling * (self.B.detach().double() @ self.A.detach().double())

    def _forward(self, x):
        y = self.base(x)  # x W0ᵀ + b   (..., out)
        h = self.dropout(x) @ self.A.T  # h = x̃ Aᵀ   (..., r)
        # y + s h Bᵀ in one GEMM (addmm adds into y and scales on the way): no extra (N, out) pass
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), self.B.T,
                          alpha=self.scaling)
        return out.view(y.shape)
