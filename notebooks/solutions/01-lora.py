"""Solutions to notebooks/01-lora-exercises.ipynb (try the exercises first)."""

import math


def lora_scaling(alpha, r, rslora=False):
    """s = α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_forward(x, W, b, A, B, s):
    """y = x W0ᵀ + b + s (x Aᵀ) Bᵀ, never building ΔW."""
    return x @ W.T + b + s * (x @ A.T) @ B.T


def lora_backward(dy, x, W, A, B, s):
    """B̄ = s ȳᵀ h, h̄ = s ȳ B, Ā = h̄ᵀ x, x̄ = ȳ W0 + h̄ A, with h = x Aᵀ."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    h = x2 @ A.T  # (N, r)
    dB = s * dy2.T @ h  # (out, r)
    dh = s * dy2 @ B  # (N, r)
    dA = dh.T @ x2  # (r, in)
    dx = (dy2 @ W + dh @ A).reshape(x.shape)
    return dx, dA, dB


def lora_merge(W, A, B, s):
    """W' = W0 + s B A."""
    return W + s * (B @ A)


def lora_params(in_features, out_features, r):
    """A (r, in) and B (out, r): r (in + out)."""
    return r * (in_features + out_features)
