r"""A test-only method: "shared-B LoRA", to exercise ``SPEC.shared`` before a shipped method uses it.

    ΔW_ℓ = s · B[:out_ℓ] A_ℓ,   s = α / r,

with one ``B (out_max, r)`` for every adapted layer of the model (``out_max``: the widest
layer's ``out``, from the shapes the builder is given) and each layer's own ``A_ℓ (r, in_ℓ)``.
``B`` starts random, not zero, so that a wrong ``B`` shows in the outputs.

Backward, for ``h = x A_ℓᵀ (N, r)``:  ``B̄[:out_ℓ] += s ȳᵀ h``, ``Ā_ℓ = s (ȳ B[:out_ℓ])ᵀ x``,
``x̄ = ȳ W0 + s (ȳ B[:out_ℓ]) A_ℓ``. Every layer adds its share into the one ``B.grad``.

Register it for a test with ``registry.register_for_tests(SPEC)``; the torch twin is
``sharedb_method_torch``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_alpha, check_rank
from lowrank_ref.inject import as_rng
from lowrank_ref.nn.linear import linear_forward
from lowrank_ref.nn.module import Module, Parameter
from lowrank_ref.registry import Example, MethodSpec, PerBackend


@dataclass(frozen=True)
class SharedBConfig:
    r: int = 2
    alpha: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def shared_rank(configs: dict) -> int:
    ranks = {c.r for c in configs.values()}
    if len(ranks) != 1:
        raise ValueError(f"shared-B LoRA needs one r for all its layers, got {sorted(ranks)}")
    return ranks.pop()


def build_shared(configs: dict, shapes: dict, rng) -> Module:
    """One ``B (out_max, r)`` for the layers ``shapes = {name: (out, in)}``."""
    out_max = max(out for out, _ in shapes.values())
    state = Module()
    state.B = Parameter(0.5 * rng.standard_normal((out_max, shared_rank(configs))))
    return state


class SharedBLinear(AdapterLinear):
    CONFIG = SharedBConfig

    def __init__(self, base, config=None, rng=None, shared=None):
        config = self.check_config(config)
        super().__init__(base, config)
        if shared is None:
            raise TypeError("SharedBLinear needs shared= (inject builds it)")
        rng = as_rng(rng)
        self.shared = shared  # a SharedRef: not registered, so B is listed once, by the model
        dtype = base.weight.data.dtype
        self.A = Parameter((rng.standard_normal((config.r, self.in_features)) / np.sqrt(self.in_features)).astype(dtype))

    def _B(self):
        return self.shared.B.data[: self.out_features]  # (out, r)

    def delta_weight(self):
        return self.scaling * (self._B() @ self.A.data)

    def _forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        h = x2 @ self.A.data.T  # (N, r)
        b = None if self.base.bias is None else self.base.bias.data
        y = linear_forward(x2, self.base.weight.data, b) + self.scaling * (h @ self._B().T)
        self._cache = (x2, h, x.shape)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _backward(self, dy):
        x2, h, shape = self._pop_cache()
        s, B = self.scaling, self._B()
        dy2 = dy.reshape(-1, self.out_features)  # (N, out)
        dB = np.zeros_like(self.shared.B.data)
        dB[: self.out_features] = s * (dy2.T @ h)  # B̄[:out] += s ȳᵀ h
        self.shared.B.accumulate(dB)
        dh = s * (dy2 @ B)  # (N, r)
        self.A.accumulate(dh.T @ x2)
        dx = dy2 @ self.base.weight.data + dh @ self.A.data
        return dx.reshape(shape)


SPEC = MethodSpec(
    name="sharedb_test",
    config=SharedBConfig,
    numpy="sharedb_method:SharedBLinear",
    torch="sharedb_method_torch:SharedBLinear",
    description="test only: LoRA with one B shared by all layers",
    overridable=("alpha",),
    example=lambda: Example(6, 5, SharedBConfig(r=2)),
    shared=PerBackend("sharedb_method:build_shared", "sharedb_method_torch:build_shared"),
)
