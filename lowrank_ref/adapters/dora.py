r"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

DoRA splits each output row of the adapted weight into a length and a direction. With the
LoRA update inside the direction, ``V = W0 + s B A`` (out, in), its row norms
``n_j = ‖V_j‖`` (over the input axis) and a trainable magnitude ``m`` (out,):

.. math::
    W' = \operatorname{diag}(m / n)\, V, \qquad
    y = x W'^\top + b = g \odot \big(x W_0^\top + s\,(x A^\top) B^\top\big) + b,
    \qquad g = m / n \;(\text{out},).

The bias is not rescaled. ``A (r, in)``, ``B (out, r)``, ``s = α/r`` (``α/√r`` with rsLoRA).
Init: ``B = 0`` and ``m = ‖W0_j‖`` row by row, so ``g = 1`` and DoRA starts as the base layer.
Trainable: ``A``, ``B``, ``m``.

**The norm without ΔW.** Row by row,

.. math::
    n_j^2 = \|W_{0,j}\|^2 + 2s\,\langle (W_0 A^\top)_j, B_j\rangle + s^2\, B_j (A A^\top) B_j^\top ,

which needs ``W0 Aᵀ`` (out, r), ``A Aᵀ`` (r, r) and ``‖W0_j‖²`` (cached: ``W0`` is frozen), never
the (out, in) matrix ``V``. The expansion cancels when ``V_j`` is much shorter than ``W0_j`` and
``s ΔW_j`` (``ΔW`` undoing ``W0``): rows where ``n_j² < 0.1 (‖W0_j‖² + s²‖(BA)_j‖²)`` are recomputed
from ``V_j`` directly, so the relative error of ``n`` stays a few units of rounding.

**Dropout.** As in LoRA, dropout acts on the adapter's input only, ``x̃ = x ⊙ M`` (inverted
dropout: ``M`` is 0 or ``1/(1−p)``, ``E[M] = 1``). Two forms of the output, picked by
``DoRAConfig.dropout_correction``:

``"shared"`` (the default): the row scale multiplies the base output that the layer computes
anyway, on the undropped input,

.. math::
    y = g \odot \big(x W_0^\top + s\,(\tilde x A^\top) B^\top\big) + b ,

at LoRA-with-dropout's cost (one ``N·d·d`` product forward, one backward).

``"dropped"`` (PEFT's form, ``peft/tuners/lora/variants.py`` ``DoraLinearVariant.forward``, which
recomputes the base output on the dropped input): the adapter's contribution
``Δy(x) = g ⊙ x Vᵀ − x W0ᵀ`` is fed ``x̃``,

.. math::
    y = x W_0^\top + b + (g - 1) \odot (\tilde x W_0^\top) + g \odot s\,(\tilde x A^\top) B^\top ,

one more ``N·d·d`` product forward and one backward. The two differ by
``(g − 1) ⊙ (x̃ − x) W0ᵀ``, which is zero at ``p = 0`` and in eval mode (``x̃ = x``) and has mean
zero over the masks: both are affine in ``M``, with expectation the eval output. Without dropout
both are ``y = g ⊙ z + b``.

**Backward.** Write ``h = x̃ Aᵀ`` (N, r) and ``z = u + s h Bᵀ`` (N, out), with ``u = x W0ᵀ``
("shared") or ``u = x̃ W0ᵀ`` ("dropped"); then ``y = g ⊙ z + b`` ("shared") or
``y = x W0ᵀ − x̃ W0ᵀ + g ⊙ z + b`` ("dropped"). For upstream ``ȳ`` (N, out):

.. math::
    \bar g = \textstyle\sum_N \bar y \odot z, \qquad
    \bar m = \bar g / n, \qquad
    \bar z = \bar y \odot g, \qquad
    \bar B = s\,\bar z^\top h, \qquad
    \bar A = s\,(\bar z B)^\top \tilde x,

.. math::
    \text{shared: } \bar x = \bar z W_0 + \big[s (\bar z B) A\big] \odot M, \qquad
    \text{dropped: } \bar x = \bar y W_0 + \big[(\bar z - \bar y) W_0 + s (\bar z B) A\big] \odot M

