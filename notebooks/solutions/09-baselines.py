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
