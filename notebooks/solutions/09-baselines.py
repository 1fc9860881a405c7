"""Solutions to the exercises of chapter 09 (notebooks/09-baselines-exercises.ipynb)."""

import numpy as np


def ssf_merge(W, b, gamma, beta):
    # y = γ ⊙ (x Wᵀ + b) + β = x (diag(γ) W)ᵀ + (γ ⊙ b + β): γ scales the rows of W
    return gamma[:, None] * W, gamma * b + beta


def adapter_backward(dy, h, W_down, b_down, W_up):
    a = h @ W_down.T + b_down  # the pre-activation (N, m)
    g = np.maximum(a, 0)  # relu(a)
    db_up = dy.sum(axis=0)
    dW_up = dy.T @ g  # (out, m)
    da = (dy @ W_up) * (a > 0)  # ā = ḡ ⊙ relu'(a)
    dW_down = da.T @ h  # (m, out)
    db_down = da.sum(axis=0)
    dh = dy + da @ W_down  # the skip connection passes ȳ straight through
    return dh, dW_down, db_down, dW_up, db_up


def adapter_params(d, m):
    # W_down (m, d) + b_down (m) + W_up (d, m) + b_up (d)
    return 2 * d * m + m + d


def s2_mask(T, n_head, n_groups):
    G = T // n_groups
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    plain = (t // G == s // G) & (s <= t)  # groups [0, G), [G, 2G), ...
    shifted = ((t + G // 2) // G == (s + G // 2) // G) & (s <= t)  # [0, G/2), [G/2, 3G/2), ..., no wrap
    h0 = n_head // 2  # heads [h0, H) are shifted, as the reference's qkv[:, H//2:]
    return np.stack([plain] * h0 + [shifted] * (n_head - h0))


def interpolate_positions(table, new_length):
    L = table.shape[0]
    u = np.arange(new_length) * L / new_length  # where each new position falls on the old axis
    lo = np.minimum(np.floor(u).astype(int), L - 1)
    hi = np.minimum(lo + 1, L - 1)
    w = np.where(hi > lo, u - lo, 0.0)[:, None]  # past the last row: keep it
    return (1 - w) * table[lo] + w * table[hi]
