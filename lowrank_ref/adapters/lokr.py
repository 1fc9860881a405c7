r"""LoKr: a frozen linear layer plus a Kronecker-product update whose large block may be low rank
(LyCORIS, Yeh et al. 2024, arXiv:2309.14859, §3.2 Eq. 4; PEFT's ``peft.tuners.lokr``). Chapter 05,
"KronA and LoKr", derives the reshape identity and the backward.

Update (PyTorch layout, ``W0 (out, in)``), with ``out = p·q`` and ``in = m·n``::

    ΔW = s · C ⊗ D,   C (p, m) the small block ("w1"),  D (q, n) the large block ("w2"),
    D = B A           with B = w2_a (q, r), A = w2_b (r, n)    when r < max(q, n)/2, else D full
    C = C_B C_A       with C_B = w1_a (p, r), C_A = w1_b (r, m) when decompose_both and
                      r < max(p, m)/2, else C full
    s = alpha / r     (PEFT's rule, also when both blocks are full)

The sizes ``(p, q) = factorization(out, f)`` and ``(m, n) = factorization(in, f)`` follow PEFT's
``factorization`` (:func:`factorization`, ``f = decompose_factor``). rank(C ⊗ D) = rank(C)·rank(D)
(the Kronecker rank identity), so a rank-r block D and a full C give rank p·r.

**The forward never forms the (out, in) Kronecker product.** With the row-major reshape
``X = x.reshape(N, m, n)`` (``x (N, in)``; index ``j·n + l`` is ``X[:, j, l]``)::

    (x (C ⊗ D)ᵀ).reshape(N, p, q) = C X Dᵀ        (for each row: (p,m)(m,n)(n,q))

because ``(C ⊗ D)[i·q + k, j·n + l] = C[i, j] D[k, l]``. Cost ``N·m·q·(n + p)`` multiply-adds
against ``N·out·in`` for the dense ΔW. With T = X Dᵀ (N, m, q), Ȳ = ȳ.reshape(N, p, q) and
Z = Cᵀ Ȳ (N, m, q) the backward is::

    C̄ = s Σ_N Ȳ Tᵀ  (p, m)     D̄ = s Σ_N Zᵀ X  (q, n)     X̄ = s Z D  (N, m, n)

and through the low-rank blocks: B̄ = D̄ Aᵀ, Ā = Bᵀ D̄ (and C̄_B = C̄ C_Aᵀ, C̄_A = C_Bᵀ C̄).

**Where PEFT and LyCORIS disagree** (from their source; PEFT is followed here):

1. ``factorization(dim, f)`` with ``f`` dividing ``dim``: PEFT returns ``(f, dim/f)`` unsorted
   (``factorization(16, 16) = (16, 1)``: C becomes the large block), LyCORIS sorts the pair.
   With the default ``f = -1`` they agree.
2. The scale when both blocks are full: PEFT keeps ``s = alpha/r``; LyCORIS forces ``alpha = r``,
   so ``s = 1``.
3. Which factor starts at zero: PEFT's default zeroes C (``w1``, or ``w1_a``) and draws D
   Kaiming-uniform; LyCORIS (and PEFT's ``init_weights="lycoris"``, ``init="lycoris"`` here) draws
   C and zeroes D (``w2``, or ``w2_b``). Either way ΔW = 0 at init.

**PEFT's two dropouts** (training only, as in PEFT's LoKr): ``rank_dropout`` does not drop ranks;
it draws a 0/1 keep-mask ``k`` over the **rows of ΔW** (output features), ``k_i = [u_i > p]``, so
``y = x W0ᵀ + b + (x ΔWᵀ) ⊙ m`` with ``m = k``, or ``m = k / mean(k)`` with ``rank_dropout_scale``
(PEFT LoKr's default is not to rescale, unlike its LoHa). A draw that drops every row switches
the branch off for that step (PEFT's rescale divides by zero there). ``module_dropout`` skips the
whole branch with probability ``p``. The draws are :func:`lowrank_ref.adapters.loha.draw_row_dropout`,
shared with LoHa.

Not provided: conv layers and the Tucker ``lokr_t2`` core (conv only).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.loha import draw_row_dropout, row_mask_factor
from lowrank_ref.config import check_alpha, check_bool, check_dropout, check_rank
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.quant.linear import weight_array
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping

__all__ = ["LoKrConfig", "LoKrLinear", "factorization", "lokr_layout", "lokr_shapes", "kron_apply",
           "kron_apply_backward", "lokr_forward", "lokr_backward", "SPEC"]

LOKR_INITS = ("peft", "lycoris")
FACTOR_NAMES = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")


def check_factor(f, name: str = "decompose_factor") -> int:
    """``f`` if it is ``-1`` (automatic) or a positive integer; else a ``TypeError``/``ValueError``."""
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
        raise TypeError(f"{name} must be an int (-1 for automatic, or a positive factor), got {type(f).__name__}")
    f = int(f)
    if f != -1 and f < 1:
        raise ValueError(f"{name} must be -1 (automatic) or a positive integer, got {f}")
    return f


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS's older) rule for splitting ``dimension = m·n``.

    * ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``, **unsorted**
      (LyCORIS sorts it; PEFT does not: ``factorization(16, 16) == (16, 1)``).
    * otherwise (``factor = -1`` means "no bound"): walk the divisors ``m = 2, 3, ...`` upwards while
      ``m ≤ n = dimension/m``, ``m ≤ factor`` and ``m + n`` does not grow, and keep the last pair;
      returned sorted (``m ≤ n``). ``128 -> (8, 16)``, ``127 -> (1, 127)``, ``(360, 8) -> (8, 45)``.
    """
    dimension, factor = int(dimension), check_factor(factor)
    if dimension < 1:
        raise ValueError(f"dimension must be a positive integer, got {dimension}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class LoKrConfig:
    r"""LoKr (LyCORIS): ``ΔW = s · C ⊗ D`` with ``D = B A`` low rank when ``r`` is small enough.

    Args:
        r: the rank of the large block ``D = B A`` (and of ``C`` with ``decompose_both``). A block is
            only factorised when ``r < max(its two sides)/2``; otherwise it is a full matrix (PEFT's
            and LyCORIS's rule), so a large ``r`` silently means "full block", as in PEFT.
        alpha: ``s = alpha / r`` (PEFT's rule, even when both blocks are full).
        decompose_both: also factorise the small block ``C = C_B C_A`` (rank ``r``).
        decompose_factor: ``-1`` (sizes near √dim) or a positive ``f``: the sizes come from
            :func:`factorization` ``(dim, f)``, applied to ``out`` and to ``in``.
        init: ``"peft"`` (C = 0, D Kaiming-uniform: PEFT's default) or ``"lycoris"`` (C Kaiming,
            D = 0, i.e. ``w2`` or ``w2_b`` zero: LyCORIS's and PEFT's ``init_weights="lycoris"``).
        rank_dropout: PEFT's name for a dropout over the **rows** of ``ΔW`` (output features), in
            [0, 1); training only.
        module_dropout: the probability, in [0, 1), that a training forward skips the branch.
        rank_dropout_scale: divide the row mask by its mean (PEFT's LoKr default: no).
    """

    r: int = 4
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1
    init: str = "peft"
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "decompose_both", check_bool(self.decompose_both, "decompose_both"))
        object.__setattr__(self, "decompose_factor", check_factor(self.decompose_factor))
        object.__setattr__(self, "rank_dropout", check_dropout(self.rank_dropout, "rank_dropout"))
        object.__setattr__(self, "module_dropout", check_dropout(self.module_dropout, "module_dropout"))
        object.__setattr__(self, "rank_dropout_scale", check_bool(self.rank_dropout_scale, "rank_dropout_scale"))
        if self.init not in LOKR_INITS:
            raise ValueError(f"init must be one of {LOKR_INITS} for LoKrConfig, got {self.init!r}")

    @property
    def scaling(self) -> float:
        """``alpha / r`` (PEFT's; LyCORIS uses 1 when both blocks are full)."""
        return self.alpha / self.r

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


