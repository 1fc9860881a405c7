"""Solutions to notebooks/08-serving-exercises.ipynb (try the exercises first)."""

import numpy as np


def bgmv_rows(x, W0, b, A_all, B_all, s, g, slots):
    """Gather each row's factors, then the shrink (to R) and the expand, as two batched products."""
    A = A_all[slots]  # (N, R, in)
    B = B_all[slots]  # (N, out, R)
    h = x @ A.transpose(0, 2, 1)  # shrink: (N, T, R)
    d = h @ B.transpose(0, 2, 1)  # expand: (N, T, out)
    z = x @ W0.T  # the base, shared by every row: (N, T, out)
    return g[slots][:, None, :] * (z + s[slots][:, None, None] * d) + b


def dora_serving_scale(W0, A, B, s, m):
    """g = m / ‖W0 + s B A‖ over the input axis; 0 where the norm is 0 (DoRA's zero-norm rule)."""
    V = W0 + s * (B @ A)  # the adapted direction, (out, in)
    n = np.sqrt(np.sum(V * V, axis=1))
    return np.where(n > 0, m / np.where(n > 0, n, 1.0), 0.0)


def lorahub_delta(As, Bs, s, w):
    """Mix the factors first (A = Σ wᵢAᵢ, B = Σ wᵢBᵢ), then multiply: LoraHub's ΔW = s B A."""
    A = sum(wi * a for wi, a in zip(w, As))
    B = sum(wi * b for wi, b in zip(w, Bs))
    return s * (B @ A)
