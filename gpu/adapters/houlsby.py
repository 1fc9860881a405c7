r"""Houlsby adapters in PyTorch: the twin of :mod:`lowrank_ref.adapters.houlsby`, backward by autograd.

``y = h + f(h W_downᵀ + b_down) W_upᵀ + b_up`` with ``h = x W0ᵀ + b``, f GELU (exact) or ReLU;
``W_down`` from a Gaussian truncated at 2σ, ``W_up = 0`` (or truncated Gaussian with
``init="paper"``), biases 0. Not mergeable: ``merge()`` is the same ``ValueError`` as NumPy's.
Same config, same names and shapes; wraps any ``torch.nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.houlsby import NOT_MERGEABLE_WHY, HoulsbyConfig, check_bottleneck

__all__ = ["HoulsbyLinear"]


def truncated_normal(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std²) restricted to [-2 std, 2 std] (draws outside are redrawn), float64."""
    v = torch.randn(shape, generator=generator, dtype=torch.float64)
    bad = v.abs() > 2
    while bool(bad.any()):
        v[bad] = torch.randn(int(bad.sum()), generator=generator, dtype=torch.float64)
        bad = v.abs() > 2
    return v * std


class HoulsbyLinear(AdapterLinear):
    CONFIG = HoulsbyConfig
    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, base: nn.Linear, config: HoulsbyConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        m, out = config.bottleneck, self.out_features
        check_bottleneck(m, out)
        kw = {"dtype": self.weight_dtype, "device": self._base_device()}
        self.W_down = nn.Parameter(truncated_normal((m, out), config.init_std, g).to(**kw))
        self.b_down = nn.Parameter(torch.zeros(m, **kw))
        W_up = truncated_normal((out, m), config.init_std, g) if config.init == "paper" else torch.zeros(out, m)
        self.W_up = nn.Parameter(W_up.to(**kw))
        self.b_up = nn.Parameter(torch.zeros(out, **kw))

    @property
    def bottleneck(self) -> int:
        return self.config.bottleneck

    def _forward(self, x):
        h = self.base(x)  # x W0ᵀ + b
        a = F.linear(h, self.W_down, self.b_down)  # h W_downᵀ + b_down
        g = F.relu(a) if self.config.activation == "relu" else F.gelu(a)  # exact (erf) GELU
        return h + F.linear(g, self.W_up, self.b_up)
