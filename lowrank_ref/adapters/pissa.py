r"""PiSSA: LoRA initialised from the principal singular vectors of ``W0`` (Meng et al. 2024,
arXiv:2404.02948).

With the SVD ``W0 = U Σ Vᵀ`` (singular values in decreasing order) and the scaling ``s``:

.. math::
    B = U_{:, :r}\, \sqrt{\Sigma_r / s} \;(\text{out}, r), \qquad
    A = \sqrt{\Sigma_r / s}\; V_{:, :r}^\top \;(r, \text{in}), \qquad
    W_{\text{res}} = W_0 - s\, B A ,

so ``s B A = U_r Σ_r V_rᵀ`` is the best rank-``r`` approximation of ``W0`` and the frozen base
holds the residual (the minor singular directions). The layer's output at init is unchanged:
``x W_resᵀ + s x Aᵀ Bᵀ = x W0ᵀ`` up to rounding. Fine-tuning then trains the principal
components instead of a random ``A`` and a zero ``B``. (PEFT splits ``√(Σ_r/s)`` between the two
factors the same way, ``init_lora_weights="pissa"``.)

The residual is computed from the factors *after* they are rounded to the weight dtype, so
``W_res + s B A`` misses ``W0`` by one rounding of ``W_res`` only.

Signs: singular vectors are defined up to a sign per pair; each pair is flipped so that the
entry of ``U_{:,k}`` with the largest magnitude is positive, so NumPy and PyTorch give the same
``A`` and ``B`` (when the singular values are distinct).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pissa_decompose", "pissa_init", "fix_svd_signs"]


def fix_svd_signs(U: np.ndarray, Vt: np.ndarray):
    """Flip each singular pair so that the largest-magnitude entry of ``U[:, k]`` is positive."""
    idx = np.argmax(np.abs(U), axis=0)  # (k,)
    sign = np.sign(U[idx, np.arange(U.shape[1])])
    sign[sign == 0] = 1
    return U * sign, Vt * sign[:, None]


def check_pissa_args(shape, r: int, s: float) -> None:
    out, inn = shape
    if r > min(out, inn):
        raise ValueError(f"PiSSA needs r <= min(out, in) = {min(out, inn)}; got r={r} for a weight of shape {shape}")
    if not s > 0:
        raise ValueError(f"PiSSA needs a positive scaling s = alpha/r (alpha > 0), got s={s}")


def pissa_decompose(W: np.ndarray, r: int, s: float):
    r"""``(A (r, in), B (out, r), W_res (out, in))`` with ``W_res + s B A = W0`` (to rounding).

    All three in ``W``'s dtype; the SVD runs in float64."""
    check_pissa_args(W.shape, r, s)
    W64 = W.astype(np.float64)
    U, S, Vt = np.linalg.svd(W64, full_matrices=False)  # W0 = U Σ Vᵀ
    U, Vt = fix_svd_signs(U[:, :r], Vt[:r])
    root = np.sqrt(S[:r] / s)  # √(Σ_r / s)
    B = (U * root).astype(W.dtype)  # B = U_r √(Σ_r/s)   (out, r)
    A = (root[:, None] * Vt).astype(W.dtype)  # A = √(Σ_r/s) V_rᵀ   (r, in)
    W_res = (W64 - s * (B.astype(np.float64) @ A.astype(np.float64))).astype(W.dtype)  # W0 − s B A
    return A, B, W_res


def pissa_init(base, config):
    r"""PiSSA's ``(A, B)`` for ``base`` (a ``lowrank_ref.nn.Linear``), writing ``W_res`` into it.

    Side effect, on purpose: ``base.weight.data`` becomes the residual ``W0 − s B A`` (a new
    array; the caller's ``W0`` array is not modified). ``config`` gives ``r`` and ``scaling``."""
    A, B, W_res = pissa_decompose(base.weight.data, config.r, config.scaling)
    base.weight.data = W_res
    return A, B
