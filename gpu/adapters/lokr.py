r"""LoKr in PyTorch: the twin of :mod:`lowrank_ref.adapters.lokr`, backward by autograd.

``y = x W0ᵀ + b + s · x (C ⊗ D)ᵀ`` through the reshape identity ``C X Dᵀ`` (the Kronecker product
is never formed in the forward); ``C = w1`` or ``w1_a w1_b``, ``D = w2`` or ``w2_a w2_b``, sizes by
PEFT's ``factorization`` rule. Same config, names and shapes; wraps any ``torch.nn.Linear``.
PEFT's ``rank_dropout`` (a 0/1 mask over the rows of ΔW, divided by its mean only with
``rank_dropout_scale``) and ``module_dropout``, drawn by LoHa's :func:`draw_row_dropout`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.loha import draw_row_dropout
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.lokr import FACTOR_NAMES, LoKrConfig, lokr_layout, lokr_shapes

__all__ = ["LoKrLinear", "kron_apply"]


def kron_apply(x: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``x (C ⊗ D)ᵀ`` for ``x (..., m·n)``, ``C (p, m)``, ``D (q, n)``: ``C X Dᵀ`` per row."""
    (p, m), (q, n) = C.shape, D.shape
    N = x.numel() // (m * n)
    T = (x.reshape(N * m, n) @ D.T).reshape(N, m, q)  # T = X Dᵀ: one GEMM
    # C T as one GEMM over the m axis, (p, m)(m, N·q), rather than N small batched products
    Y = (C @ T.transpose(0, 1).reshape(m, N * q)).reshape(p, N, q).transpose(0, 1)  # (N, p, q)
    return Y.reshape(*x.shape[:-1], p * q)


def _blocks(f: dict):
    C = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
    D = f["w2"] if "w2" in f else f["w2_a"] @ f["w2_b"]
    return C, D


class LoKrLinear(AdapterLinear):
    CONFIG = LoKrConfig

    def __init__(self, base: nn.Linear, config: LoKrConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        self.generator = g  # the init, then the dropout draws
        self.layout = lokr_layout(config, self.in_features, self.out_features)
        zero = ("w1", "w1_a") if config.init == "peft" else ("w2", "w2_b")
        for name, shape in lokr_shapes(config, self.in_features, self.out_features).items():
            if name in zero:
                v = torch.zeros(shape, dtype=torch.float64)
            else:  # kaiming_uniform_(a=√5): U(±1/√fan_in)
                v = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(shape[1])
            setattr(self, name, nn.Parameter(v.to(device=self._base_device(), dtype=self.weight_dtype)))

    def _factors(self) -> dict:
        return {n: getattr(self, n) for n in FACTOR_NAMES if n in self._parameters}

    def blocks(self):
        return _blocks(self._factors())

    def delta_weight(self) -> torch.Tensor:
        C, D = self.blocks()
        return self.scaling * torch.kron(C, D)  # ΔW = s C ⊗ D   (out, in)

    @torch.no_grad()
    def _delta_weight_f64(self) -> torch.Tensor:
        C, D = _blocks({n: v.detach().double() for n, v in self._factors().items()})
        return self.scaling * torch.kron(C, D)

    def _forward(self, x):
        c = self.config
        keep, active = draw_row_dropout(self.generator, self.out_features, c.rank_dropout, c.module_dropout,
                                        self.training)
        y = self.base(x)  # x W0ᵀ + b
        if not active:
            return y
        C, D = self.blocks()
        z = kron_apply(x, self.scaling * C, D)  # s folded into the small block
        if keep is not None:
            m = keep / keep.mean() if c.rank_dropout_scale else keep
            z = z * m.to(device=z.device, dtype=z.dtype)  # rows of ΔW: columns of x ΔWᵀ
        return y + z