(without dropout both are ``x̄ = z̄ W0 + s (z̄ B) A``). That is the whole gradient with
``detach_norm=True``, where ``n`` is a constant (§4.3 of the paper; PEFT detaches the norm too).

The exact gradient (``detach_norm=False``) adds the path through ``n``:
``n̄ = −ḡ m / n²`` and ``∂n_j/∂V_j = V_j / n_j``, so ``V̄ += diag(c) V`` with ``c = −ḡ m / n³``, and

.. math::
    \bar B \mathrel{+}= s\,\operatorname{diag}(c)\,\big(W_0 A^\top + s\, B (A A^\top)\big), \qquad
    \bar A \mathrel{+}= s\,(cB)^\top W_0 + s^2\, (cB)^\top B A ,

reusing ``W0 Aᵀ`` from the forward. Per row this is the paper's projection: with
``G = ȳᵀ x̃`` (the gradient w.r.t. ``W'``) and ``V̂_j = V_j/n_j``,
``V̄_j = (m_j/n_j)(G_j − ⟨G_j, V̂_j⟩ V̂_j)``: the component of ``G_j`` along the current direction
is removed (it belongs to ``m``: ``m̄_j = ⟨G_j, V̂_j⟩``).

**Zero-norm rows (the rule).** Where ``n_j = 0`` the direction is undefined; DoRA sets
``g_j = 0``: that row outputs its bias, and it gets no gradient (``m̄_j = 0``, no path to ``B_j``).
A base weight with an all-zero row is accepted (the row's output, ``b_j``, equals the base
layer's, so DoRA still starts as the identity) with a warning, because that row can never train.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import (
    PEFT_OPTIONS,
    init_lora_A,
    lora_from_peft,
    lora_shapes,
    lora_to_peft,
)
from lowrank_ref.config import ScaledLowRankConfig, check_bool, scaling_metadata
from lowrank_ref.nn.module import Parameter, array_module, as_rng
from lowrank_ref.quant.linear import weight_array
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping

DORA_INITS = ("kaiming", "gaussian")
DROPOUT_CORRECTIONS = ("shared", "dropped")


@dataclass(frozen=True)
class DoRAConfig(ScaledLowRankConfig):
    r"""DoRA (Liu et al. 2024, arXiv:2402.09353): ``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖`` row-wise.

    Args:
        r, alpha, dropout, rslora: as in :class:`LoRAConfig` (``s = alpha/r`` or ``alpha/sqrt(r)``).
        detach_norm: treat the row norm ``n = ‖W0 + s B A‖`` as a constant in the backward pass
            (the paper's §4.3, and what PEFT does); ``False`` gives the exact gradient, with the
            projection term.
        init: ``"kaiming"`` or ``"gaussian"`` for ``A`` (``B = 0`` either way).
        dropout_correction: with ``dropout > 0`` in training, which base output the row scale
            corrects (module docstring): ``"shared"`` (the default) rescales the undropped base
            output the layer computes anyway, ``y = g ⊙ (x W0ᵀ + s x̃ Aᵀ Bᵀ) + b``, at
            LoRA-with-dropout's cost; ``"dropped"`` is PEFT's form, which recomputes the base on
            the dropped input, ``y = x W0ᵀ + (g − 1) ⊙ x̃ W0ᵀ + g ⊙ s x̃ Aᵀ Bᵀ + b`` (two more
            ``N·d·d`` products per step). Both are the same function at ``dropout = 0`` and in
            eval mode, and the same in expectation over the masks. Adapter files store it; a
            file written before it existed, and a PEFT folder, read as ``"dropped"`` when their
            dropout is non-zero (the form they were trained with).
    """

    detach_norm: bool = True
    init: str = "kaiming"
    dropout_correction: str = "shared"

    INITS = DORA_INITS

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "detach_norm", check_bool(self.detach_norm, "detach_norm"))
        c = self.dropout_correction
        if not isinstance(c, str):
            raise TypeError(f"dropout_correction must be a str, one of {DROPOUT_CORRECTIONS}, got {c!r} "
                            f"({type(c).__name__})")
        if c not in DROPOUT_CORRECTIONS:
            raise ValueError(f"dropout_correction must be one of {DROPOUT_CORRECTIONS}, got {c!r}")

    @classmethod
    def from_file_fields(cls, **d) -> DoRAConfig:
        """The config of a file's (or a PEFT folder's) fields: one written before
        ``dropout_correction`` existed, with non-zero dropout, was trained with ``"dropped"``
        (the only form then, and PEFT's); at ``dropout = 0`` the forms are the same function
        and the default is kept."""
        if "dropout_correction" not in d and d.get("dropout", 0.0):
            d["dropout_correction"] = "dropped"
        return cls(**d)