class LoKrLayout(NamedTuple):
    """The block sizes of a LoKr layer: ``out = p·q``, ``in = m·n``, and which blocks are full."""

    p: int
    q: int
    m: int
    n: int
    full_c: bool
    full_d: bool


def lokr_layout(cfg: LoKrConfig, in_features: int, out_features: int) -> LoKrLayout:
    """PEFT's sizes for a ``(out, in)`` layer: ``(p, q) = factorization(out, f)``,
    ``(m, n) = factorization(in, f)``; ``D`` is low rank iff ``r < max(q, n)/2``, ``C`` iff
    ``decompose_both`` and ``r < max(p, m)/2``."""
    p, q = factorization(out_features, cfg.decompose_factor)
    m, n = factorization(in_features, cfg.decompose_factor)
    full_c = not (cfg.decompose_both and cfg.r < max(p, m) / 2)
    full_d = not (cfg.r < max(q, n) / 2)
    return LoKrLayout(p, q, m, n, full_c, full_d)


def lokr_shapes(cfg: LoKrConfig, in_features: int, out_features: int) -> dict:
    """The layer's tensors by name and shape: ``w1 (p, m)`` or ``w1_a (p, r)``, ``w1_b (r, m)``;
    ``w2 (q, n)`` or ``w2_a (q, r)``, ``w2_b (r, n)`` (PEFT's names without ``lokr_``)."""
    L, r = lokr_layout(cfg, in_features, out_features), cfg.r
    out = {"w1": (L.p, L.m)} if L.full_c else {"w1_a": (L.p, r), "w1_b": (r, L.m)}
    out.update({"w2": (L.q, L.n)} if L.full_d else {"w2_a": (L.q, r), "w2_b": (r, L.n)})
    return out


