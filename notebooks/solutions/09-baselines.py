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


def prompt_backward(dH, k):
    # H = [P; X_e]: the last T positions are X_e's; P sits in front of every row, so its gradient
    # is the sum over the batch of the first k positions'
    return dH[:, k:], dH[:, :k].sum(axis=0)


def prefix_attention_backward(dy, q, k, v, pk, pv):
    T, hs = q.shape
    p = pk.shape[0]
    K, V = np.concatenate([pk, k]), np.concatenate([pv, v])  # K' = [P_k; K], V' = [P_v; V]   (p+T, hs)
    closed = np.triu(np.ones((T, p + T), dtype=bool), k=1 + p)  # the future; the p prefix columns stay open
    s = np.where(closed, -np.inf, q @ K.T / np.sqrt(hs))
    P = np.exp(s - s.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    dV = P.T @ dy  # V̄' = Pᵀ Ȳ
    dP = dy @ V.T
    dS = P * (dP - (dP * P).sum(axis=1, keepdims=True)) / np.sqrt(hs)  # softmax backward, with the 1/√hs
    dq, dK = dS @ K, dS.T @ q  # Q̄ = S̄ K', K̄' = S̄ᵀ Q
    return dq, dK[p:], dV[p:], dK[:p], dV[:p]  # the first p rows are the prefixes'


def prefix_params(n_layer, d_model, k, hidden, projection):
    if not projection:
        return 2 * n_layer * k * d_model  # P (L, 2, k, C)
    out = 2 * n_layer * d_model  # the MLP's output width
    return k * d_model + hidden * d_model + hidden + out * hidden + out  # E, W1, b1, W2, b2


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
