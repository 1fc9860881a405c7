r"""DyLoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.dylora`, backward by autograd.

At rank ``b`` (``set_rank(b)``, default ``r``): ``y = x W0ᵀ + b0 + (α/b) (x̃ A[:b]ᵀ) B[:, :b]ᵀ``.
``frozen=True`` detaches ranks ``1..b−1``, so only the ``b``-th rank gets a gradient. The rank
sampling is :class:`lowrank_ref.adapters.dylora.DyLoRAHooks` (it only calls ``set_rank``).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lora import init_lora_A
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.dylora import DyLoRAConfig, check_eval_rank

__all__ = ["DyLoRALinear"]


class DyLoRALinear(AdapterLinear):
    CONFIG = DyLoRAConfig

    def __init__(self, base: nn.Linear, config: DyLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        r, dtype, device = config.r, self.weight_dtype, self._base_device()
        g = generator_from(rng, device="cpu")
        A = init_lora_A(r, self.in_features, "kaiming", g)
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))  # (r, in)
        self.B = nn.Parameter(torch.zeros((self.out_features, r), dtype=dtype, device=device))  # B = 0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._rank = r

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def active_rank(self) -> int:
        """The rank in use (what ``compare`` reports per layer): the current rank."""
        return self._rank

    def set_rank(self, b) -> None:
        b = check_eval_rank(b, self.r)
        if self.merged:
            raise ValueError(f"{type(self).__name__}.set_rank() while merged: the merged weight holds one rank; "
                             "unmerge() first")
        self._rank = b

    @property
    def scaling(self) -> float:
        return self.config.scaling_at(self._rank)  # s_b = α/b

    @torch.no_grad()
    def to_lora(self, b=None):
        from lowrank_gpu.adapters.lora import LoRALinear
        from lowrank_ref.adapters.lora import LoRAConfig

        b = self._rank if b is None else check_eval_rank(b, self.r)
        if self.merged:
            raise ValueError(f"{type(self).__name__}.to_lora() while merged: unmerge() first")
        c = self.config
        lora = LoRALinear(self.base, LoRAConfig(r=b, alpha=c.alpha, dropout=c.dropout, rslora=c.rslora), rng=0)
        lora.load_adapter_state({"A": self.A[:b], "B": self.B[:, :b]})
        return lora

    def _slices(self):
        b = self._rank
        A, B = self.A[:b], self.B[:, :b]  # (b, in), (out, b)
        if self.config.frozen and b > 1:  # only the b-th rank trains
            A = torch.cat([A[: b - 1].detach(), A[b - 1 :]], dim=0)
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1 :]], dim=1)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        A, B = self._slices()
        return self.scaling * (B @ A)  # ΔW = s_b B[:, :b] A[:b]

    def _delta_weight_f64(self) -> torch.Tensor:
        b = self._rank
        return self.scaling * (self.B[:, :b].detach().double() @ self.A[:b].detach().double())

    def _forward(self, x):
        A, B = self._slices()
        y = self.base(x)  # x W0ᵀ + b0   (..., out)
        h = self.dropout(x) @ A.T  # (..., b)
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.T, alpha=self.scaling)
        return out.view(y.shape)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config}, rank={self._rank}"
