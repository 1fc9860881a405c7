r"""IA³ in PyTorch: the twin of :mod:`lowrank_ref.adapters.ia3`, backward by autograd.

``y = (x W0ᵀ + b) ⊙ l`` with ``l (out,)``, or (``feedforward=True``) ``y = (x ⊙ l) W0ᵀ + b`` with
``l (in,)``; ``l = 1`` at init. Same config, same names and shapes; wraps any ``torch.nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.ia3 import IA3Config

__all__ = ["IA3Linear"]


class IA3Linear(AdapterLinear):
    CONFIG = IA3Config

    def __init__(self, base: nn.Linear, config: IA3Config | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        generator_from(rng, device="cpu")  # no randomness in IA³'s init; the rng is checked like every method's
        n = self.in_features if config.feedforward else self.out_features
        self.l = nn.Parameter(torch.ones(n, dtype=self.weight_dtype, device=self._base_device()))  # l = 1: the base layer

    @property
    def feedforward(self) -> bool:
        return self.config.feedforward

    def delta_weight(self) -> torch.Tensor:
        W0, l1 = self.w0(), self.l - 1
        return W0 * l1 if self.feedforward else W0 * l1[:, None]  # W0 diag(l−1) or diag(l−1) W0

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        W0 = self.w0()
        l64 = self.l.detach().double()
        return (W0.double() * (l64 if self.feedforward else l64[:, None])).to(W0.dtype)

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor | None:
        if self.base.bias is None:
            return None
        b0 = self._b0_backup if self.merged else self.base.bias.detach()
        if self.feedforward:
            return b0
        return (b0.double() * self.l.detach().double()).to(b0.dtype)  # b' = l ⊙ b

    def _forward(self, x):
        if self.feedforward:
            return self.base(x * self.l)  # (x ⊙ l) W0ᵀ + b
        return self.base(x) * self.l  # (x W0ᵀ + b) ⊙ l
