r"""Houlsby adapters: a small bottleneck network with a skip connection after a frozen linear
layer (Houlsby, Giurgiu, Jastrzębski, Morrone, de Laroussilhe, Gesmundo, Attariyan & Gelly 2019,
"Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv:1902.00751). Chapter 09,
§Houlsby adapters, derives the backward and why the layer cannot be merged.

With ``h = x W0ᵀ + b`` (PyTorch layout, ``W0 (out, in)``) and a bottleneck of ``m`` units::

    y = h + f(h W_downᵀ + b_down) W_upᵀ + b_up       W_down (m, out), W_up (out, m)

The paper puts two adapters in each layer: after the attention's output projection and after the
feed-forward network, before the residual add and the layer norm. Here that is an adapter around
the attention's ``o`` and the MLP's ``proj`` (the compare row's targets). The paper also trains the
layer norms: a layer method does not reach them, so ``inject(..., train_also="norms")`` keeps every
LayerNorm trainable next to the adapters, as the ``adapter`` compare row does.

**The non-linearity** ``f``: GELU by default, ReLU as an option. The paper's figure names only "a
nonlinearity"; GELU is the model's own MLP activation here (one smooth function in the whole
network) and is differentiable everywhere, so central differences check it at every point, while
ReLU's kink at 0 is where a finite difference is wrong.

**Init, near the identity.** ``"zero_up"`` (the default): ``W_down`` from a zero-mean Gaussian with
std ``init_std`` truncated at 2σ, ``W_up = 0`` and both biases 0, so the layer starts *exactly* as
its base (the choice NeMo makes for its adapters' output linear). ``"paper"``: both projections
from that truncated Gaussian (std 1e-2 in the paper, "near-identity initialization"), biases 0:
the output starts within about ``std²·m`` of the base, not at it.

**Not mergeable.** ``f`` sits between the two projections, so ``y`` is not ``x W'ᵀ + b'`` for any
``W'``, ``b'`` (unless ``f`` is linear on every pre-activation the data reach): ``merge()``,
``delta_weight()``, ``merged_weight()`` and ``merged_bias()`` are a ``ValueError`` that says so, and
the adapter's two extra matmuls stay in every inference step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_alpha, check_rank
from lowrank_ref.nn.activations import gelu_grad, normal_cdf
from lowrank_ref.nn.module import Parameter, as_rng
from lowrank_ref.registry import CompareRow, Example, MethodSpec

__all__ = ["HoulsbyConfig", "HoulsbyLinear", "houlsby_forward", "houlsby_backward", "truncated_normal",
           "HOULSBY_ACTIVATIONS", "HOULSBY_INITS", "NOT_MERGEABLE_WHY", "check_bottleneck", "SPEC"]

HOULSBY_ACTIVATIONS = ("gelu", "relu")
HOULSBY_INITS = ("zero_up", "paper")
NOT_MERGEABLE_WHY = ("a Houlsby adapter has a non-linearity between its down- and up-projection, "
                     "so no single weight W' and bias b' reproduce h + f(h W_downᵀ + b_down) W_upᵀ + b_up; "
                     "the adapter runs unmerged at inference")


@dataclass(frozen=True)
class HoulsbyConfig:
    r"""A Houlsby adapter (Houlsby et al. 2019): ``y = h + f(h W_downᵀ + b_down) W_upᵀ + b_up``.

    Args:
        bottleneck: ``m``, the adapter's hidden width (at most the layer's output width).
        activation: ``"gelu"`` (exact, erf form; the default) or ``"relu"``.
        init: ``"zero_up"`` (``W_up = 0``: exactly the base at init) or ``"paper"`` (both
            projections from the truncated Gaussian: near, not at, the base).
        init_std: the std of the Gaussian, truncated at ±2 std (the paper: 1e-2).
    """

    bottleneck: int = 8
    activation: str = "gelu"
    init: str = "zero_up"
    init_std: float = 1e-2

    def __post_init__(self):
        object.__setattr__(self, "bottleneck", check_rank(self.bottleneck, "bottleneck"))
        for name, allowed in (("activation", HOULSBY_ACTIVATIONS), ("init", HOULSBY_INITS)):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"{name} must be a string, got {type(v).__name__}")
            if v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {v!r}")
        s = check_alpha(self.init_std, "init_std")
        if s == 0:
            raise ValueError("init_std must be > 0 (a zero W_down leaves W_up without a gradient), got 0.0")
        object.__setattr__(self, "init_std", s)

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def check_bottleneck(bottleneck: int, out_features: int) -> None:
    """A bottleneck wider than the layer it adapts is no bottleneck: a ``ValueError``."""
    if bottleneck > out_features:
        raise ValueError(f"bottleneck={bottleneck} is wider than the layer's output ({out_features}); "
                         f"a Houlsby adapter's bottleneck must be at most out_features")


def truncated_normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """N(0, std²) restricted to [-2 std, 2 std] (draws outside are redrawn), float64."""
    v = rng.standard_normal(shape)
    bad = np.abs(v) > 2
    while bad.any():
        v[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(v) > 2
    return v * std


class HoulsbyCache(NamedTuple):
    """What ``houlsby_backward`` needs from the forward (leading axes flattened to ``N`` rows)."""

    h: np.ndarray  # x W0ᵀ + b (N, out)
    a: np.ndarray  # h W_downᵀ + b_down (N, m), the pre-activation
    g: np.ndarray  # f(a) (N, m)
    W: np.ndarray  # W0 (out, in)
    W_down: np.ndarray  # (m, out)
    W_up: np.ndarray  # (out, m)
    activation: str
    lead: tuple  # x.shape[:-1]


def _act(a, activation):
    if activation == "relu":
        return np.maximum(a, 0)
    return a * normal_cdf(a)  # GELU(a) = a Φ(a)


def _act_grad(a, activation):
    if activation == "relu":
        return (a > 0).astype(a.dtype)  # f'(0) taken as 0, as torch does
    return gelu_grad(a)  # Φ(a) + a φ(a)


def houlsby_forward(x, params, cfg: HoulsbyConfig):
    r"""y = h + f(h W_downᵀ + b_down) W_upᵀ + b_up, h = x W0ᵀ + b.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "W_down": (m, out), "b_down": (m,),
            "W_up": (out, m), "b_up": (out,)}``.
        cfg: ``cfg.activation`` picks f.
    Returns:
        ``(y (..., out), cache)``.

    Backward, for upstream ȳ (N, out) (derived in chapter 09, §Houlsby adapters; ``W0``, ``b``
    frozen), with a = h W_downᵀ + b_down and g = f(a)::

        b̄_up = Σ_n ȳ_n          W̄_up = ȳᵀ g   (out, m)       ḡ = ȳ W_up   (N, m)
        ā = ḡ ⊙ f'(a)           W̄_down = āᵀ h  (m, out)      b̄_down = Σ_n ā_n
        h̄ = ȳ + ā W_down (N, out)                             x̄ = h̄ W0   (N, in)

    The ``ȳ`` in ``h̄`` is the adapter's skip connection. Cost beyond the base matmul: two
    ``N·out·m`` matmuls forward, four backward (plus the base's ``x̄``).
    """
    W, b = params["W"], params["b"]
    Wd, bd, Wu, bu = params["W_down"], params["b_down"], params["W_up"], params["b_up"]
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]) @ W.T  # (N, out)
    if b is not None:
        h += b  # h = x W0ᵀ + b
    a = h @ Wd.T  # (N, m)
    a += bd  # a = h W_downᵀ + b_down
    g = _act(a, cfg.activation)  # g = f(a)
    y = g @ Wu.T  # (N, out)
    y += bu
    y += h  # y = h + g W_upᵀ + b_up
    return y.reshape(*lead, W.shape[0]), HoulsbyCache(h, a, g, W, Wd, Wu, cfg.activation, lead)


def houlsby_backward(dy, cache: HoulsbyCache):
    r"""Return ``(x̄, grads)``; grads: ``W_down``, ``b_down``, ``W_up``, ``b_up`` arrays, ``W`` and
    ``b`` None (frozen)."""
    h, a, g, W, Wd, Wu, activation, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # ȳ (N, out)
    dbu = dy2.sum(axis=0)  # b̄_up = Σ_n ȳ_n
    dWu = dy2.T @ g  # W̄_up = ȳᵀ g   (out, m)
    da = dy2 @ Wu  # ḡ = ȳ W_up   (N, m)
    da *= _act_grad(a, activation)  # ā = ḡ ⊙ f'(a)
    dWd = da.T @ h  # W̄_down = āᵀ h   (m, out)
    dbd = da.sum(axis=0)  # b̄_down = Σ_n ā_n
    dh = da @ Wd  # ā W_down   (N, out)
    dh += dy2  # h̄ = ȳ + ā W_down (the skip connection)
    dx = dh @ W  # x̄ = h̄ W0
    grads = {"W_down": dWd, "b_down": dbd, "W_up": dWu, "b_up": dbu, "W": None, "b": None}
    return dx.reshape(*lead, W.shape[1]), grads


class HoulsbyLinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` followed by a Houlsby bottleneck adapter with its
    own skip connection. Trainable: ``W_down (m, out)``, ``b_down (m,)``, ``W_up (out, m)``,
    ``b_up (out,)``. Not mergeable (``merge()`` is a ``ValueError`` that says why).

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`HoulsbyConfig`.
        rng: a seed or ``numpy.random.Generator`` for the truncated-Gaussian init.
    """

    CONFIG = HoulsbyConfig
    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, base, config: HoulsbyConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        self.rng = as_rng(rng)
        m, out, dt = config.bottleneck, self.out_features, self.weight_dtype
        check_bottleneck(m, out)
        self.W_down = Parameter(truncated_normal(self.rng, (m, out), config.init_std).astype(dt))
        self.b_down = Parameter(np.zeros(m, dtype=dt))
        W_up = truncated_normal(self.rng, (out, m), config.init_std) if config.init == "paper" else np.zeros((out, m))
        self.W_up = Parameter(W_up.astype(dt))
        self.b_up = Parameter(np.zeros(out, dtype=dt))

    @property
    def bottleneck(self) -> int:
        return self.config.bottleneck

    def _forward(self, x):
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0(), "b": b, "W_down": self.W_down.data, "b_down": self.b_down.data,
                  "W_up": self.W_up.data, "b_up": self.b_up.data}
        y, self._cache = houlsby_forward(x, params, self.config)
        return y

    def _backward(self, dy):
        dx, grads = houlsby_backward(dy, self._pop_cache())
        for n in ("W_down", "b_down", "W_up", "b_up"):
            getattr(self, n).accumulate(grads[n])
        return dx


