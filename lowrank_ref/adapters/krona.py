r"""KronA: a frozen linear layer plus the Kronecker product of two small full factors
(Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter", arXiv:2212.10650).
Chapter 05, "KronA and LoKr", derives the forward and the backward.

Update (PyTorch layout, ``W0 (out, in)``; the paper's ``(in, out)`` factors transposed, since
``(A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ``)::

    ΔW = s · A ⊗ B,    A (a_out, a_in),  B (out / a_out, in / a_in)

Mergeable (ΔW is one dense matrix). rank(A ⊗ B) = rank(A)·rank(B): with ``a ≈ √dim`` the update
can be full rank with about ``2·√out·√in`` parameters. The forward goes through the reshape
identity (:func:`lowrank_ref.adapters.lokr.kron_apply`: ``(x (A ⊗ B)ᵀ).reshape(N, a_out, b_out)
= A X Bᵀ`` with ``X = x.reshape(N, a_in, b_in)``), never forming ``A ⊗ B``; its backward is
:func:`~lowrank_ref.adapters.lokr.kron_apply_backward`.

**Sizes (the rule here).** ``a_out`` / ``a_in`` given: they must divide ``out`` / ``in`` (else a
``ValueError`` naming the dimension and the divisors that would work). ``None`` (the default):
PEFT's LoKr rule, the smaller factor of ``factorization(dim, -1)``, the divisor pair nearest
``√dim`` (768 -> A side 24, B side 32; a prime dimension gives 1 and the whole dimension).

**What the paper leaves open** (its full text is not public): the init and
``s``. Chosen here: ``A`` Kaiming-uniform (``U(±1/√a_in)``, as ``nn.Linear``), ``B = 0``, so
ΔW = 0 at init and both factors get gradients after the first step (the choice of an unofficial
re-implementation; LoRA's ``B = 0``); ``s = scale``, a plain hyper-parameter, default 1.

**KronA^B_res** (:class:`KronAResBlock`, the slide deck's best GLUE variant): the same product, but
in parallel to a whole frozen block ``F`` (the paper: the FFN) that maps ``d`` features to ``d``,
plus a scaled copy of the block's input::

    y = F(x) + s · x (A ⊗ B)ᵀ + s_res · x,     A ⊗ B  (d, d)

Not mergeable: ``F`` is non-linear (the FFN's GELU), so no weight of any one layer can absorb the
two extra terms, and the adapter runs at inference too (the deck's latency table: 136 % of the
model's). What is not public, and chosen here: the init (A Kaiming, B = 0, as for KronA), ``s``
(default 1), and ``s_res``: the deck says "scaled residual", one blog writes ``+ I`` (``s_res = 1``),
an unofficial re-implementation makes it a trainable scalar initialised to 1. Here ``s_res`` starts
at ``residual_scale`` (default 1) and is trained iff ``train_residual`` (default True). With
``s_res ≠ 0`` the wrapped block does **not** start as the pretrained block: it adds ``s_res · x``
from the first step (the paper's design; ``residual_scale=0`` starts exactly at ``F``). Not a
registered method: the injection engine targets linear layers, and this wraps a block, by hand
(``block.mlp = KronAResBlock(block.mlp, d)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lokr import (
    factorization,
    kaiming_uniform,
    kron_apply,
    kron_apply_backward,
)
from lowrank_ref.config import check_alpha, check_bool, check_rank
from lowrank_ref.nn.module import Module, Parameter, as_rng
from lowrank_ref.quant.linear import weight_array
from lowrank_ref.registry import CompareRow, Example, MethodSpec

__all__ = ["KronAConfig", "KronALinear", "krona_sizes", "krona_shapes", "krona_forward", "krona_backward",
           "divisors", "KronAResConfig", "KronAResBlock", "krona_res_forward", "krona_res_backward", "SPEC"]


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_side(v, name: str):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int or None, got {type(v).__name__}")
    if int(v) < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {v}")
    return int(v)


@dataclass(frozen=True)
class KronAConfig:
    r"""KronA (Edalati et al. 2022): ``ΔW = s · A ⊗ B``, two small full factors.

    Args:
        a_out, a_in: ``A``'s shape ``(a_out, a_in)``; ``B`` is ``(out/a_out, in/a_in)``. ``None``:
            the smaller factor of PEFT's ``factorization(dim, -1)`` (the divisor pair nearest √dim).
        scale: ``s`` (the paper's scalar, "parallel to LoRA's α/r"; its value is not public).
    """

    a_out: int | None = None
    a_in: int | None = None
    scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "a_out", _check_side(self.a_out, "a_out"))
        object.__setattr__(self, "a_in", _check_side(self.a_in, "a_in"))
        object.__setattr__(self, "scale", check_alpha(self.scale, "scale"))

    @property
    def scaling(self) -> float:
        return self.scale

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def krona_sizes(cfg: KronAConfig, in_features: int, out_features: int) -> tuple[int, int, int, int]:
    """``(a_out, a_in, b_out, b_in)`` for a ``(out, in)`` layer; a ``ValueError`` naming the
    dimension and its divisors when a given side does not divide it."""
    sides = []
    for v, dim, name, feat in ((cfg.a_out, out_features, "a_out", "out_features"),
                               (cfg.a_in, in_features, "a_in", "in_features")):
        if v is None:
            v = factorization(dim, -1)[0]
        elif dim % v:
            raise ValueError(f"{name}={v} does not divide {feat}={dim}; the divisors of {dim} that would "
                             f"work: {divisors(dim)}")
        sides.append(v)
    a_out, a_in = sides
    return a_out, a_in, out_features // a_out, in_features // a_in


def krona_shapes(cfg: KronAConfig, in_features: int, out_features: int) -> dict:
    """``A (a_out, a_in)``, ``B (out/a_out, in/a_in)``."""
    a_out, a_in, b_out, b_in = krona_sizes(cfg, in_features, out_features)
    return {"A": (a_out, a_in), "B": (b_out, b_in)}


class KronACache(NamedTuple):
    x2: np.ndarray
    A: np.ndarray
    B: np.ndarray
    Wq: object
    s: float
    lead: tuple


def krona_forward(x, params, cfg: KronAConfig):
    r"""y = x W0ᵀ + b + s · x (A ⊗ B)ᵀ, through ``A X Bᵀ`` (never forming ``A ⊗ B``).

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (a_out, a_in), "B": (b_out, b_in)}``.
        cfg: gives ``s``.
    Returns:
        ``(y (..., out), cache)``.

    Backward (chapter 05), for ȳ (N, out), Ȳ = ȳ.reshape(N, a_out, b_out), X = x.reshape(N, a_in,
    b_in), T = X Bᵀ, Z = Aᵀ Ȳ::

        Ā = s Σ_N Ȳ Tᵀ     B̄ = s Σ_N Zᵀ X     x̄ = ȳ W0 + s (Z B).reshape(N, in)
    """
    Wq, b, A, B = params["W"], params["b"], params["A"], params["B"]
    W = weight_array(Wq, x.dtype)
    s = cfg.scaling
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ W.T
    del W
    if b is not None:
        y += b
    kron_apply(x2, s * A, B, out=y)  # y += s x (A ⊗ B)ᵀ; s folded into the small factor
    return y.reshape(*lead, y.shape[-1]), KronACache(x2, A, B, Wq, s, lead)


def krona_backward(dy, cache: KronACache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``B`` arrays, ``W`` and ``b`` None (frozen)."""
    x2, A, B, Wq, s, lead = cache
    W = weight_array(Wq, dy.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dy2 @ W  # ȳ W0
    _, dA, dB = kron_apply_backward(dy2, x2, s * A, B, dx=dx)  # dx += X̄; x̄ and B̄ come out scaled by s
    return dx.reshape(*lead, W.shape[1]), {"A": s * dA, "B": dB, "W": None, "b": None}


class KronALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s · A ⊗ B``. Trainable: ``A``, ``B``.

    Args:
        base: the pretrained layer (frozen by this constructor), float or 4-bit.
        config: a :class:`KronAConfig`.
        rng: a ``numpy.random.Generator`` (or a seed) for ``A``'s Kaiming draw.
    """

    CONFIG = KronAConfig

    def __init__(self, base, config: KronAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        self.rng = as_rng(rng)
        shapes = krona_shapes(config, self.in_features, self.out_features)
        self.A = Parameter(kaiming_uniform(shapes["A"], self.rng, self.weight_dtype))
        self.B = Parameter(np.zeros(shapes["B"], dtype=self.weight_dtype))  # B = 0: starts as the base

    @property
    def r(self) -> int:
        """The largest rank ΔW can have: min(a_out, a_in)·min(b_out, b_in)."""
        return min(self.A.shape) * min(self.B.shape)

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s · A ⊗ B (out, in), formed only here."""
        return self.scaling * np.kron(self.A.data, self.B.data)

    def _delta_weight_f64(self) -> np.ndarray:
        return self.scaling * np.kron(self.A.data.astype(np.float64), self.B.data.astype(np.float64))

    def _forward(self, x):
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0_operand(), "b": b, "A": self.A.data, "B": self.B.data}
        y, self._cache = krona_forward(x, params, self.config)
        return y

    def _backward(self, dy):
        dx, grads = krona_backward(dy, self._pop_cache())
        self.A.accumulate(grads["A"])
        self.B.accumulate(grads["B"])
        return dx