# --- the Kronecker product applied through the reshape identity ---------------------------------
# Rows per block. One block's T = X Dᵀ, Y = C T and Z = Cᵀ Ȳ are each rows·m·q numbers (1 MiB of
# float32 at 256 rows and a 32·32 split of d = 1024), so they stay in the CPU's cache between the
# two products that make and use them; done over all N rows at once each one is written to and
# read back from main memory (32 MiB each at N = 8192), which made the LoKr step 1.6x LoRA's
# on a loaded 2-core machine against about 1.05x blocked (bench/bench_lokr.py). The backward
# recomputes T per block (one small GEMM) instead of keeping the (N, m, q) array from the forward.
KRON_ROWS = 256


def kron_apply(x2, C, D, out=None, rows: int | None = KRON_ROWS):
    r"""``x2 (C ⊗ D)ᵀ`` for ``x2 (N, m·n)``, ``C (p, m)``, ``D (q, n)``, without forming ``C ⊗ D``.

    Row-major reshape: ``X = x2.reshape(N, m, n)``; then ``Y = C X Dᵀ`` per row, flattened to
    ``(N, p·q)``: ``T = X Dᵀ`` is one GEMM over the block's ``rows·m`` rows, ``C T`` a broadcast
    matmul that writes ``(rows, p, q)`` in the order the output needs (no transpose copy).

    Args:
        out: ``None`` (return a new ``(N, p·q)`` array) or an ``(N, p·q)`` array the product is
            **added** to, block by block (the layer's ``y = x W0ᵀ + b``: no second ``(N, out)`` pass).
        rows: rows per block (:data:`KRON_ROWS`; ``None``: all ``N`` at once, the plain form).
    Returns:
        ``out`` (or the new array).
    """
    N = x2.shape[0]
    (p, m), (q, n) = C.shape, D.shape
    X = x2.reshape(N, m, n)
    if out is None:
        out = array_module(x2).zeros((N, p * q), dtype=np.result_type(x2.dtype, C.dtype, D.dtype))
    step = N if rows is None else rows
    for i in range(0, N, step):
        Xb = X[i:i + step]  # (rows, m, n)
        T = (Xb.reshape(-1, n) @ D.T).reshape(-1, m, q)  # T = X Dᵀ, one GEMM
        out[i:i + step] += np.matmul(C, T).reshape(-1, p * q)  # Y = C T   (rows, p, q), flattened
    return out