__all__ = ["DoRAConfig", "DROPOUT_CORRECTIONS", "DoRALinear", "dora_forward", "dora_backward", "dora_row_norm", "CANCEL_FRACTION", "SPEC"]

# rows with n² below this fraction of ‖W0_j‖² + s²‖ΔW_j‖² are recomputed densely
CANCEL_FRACTION = 0.1
NORM_METHODS = ("factored", "dense")


def dora_row_norm(W, A, B, s, *, w0_sq=None, method="factored"):
    r"""``n_j = ‖W0_j + s (B A)_j‖`` for every output row j, and ``W0 Aᵀ`` (None for ``"dense"``).

    Args:
        W: ``W0`` (out, in); A (r, in); B (out, r); s: the scaling.
        w0_sq: ``‖W0_j‖²`` (out,) if already known (it is cached by the layer).
        method: ``"factored"`` (never builds ``V``; the expansion in the module docstring, with a
            dense recompute of the rows where it cancels) or ``"dense"`` (``V = W0 + s B A``).
    Returns:
        ``(n (out,), W0At (out, r) or None)``.
    """
    if method == "dense":
        V = W + s * (B @ A)  # (out, in)
        return np.sqrt(np.einsum("oi,oi->o", V, V)), None
    if method != "factored":
        raise ValueError(f"method must be one of {NORM_METHODS}, got {method!r}")
    if w0_sq is None:
        w0_sq = np.einsum("oi,oi->o", W, W)  # ‖W0_j‖²   (out,)
    W0At = W @ A.T  # (out, r)
    cross = np.einsum("or,or->o", W0At, B)  # ⟨(W0 Aᵀ)_j, B_j⟩
    ba_sq = np.einsum("or,or->o", B @ (A @ A.T), B)  # ‖(B A)_j‖² = B_j (A Aᵀ) B_jᵀ
    n2 = w0_sq + 2 * s * cross + (s * s) * ba_sq  # n_j² = ‖W0_j‖² + 2s⟨W0Aᵀ, B⟩_j + s²‖BA‖²_j
    bad = n2 < CANCEL_FRACTION * (w0_sq + (s * s) * ba_sq)
    if np.any(bad):  # cancellation: recompute those rows from V_j itself
        Vb = W[bad] + s * (B[bad] @ A)
        n2 = n2.copy()
        n2[bad] = np.einsum("oi,oi->o", Vb, Vb)
    return np.sqrt(np.maximum(n2, 0)), W0At


