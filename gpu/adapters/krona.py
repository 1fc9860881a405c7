r"""KronA in PyTorch: the twin of :mod:`lowrank_ref.adapters.krona`, backward by autograd.

``y = x W0ᵀ + b + s · x (A ⊗ B)ᵀ`` through ``A X Bᵀ`` (the Kronecker product is not formed in the
forward); ``A (a_out, a_in)`` Kaiming-uniform, ``B (out/a_out, in/a_in)`` zero at init.
:class:`KronAResBlock`: KronA^B_res, ``y = F(x) + s · x (A ⊗ B)ᵀ + s_res · x`` around a frozen
``d -> d`` block (not mergeable; see :mod:`lowrank_ref.adapters.krona`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lokr import kron_apply
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.krona import KronAConfig, KronAResConfig, krona_shapes
from lowrank_ref.config import check_rank

__all__ = ["KronALinear", "KronAResBlock"]


class KronALinear(AdapterLinear):
    CONFIG = KronAConfig

    def __init__(self, base: nn.Linear, config: KronAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        shapes = krona_shapes(config, self.in_features, self.out_features)
        sa = shapes["A"]
        A = (torch.rand(sa, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(sa[1])  # U(±1/√a_in)
        B = torch.zeros(shapes["B"], dtype=torch.float64)  # B = 0
        dev, dtype = self._base_device(), self.weight_dtype
        self.A = nn.Parameter(A.to(device=dev, dtype=dtype))
        self.B = nn.Parameter(B.to(device=dev, dtype=dtype))

    @property
    def r(self) -> int:
        return min(self.A.shape) * min(self.B.shape)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * torch.kron(self.A, self.B)  # ΔW = s A ⊗ B

    @torch.no_grad()
    def _delta_weight_f64(self) -> torch.Tensor:
        return self.scaling * torch.kron(self.A.detach().double(), self.B.detach().double())

    def _forward(self, x):
        return self.base(x) + kron_apply(x, self.scaling * self.A, self.B)  # s folded into A


class KronAResBlock(nn.Module):
    """KronA^B_res around a frozen ``features -> features`` block (any ``torch.nn.Module``).
    Trainable: ``A``, ``B`` and (with ``train_residual``) ``s_res``. The same config and init."""

    def __init__(self, block: nn.Module, features: int, config: KronAResConfig | None = None, rng=None):
        super().__init__()
        config = KronAResConfig() if config is None else config
        if not isinstance(config, KronAResConfig):
            raise TypeError(f"config must be a KronAResConfig, got {type(config).__name__}")
        d = check_rank(features, "features")
        shapes = krona_shapes(KronAConfig(config.a_out, config.a_in, config.scale), d, d)
        for p in block.parameters():
            p.requires_grad_(False)
        ref = next(block.parameters(), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.float32
        g = generator_from(rng, device="cpu")
        sa = shapes["A"]
        A = (torch.rand(sa, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(sa[1])  # U(±1/√a_in)
        self.block, self.config, self.features = block, config, d
        self.A = nn.Parameter(A.to(device=dev, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(shapes["B"], device=dev, dtype=dtype))  # B = 0
        self.s_res = nn.Parameter(torch.full((1,), config.residual_scale, device=dev, dtype=dtype),
                                  requires_grad=config.train_residual)

    def forward(self, x):
        fx = self.block(x)
        if fx.shape != x.shape:
            raise ValueError(f"KronA^B_res needs a block that maps its input's shape to itself: input "
                             f"{tuple(x.shape)}, block output {tuple(fx.shape)}")
        # F(x) + s · x (A ⊗ B)ᵀ + s_res · x
        return fx + kron_apply(x, self.config.scale * self.A, self.B) + self.s_res * x