def kron_apply_backward(dy2, x2, C, D, dx=None, rows: int | None = KRON_ROWS):
    r"""Gradients of ``⟨ȳ, x2 (C ⊗ D)ᵀ⟩``: ``(x̄2 (N, m·n), C̄ (p, m), D̄ (q, n))``.

    With Ȳ = ȳ.reshape(N, p, q), T = X Dᵀ (recomputed) and Z = Cᵀ Ȳ (N, m, q)::

        C̄ = Σ_N Ȳ Tᵀ,   D̄ = Σ_N Zᵀ X,   X̄ = Z D

    accumulated block by block (``rows`` as in :func:`kron_apply`). ``dx``: ``None`` or an
    ``(N, m·n)`` array that X̄ is **added** to (the layer's ``ȳ W0``). (A scale folded into ``C``
    by the caller carries into X̄ and D̄ through Z; C̄ is then the gradient with respect to the
    scaled C.)
    """
    N = x2.shape[0]
    (p, m), (q, n) = C.shape, D.shape
    X, dY = x2.reshape(N, m, n), dy2.reshape(N, p, q)
    xp, dtype = array_module(x2), np.result_type(dy2.dtype, x2.dtype, C.dtype, D.dtype)
    if dx is None:
        dx = xp.zeros((N, m * n), dtype=dtype)
    dC, dD = xp.zeros((p, m), dtype=dtype), xp.zeros((q, n), dtype=dtype)
    step = N if rows is None else rows
    for i in range(0, N, step):
        Xb, dYb = X[i:i + step], dY[i:i + step]  # (rows, m, n), (rows, p, q)
        T = (Xb.reshape(-1, n) @ D.T).reshape(-1, m, q)  # T = X Dᵀ, recomputed
        dC += np.matmul(dYb, T.transpose(0, 2, 1)).sum(axis=0)  # C̄ = Σ_N Ȳ Tᵀ   (p, m)
        Z = np.matmul(C.T, dYb).reshape(-1, q)  # Z = Cᵀ Ȳ   (rows·m, q)
        dD += Z.T @ Xb.reshape(-1, n)  # D̄ = Σ_N Zᵀ X   (q, n)
        dx[i:i + step] += (Z @ D).reshape(-1, m * n)  # X̄ = Z D
    return dx, dC, dD


def _blocks(params):
    """``(C, D)`` from the factor tensors (full, or the product of the low-rank pair)."""
    C = params["w1"] if params.get("w1") is not None else params["w1_a"] @ params["w1_b"]
    D = params["w2"] if params.get("w2") is not None else params["w2_a"] @ params["w2_b"]
    return C, D


class LoKrCache(NamedTuple):
    x2: np.ndarray
    C: np.ndarray
    D: np.ndarray
    Wq: object
    params: dict
    s: float
    lead: tuple
    m: np.ndarray | None = None  # the row-dropout factor (out,), or None
    active: bool = True  # False: module dropout (or an all-dropped row mask) switched the branch off


def lokr_forward(x, params, cfg: LoKrConfig, row_mask=None, active=True):
    r"""y = x W0ᵀ + b + s · x (C ⊗ D)ᵀ, the last term through ``C X Dᵀ`` (:func:`kron_apply`).

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in) (or a 4-bit tensor), "b": (out,) or None}`` and the factor
            tensors of :func:`lokr_shapes` (``w1`` or ``w1_a``/``w1_b``; ``w2`` or ``w2_a``/``w2_b``).
        cfg: gives ``s`` (``cfg.scaling``) and ``rank_dropout_scale``.
        row_mask: rank dropout's 0/1 keep-mask over the rows of ΔW, ``(out,)``, or None; divided
            by its mean when ``cfg.rank_dropout_scale`` (then an all-zero mask is a ``ValueError``).
        active: ``False``: the branch is off (module dropout): ``y = x W0ᵀ + b``, zero gradients.
    Returns:
        ``(y (..., out), cache)``.

    Backward (chapter 05 derives it), for ȳ (N, out) (times the row factor m where rank dropout
    acts: ȳ ← ȳ ⊙ m in the branch), Ȳ = ȳ.reshape(N, p, q), T = X Dᵀ, Z = Cᵀ Ȳ::

        C̄ = s Σ_N Ȳ Tᵀ    D̄ = s Σ_N Zᵀ X    x̄ = ȳ W0 + s (Z D).reshape(N, in)
        w2_ā = D̄ w2_bᵀ    w2_b̄ = w2_aᵀ D̄      (D = w2_a w2_b)
        w1_ā = C̄ w1_bᵀ    w1_b̄ = w1_aᵀ C̄      (C = w1_a w1_b, decompose_both)
    """
    Wq, b = params["W"], params["b"]
    W = weight_array(Wq, x.dtype)
    s = cfg.scaling
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = x2 @ W.T  # (N, out)
    del W
    if b is not None:
        y += b
    m = row_mask_factor(row_mask, y.shape[-1], x, rescale=cfg.rank_dropout_scale)
    if not active:
        return y.reshape(*lead, y.shape[-1]), LoKrCache(x2, None, None, Wq, params, s, lead, None, False)
    C, D = _blocks(params)
    if m is None:
        kron_apply(x2, s * C, D, out=y)  # y += s x (C ⊗ D)ᵀ; s folded into the small block
    else:
        y += kron_apply(x2, s * C, D) * m  # rows of ΔW dropped: columns of x ΔWᵀ
    return y.reshape(*lead, y.shape[-1]), LoKrCache(x2, C, D, Wq, params, s, lead, m, True)


