"""Solutions to the DyLoRA and SoRA exercises of chapter 07 (draft; try the exercises first)."""

import numpy as np


def dylora_forward(x, W, b0, A, B, alpha, b):
    """y = x W0ᵀ + b0 + (α/b) (x A[:b]ᵀ) B[:, :b]ᵀ: the first b ranks, a rank-b LoRA's scale."""
    return x @ W.T + b0 + (alpha / b) * (x @ A[:b].T) @ B[:, :b].T


def soft_threshold(x, xi):
    """T_ξ(x) = sign(x) max(|x| − ξ, 0)."""
    return np.sign(x) * np.maximum(np.abs(x) - xi, 0.0)


def sora_backward(dy, x, W, A, g, B, s):
    """With h = x Aᵀ, u = h ⊙ g: B̄ = s ȳᵀ u, ū = s ȳ B, ḡ = Σ_n ū ⊙ h, h̄ = ū ⊙ g, Ā = h̄ᵀ x,
    x̄ = ȳ W0 + h̄ A."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    h = x2 @ A.T  # (N, r)
    u = h * g
    dB = s * dy2.T @ u  # (out, r)
    du = s * dy2 @ B  # (N, r)
    dg = (du * h).sum(axis=0)  # (r,)
    dh = du * g
    dA = dh.T @ x2  # (r, in)
    dx = (dy2 @ W + dh @ A).reshape(x.shape)
    return dx, dA, dg, dB


def sora_prune(A, g, B):
    """Keep the ranks with g_i ≠ 0 and fold the gate into B: A' = A[keep], B' = B[:, keep] diag(g[keep])."""
    keep = np.flatnonzero(g != 0)
    return A[keep], B[:, keep] * g[keep]
