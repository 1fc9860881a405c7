r"""KronA in PyTorch: the twin of :mod:`lowrank_ref.adapters.krona`, backward by autograd.

``y = x W0ᵀ + b + s · x (A ⊗ B)ᵀ`` through ``A X Bᵀ`` (the Kronecker product is not formed in the
forward); ``A (a_out, a_in)`` Kaiming-uniform, ``B (out/a_out, in/a_in)`` zero at init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lokr import kron_apply
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.krona import KronAConfig, krona_shapes

__all__ = ["KronALinear"]


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