# --- KronA^B_res: parallel to a whole block, plus a scaled residual -----------------------------
@dataclass(frozen=True)
class KronAResConfig:
    r"""KronA^B_res: ``y = F(x) + s · x (A ⊗ B)ᵀ + s_res · x`` around a frozen ``d -> d`` block ``F``.

    Args:
        a_out, a_in: ``A``'s shape, as :class:`KronAConfig` (on the ``(d, d)`` product).
        scale: ``s``.
        residual_scale: the initial ``s_res`` (a real number; 0 starts exactly at the block).
        train_residual: ``s_res`` is trained (the unofficial re-implementation) or fixed.
    """

    a_out: int | None = None
    a_in: int | None = None
    scale: float = 1.0
    residual_scale: float = 1.0
    train_residual: bool = True

    def __post_init__(self):
        object.__setattr__(self, "a_out", _check_side(self.a_out, "a_out"))
        object.__setattr__(self, "a_in", _check_side(self.a_in, "a_in"))
        object.__setattr__(self, "scale", check_alpha(self.scale, "scale"))
        v = self.residual_scale
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"residual_scale must be a real number, got {type(v).__name__}")
        if not np.isfinite(v):
            raise ValueError(f"residual_scale must be finite, got {v}")
        object.__setattr__(self, "residual_scale", float(v))
        object.__setattr__(self, "train_residual", check_bool(self.train_residual, "train_residual"))

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


