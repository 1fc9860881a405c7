"""Solutions to notebooks/03-qlora-exercises.ipynb (try the exercises first)."""

import numpy as np
from scipy.stats import norm

NF4_OFFSET = 0.9677083


def nf4_table():
    """8 positive quantiles at linspace(δ, 1/2, 9)[:-1], 7 negative at linspace(δ, 1/2, 8)[:-1],
    and an exact 0; divided by the largest, so the ends are ±1."""
    pos = norm.ppf(np.linspace(NF4_OFFSET, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(NF4_OFFSET, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([neg, [0.0], pos]))
    return v / v.max()


def absmax_quantize(x, table, blocksize):
    """Per block of `blocksize` values: absmax a = max|x|, then each x/a to the nearest level."""
    n_blocks = -(-x.size // blocksize)
    pad = np.zeros(n_blocks * blocksize, dtype=np.float64)
    pad[: x.size] = x
    blocks = pad.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # (n_blocks,)
    u = blocks / np.maximum(absmax, 1e-30)[:, None]  # in [-1, 1]
    codes = np.abs(u[..., None] - table).argmin(axis=-1)  # the nearest level
    return codes.reshape(-1)[: x.size], absmax


def bits_per_param(blocksize, double_quant, blocksize2=256):
    """4 bits per weight plus the absmax: 32/B bits, or 8/B + 32/(B·B₂) when double-quantised."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def full_finetune_bytes(n_params):
    """bf16 weight (2) + bf16 gradient (2) + fp32 master copy (4) + fp32 Adam m and v (8) = 16."""
    return 16 * n_params
