r"""LoHa: a frozen linear layer plus the Hadamard product of two low-rank updates (Hyeon-Woo et al.
2022, FedPara, arXiv:2108.06098; as a fine-tuning method in LyCORIS, Yeh et al. 2024,
arXiv:2309.14859, Eq. 3). Chapter 05, §"The Hadamard product", derives both routes' backward passes.

PyTorch layout, ``W0 (out, in)``; ``A1, A2 (r, in)``, ``B1, B2 (out, r)``, ``s = α/r``::

    ΔW = s (B1 A1) ⊙ (B2 A2)                                  (out, in), rank ≤ r²
    y  = x W0ᵀ + b + (x ΔWᵀ) ⊙ m                              m: the rank-dropout row mask (or 1)

Two routes compute ``x ΔWᵀ`` and give the same numbers:

* **dense** (what PEFT and LyCORIS do): build ``ΔW`` (out, in) on every call, then one matmul.
* **factorised**: the face-splitting identity ``(B1 A1) ⊙ (B2 A2) = (B1 • B2)(A1 ∗ A2)``, with
  ``K_B = B1 • B2 (out, r²)`` (row ``i`` is ``B1[i] ⊗ B2[i]``, the row-wise Kronecker product) and
  ``K_A = A1 ∗ A2 (r², in)`` (column ``j`` is ``A1[:, j] ⊗ A2[:, j]``, the column-wise one), so
  ``x ΔWᵀ = s (x K_Aᵀ) K_Bᵀ``: a rank-r² LoRA whose factors are built from the four small ones.

``route="auto"`` picks the cheaper by counting multiply-adds for the forward and backward
(:func:`loha_route`): about ``3 N·in·out`` (dense) against ``3 N r² (in + out)`` (factorised),
so the factorised route wins when ``r² < in·out / (in + out)``: for a square ``d × d`` layer,
when ``r < √(d/2)`` (``r ≤ 22`` at ``d = 1024``).

Init (PEFT's default, ``init_weights=True``): ``B1``, ``A1``, ``B2`` Kaiming-uniform with
``a = √5`` (``U(±1/√fan_in)``: ``1/√r`` for the ``B``'s, ``1/√in`` for ``A1``) and ``A2 = 0``, so
``ΔW = 0``. LyCORIS's module zeroes ``B2`` instead (``hada_w2_a``) and draws the others from
normals; either way one factor of the second product is zero, and the first step moves only that
factor (its gradient is ``s B2ᵀ (Ḡ ⊙ B1 A1)`` or the mirror image).

``rank_dropout`` (PEFT's name) does not drop ranks: it draws a keep-mask over the **rows of ΔW**
(the output features), ``m_i ~ Bernoulli(1 − p)``, divided by its mean (PEFT LoHa always rescales).
When every row is dropped PEFT divides by zero; here that draw switches the branch off for the
step (``ΔW ⊙ 0 = 0``, the limit of the rescaled product), and the pure function refuses an
all-zero mask given explicitly. ``module_dropout`` switches the whole branch off with probability
``p`` per training forward. Neither acts in eval mode; PEFT's LoHa has no input dropout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.config import check_alpha, check_dropout, check_rank
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.quant.linear import weight_array
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping

__all__ = ["LoHaConfig", "LoHaLinear", "loha_forward", "loha_backward", "loha_route", "face_split",
           "init_loha", "draw_row_dropout", "row_mask_factor", "SPEC"]

LOHA_ROUTES = ("auto", "dense", "factorised")


@dataclass(frozen=True)
class LoHaConfig:
    r"""LoHa: ``ΔW = s (B1 A1) ⊙ (B2 A2)``, ``A1, A2 (r, in)``, ``B1, B2 (out, r)``, ``s = α/r``.

    Args:
        r: the rank of each of the two products, a positive integer; ``ΔW`` has rank at most
            ``min(r², in, out)`` with ``2 r (in + out)`` parameters, those of a rank-``2r`` LoRA.
        alpha: the numerator of ``s = alpha / r`` (PEFT's and LyCORIS's rule; no rsLoRA in PEFT).
        rank_dropout: PEFT's name for a dropout over the **rows** of ``ΔW`` (output features), in
            [0, 1), rescaled by the mask's mean; training only.
        module_dropout: the probability, in [0, 1), that a training forward skips the branch.
        route: ``"dense"`` (build ΔW), ``"factorised"`` (face-splitting, never builds ΔW) or
            ``"auto"`` (the cheaper for the call's shape, :func:`loha_route`). Same numbers either way.
    """

    r: int = 4
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    route: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "rank_dropout", check_dropout(self.rank_dropout, "rank_dropout"))
        object.__setattr__(self, "module_dropout", check_dropout(self.module_dropout, "module_dropout"))
        if not isinstance(self.route, str):
            raise TypeError(f"route must be a string, one of {LOHA_ROUTES}, got {self.route!r}")
        if self.route not in LOHA_ROUTES:
            raise ValueError(f"route must be one of {LOHA_ROUTES}, got {self.route!r}")

    @property
    def scaling(self) -> float:
        """``s = alpha / r``."""
        return self.alpha / self.r

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


def loha_route(n_rows: int, in_features: int, out_features: int, r: int) -> str:
    r"""``"dense"`` or ``"factorised"``: the route with fewer multiply-adds for a forward and
    backward over ``n_rows`` rows (chapter 05 counts them):

    * dense: ``3 N·in·out`` (forward ``x ΔWᵀ``; backward ``Ḡᵀ x`` and ``Ḡ ΔW``) plus
      ``8 r·in·out`` (``B1 A1``, ``B2 A2`` built in the forward and again in the backward, and
      the four factor gradients);
    * factorised: ``3 N r² (in + out)`` (``x K_Aᵀ``, ``h K_Bᵀ``; backward ``ḡᵀ h``, ``ḡ K_B``,
      ``h̄ᵀ x``, ``h̄ K_A``) plus ``3 r² (in + out)`` (building ``K_A``, ``K_B`` and contracting
      their gradients back to the four factors).
    """
    dense = 3 * n_rows * in_features * out_features + 8 * r * in_features * out_features
    factorised = 3 * (n_rows + 1) * r * r * (in_features + out_features)
    return "factorised" if factorised < dense else "dense"


def draw_row_dropout(rng, out_features: int, rank_dropout: float, module_dropout: float, training: bool,
                     dtype=np.float64):
    r"""One training forward's draws of PEFT's two LyCORIS dropouts: ``(keep or None, active)``.

    * ``module_dropout``: with probability ``p`` the whole branch is off (``active = False``).
    * ``rank_dropout``: ``keep_i = [u_i > p]``, ``u ~ U(0, 1)^out``: a 0/1 mask over the **rows of
      ΔW** (output features), not over ranks. Not rescaled here (LoHa always divides by its mean,
      LoKr only with ``rank_dropout_scale``). A draw that drops every row gives ``active = False``:
      ``ΔW ⊙ 0 = 0``, where PEFT's rescale divides by zero.

    Neither acts outside training (``(None, True)``). ``rng`` is a ``numpy.random.Generator``;
    nothing is drawn for a probability of 0 (PEFT draws ``rand(1)`` every training forward).
    """
    if not training:
        return None, True
    if module_dropout > 0 and rng.random() < module_dropout:
        return None, False  # the branch skips this step
    if rank_dropout > 0:
        keep = (rng.random(out_features) > rank_dropout).astype(dtype)
        if not keep.any():
            return None, False  # every row dropped: ΔW ⊙ 0 = 0 (PEFT's rescale divides by zero)
        return keep, True
    return None, True


def row_mask_factor(row_mask, out_features: int, x, rescale: bool = True):
    r"""The factor ``m (out,)`` that multiplies the columns of ``x ΔWᵀ`` (rows of ΔW), or None.

    ``row_mask`` is a 0/1 keep-mask (``(out,)``) or None; with ``rescale`` it is divided by its
    mean (``m = keep / mean(keep)``), so an all-zero mask is a ``ValueError`` (PEFT returns NaN
    there); without it ``m = keep``."""
    if row_mask is None:
        return None
    keep = array_module(x).asarray(row_mask, dtype=x.dtype).reshape(-1)
    if keep.shape != (out_features,):
        raise ValueError(f"row_mask must have shape ({out_features},) (one entry per output row of ΔW), "
                         f"got {keep.shape}")
    if not rescale:
        return keep
    total = float(keep.sum())
    if total == 0:
        raise ValueError("row_mask drops every row of ΔW: its mean is 0, and rescaling by it divides by zero "
                         "(PEFT returns NaN here); skip the branch instead (active=False)")
    return keep * (out_features / total)  # m = keep / mean(keep)


def face_split(A1, A2, B1, B2):
    r"""``(K_A, K_B)``: ``K_A = A1 ∗ A2 (r², in)``, ``K_B = B1 • B2 (out, r²)``, index ``(p, q) → p r + q``.

    ``K_A[(p,q), j] = A1[p, j] A2[q, j]`` (column-wise Kronecker), ``K_B[i, (p,q)] = B1[i, p] B2[i, q]``
    (row-wise Kronecker), so ``(K_B K_A)[i, j] = Σ_p B1[i,p] A1[p,j] · Σ_q B2[i,q] A2[q,j]``:
    ``K_B K_A = (B1 A1) ⊙ (B2 A2)`` (the face-splitting identity).
    """
    r, n_in = A1.shape
    KA = (A1[:, None, :] * A2[None, :, :]).reshape(r * r, n_in)  # (r², in)
    KB = (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], r * r)  # (out, r²)
    return KA, KB


class LoHaCache(NamedTuple):
    """What ``loha_backward`` needs from the forward (leading axes flattened to ``N`` rows)."""

    x2: np.ndarray  # x (N, in)
    Wq: object  # W0 (out, in), or a 4-bit tensor rebuilt per pass
    A1: np.ndarray
    A2: np.ndarray
    B1: np.ndarray
    B2: np.ndarray
    s: float
    m: np.ndarray | None  # the rescaled row mask (out,), or None
    route: str  # "dense", "factorised", or "off" (module dropout: the branch skipped)
    h: np.ndarray | None  # factorised: x K_Aᵀ (N, r²)
    lead: tuple  # x.shape[:-1]


def loha_forward(x, params, cfg: LoHaConfig, row_mask=None, active=True):
    r"""y = x W0ᵀ + b + (x ΔWᵀ) ⊙ m, with ΔW = s (B1 A1) ⊙ (B2 A2).

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in) (or a 4-bit tensor), "b": (out,) or None, "A1", "A2": (r, in),
            "B1", "B2": (out, r)}``.
        cfg: gives ``s`` and the route (``"auto"`` resolved by :func:`loha_route` for this call).
        row_mask: rank dropout's keep-mask over the rows of ΔW, ``(out,)`` of 0/1 (not yet
            rescaled; divided here by its mean), or None. An all-zero mask is a ``ValueError``.
        active: ``False``: the branch is off (module dropout): ``y = x W0ᵀ + b``, zero gradients.
    Returns:
        ``(y (..., out), cache)``.

    Backward, for upstream ȳ (N, out) and ḡ = ȳ ⊙ m (derived in chapter 05):

    * dense, with P1 = B1 A1, P2 = B2 A2 (out, in), recomputed in the backward::

          Ḡ = ḡᵀ x (out, in)    P̄1 = s Ḡ ⊙ P2    P̄2 = s Ḡ ⊙ P1    x̄ = ȳ W0 + ḡ ΔW
          Ā1 = B1ᵀ P̄1   B̄1 = P̄1 A1ᵀ   Ā2 = B2ᵀ P̄2   B̄2 = P̄2 A2ᵀ

    * factorised, with h = x K_Aᵀ (N, r²)::

          K̄_B = s ḡᵀ h (out, r²)    h̄ = s ḡ K_B (N, r²)    K̄_A = h̄ᵀ x (r², in)    x̄ = ȳ W0 + h̄ K_A
          B̄1[i,p] = Σ_q K̄_B[i,(p,q)] B2[i,q]    B̄2[i,q] = Σ_p K̄_B[i,(p,q)] B1[i,p]
          Ā1[p,j] = Σ_q K̄_A[(p,q),j] A2[q,j]    Ā2[q,j] = Σ_p K̄_A[(p,q),j] A1[p,j]
    """
    Wq, b = params["W"], params["b"]
    A1, A2, B1, B2 = params["A1"], params["A2"], params["B1"], params["B2"]
    if A1.shape != A2.shape or B1.shape != B2.shape or A1.shape[0] != B1.shape[1]:
        raise ValueError(f"LoHa factors must be A1, A2 (r, in) and B1, B2 (out, r), got A1 {A1.shape}, "
                         f"A2 {A2.shape}, B1 {B1.shape}, B2 {B2.shape}")
    W = weight_array(Wq, x.dtype)
    s, (out, n_in), r = cfg.scaling, W.shape, A1.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)  # (N, in)
    y = x2 @ W.T  # (N, out)
    del W
    if b is not None:
        y += b
    m = row_mask_factor(row_mask, out, x, rescale=True)
    if not active:
        return y.reshape(*lead, out), LoHaCache(x2, Wq, A1, A2, B1, B2, s, None, "off", None, lead)
    route = cfg.route if cfg.route != "auto" else loha_route(x2.shape[0], n_in, out, r)
    h = None
    if route == "dense":
        D = (B1 @ A1) * (B2 @ A2)  # (B1 A1) ⊙ (B2 A2)   (out, in)
        D *= s  # ΔW = s (B1 A1) ⊙ (B2 A2)
        z = x2 @ D.T  # x ΔWᵀ   (N, out)
    else:
        KA, KB = face_split(A1, A2, B1, B2)  # (r², in), (out, r²)
        h = x2 @ KA.T  # h = x K_Aᵀ   (N, r²)
        z = (s * h) @ KB.T  # x ΔWᵀ = s h K_Bᵀ   (N, out), scaled on the small side
    if m is not None:
        z *= m  # rows of ΔW dropped: columns of x ΔWᵀ
    y += z
    return y.reshape(*lead, out), LoHaCache(x2, Wq, A1, A2, B1, B2, s, m, route, h, lead)


def loha_backward(dy, cache: LoHaCache):
    r"""Return ``(x̄, grads)``; grads: ``A1, A2, B1, B2`` arrays, ``W`` and ``b`` None (frozen)."""
    x2, Wq, A1, A2, B1, B2, s, m, route, h, lead = cache
    W = weight_array(Wq, dy.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dx = dy2 @ W  # ȳ W0   (N, in)
    del W
    grads = {"W": None, "b": None}
    if route == "off":  # module dropout: the branch did not act, its gradient is zero
        grads |= {n: np.zeros_like(p) for n, p in (("A1", A1), ("A2", A2), ("B1", B1), ("B2", B2))}
        return dx.reshape(*lead, x2.shape[1]), grads
    g = dy2 if m is None else dy2 * m  # ḡ = ȳ ⊙ m   (N, out)
    r = A1.shape[0]
    if route == "dense":
        P1, P2 = B1 @ A1, B2 @ A2  # recomputed: the forward kept no (out, in) array
        dD = g.T @ x2  # Ḡ = ḡᵀ x   (out, in)
        dx += g @ (s * (P1 * P2))  # + ḡ ΔW
        dP1 = dD * P2
        dP1 *= s  # P̄1 = s Ḡ ⊙ P2
        dP2 = dD * P1
        dP2 *= s  # P̄2 = s Ḡ ⊙ P1
        grads |= {"A1": B1.T @ dP1, "B1": dP1 @ A1.T, "A2": B2.T @ dP2, "B2": dP2 @ A2.T}
    else:
        KA, KB = face_split(A1, A2, B1, B2)
        dKB = g.T @ h  # (out, r²)
        dKB *= s  # K̄_B = s ḡᵀ h
        dh = g @ KB  # (N, r²)
        dh *= s  # h̄ = s ḡ K_B
        dKA = dh.T @ x2  # K̄_A = h̄ᵀ x   (r², in)
        dx += dh @ KA  # + h̄ K_A
        dKB = dKB.reshape(-1, r, r)  # (out, p, q)
        dKA = dKA.reshape(r, r, -1)  # (p, q, in)
        grads |= {"B1": (dKB * B2[:, None, :]).sum(axis=2),  # B̄1[i,p] = Σ_q K̄_B[i,p,q] B2[i,q]
                  "B2": (dKB * B1[:, :, None]).sum(axis=1),  # B̄2[i,q] = Σ_p K̄_B[i,p,q] B1[i,p]
                  "A1": (dKA * A2[None, :, :]).sum(axis=1),  # Ā1[p,j] = Σ_q K̄_A[p,q,j] A2[q,j]
                  "A2": (dKA * A1[:, None, :]).sum(axis=0)}  # Ā2[q,j] = Σ_p K̄_A[p,q,j] A1[p,j]
    return dx.reshape(*lead, x2.shape[1]), grads


def init_loha(r: int, in_features: int, out_features: int, rng, dtype) -> dict:
    r"""PEFT's default init: ``B1, B2 ~ U(±1/√r)``, ``A1 ~ U(±1/√in)`` (Kaiming-uniform, a = √5,
    on each tensor's own fan-in), ``A2 = 0``: so ``ΔW = 0``."""
    kb, ka = 1.0 / np.sqrt(r), 1.0 / np.sqrt(in_features)
    B1 = rng.uniform(-kb, kb, (out_features, r)).astype(dtype)
    A1 = rng.uniform(-ka, ka, (r, in_features)).astype(dtype)
    B2 = rng.uniform(-kb, kb, (out_features, r)).astype(dtype)
    A2 = np.zeros((r, in_features), dtype=dtype)  # A2 = 0 (PEFT's hada_w2_b): ΔW = 0 at init
    return {"A1": A1, "A2": A2, "B1": B1, "B2": B2}


class LoHaLinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s (B1 A1) ⊙ (B2 A2)``.
    Trainable: ``A1``, ``A2`` ``(r, in)``, ``B1``, ``B2`` ``(out, r)``.

    Args:
        base: the pretrained layer (frozen by this constructor); a float ``Linear`` or a 4-bit
            :class:`~lowrank_ref.quant.QuantizedLinear`.
        config: a :class:`LoHaConfig`.
        rng: a ``numpy.random.Generator`` (or a seed) for the init and both dropouts.
    """

    CONFIG = LoHaConfig

    def __init__(self, base, config: LoHaConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        self.rng = as_rng(rng)
        init = init_loha(config.r, self.in_features, self.out_features, self.rng, self.weight_dtype)
        self.A1 = Parameter(init["A1"])  # (r, in)
        self.A2 = Parameter(init["A2"])  # (r, in), zero at init
        self.B1 = Parameter(init["B1"])  # (out, r)
        self.B2 = Parameter(init["B2"])  # (out, r)

    def delta_weight(self) -> np.ndarray:
        r"""ΔW = s (B1 A1) ⊙ (B2 A2), shape (out, in)."""
        return self.scaling * ((self.B1.data @ self.A1.data) * (self.B2.data @ self.A2.data))

    def _delta_weight_f64(self) -> np.ndarray:
        f = {n: p.data.astype(np.float64) for n, p in self.adapter_parameters().items()}
        return self.scaling * ((f["B1"] @ f["A1"]) * (f["B2"] @ f["A2"]))

    def _masks(self):
        """``(row_mask, active)`` for this forward: both dropouts act only while training."""
        c = self.config
        return draw_row_dropout(self.rng, self.out_features, c.rank_dropout, c.module_dropout, self.training,
                                self.weight_dtype)

    def _forward(self, x):
        row_mask, active = self._masks()
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0_operand(), "b": b, "A1": self.A1.data, "A2": self.A2.data,
                  "B1": self.B1.data, "B2": self.B2.data}
        y, self._cache = loha_forward(x, params, self.config, row_mask=row_mask, active=active)
        return y

    def _backward(self, dy):
        dx, grads = loha_backward(dy, self._pop_cache())
        for n in ("A1", "A2", "B1", "B2"):
            getattr(self, n).accumulate(grads[n])
        return dx


# --- PEFT (peft.tuners.loha) -------------------------------------------------------------------
# PEFT's defaults where a field is absent: r = 8, alpha = 8, rank_dropout = module_dropout = 0.
PEFT_OPTIONS = ("r", "alpha", "rank_dropout", "module_dropout", "rank_pattern", "alpha_pattern",
                "init_weights", "use_effective_conv2d")


def _to_peft(configs: dict) -> dict:
    from lowrank_ref.io import peft_default_and_pattern, peft_uniform

    r, rank_pattern = peft_default_and_pattern(configs, "r")
    alpha, alpha_pattern = peft_default_and_pattern(configs, "alpha")
    return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "rank_dropout": peft_uniform(configs, "rank_dropout"),
            "module_dropout": peft_uniform(configs, "module_dropout"),
            "init_weights": True, "use_effective_conv2d": False}


def _from_peft(c: dict, path: str) -> LoHaConfig:
    from lowrank_ref.io import peft_pattern

    for flag in ("init_weights", "use_effective_conv2d"):  # the tensors are loaded; the conv flag is conv-only
        if not isinstance(c.get(flag, False), bool):
            raise ValueError(f"{flag} must be true or false, got {c[flag]!r}")
    return LoHaConfig(r=peft_pattern(c.get("rank_pattern"), path, c.get("r", 8), "rank_pattern"),
                      alpha=peft_pattern(c.get("alpha_pattern"), path, c.get("alpha", 8), "alpha_pattern"),
                      rank_dropout=c.get("rank_dropout", 0.0), module_dropout=c.get("module_dropout", 0.0))


def loha_shapes(cfg: LoHaConfig, in_features: int, out_features: int) -> dict:
    """A1, A2 (r, in), B1, B2 (out, r): what a LoHa layer's file holds."""
    return {"A1": (cfg.r, in_features), "A2": (cfg.r, in_features),
            "B1": (out_features, cfg.r), "B2": (out_features, cfg.r)}