class KronAResCache(NamedTuple):
    x2: np.ndarray  # the block's input (N, d)
    A: np.ndarray
    B: np.ndarray
    s: float
    s_res: np.ndarray  # (1,)
    lead: tuple


def krona_res_forward(x, fx, params, cfg: KronAResConfig):
    r"""y = F(x) + s · x (A ⊗ B)ᵀ + s_res · x (the block's own output ``F(x)`` given).

    Args:
        x: the block's input ``(..., d)``.
        fx: the frozen block's output ``F(x)``, ``(..., d)``.
        params: ``{"A": (a_out, a_in), "B": (d/a_out, d/a_in), "s_res": (1,)}``.
        cfg: gives ``s``.
    Returns:
        ``(y (..., d), cache)``.

    Backward, for ȳ (N, d), with the KronA terms of :func:`krona_forward` (Ȳ = ȳ.reshape(N,
    a_out, b_out), T = X Bᵀ, Z = Aᵀ Ȳ); the block's own x̄ is the block's backward, added by
    the caller::

        Ā = s Σ_N Ȳ Tᵀ    B̄ = s Σ_N Zᵀ X    s̄_res = Σ ȳ ⊙ x    x̄ = F'(x)ᵀ ȳ + s (Z B).reshape(N, d) + s_res ȳ
    """
    A, B, s_res = params["A"], params["B"], params["s_res"]
    if fx.shape != x.shape:
        raise ValueError(f"KronA^B_res needs a block that maps its input's shape to itself: input {x.shape}, "
                         f"block output {fx.shape}")
    s, lead, d = cfg.scale, x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)  # (N, d)
    y = fx.reshape(-1, d) + s_res * x2  # F(x) + s_res · x   (N, d), a new array
    kron_apply(x2, s * A, B, out=y)  # + s · x (A ⊗ B)ᵀ
    return y.reshape(*lead, d), KronAResCache(x2, A, B, s, s_res, lead)


