r"""SSF: a frozen linear layer whose output is scaled and shifted per channel (Lian, Zhou, Feng &
Wang 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
NeurIPS 2022, arXiv:2210.08823). Chapter 09, §SSF, derives the backward and the merge.

One scale ``γ (out,)`` and one shift ``β (out,)`` per adapted layer (PyTorch layout,
``W0 (out, in)``, ``b (out,)``)::

    y = γ ⊙ (x W0ᵀ + b) + β                  merged: W' = diag(γ) W0,  b' = γ ⊙ b + β

The paper inserts the operation after every linear layer of the ViT (and after its layer norms
and the patch embedding); here it follows the linear layers the injection picks (a layer norm's
affine already is a scale and a shift, so SSF after it would fold into ``γ_LN``/``β_LN``; training
the norms' own affine does the same). Merged, the layer is one plain Linear: the scale
rescales the rows of ``W0`` and the bias, the shift adds to the bias. A base without a bias has
nowhere to put ``β``, so its ``merge()`` is a clear error (the dense view still holds:
``merged_bias()`` is then ``β`` alone, the bias a plain Linear would need).

Init: ``"identity"`` (γ = 1, β = 0, the default: the adapted layer starts as the base, bit for
bit) or ``"normal"``, the reference code's ``init_ssf_scale_shift``: γ ~ N(1, 0.02²),
β ~ N(0, 0.02²) (dongzelian/SSF, ``models/vision_transformer.py``), which is *not* a no-op at
init; an identity test needs ``"identity"``.

The update as a dense ``ΔW`` (what ``delta_weight()`` returns) is ``diag(γ − 1) W0``; the bias
changes as well, which is why the merge installs ``merged_bias()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.nn.module import Parameter, as_rng
from lowrank_ref.registry import CompareRow, Example, MethodSpec

__all__ = ["SSFConfig", "SSFLinear", "ssf_forward", "ssf_backward", "SSF_INITS", "SSF_NORMAL_STD", "SPEC"]

SSF_INITS = ("identity", "normal")
SSF_NORMAL_STD = 0.02  # the reference code's std for both γ (around 1) and β (around 0)


@dataclass(frozen=True)
class SSFConfig:
    r"""SSF (Lian et al. 2022): a per-channel scale ``γ`` and shift ``β`` after a linear layer.

    Args:
        init: ``"identity"`` (γ = 1, β = 0: the base layer exactly) or ``"normal"`` (the
            reference code's γ ~ N(1, 0.02²), β ~ N(0, 0.02²): close to, not equal to, the base).
    """

    init: str = "identity"

    def __post_init__(self):
        if not isinstance(self.init, str):
            raise TypeError(f"init must be a string, got {type(self.init).__name__}")
        if self.init not in SSF_INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, SSF_INITS))}, got {self.init!r}")

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


class SSFCache(NamedTuple):
    """What ``ssf_backward`` needs from the forward (leading axes flattened to ``N`` rows)."""

    z: np.ndarray  # x W0ᵀ + b (N, out)
    W: np.ndarray  # W0 (out, in)
    gamma: np.ndarray  # (out,)
    lead: tuple  # x.shape[:-1]


def ssf_forward(x, params):
    r"""y = γ ⊙ (x W0ᵀ + b) + β.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "gamma": (out,), "beta": (out,)}``.
    Returns:
        ``(y (..., out), cache)``.

    Backward, for upstream ȳ (N, out), with z = x W0ᵀ + b (derived in chapter 09, §SSF; ``W0``,
    ``b`` frozen)::

        γ̄ = Σ_n ȳ_n ⊙ z_n   (out,)      β̄ = Σ_n ȳ_n   (out,)      x̄ = (ȳ ⊙ γ) W0   (N, in)

    Cost beyond the base matmul: ``2·N·out`` forward, ``3·N·out`` backward.
    """
    W, b, gamma, beta = params["W"], params["b"], params["gamma"], params["beta"]
    lead = x.shape[:-1]
    z = x.reshape(-1, x.shape[-1]) @ W.T  # (N, out)
    if b is not None:
        z += b  # z = x W0ᵀ + b
    y = z * gamma  # γ ⊙ z
    y += beta  # + β
    return y.reshape(*lead, W.shape[0]), SSFCache(z, W, gamma, lead)


def ssf_backward(dy, cache: SSFCache):
    r"""Return ``(x̄, grads)``; grads: ``gamma``, ``beta`` arrays, ``W`` and ``b`` None (frozen)."""
    z, W, gamma, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dgamma = (dy2 * z).sum(axis=0)  # γ̄ = Σ_n ȳ_n ⊙ z_n
    dbeta = dy2.sum(axis=0)  # β̄ = Σ_n ȳ_n
    dx = (dy2 * gamma) @ W  # x̄ = (ȳ ⊙ γ) W0
    return dx.reshape(*lead, W.shape[1]), {"gamma": dgamma, "beta": dbeta, "W": None, "b": None}


def no_bias_message(owner: str) -> str:
    """Why an SSF layer over a bias-less base does not merge (the same words in both backends)."""
    return (f"{owner} cannot be merged: its base has no bias, so the shift β has nowhere to go "
            "(merged, SSF needs b' = γ ⊙ b + β); build the base with a bias to merge it")


class SSFLinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` followed by a per-channel scale and shift.
    Trainable: ``gamma (out,)`` and ``beta (out,)``; 1 and 0 at init (or the reference's Gaussians).

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: an :class:`SSFConfig`.
        rng: a seed or ``numpy.random.Generator`` for the ``"normal"`` init.
    """

    CONFIG = SSFConfig

    def __init__(self, base, config: SSFConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        self.rng = as_rng(rng)
        n, dt = self.out_features, self.weight_dtype
        if config.init == "identity":
            gamma, beta = np.ones(n, dtype=dt), np.zeros(n, dtype=dt)
        else:
            gamma = (1.0 + SSF_NORMAL_STD * self.rng.standard_normal(n)).astype(dt)
            beta = (SSF_NORMAL_STD * self.rng.standard_normal(n)).astype(dt)
        self.gamma = Parameter(gamma)
        self.beta = Parameter(beta)

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = diag(γ − 1) W0 (rows scaled), (out, in); the shift lives in :meth:`merged_bias`."""
        return self.w0() * (self.gamma.data - 1)[:, None]

    def merged_weight(self) -> np.ndarray:
        r"""W' = diag(γ) W0, in float64, rounded once."""
        W0 = self.w0()
        return (W0.astype(np.float64) * self.gamma.data.astype(np.float64)[:, None]).astype(W0.dtype)

    def merged_bias(self):
        r"""b' = γ ⊙ b + β (in float64, rounded once); ``β`` alone for a base without a bias."""
        if self.base.bias is None:
            return self.beta.data.copy()
        g64, beta64 = self.gamma.data.astype(np.float64), self.beta.data.astype(np.float64)
        b0 = self._b0_backup if self.merged else self.base.bias.data
        return (g64 * b0.astype(np.float64) + beta64).astype(b0.dtype)

    def merge(self) -> None:
        if self.base.bias is None and not self.merged:
            raise ValueError(no_bias_message(type(self).__name__))
        super().merge()

    def _forward(self, x):
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0(), "b": b, "gamma": self.gamma.data, "beta": self.beta.data}
        y, self._cache = ssf_forward(x, params)
        return y

    def _backward(self, dy):
        dx, grads = ssf_backward(dy, self._pop_cache())
        self.gamma.accumulate(grads["gamma"])
        self.beta.accumulate(grads["beta"])
        return dx


SPEC = MethodSpec(
    name="ssf",
    config=SSFConfig,
    numpy="lowrank_ref.adapters.ssf:SSFLinear",
    torch="lowrank_gpu.adapters.ssf:SSFLinear",
    description="SSF, Lian et al. 2022: y = γ ⊙ (x W0ᵀ + b) + β, folded into W0 and b when merged",
    file_metadata=lambda cfg: {"init": cfg.init},
    shapes=lambda cfg, inn, out: {"gamma": (out,), "beta": (out,)},
    # PEFT has no SSF: no PeftMapping
    example=lambda: Example(6, 5, SSFConfig()),
    compare={
        # the paper's ViT placement is after every linear layer (qkv, attn.proj, fc1, fc2) plus the
        # norms; here after every linear layer but the head ("all"), the norms left frozen
        "ssf": CompareRow(SSFConfig(), targets="all", lr=3e-2, order=36),
    },
)