def lokr_backward(dy, cache: LoKrCache):
    r"""Return ``(x̄, grads)``; grads: the factor tensors present, ``W`` and ``b`` None (frozen)."""
    x2, C, D, Wq, params, s, lead, m, active = cache
    W = weight_array(Wq, dy.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dx = dy2 @ W  # ȳ W0
    grads = {"W": None, "b": None}
    if not active:  # module dropout: the branch did not act, its gradient is zero
        grads |= {n: np.zeros_like(v) for n, v in params.items() if n in FACTOR_NAMES and v is not None}
        return dx.reshape(*lead, W.shape[1]), grads
    g = dy2 if m is None else dy2 * m  # ḡ = ȳ ⊙ m
    _, dC, dD = kron_apply_backward(g, x2, s * C, D, dx=dx)  # dx += X̄; X̄ and D̄ come out scaled by s
    dC *= s  # C̄ = s Σ_N Ȳ Tᵀ
    if params.get("w1") is not None:
        grads["w1"] = dC
    else:
        grads["w1_a"], grads["w1_b"] = dC @ params["w1_b"].T, params["w1_a"].T @ dC
    if params.get("w2") is not None:
        grads["w2"] = dD
    else:
        grads["w2_a"], grads["w2_b"] = dD @ params["w2_b"].T, params["w2_a"].T @ dD
    return dx.reshape(*lead, W.shape[1]), grads


def kaiming_uniform(shape, rng, dtype) -> np.ndarray:
    """PyTorch's ``kaiming_uniform_(a=√5)`` for a 2-D ``(fan_out, fan_in)`` tensor: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, shape).astype(dtype)


def lokr_init(shapes: dict, init: str, rng, dtype) -> dict:
    """Initial factor values (ΔW = 0): ``"peft"`` zeroes ``w1`` (or ``w1_a``), the rest Kaiming;
    ``"lycoris"`` zeroes ``w2`` (or ``w2_b``), the rest Kaiming."""
    zero = ("w1", "w1_a") if init == "peft" else ("w2", "w2_b")
    return {n: (np.zeros(sh, dtype=dtype) if n in zero else kaiming_uniform(sh, rng, dtype))
            for n, sh in shapes.items()}


class LoKrLinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s · C ⊗ D``. Trainable: the factor tensors
    of :func:`lokr_shapes` (``w1`` or ``w1_a``, ``w1_b``; ``w2`` or ``w2_a``, ``w2_b``).

    Args:
        base: the pretrained layer (frozen by this constructor), float or 4-bit.
        config: a :class:`LoKrConfig`.
        rng: a ``numpy.random.Generator`` (or a seed) for the Kaiming draws.
    """

    CONFIG = LoKrConfig

    def __init__(self, base, config: LoKrConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        self.rng = as_rng(rng)
        self.layout = lokr_layout(config, self.in_features, self.out_features)
        shapes = lokr_shapes(config, self.in_features, self.out_features)
        for n, v in lokr_init(shapes, config.init, self.rng, self.weight_dtype).items():
            setattr(self, n, Parameter(v))

    def _factors(self) -> dict:
        return {n: getattr(self, n).data for n in FACTOR_NAMES if n in self._params}

    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(C (p, m), D (q, n))``: the two Kronecker blocks (products where low rank)."""
        return _blocks(self._factors())

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s · C ⊗ D, shape (out, in) (formed only here, for merging and tests)."""
        C, D = self.blocks()
        return self.scaling * np.kron(C, D)

    def _delta_weight_f64(self) -> np.ndarray:
        C, D = _blocks({n: v.astype(np.float64) for n, v in self._factors().items()})
        return self.scaling * np.kron(C, D)

    def _forward(self, x):
        c = self.config
        row_mask, active = draw_row_dropout(self.rng, self.out_features, c.rank_dropout, c.module_dropout,
                                            self.training, self.weight_dtype)
        b = None if self.base.bias is None else self.base.bias.data
        y, self._cache = lokr_forward(x, {"W": self.w0_operand(), "b": b, **self._factors()}, c,
                                      row_mask=row_mask, active=active)
        return y

    def _backward(self, dy):
        dx, grads = lokr_backward(dy, self._pop_cache())
        for n in self._factors():
            getattr(self, n).accumulate(grads[n])
        return dx

    def extra_repr(self) -> str:
        L = self.layout
        return (f"{super().extra_repr()}, C=({L.p}, {L.m}){' full' if L.full_c else ' low-rank'}, "
                f"D=({L.q}, {L.n}){' full' if L.full_d else ' low-rank'}")


# --- PEFT (peft.tuners.lokr) ----------------------------------------------------------------------
PEFT_OPTIONS = ("r", "alpha", "rank_pattern", "alpha_pattern", "decompose_both", "decompose_factor",
                "init_weights", "rank_dropout", "module_dropout", "rank_dropout_scale", "use_effective_conv2d")


def _to_peft(configs: dict) -> dict:
    from lowrank_ref.io import peft_default_and_pattern, peft_uniform

    r, rank_pattern = peft_default_and_pattern(configs, "r")
    alpha, alpha_pattern = peft_default_and_pattern(configs, "alpha")
    init = peft_uniform(configs, "init")
    return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "decompose_both": peft_uniform(configs, "decompose_both"),
            "decompose_factor": peft_uniform(configs, "decompose_factor"),
            "init_weights": True if init == "peft" else "lycoris",
            "rank_dropout": peft_uniform(configs, "rank_dropout"),
            "module_dropout": peft_uniform(configs, "module_dropout"),
            "rank_dropout_scale": peft_uniform(configs, "rank_dropout_scale"), "use_effective_conv2d": False}


def _from_peft(c: dict, path: str) -> LoKrConfig:
    from lowrank_ref.io import peft_pattern

    init = c.get("init_weights", True)
    if init not in (True, False, "lycoris"):
        raise ValueError(f"init_weights={init!r} is not supported; supported: true, false, 'lycoris'")
    return LoKrConfig(r=peft_pattern(c.get("rank_pattern"), path, c.get("r", 8), "rank_pattern"),
                      alpha=peft_pattern(c.get("alpha_pattern"), path, c.get("alpha", 8), "alpha_pattern"),
                      decompose_both=c.get("decompose_both", False), decompose_factor=c.get("decompose_factor", -1),
                      init="lycoris" if init == "lycoris" else "peft",
                      rank_dropout=c.get("rank_dropout", 0.0), module_dropout=c.get("module_dropout", 0.0),
                      rank_dropout_scale=c.get("rank_dropout_scale", False))


SPEC = MethodSpec(
    name="lokr",
    config=LoKrConfig,
    numpy="lowrank_ref.adapters.lokr:LoKrLinear",
    torch="lowrank_gpu.adapters.lokr:LoKrLinear",
    description="LoKr (LyCORIS): ΔW = (α/r) C ⊗ (B A), sizes by PEFT's factorization rule",
    overridable=("r", "alpha"),
    file_metadata=lambda cfg: {"scaling": float(cfg.scaling), "scaling_rule": "alpha/r"},
    shapes=lokr_shapes,
    peft=PeftMapping("LOKR", {n: f"lokr_{n}" for n in FACTOR_NAMES}, to_peft=_to_peft, from_peft=_from_peft,
                     options=PEFT_OPTIONS),
    # 6 = 2·3, 8 = 2·4: C (2, 2) full, D (4, 3) = B A with r = 1 < 4/2; decompose_both would need
    # r < 1, so C stays full. Non-zero through the contract's own perturbation.
    example=lambda: Example(6, 8, LoKrConfig(r=1, alpha=3.0)),
    compare={
        # about LoRA's budget (r = 8 on q, v: 1,024 per 64x64 layer): f = 2 gives C (2, 2) and
        # D (32, 32) = B A of rank 15: 4 + 960 = 964 per layer, rank up to 2·15 = 30; s = 2 as LoRA's
        "lokr": CompareRow(LoKrConfig(r=15, alpha=30.0, decompose_factor=2), targets=("q", "v"), lr=1e-2, order=36),
    },
)
