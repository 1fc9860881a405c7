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
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from lowrank_ref.nn.module import Module

__all__ = ["GELU", "gelu", "gelu_grad", "normal_cdf", "softmax", "softmax_backward"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu(x: np.ndarray) -> np.ndarray:
    r"""GELU(x) = x Φ(x), the exact (erf) form."""
    return x * normal_cdf(x)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    r"""Φ(x) = (1 + erf(x/√2)) / 2, in the dtype of ``x``."""
    return (0.5 * (1.0 + erf(x * _INV_SQRT2))).astype(x.dtype, copy=False)


def gelu_grad(x: np.ndarray, cdf: np.ndarray | None = None) -> np.ndarray:
    r"""d GELU / dx = Φ(x) + x φ(x)  (pass ``cdf`` = Φ(x) if the forward already computed it)."""
    cdf = normal_cdf(x) if cdf is None else cdf  # Φ(x)
    pdf = _INV_SQRT2PI * np.exp(-0.5 * x * x)  # φ(x)
    return (cdf + x * pdf).astype(x.dtype, copy=False)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""p = exp(z - max z) / Σ exp(z - max z) along ``axis`` (entries of -inf get p = 0)."""
    m = np.max(z, axis=axis, keepdims=True)
    e = np.exp(z - m)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(dp: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""z̄ = p ⊙ (p̄ - Σ_i p̄_i p_i), given the softmax output ``p``."""
    return p * (dp - np.sum(dp * p, axis=axis, keepdims=True))


class GELU(Module):
    """Elementwise ``x Φ(x)``; no parameters. Any shape in, same shape out."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
        cdf = normal_cdf(x)  # Φ(x), kept for the backward
        self._cache = (x, cdf)
        return x * cdf  # GELU(x) = x Φ(x)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        x, cdf = self._pop_cache()
        return dy * gelu_grad(x, cdf)  # x̄ = ȳ ⊙ (Φ(x) + x φ(x))