SPEC = MethodSpec(
    name="loha",
    config=LoHaConfig,
    numpy="lowrank_ref.adapters.loha:LoHaLinear",
    torch="lowrank_gpu.adapters.loha:LoHaLinear",
    description="LoHa, Hyeon-Woo et al. 2022 (FedPara) / LyCORIS: ΔW = (α/r) (B1 A1) ⊙ (B2 A2)",
    overridable=("r", "alpha"),
    file_metadata=lambda cfg: {"scaling": float(cfg.scaling), "scaling_rule": "alpha/r"},
    shapes=loha_shapes,
    peft=PeftMapping("LOHA", {"B1": "hada_w1_a", "A1": "hada_w1_b", "B2": "hada_w2_a", "A2": "hada_w2_b"},
                     to_peft=_to_peft, from_peft=_from_peft, options=PEFT_OPTIONS),
    # the factorised route in the contract tests (its dense twin is what they compare against)
    example=lambda: Example(6, 5, LoHaConfig(r=2, alpha=3.0, route="factorised")),
    compare={
        # at the lora row's budget: r = 4 has 2·4·(in + out) parameters, those of LoRA r = 8, and
        # the same s = 2 (α = 8, r = 4; LoRA's α = 16, r = 8), on the same q and v. lr from
        # {1e-2, 3e-2, 1e-1}, one default 300-step run each (dialect accuracy after: 0.295, 0.340,
        # 0.322); LoRA at 3e-2 reached 0.345 in the same run (its row keeps 1e-2)
        "loha": CompareRow(LoHaConfig(r=4, alpha=8), targets=("q", "v"), lr=3e-2, order=40),
    },
)