def dora_forward(x, params, cfg: DoRAConfig, mask=None, method="factored"):
    r"""y = g ⊙ (x W0ᵀ + s x̃ Aᵀ Bᵀ) + b with g = m / ‖W0 + s B A‖ (row-wise); PEFT's form with
    ``cfg.dropout_correction == "dropped"``: y = x W0ᵀ + b + (g − 1) ⊙ x̃ W0ᵀ + g ⊙ s x̃ Aᵀ Bᵀ.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "B": (out, r),
            "m": (out,)}`` (``W0`` may be a 4-bit tensor, dequantised per pass: QDoRA), optionally ``"w0_sq"``: the cached ``‖W0_j‖²`` (out,), and ``"n"``:
            a norm to use as a given constant instead of computing it (with ``detach_norm=True``
            the backward is then the exact gradient of this function: that is how it is checked).
        cfg: gives ``s``, ``detach_norm`` and ``dropout_correction``.
        mask: the inverted-dropout mask shaped like ``x`` (already divided by ``1-p``), or None.
        method: how to take the row norm (:func:`dora_row_norm`).
    Returns:
        ``(y (..., out), cache)``.
    """
    Wq, b, A, B, m = params["W"], params["b"], params["A"], params["B"], params["m"]
    W = weight_array(Wq, x.dtype)  # W0, or W̃0 rebuilt from 4 bits (transient)
    s = cfg.scaling
    if params.get("n") is not None:  # a given norm, held constant (how the detached case is gradchecked)
        n, W0At = params["n"], None
    else:
        n, W0At = dora_row_norm(W, A, B, s, w0_sq=params.get("w0_sq"), method=method)  # (out,)
    live = n > 0
    g = np.where(live, m / np.where(live, n, 1), 0).astype(W.dtype)  # g = m / n; 0 on zero rows
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # (N, in): 2-D products go to BLAS (stacked ones may not)
    if mask is not None:
        mask = mask.reshape(x.shape)
    dropped = mask is not None and cfg.dropout_correction == "dropped"
    xd = x if mask is None else x * mask  # x̃ = x ⊙ M
    h = xd @ A.T  # (N, r)
    ut = (xd if dropped else x) @ W.T  # u = x W0ᵀ ("shared", and without dropout) or x̃ W0ᵀ   (N, out)
    z = ut.copy() if dropped else ut
    z += (s * h) @ B.T  # z = u + s x̃ Aᵀ Bᵀ (scaled on the (N, r) side)   (N, out)
    y = g * z  # g ⊙ z
    if dropped:
        y += x @ W.T  # + x W0ᵀ − x̃ W0ᵀ: PEFT's form, the base sees the undropped input
        y -= ut
    if b is not None:
        y += b  # the bias is not rescaled
    y = y.reshape(*lead, W.shape[0])  # (..., out)
    return y, (lead, xd, mask, dropped, h, z, g, n, W0At, Wq, A, B, m, s, cfg.detach_norm)


