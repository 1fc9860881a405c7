r"""GELU and softmax, with their derivatives.

GELU (Hendrycks & Gimpel 2016, arXiv:1606.08415), the exact form that ``torch.nn.GELU()`` uses
by default:

.. math::
    \mathrm{GELU}(x) = x\,\Phi(x), \qquad \Phi(x) = \tfrac12\big(1 + \operatorname{erf}(x/\sqrt2)\big),
    \qquad
    \frac{d}{dx}\mathrm{GELU}(x) = \Phi(x) + x\,\varphi(x), \quad \varphi(x) = \frac{e^{-x^2/2}}{\sqrt{2\pi}} .

Softmax over the last axis, :math:`p_i = e^{z_i - m} / \sum_j e^{z_j - m}` with
:math:`m = \max_j z_j` (the shift changes nothing mathematically and keeps every exponent
:math:`\le 0`, so nothing overflows). Its Jacobian is
:math:`\partial p_i/\partial z_j = p_i(\delta_{ij} - p_j)`, so for an upstream :math:`\bar p`

.. math::
    \bar z_j = \sum_i \bar p_i\, p_i(\delta_{ij} - p_j) = p_j\Big(\bar p_j - \sum_i \bar p_i p_i\Big),

one elementwise product and one row sum: the ``(d, d)`` Jacobian is never built.

Speed. SciPy's ``erf`` runs a scalar loop (about 12 ns an entry, 40x NumPy's ``exp``), which made
GELU the slowest layer of the GPT step. For float32 input, :func:`normal_cdf` therefore evaluates
:math:`\Phi` from the Chebyshev fit of :math:`\operatorname{erfc}` in Numerical Recipes (Press et al.,
2nd ed., §6.2, ``erfcc``: relative error below :math:`1.2\cdot10^{-7}` everywhere, so the tails
:math:`\Phi(x) \ll 1` keep their relative precision too), written as whole-array NumPy operations:

.. math::
    z = |x|/\sqrt2, \quad t = \frac{1}{1 + z/2}, \quad
    \operatorname{erfc}(z) \approx t\,\exp\big(-z^2 + c_0 + c_1 t + \dots + c_9 t^9\big), \qquad
    \Phi(x) = \begin{cases} \tfrac12\operatorname{erfc}(z) & x < 0 \\
                              1 - \tfrac12\operatorname{erfc}(z) & x \ge 0 . \end{cases}

Float64 input keeps SciPy's ``erf`` (exact to float64, and what the gradient checks run on);
``tests/nn/test_fast_paths.py`` checks the float32 path against it entry by entry.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from lowrank_ref.nn.module import Module, array_module

__all__ = ["GELU", "gelu", "gelu_grad", "normal_cdf", "softmax", "softmax_backward"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
# c_0 .. c_9 of Numerical Recipes' erfcc (Press et al., 2nd ed., §6.2), as float32
_ERFC_C = tuple(np.float32(c) for c in (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277))


def gelu(x: np.ndarray) -> np.ndarray:
    r"""GELU(x) = x Φ(x), the exact (erf) form."""
    return x * normal_cdf(x)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    r"""Φ(x) = (1 + erf(x/√2)) / 2, in the dtype of ``x`` (float32 NumPy input: the erfc fit above)."""
    if x.dtype == np.float32 and type(x) is np.ndarray:
        return _normal_cdf_f32(x)
    return (0.5 * (1.0 + special_erf(x)(x * _INV_SQRT2))).astype(x.dtype, copy=False)


def special_erf(x):
    """The ``erf`` for ``x``'s array module: SciPy's for NumPy, ``cupyx.scipy.special.erf`` for
    CuPy (an array module may carry its own as ``.special``, as the tests' CPU stand-in does)."""
    xp = array_module(x)
    if xp is np:
        return erf
    own = getattr(xp, "special", None)
    if own is not None and hasattr(own, "erf"):
        return own.erf
    import cupyx.scipy.special  # pragma: no cover - needs CuPy

    return cupyx.scipy.special.erf


def _normal_cdf_f32(x: np.ndarray) -> np.ndarray:
    r"""Φ(x) for float32 ``x`` from erfc(z) ≈ t exp(-z² + Σ_k c_k t^k): 3 arrays, every step in place."""
    c = _ERFC_C
    z = np.abs(x)
    z *= np.float32(_INV_SQRT2)  # z = |x|/√2
    t = z * np.float32(0.5)
    t += np.float32(1.0)
    np.reciprocal(t, out=t)  # t = 1/(1 + z/2)
    e = t * c[9]
    for ck in c[8:0:-1]:  # Horner: ((c9 t + c8) t + c7) t ... + c1) t
        e += ck
        e *= t
    e += c[0]
    np.multiply(x, x, out=z)
    z *= np.float32(0.5)  # z² = x²/2, from x: one rounding instead of the two of (|x|/√2)²
    e -= z  # -z² + P(t)
    np.exp(e, out=e)
    e *= t  # erfc(z) = erfc(|x|/√2) = 2 Φ(-|x|)
    # Φ = ½erfc + [x ≥ 0](1 - erfc): arithmetic, not np.where, whose branch on random signs costs 15x
    np.greater_equal(x, 0, out=z, casting="unsafe")  # z now holds the 0/1 indicator
    np.subtract(np.float32(1.0), e, out=t)
    t *= z
    e *= np.float32(0.5)
    e += t
    return e


def gelu_grad(x: np.ndarray, cdf: np.ndarray | None = None) -> np.ndarray:
    r"""d GELU / dx = Φ(x) + x φ(x)  (pass ``cdf`` = Φ(x) if the forward already computed it)."""
    cdf = normal_cdf(x) if cdf is None else cdf  # Φ(x)
    pdf = np.multiply(x, x, dtype=x.dtype)
    pdf *= x.dtype.type(-0.5)
    np.exp(pdf, out=pdf)
    pdf *= x.dtype.type(_INV_SQRT2PI)  # φ(x) = e^{-x²/2}/√(2π), built in one array
    pdf *= x
    pdf += cdf  # Φ(x) + x φ(x)
    return pdf


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""p = exp(z - max z) / Σ exp(z - max z) along ``axis`` (entries of -inf get p = 0)."""
    e = z - np.max(z, axis=axis, keepdims=True)  # the one new array; every later step is in place
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax_backward(dp: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""z̄ = p ⊙ (p̄ - Σ_i p̄_i p_i), given the softmax output ``p``."""
    dz = dp * p  # p ⊙ p̄
    dz -= p * np.sum(dz, axis=axis, keepdims=True)  # - p Σ_i p̄_i p_i
    return dz


def _owned_out(buf, other):
    """``buf`` as the ``out=`` of ``buf ∘ other`` when that keeps the result dtype, else None (a new array)."""
    return buf if buf.dtype == np.result_type(buf, other) and buf.shape == np.broadcast_shapes(buf.shape, other.shape) else None


class GELU(Module):
    """Elementwise ``x Φ(x)``; no parameters. Any shape in, same shape out."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = array_module(x).asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
        cdf = normal_cdf(x)  # Φ(x), kept for the backward
        self._cache = (x, cdf)
        return x * cdf  # GELU(x) = x Φ(x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x, cdf = self._pop_cache()
        g = gelu_grad(x, cdf)
        return np.multiply(dy, g, out=_owned_out(g, dy))  # x̄ = ȳ ⊙ (Φ(x) + x φ(x))