def krona_res_backward(dy, cache: KronAResCache):
    r"""Return ``(x̄ of the two adapter terms, grads)``: ``A``, ``B``, ``s_res``."""
    x2, A, B, s, s_res, lead = cache
    dy2 = dy.reshape(-1, x2.shape[1])
    dx = s_res * dy2  # s_res ȳ
    _, dA, dB = kron_apply_backward(dy2, x2, s * A, B, dx=dx)  # dx += s (Z B); B̄ comes out scaled by s
    ds = (dy2 * x2).sum().reshape(1)  # s̄_res = Σ ȳ ⊙ x
    return dx.reshape(*lead, x2.shape[1]), {"A": s * dA, "B": dB, "s_res": ds}


class KronAResBlock(Module):
    """KronA^B_res around a frozen block ``F`` of ``features -> features`` (any module with
    ``forward``/``backward``, e.g. a GPT block's ``mlp``). Trainable: ``A``, ``B`` and (with
    ``train_residual``) ``s_res``. Not mergeable (``F`` is non-linear).

    Args:
        block: the frozen block (its parameters are frozen by this constructor).
        features: ``d``, the block's input and output width.
        config: a :class:`KronAResConfig`.
        rng: a ``numpy.random.Generator`` (or a seed) for ``A``'s Kaiming draw.
    """

    def __init__(self, block, features: int, config: KronAResConfig | None = None, rng=None):
        super().__init__()
        config = KronAResConfig() if config is None else config
        if not isinstance(config, KronAResConfig):
            raise TypeError(f"config must be a KronAResConfig, got {type(config).__name__}")
        d = check_rank(features, "features")
        shapes = krona_shapes(KronAConfig(config.a_out, config.a_in, config.scale), d, d)
        for p in block.parameters().values():
            p.trainable, p.grad = False, None
        dtype = next((p.data.dtype for p in block.parameters().values()), np.dtype(np.float32))
        rng = as_rng(rng)
        self.block, self.config, self.features = block, config, d
        self.A = Parameter(kaiming_uniform(shapes["A"], rng, dtype))
        self.B = Parameter(np.zeros(shapes["B"], dtype=dtype))  # B = 0: the Kronecker term starts at 0
        self.s_res = Parameter(np.full(1, config.residual_scale, dtype=dtype), trainable=config.train_residual)

    def forward(self, x):
        params = {"A": self.A.data, "B": self.B.data, "s_res": self.s_res.data}
        y, self._cache = krona_res_forward(x, self.block.forward(x), params, self.config)
        return y

    def backward(self, dy):
        dx, grads = krona_res_backward(dy, self._pop_cache())
        dx += self.block.backward(dy)  # + F'(x)ᵀ ȳ
        for n in ("A", "B", "s_res"):
            getattr(self, n).accumulate(grads[n])
        return dx


SPEC = MethodSpec(
    name="krona",
    config=KronAConfig,
    numpy="lowrank_ref.adapters.krona:KronALinear",
    torch="lowrank_gpu.adapters.krona:KronALinear",
    description="KronA, Edalati et al. 2022: ΔW = s A ⊗ B (two small full factors)",
    overridable=("a_out", "a_in", "scale"),
    file_metadata=lambda cfg: {"scaling": float(cfg.scale), "scaling_rule": "scale"},
    shapes=krona_shapes,
    # 8 = 2·4, 6 = 2·3: A (2, 2), B (4, 3)
    example=lambda: Example(6, 8, KronAConfig(scale=2.0)),
    compare={
        # LoRA's budget (r = 8 on q, v: 1,024 per 64x64 layer): A (2, 2), B (32, 32), 1,028 per
        # layer, full rank possible (64); s = 2 as LoRA's α/r
        "krona": CompareRow(KronAConfig(a_out=2, a_in=2, scale=2.0), targets=("q", "v"), lr=1e-2, order=37),
    },
)
