r"""SSF in PyTorch: the twin of :mod:`lowrank_ref.adapters.ssf`, backward by autograd.

``y = γ ⊙ (x W0ᵀ + b) + β`` with ``γ, β (out,)``; γ = 1, β = 0 at init (or the reference code's
N(1, 0.02²), N(0, 0.02²) with ``init="normal"``). Merged: ``W' = diag(γ) W0``, ``b' = γ ⊙ b + β``.
Same config, same names and shapes; wraps any ``torch.nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.ssf import SSF_NORMAL_STD, SSFConfig, no_bias_message

__all__ = ["SSFLinear"]


class SSFLinear(AdapterLinear):
    CONFIG = SSFConfig

    def __init__(self, base: nn.Linear, config: SSFConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        n, kw = self.out_features, {"dtype": self.weight_dtype, "device": self._base_device()}
        if config.init == "identity":
            gamma, beta = torch.ones(n, **kw), torch.zeros(n, **kw)
        else:
            gamma = (1.0 + SSF_NORMAL_STD * torch.randn(n, generator=g, dtype=torch.float64)).to(**kw)
            beta = (SSF_NORMAL_STD * torch.randn(n, generator=g, dtype=torch.float64)).to(**kw)
        self.gamma = nn.Parameter(gamma)
        self.beta = nn.Parameter(beta)

    def delta_weight(self) -> torch.Tensor:
        return self.w0() * (self.gamma - 1)[:, None]  # diag(γ − 1) W0

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        W0 = self.w0()
        return (W0.double() * self.gamma.detach().double()[:, None]).to(W0.dtype)  # diag(γ) W0

    @torch.no_grad()
    def merged_bias(self) -> torch.Tensor:
        if self.base.bias is None:
            return self.beta.detach().clone()
        b0 = self._b0_backup if self.merged else self.base.bias.detach()
        return (self.gamma.detach().double() * b0.double() + self.beta.detach().double()).to(b0.dtype)  # γ ⊙ b + β

    def merge(self) -> None:
        if self.base.bias is None and not self.merged:
            raise ValueError(no_bias_message(type(self).__name__))
        super().merge()

    def _forward(self, x):
        return self.base(x) * self.gamma + self.beta  # γ ⊙ (x W0ᵀ + b) + β