SPEC = MethodSpec(
    name="houlsby",
    config=HoulsbyConfig,
    numpy="lowrank_ref.adapters.houlsby:HoulsbyLinear",
    torch="lowrank_gpu.adapters.houlsby:HoulsbyLinear",
    description="Houlsby adapters, Houlsby et al. 2019: y = h + f(h W_downᵀ + b_down) W_upᵀ + b_up, h = x W0ᵀ + b "
                "(not mergeable)",
    overridable=("bottleneck",),
    file_metadata=lambda cfg: {"activation": cfg.activation},
    shapes=lambda cfg, inn, out: {"W_down": (cfg.bottleneck, out), "b_down": (cfg.bottleneck,),
                                  "W_up": (out, cfg.bottleneck), "b_up": (out,)},
    # PEFT has no Houlsby adapter: no PeftMapping
    example=lambda: Example(6, 5, HoulsbyConfig(bottleneck=3)),
    mergeable=False,
    compare={
        # the paper's two adapters per layer: after the attention output and after the feed-forward
        # ...with the layer norms trained too, as in the paper (inject's train_also)
        "adapter": CompareRow(HoulsbyConfig(bottleneck=8), targets=("o", "proj"), lr=1e-2, order=37,
                              kwargs={"train_also": ("norms",)}),
    },
)
