r"""IA³: a frozen linear layer whose output (or input) is rescaled by a learned vector ``l``
(Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638, §3.3). Chapter 01, §IA³, derives the backward.

Two modes, one vector per layer (PyTorch layout, ``W0 (out, in)``, ``b (out,)``):

* output scaling (``feedforward=False``), ``l (out,)``::

      y = (x W0ᵀ + b) ⊙ l                      merged: W' = diag(l) W0, b' = l ⊙ b

* input scaling (``feedforward=True``), ``l (in,)``::

      y = (x ⊙ l) W0ᵀ + b                      merged: W' = W0 diag(l), b' = b

The paper rescales the keys and values of attention (``l_k``, ``l_v``: output scaling of the
``k`` and ``v`` projections) and the feed-forward's hidden activations, ``(l_ff ⊙ γ(W1 x)) W2``:
input scaling of the second feed-forward layer. ``l = 1`` at init, so the adapted layer starts
equal to the base. The update as a dense ``ΔW`` (what ``delta_weight()`` returns) is
``diag(l − 1) W0`` or ``W0 diag(l − 1)``; output scaling also changes the bias, which is why the
merge installs ``merged_bias()`` as well.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_bool
from lowrank_ref.nn.module import Parameter, as_rng
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping

__all__ = ["IA3Config", "IA3Linear", "ia3_forward", "ia3_backward", "SPEC"]


@dataclass(frozen=True)
class IA3Config:
    r"""IA³ (Liu et al. 2022): a learned rescaling vector ``l`` per adapted layer, ones at init.

    Args:
        feedforward: ``False``: scale the layer's output, ``l (out,)`` (the paper's keys and
            values); ``True``: scale its input, ``l (in,)`` (the paper's feed-forward
            activations, i.e. the input of the feed-forward's second linear layer). One model
            mixes both through per-layer overrides: ``inject(..., overrides={"feedforward":
            {"proj": True}})``; PEFT says the same with ``feedforward_modules``.
    """

    feedforward: bool = False

    def __post_init__(self):
        object.__setattr__(self, "feedforward", check_bool(self.feedforward, "feedforward"))

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


class IA3Cache(NamedTuple):
    """What ``ia3_backward`` needs from the forward (leading axes flattened to ``N`` rows)."""

    x2: np.ndarray  # x (N, in)
    z: np.ndarray | None  # output scaling: x W0ᵀ + b (N, out); input scaling: None
    W: np.ndarray  # W0 (out, in)
    l: np.ndarray  # (out,) or (in,)
    feedforward: bool
    lead: tuple  # x.shape[:-1]


def ia3_forward(x, params, cfg: IA3Config):
    r"""y = (x W0ᵀ + b) ⊙ l, or with ``cfg.feedforward``: y = (x ⊙ l) W0ᵀ + b.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "l": (out,) or, feed-forward, (in,)}``.
        cfg: ``cfg.feedforward`` picks the side that ``l`` scales.
    Returns:
        ``(y (..., out), cache)``.

    Backward, for upstream ȳ (N, out) (derived in chapter 01, §IA³; ``W0``, ``b`` frozen):

    * output scaling, with z = x W0ᵀ + b (N, out)::

          l̄ = Σ_n ȳ_n ⊙ z_n   (out,)        x̄ = (ȳ ⊙ l) W0   (N, in)

    * input scaling, with u = x ⊙ l (N, in) and ū = ȳ W0 (N, in)::

          l̄ = Σ_n ū_n ⊙ x_n   (in,)         x̄ = ū ⊙ l        (N, in)

    Cost beyond the base matmul: ``N·out`` (or ``N·in``) multiplies forward, twice that backward.
    """
    W, b, l = params["W"], params["b"], params["l"]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    if cfg.feedforward:
        y = (x2 * l) @ W.T  # u Wᵀ with u = x ⊙ l   (N, out)
        if b is not None:
            y += b
        z = None
    else:
        z = x2 @ W.T  # (N, out)
        if b is not None:
            z += b  # z = x W0ᵀ + b
        y = z * l  # y = z ⊙ l
    return y.reshape(*lead, W.shape[0]), IA3Cache(x2, z, W, l, cfg.feedforward, lead)


def ia3_backward(dy, cache: IA3Cache):
    r"""Return ``(x̄, grads)``; grads: ``l`` an array, ``W`` and ``b`` None (frozen)."""
    x2, z, W, l, feedforward, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    if feedforward:
        du = dy2 @ W  # ū = ȳ W0   (N, in)
        dl = (du * x2).sum(axis=0)  # l̄ = Σ_n ū_n ⊙ x_n   (in,)
        dx = du * l  # x̄ = ū ⊙ l
    else:
        dl = (dy2 * z).sum(axis=0)  # l̄ = Σ_n ȳ_n ⊙ z_n   (out,)
        dx = (dy2 * l) @ W  # x̄ = (ȳ ⊙ l) W0   (N, in)
    return dx.reshape(*lead, W.shape[1]), {"l": dl, "W": None, "b": None}


class IA3Linear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` whose output (or input) is scaled by ``l``.
    Trainable: ``l``, ``(out,)``, or ``(in,)`` with ``feedforward=True``; ones at init.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: an :class:`IA3Config`.
        rng: accepted like every method's (the injection engine passes one); IA³'s init is
            deterministic, so it is not used.
    """

    CONFIG = IA3Config

    def __init__(self, base, config: IA3Config | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        # no randomness in IA³'s init; the rng is checked like every method's, and kept
        self.rng = as_rng(rng)
        n = self.in_features if config.feedforward else self.out_features
        self.l = Parameter(np.ones(n, dtype=self.weight_dtype))  # l = 1: starts as the base layer

    @property
    def feedforward(self) -> bool:
        return self.config.feedforward

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = diag(l − 1) W0 (rows), or W0 diag(l − 1) (columns, feed-forward); (out, in)."""
        W0, l1 = self.w0(), self.l.data - 1
        return W0 * l1 if self.feedforward else W0 * l1[:, None]

    def merged_weight(self) -> np.ndarray:
        r"""W' = diag(l) W0 (rows scaled), or W0 diag(l) (columns), in float64, rounded once."""
        W0 = self.w0()
        l64 = self.l.data.astype(np.float64)
        W = W0.astype(np.float64) * (l64 if self.feedforward else l64[:, None])
        return W.astype(W0.dtype)

    def merged_bias(self):
        r"""b' = l ⊙ b for output scaling (the bias is inside the scaled output); b otherwise."""
        b = self.base.bias
        if b is None:
            return None
        b0 = self._b0_backup if self.merged else b.data
        if self.feedforward:
            return b0
        return (b0.astype(np.float64) * self.l.data.astype(np.float64)).astype(b0.dtype)

    def _forward(self, x):
        b = None if self.base.bias is None else self.base.bias.data
        y, self._cache = ia3_forward(x, {"W": self.w0(), "b": b, "l": self.l.data}, self.config)
        return y

    def _backward(self, dy):
        dx, grads = ia3_backward(dy, self._pop_cache())
        self.l.accumulate(grads["l"])
        return dx


# --- PEFT (peft.tuners.ia3) ------------------------------------------------------------------
def _peft_is_feedforward(peft_config: dict, path: str) -> bool:
    """PEFT's rule (``IA3Model._check_target_module_feedforward``): a string is a regular
    expression that must match the whole module name; a list marks every module whose name ends
    with one of its entries (a plain ``endswith``, so ``"proj"`` also marks ``"c_proj"``)."""
    ff = peft_config.get("feedforward_modules")
    if ff is None:  # PEFT fills it in from a table of model types; this package has none
        raise ValueError("IA3 adapter_config.json has no feedforward_modules: name the layers that "
                         "get input scaling (an empty list for none)")
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    if not isinstance(ff, (list, tuple)) or not all(isinstance(k, str) for k in ff):
        raise ValueError(f"feedforward_modules must be a string or a list of strings, got {ff!r}")
    return any(path.endswith(k) for k in ff)


def _to_peft(configs: dict) -> dict:
    # every feed-forward layer by its full name; PEFT checks that the list is within target_modules
    return {"feedforward_modules": sorted(p for p, c in configs.items() if c.feedforward)}


def _from_peft(peft_config: dict, path: str) -> IA3Config:
    return IA3Config(feedforward=_peft_is_feedforward(peft_config, path))


def _to_peft_tensor(name: str, array, config: IA3Config):
    # PEFT's ia3_l: (out, 1) for output scaling, (1, in) for input scaling
    return array.reshape(1, -1) if config.feedforward else array.reshape(-1, 1)


def _from_peft_tensor(name: str, array, config: IA3Config):
    shape = tuple(int(d) for d in array.shape)
    want = "(1, in)" if config.feedforward else "(out, 1)"
    if len(shape) != 2 or shape[0 if config.feedforward else 1] != 1:
        raise ValueError(f"PEFT's ia3_l for a {'feed-forward' if config.feedforward else 'non-feed-forward'} "
                         f"layer is {want}, got shape {shape}")
    return array.reshape(-1)


SPEC = MethodSpec(
    name="ia3",
    config=IA3Config,
    numpy="lowrank_ref.adapters.ia3:IA3Linear",
    torch="lowrank_gpu.adapters.ia3:IA3Linear",
    description="IA³, Liu et al. 2022: y = (x W0ᵀ + b) ⊙ l, or y = (x ⊙ l) W0ᵀ + b on feed-forward layers",
    overridable=("feedforward",),
    file_metadata=lambda cfg: {"scaled_side": "input" if cfg.feedforward else "output"},
    peft=PeftMapping("IA3", {"l": "ia3_l"}, to_peft=_to_peft, from_peft=_from_peft,
                     to_peft_tensor=_to_peft_tensor, from_peft_tensor=_from_peft_tensor,
                     options=("feedforward_modules", "init_ia3_weights")),
    # output scaling with a bias: the mode whose merge also changes the bias
    example=lambda: Example(6, 5, IA3Config(feedforward=False)),
    compare={
        # the paper's placement (§3.3): keys, values, and the feed-forward's hidden activations,
        # which are the input of the MLP's second layer (proj); PEFT's llama defaults are the same
        # (k_proj, v_proj, down_proj with down_proj in feedforward_modules)
        "ia3": CompareRow(IA3Config(), targets=("k", "v", "proj"), lr=1e-1, order=35,
                          kwargs={"overrides": {"feedforward": {"proj": True}}}),
    },
)