def dora_backward(dy, cache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``B``, ``m`` arrays, ``W`` and ``b`` None (frozen).

    The formulas are in the module docstring; ``detach_norm`` (from the cache) drops the path
    through ``n``."""
    lead, xd2, mask, dropped, h2, z2, g, n, W0At, Wq, A, B, m, s, detach = cache  # 2-D: (N, ·)
    W = weight_array(Wq, dy.dtype)  # W̃0 rebuilt again (4-bit base)
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    live = n > 0
    dg = np.einsum("no,no->o", dy2, z2)  # ḡ = Σ_N ȳ ⊙ z   (out,)
    dm = np.where(live, dg / np.where(live, n, 1), 0)  # m̄ = ḡ / n
    dz = dy2 * g  # z̄ = ȳ ⊙ g   (N, out)
    dzB = dz @ B  # (N, r)
    dzB *= s  # s z̄ B
    dB = dz.T @ h2  # (out, r)
    dB *= s  # B̄ = s z̄ᵀ h
    dA = dzB.T @ xd2  # Ā = s (z̄ B)ᵀ x̃   (r, in)
    if mask is None:
        dx2 = dz @ W  # (N, in)
        dx2 += dzB @ A  # x̄ = z̄ W0 + s (z̄ B) A
    elif not dropped:
        dx2 = dz @ W  # (N, in)
        dxd = dzB @ A  # x̃̄ = s (z̄ B) A   (N, in)
        dxd *= mask
        dx2 += dxd  # x̄ = z̄ W0 + x̃̄ ⊙ M
    else:
        dz -= dy2
        dxd = dz @ W  # (N, in)
        dxd += dzB @ A  # x̃̄ = (z̄ − ȳ) W0 + s (z̄ B) A
        dxd *= mask
        dx2 = dy2 @ W  # x̄ = ȳ W0 + x̃̄ ⊙ M
        dx2 += dxd
    if not detach:
        # the path through n: c = −ḡ m / n³, V̄ = diag(c) V (the projection term)
        c = np.where(live, -dg * m / np.where(live, n, 1) ** 3, 0)  # (out,)
        if W0At is None:
            W0At = W @ A.T  # (out, r)
        cB = c[:, None] * B  # (out, r)
        dB = dB + s * (c[:, None] * W0At + s * (cB @ (A @ A.T)))  # B̄ += s diag(c)(W0Aᵀ + s B AAᵀ)
        dA = dA + s * (cB.T @ W + s * ((cB.T @ B) @ A))  # Ā += s (cB)ᵀ W0 + s² (cB)ᵀ B A
    dx = dx2.reshape(*lead, W.shape[1])  # (..., in)
    return dx, {"A": dA, "B": dB, "m": dm, "W": None, "b": None}


class DoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` re-parametrised as magnitude ``m`` times the
    direction of ``W0 + s B A``. Trainable: ``A``, ``B``, ``m``.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`~lowrank_ref.config.DoRAConfig`.
        rng: a ``numpy.random.Generator`` (or an int seed, or None) for the init and the dropout masks.

    ``norm_method`` (attribute, ``"factored"`` by default, or ``"dense"``) picks how the row norm
    is computed; both give the same numbers (tested) and differ in cost (``bench/bench_dora.py``).
    """

    # the names PEFT gives these tensors in its adapter files (used by lowrank_ref.io)
    CONFIG = DoRAConfig

    def __init__(self, base, config: DoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)  # None / int seed
        self.rng = rng
        self.norm_method = "factored"
        r, dtype = config.r, self.weight_dtype
        W0 = self.w0()  # the float weight, or W̃0 dequantised (QDoRA: m starts at ‖W̃0_j‖)
        self.A = Parameter(init_lora_A(r, self.in_features, config.init, rng, dtype))  # (r, in)
        self.B = Parameter(np.zeros((self.out_features, r), dtype=dtype))  # (out, r); B = 0
        w0_sq = np.einsum("oi,oi->o", W0.astype(np.float64), W0.astype(np.float64))
        zero = np.flatnonzero(w0_sq == 0)
        if zero.size:
            warnings.warn(
                f"base weight rows {zero[:10].tolist()}{'...' if zero.size > 10 else ''} are all zero: "
                "DoRA's direction is undefined there, so those rows keep their bias and never train "
                "(use LoRA for such a layer)", RuntimeWarning, stacklevel=2)
        self.m = Parameter(np.sqrt(w0_sq).astype(dtype))  # (out,) m = ‖W0_j‖: starts as the identity
        object.__setattr__(self, "_w0_sq_cache", (None, None, None))

    # W0 and its cached row norms ----------------------------------------------------------
    def _w0_sq(self) -> np.ndarray:
        r"""``‖W0_j‖²`` (out,), cached while ``W0`` is the same frozen array (or 4-bit tensor).

        The cache is keyed on the array object and the compute dtype: assigning a new
        ``base.weight.data`` (loading, PiSSA, ``astype``) recomputes it. After editing a frozen
        ``W0`` *in place*, call :meth:`clear_norm_cache`."""
        key, dtype = self.w0_operand(), self.weight_dtype
        ref, ref_dtype, val = self._w0_sq_cache
        if ref is key and ref_dtype == dtype and (self.quantized or not self.base.weight.trainable):
            return val
        W0 = self.w0()
        val = np.einsum("oi,oi->o", W0, W0)
        object.__setattr__(self, "_w0_sq_cache", (key, dtype, val))
        return val

    def clear_norm_cache(self) -> None:
        object.__setattr__(self, "_w0_sq_cache", (None, None, None))

    def weight_norm(self) -> np.ndarray:
        r"""``n_j = ‖W0_j + s (B A)_j‖`` (out,): the row norms of the direction matrix ``V``."""
        n, _ = dora_row_norm(self.w0(), self.A.data, self.B.data, self.scaling,
                             w0_sq=self._w0_sq(), method=self.norm_method)
        return n

    def row_scale(self) -> np.ndarray:
        r"""``g = m / n`` (out,), with ``g_j = 0`` on zero-norm rows (the stated rule)."""
        n = self.weight_norm()
        live = n > 0
        return np.where(live, self.m.data / np.where(live, n, 1), 0)

    # the dense view -----------------------------------------------------------------------
    def merged_weight(self) -> np.ndarray:
        r"""``W' = diag(m/n) (W0 + s B A)`` (out, in): computed in float64, rounded once."""
        W0 = self.w0()
        A, B = self.A.data.astype(np.float64), self.B.data.astype(np.float64)
        V = W0.astype(np.float64) + self.scaling * (B @ A)  # (out, in)
        n = np.sqrt(np.einsum("oi,oi->o", V, V))
        live = n > 0
        g = np.where(live, self.m.data.astype(np.float64) / np.where(live, n, 1), 0)
        return (g[:, None] * V).astype(W0.dtype)  # W' = (m/n) ⊙ V row-wise

    def delta_weight(self) -> np.ndarray:
        r"""``ΔW = W' − W0`` (out, in): what merging adds to ``W0`` (not ``s B A``)."""
        W0 = self.w0()
        return (self.merged_weight().astype(np.float64) - W0.astype(np.float64)).astype(W0.dtype)

    # the computation ----------------------------------------------------------------------
    def _params_dict(self):
        b = None if self.base.bias is None else self.base.bias.data
        return {"W": self.w0_operand(), "b": b, "A": self.A.data, "B": self.B.data,
                "m": self.m.data, "w0_sq": self._w0_sq()}

    def _forward(self, x):
        mask = None
        p = self.config.dropout
        if self.training and p > 0:
            xp = array_module(x)  # on CuPy arrays the mask comes from CuPy's own generator
            u = self.rng.random(x.shape) if xp is np else xp.random.random(x.shape)
            mask = (u >= p).astype(x.dtype) / (1.0 - p)
        y, cache = dora_forward(x, self._params_dict(), self.config, mask=mask, method=self.norm_method)
        self._cache = cache
        return y

    def _backward(self, dy):
        dx, grads = dora_backward(dy, self._pop_cache())
        self.A.accumulate(grads["A"])
        self.B.accumulate(grads["B"])
        self.m.accumulate(grads["m"])
        return dx


def _dora_to_peft(configs: dict) -> dict:
    """LoRA's fields plus ``use_dora``; PEFT's DoRA always detaches the norm (as §4.3 does)."""
    exact = sorted(p for p, c in configs.items() if not c.detach_norm)
    if exact:
        raise ValueError(f"layers {exact} have detach_norm=False; PEFT's DoRA always detaches the norm, so "
                         "its folder would train another method (supported: detach_norm=True)")
    return {**lora_to_peft(configs), "use_dora": True}


SPEC = MethodSpec(
    name="dora",
    config=DoRAConfig,
    numpy="lowrank_ref.adapters.dora:DoRALinear",
    torch="lowrank_gpu.adapters.dora:DoRALinear",
    description="DoRA, Liu et al. 2024: W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖ row-wise",
    overridable=("r", "alpha"),
    file_metadata=scaling_metadata,
    shapes=lambda cfg, fin, fout: {**lora_shapes(cfg, fin, fout), "m": (fout,)},
    peft=PeftMapping("LORA", {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"},
                     to_peft=_dora_to_peft, options=PEFT_OPTIONS, claims=lambda c: bool(c.get("use_dora", False)),
                     from_peft=lambda c, path: lora_from_peft(c, path, DoRAConfig.from_file_fields, detach_norm=True)),
    # the exact gradient (detach_norm=False): the contract's gradcheck differentiates the forward,
    # in which the norm is not a constant (the detached default is checked in tests/adapters/test_dora.py)
    example=lambda: Example(6, 5, DoRAConfig(r=3, alpha=6.0, detach_norm=False)),
    compare={
        # LoRA's row plus a magnitude per output row (detached norm, as in the paper's §4.3)
        "dora": CompareRow(DoRAConfig(r=8, alpha=16), targets=("q", "v"), lr=1e-2, order=30),
        # QDoRA: the same adapter on the targeted layers' weights stored in NF4, as qlora's base
        # (inject(quantize="nf4"): blocksize 64, double-quantised scales); next to qlora in the table
        "qdora": CompareRow(DoRAConfig(r=8, alpha=16), targets=("q", "v"), lr=1e-2, order=42,
                            kwargs={"quantize": "nf4", "blocksize": 64, "double_quant": True}),
    },
)
