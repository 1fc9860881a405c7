r"""Uniform quantisation: affine int-k (a scale and a zero point) and symmetric absmax int8.

Affine (asymmetric) int-k over a range :math:`[x_{\min}, x_{\max}]` with :math:`2^k` integer
levels :math:`0 .. 2^k-1`:

.. math::
    S = \frac{x_{\max} - x_{\min}}{2^k - 1}, \qquad
    Z = \operatorname{round}\!\big(-x_{\min} / S\big), \qquad
    q = \operatorname{clip}\big(\operatorname{round}(x / S) + Z,\; 0,\; 2^k - 1\big), \qquad
    \hat x = S\,(q - Z).

:math:`Z` is the integer that represents 0, so zero (padding, ReLU outputs) is exact.

The error is at most :math:`S/2` for every value of the range, ends included. Write
:math:`v = x/S + Z` (so :math:`q = \operatorname{clip}(\operatorname{round}(v))`, :math:`Z` being an
integer) and :math:`z^* = -x_{\min}/S`, with :math:`|Z - z^*| \le \tfrac12`. At :math:`x = x_{\min}`,
:math:`v = Z - z^*`; at :math:`x = x_{\max}`, :math:`v = (2^k-1) + (Z - z^*)`. So for :math:`x` in
the range, :math:`v \in [-\tfrac12,\ 2^k - 1 + \tfrac12]`: the zero point's rounding pushes the
ends at most half a step outside the codes. Inside :math:`[0, 2^k-1]` rounding moves :math:`v` by
at most :math:`\tfrac12`; outside it, :math:`v` is within :math:`\tfrac12` of the end code that the
clip returns. Either way :math:`|q - v| \le \tfrac12`, and :math:`|\hat x - x| = S\,|q - v| \le S/2`
(plus float rounding; ``tests/quant/test_uniform.py`` checks it).

Symmetric absmax int8 (as in LLM.int8's vector-wise quantisation, Dettmers et al. 2022,
arXiv:2208.07339): :math:`S = \max|x| / 127`, :math:`q = \operatorname{round}(x/S) \in [-127, 127]`,
:math:`\hat x = S q`; error at most :math:`S/2`. It wastes one code (-128) to keep 0 at 0 and the
range symmetric.

Both can act per tensor or per block (``blocksize``), the latter being what QLoRA's NF4 does with
non-uniform levels. Chapter 03 compares their errors on real weights.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.quant.blockwise import as_float_input

__all__ = ["quantize_affine", "dequantize_affine", "affine_roundtrip", "quantize_absmax_int8",
           "quantize_absmax_int", "absmax_int_roundtrip",
           "dequantize_absmax_int8", "absmax_int8_roundtrip", "roundtrip_error"]


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    return int(bits)


def _blocks(x: np.ndarray, blocksize: int | None):
    """``x`` flattened into rows of ``blocksize`` (padded with the block's last value's copy of 0)."""
    flat = x.reshape(-1)
    if blocksize is None:
        return flat[None, :], 0
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer or None, got {blocksize!r}")
    nb = -(-flat.size // blocksize)
    pad = nb * blocksize - flat.size
    if pad:  # pad with the last value: it changes no block's min, max or absmax
        flat = np.concatenate([flat, np.full(pad, flat[-1], flat.dtype)])
    return flat.reshape(nb, blocksize), pad


def quantize_affine(x, bits: int = 8, blocksize: int | None = None):
    r"""Affine int-k: returns ``(q, scale, zero_point)``; ``q`` is ``(n_blocks, blocksize)`` uint.

    ``S = (x_max - x_min) / (2^k - 1)``, ``Z = round(-x_min / S)``, ``q = clip(round(x/S) + Z)``.
    The range always includes 0 (``x_min ≤ 0 ≤ x_max``) so that 0 is representable.
    """
    bits = _check_bits(bits)
    x = as_float_input(x).astype(np.float64)
    rows, _ = _blocks(x, blocksize)
    lo = np.minimum(rows.min(axis=1), 0.0)  # x_min (the range includes 0)
    hi = np.maximum(rows.max(axis=1), 0.0)  # x_max
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax  # S
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero block: any S works
    zero = np.round(-lo / scale)  # Z: the integer that stands for 0
    q = np.clip(np.round(rows / scale[:, None]) + zero[:, None], 0, qmax)  # q
    dtype = np.uint8 if bits <= 8 else np.uint16
    return q.astype(dtype), scale, zero


def dequantize_affine(q, scale, zero, shape) -> np.ndarray:
    r"""``x̂ = S (q - Z)``, reshaped to ``shape`` (padding dropped)."""
    xh = scale[:, None] * (q.astype(np.float64) - zero[:, None])
    n = int(np.prod(shape))
    return xh.reshape(-1)[:n].reshape(shape)


def affine_roundtrip(x, bits: int = 8, blocksize: int | None = None) -> np.ndarray:
    """Quantise then dequantise with affine int-k; float64, same shape as ``x``."""
    q, s, z = quantize_affine(x, bits, blocksize)
    return dequantize_affine(q, s, z, np.shape(x))


def quantize_absmax_int(x, bits: int = 8, blocksize: int | None = None):
    r"""Symmetric int-k: ``S = max|x| / (2^{k-1}-1)``, ``q = round(x / S)``. Returns ``(q, S)``.

    One scale per block, like NF4: with ``bits=4`` this is the fair uniform baseline for NF4
    (15 levels ``-7..7`` against NF4's 16 normal quantiles).
    """
    bits = _check_bits(bits)
    if bits < 2:
        raise ValueError(f"bits must be at least 2 for a signed code, got {bits}")
    x = as_float_input(x).astype(np.float64)
    rows, _ = _blocks(x, blocksize)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(rows).max(axis=1) / qmax  # S = absmax / (2^{k-1}-1)
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(rows / scale[:, None]), -qmax, qmax)
    return q.astype(np.int8 if bits <= 8 else np.int16), scale


def quantize_absmax_int8(x, blocksize: int | None = None):
    r"""Symmetric int8: ``S = max|x| / 127``, ``q = round(x / S)`` in ``[-127, 127]``. Returns ``(q, S)``."""
    return quantize_absmax_int(x, 8, blocksize)


def dequantize_absmax_int8(q, scale, shape) -> np.ndarray:
    """``x̂ = S q`` (any bit width)."""
    xh = scale[:, None] * q.astype(np.float64)
    n = int(np.prod(shape))
    return xh.reshape(-1)[:n].reshape(shape)


def absmax_int8_roundtrip(x, blocksize: int | None = None) -> np.ndarray:
    q, s = quantize_absmax_int8(x, blocksize)
    return dequantize_absmax_int8(q, s, np.shape(x))


def absmax_int_roundtrip(x, bits: int = 4, blocksize: int | None = None) -> np.ndarray:
    """Quantise then dequantise with symmetric absmax int-k; float64, same shape as ``x``."""
    q, s = quantize_absmax_int(x, bits, blocksize)
    return dequantize_absmax_int8(q, s, np.shape(x))


def roundtrip_error(x, x_hat) -> dict:
    """``{"max_abs", "rmse", "rel_fro"}`` between ``x`` and its reconstruction."""
    x = np.asarray(x, dtype=np.float64)
    e = np.asarray(x_hat, dtype=np.float64) - x
    return {"max_abs": float(np.abs(e).max()), "rmse": float(np.sqrt(np.mean(e * e))),
            "rel_fro": float(np.linalg.norm(e) / max(np.linalg.norm(x), 1e-300))}
