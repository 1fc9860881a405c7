"""The torch twin of the test-only method in ``sharedb_method`` (autograd does the backward)."""

from __future__ import annotations

import math

import torch
from sharedb_method import SharedBConfig, shared_rank
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from


def build_shared(configs: dict, shapes: dict, rng) -> nn.Module:
    out_max = max(out for out, _ in shapes.values())
    state = nn.Module()
    g = generator_from(rng)
    state.B = nn.Parameter(0.5 * torch.randn((out_max, shared_rank(configs)), generator=g, dtype=torch.float64))
    return state


class SharedBLinear(AdapterLinear):
    CONFIG = SharedBConfig

    def __init__(self, base, config=None, rng=None, shared=None):
        config = self.check_config(config)
        super().__init__(base, config)
        if shared is None:
            raise TypeError("SharedBLinear needs shared= (inject builds it)")
        self.shared = shared
        g = generator_from(rng)
        A = torch.randn((config.r, self.in_features), generator=g, dtype=torch.float64) / math.sqrt(self.in_features)
        self.A = nn.Parameter(A.to(device=base.weight.device, dtype=base.weight.dtype))

    def delta_weight(self):
        return self.scaling * (self.shared.B[: self.out_features] @ self.A)

    def _forward(self, x):
        return self.base(x) + self.scaling * ((x @ self.A.T) @ self.shared.B[: self.out_features].T)
