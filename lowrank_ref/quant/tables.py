r"""The code books: NormalFloat (NF4), FP4, and the 8-bit dynamic map, built from their recipes.

A *code book* (or data type) is a short sorted list of levels in ``[-1, 1]``. Block-wise
quantisation (``blockwise.py``) divides each block by its largest magnitude and stores, for every
value, the index of the nearest level.

NormalFloat (Dettmers et al. 2023, QLoRA, arXiv:2305.14314, §3)
----------------------------------------------------------------
Pretrained weights are roughly zero-centred normal (chapter 03 shows a histogram). If the levels
are the quantiles of the normal distribution, every level would be used equally often on normal
data scaled to the table's range (the paper calls the data type *information-theoretically
optimal*). After block-wise absmax they are not: each block's largest value lands on ±1 and the
rest are scaled by that maximum, so the end codes are rare and the middle ones common (chapter 03,
§3 measures it). The paper's Eq. 4,

.. math::
    q_i = \tfrac12\Big(Q_X\big(\tfrac{i}{2^k+1}\big) + Q_X\big(\tfrac{i+1}{2^k+1}\big)\Big),
    \qquad i = 0, \dots, 2^k - 1,

taken literally, cannot give the ends: :math:`Q_X(0) = -\infty` so :math:`q_0 = -\infty`, and
dividing by :math:`\max|q_i|` to land in ``[-1, 1]`` is then impossible
(:func:`nf4_paper_eq4` computes it and shows the ``-inf``). It does have an exact zero:
:math:`q_{2^{k-1}} = \tfrac12(Q(\tfrac{2^{k-1}}{2^k+1}) + Q(\tfrac{2^{k-1}+1}{2^k+1})) = 0`, the
two probabilities being symmetric about 1/2. But its 16 values split the other way from NF4's:
8 below zero (one of them the ``-inf``) and 7 above, where NF4 has 7 negative and 8 positive
levels. So Eq. 4 is neither finite nor the table QLoRA ran with.

What the paper's §3 prose describes, and the reference implementation does (bitsandbytes
``create_normal_map``, the levels QLoRA was run with), is *asymmetric*: quantiles of the normal at evenly spaced probabilities from
``offset`` down to 1/2,

.. math::
    p^{+}_j = \text{linspace}(\delta, \tfrac12, 9)_j,\; j=0..7 \;\Rightarrow\; 8 \text{ positive levels } Q(p^{+}_j), \\
    p^{-}_j = \text{linspace}(\delta, \tfrac12, 8)_j,\; j=0..6 \;\Rightarrow\; 7 \text{ negative levels } -Q(p^{-}_j),

plus an exact 0, 16 levels in all, then divided by the largest, so the ends are exactly
:math:`Q(\delta)/Q(\delta) = \pm 1`. The offset :math:`\delta = 0.9677083` is not derived in the
paper. The explanation that is known (it is what the number equals) is the average of the two
"natural" end probabilities for 15 and 16 bins,
:math:`\tfrac12\big((1 - \tfrac{1}{2\cdot 15}) + (1 - \tfrac{1}{2\cdot 16})\big) = 0.96770833\ldots`:
stepping into the tail by half a bin keeps :math:`Q(\delta)` finite, and the two sides have 15 and
16 bins. :func:`nf4_offset_explained` computes it.

Exactness: to equal bitsandbytes' NF4 levels as float32, the construction must round where the
reference rounds: the probabilities come from a float32 ``linspace`` (computed as
``start + i·step`` with one rounding, from both ends toward the middle, as ``torch.linspace``
does), ``Q`` is evaluated in float64 on those float32 probabilities, rounded to float32, and the
division by the maximum is a float32 division. Doing everything in float64 and rounding once at
the end gives 10 of the 16 levels one ulp away (the test suite checks both statements).

FP4 (bitsandbytes' ``fp4``)
---------------------------
1 sign bit, 2 exponent bits, 1 mantissa bit, with magnitudes (code bits ``e1 e0 m``)
``000 → 0``, ``001 → 0.0625`` (the subnormal), ``01m → 8·(1 + m/2)``, ``10m → 4·(1 + m/2)``,
``11m → 2·(1 + m/2)``, all divided by 12 so the largest is 1. Its levels crowd near 0 and thin out
towards ±1 at powers of two, which suits a normal distribution worse than NF4 does (measured in
chapter 03).

The dynamic map (Dettmers et al. 2022, 8-bit optimizers, arXiv:2110.02861, §2 and App.;
Dettmers 2016, arXiv:1511.04561)
-------------------------------------------------------------------------------------------------
An 8-bit code with a *dynamic exponent*: after the sign bit, a run of zero bits gives the decimal
exponent :math:`10^{-e}`, the first one bit is an indicator, and the remaining bits are a linear
fraction. So small magnitudes get many exponents (range) and large ones get many fraction bits
(precision). Built as bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7,
total_bits=8)`` does: for exponent level :math:`i = 0..6` with :math:`2^{i}` (signed) or
:math:`2^{i+1}` (unsigned) fraction values, the midpoints of ``linspace(0.1, 1, n+1)`` times
:math:`10^{i-6}`, with both signs when signed; then 0 and 1.0, padded with zeros to 256, sorted.
The signed map's smallest level is therefore :math:`-0.99297`, not -1 (its largest is exactly 1).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

__all__ = [
    "NF4_OFFSET", "linspace32", "nf4_table", "normal_float_table", "nf4_paper_eq4", "nf4_offset_explained",
    "fp4_codebook", "fp4_table", "int4_table", "dynamic_map", "midpoints",
]

NF4_OFFSET = 0.9677083  # bitsandbytes create_normal_map(offset=0.9677083): the end probability δ


def linspace32(start: float, end: float, steps: int) -> np.ndarray:
    r"""``steps`` evenly spaced float32 values from ``start`` to ``end``, rounded as torch does.

    ``step = float32((end - start) / (steps - 1))``; entry ``i`` is ``start + i·step`` for the
    first half and ``end - (steps-1-i)·step`` for the second, each rounded to float32 once.
    (``numpy.linspace`` rounds differently, one ulp off in some entries, which changes NF4.)
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    lo = np.float64(a) + i * np.float64(step)  # exact in float64, rounded once below
    hi = np.float64(b) - (steps - 1 - i) * np.float64(step)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def normal_float_table(bits: int = 4, offset: float = NF4_OFFSET) -> np.ndarray:
    r"""The asymmetric k-bit NormalFloat levels, float32, sorted, with an exact 0 and ends ±1.

    ``2^{k-1}`` positive quantiles ``Q(linspace(δ, 1/2, 2^{k-1}+1)[:-1])``, ``2^{k-1}-1``
    negative ones ``-Q(linspace(δ, 1/2, 2^{k-1})[:-1])``, and 0; divided by the largest.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be in (0.5, 1), got {offset}")
    half = 2 ** (bits - 1)
    p_pos = linspace32(offset, 0.5, half + 1)[:-1]  # 2^{k-1} probabilities above 1/2
    p_neg = linspace32(offset, 0.5, half)[:-1]  # 2^{k-1} - 1 of them
    pos = norm.ppf(p_pos.astype(np.float64)).astype(np.float32)  # Q(p), float64 then rounded
    neg = (-norm.ppf(p_neg.astype(np.float64))).astype(np.float32)
    v = np.sort(np.concatenate([neg, np.zeros(1, np.float32), pos]))
    return (v / v.max()).astype(np.float32)  # float32 division: q / max q, ends ±1


def nf4_table() -> np.ndarray:
    """The 16 NF4 levels (float32, sorted): code ``i`` means ``nf4_table()[i] * absmax``."""
    return normal_float_table(4, NF4_OFFSET)


def nf4_paper_eq4(bits: int = 4) -> np.ndarray:
    r"""QLoRA Eq. 4 taken literally (float64): :math:`q_i = \frac12(Q(\frac{i}{2^k+1}) + Q(\frac{i+1}{2^k+1}))`.

    Returns ``2^k`` values; the first is ``-inf`` because :math:`Q(0) = -\infty`, which is why the
    reference implementation does not use this formula as written. Entry ``2^{k-1}`` is exactly 0;
    ``2^{k-1}`` values are negative (including the ``-inf``) and ``2^{k-1}-1`` positive: the
    opposite split from NF4's 7 negative and 8 positive levels.
    """
    n = 2**bits
    p = np.arange(n + 1) / (n + 1)  # 0, 1/(n+1), ..., n/(n+1)
    with np.errstate(divide="ignore"):
        q = norm.ppf(p)  # Q(0) = -inf
    return 0.5 * (q[:-1] + q[1:])


def nf4_offset_explained() -> float:
    r"""``((1 - 1/(2·15)) + (1 - 1/(2·16))) / 2 = 0.967708333…``: what the NF4 offset equals."""
    return 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))


def fp4_codebook() -> np.ndarray:
    r"""bitsandbytes' FP4 levels in *code order* (index = the 4-bit code, sign bit first), float32.

    Magnitude bits ``e1 e0 m``: ``000→0``, ``001→0.0625``, ``01m→8(1+m/2)``, ``10m→4(1+m/2)``,
    ``11m→2(1+m/2)``; divided by 12. Code ``8 + j`` is minus code ``j`` (code 8 is -0).
    """
    mags = []
    for code in range(8):
        e, m = code >> 1, code & 1
        if e == 0:
            mags.append(0.0625 * m)  # zero and the one subnormal
        else:
            mags.append(2.0 ** (4 - e) * (1 + m / 2))  # e=1: 8, 12; e=2: 4, 6; e=3: 2, 3
    mags = np.array(mags, dtype=np.float32) / np.float32(12.0)
    return np.concatenate([mags, -mags]).astype(np.float32)


def fp4_table() -> np.ndarray:
    """The 16 FP4 levels sorted (both zeros kept: -0 then +0), float32."""
    return np.sort(fp4_codebook(), kind="stable")


def int4_table() -> np.ndarray:
    r"""Symmetric absmax int4 in the 4-bit machinery: levels ``(c - 7)/7`` for codes ``c = 0..15``.

    Codes 0..14 are the uniform levels -1, -6/7, ..., 0, ..., 1 (``q = round(7u)``); code 15
    (8/7) is never chosen because ``u ≤ 1`` is below its midpoint 15/14. The uniform baseline
    for NF4 with the same storage (4 bits + one absmax per block).
    """
    return ((np.arange(16, dtype=np.float32) - np.float32(7)) / np.float32(7)).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    r"""The 256-level dynamic map (sorted float32) used for double quantisation and 8-bit Adam.

    See the module docstring for the construction; float32 arithmetic as in bitsandbytes, so the
    levels are equal to its ``create_dynamic_map`` bit for bit.
    """
    data: list[np.ndarray] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n_frac = 2 ** (i + non_sign_bits - max_exponent_bits) + (0 if signed else 2 ** (i + non_sign_bits - max_exponent_bits))
        bounds = linspace32(0.1, 1.0, n_frac + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)  # midpoints, float32
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))  # 10^{i-6}
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    if additional_items > 0:
        bounds = linspace32(0.1, 1.0, additional_items + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append(scale * means)
        if signed:
            data.append(-scale * means)
    data.append(np.array([0.0, 1.0], dtype=np.float32))
    v = np.concatenate(data).astype(np.float32)
    if v.size > 2**total_bits:
        raise ValueError("dynamic map construction produced too many levels")
    v = np.concatenate([v, np.zeros(2**total_bits - v.size, np.float32)])  # pad with zeros
    return np.sort(v)


def midpoints(table: np.ndarray) -> np.ndarray:
    """Float32 decision boundaries ``(t[i] + t[i+1]) / 2`` between sorted levels."""
    t = np.asarray(table, dtype=np.float32)
    return ((t[:-1] + t[1:]) / np.float32(2.0)).astype(np.float32)
