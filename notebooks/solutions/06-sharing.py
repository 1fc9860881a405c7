"""Solutions to notebooks/06-sharing-exercises.ipynb (try the exercises first)."""

import numpy as np


def vera_backward(dy, x, W, A, B, d, b):
    """h = x Aᵀ, g = h ⊙ d, z = g Bᵀ, y = x Wᵀ + b0 + z ⊙ b; back through each step."""
    h = x @ A.T
    z = (h * d) @ B.T
    db = (dy * z).reshape(-1, z.shape[-1]).sum(axis=0)  # b̄ = Σ_n ȳ_n ⊙ z_n
    dg = (dy * b) @ B  # ḡ = z̄ B with z̄ = ȳ ⊙ b
    dd = (dg * h).reshape(-1, h.shape[-1]).sum(axis=0)  # d̄ = Σ_n ḡ_n ⊙ h_n
    dx = dy @ W + (dg * d) @ A  # x̄ = ȳ W + h̄ A with h̄ = ḡ ⊙ d
    return dx, dd, db


def tied_A_grad(dys, xs, A, B, us, vs):
    """Ā = Σ_ℓ h̄_ℓᵀ x_ℓ: every layer that uses A adds its share."""
    dA = np.zeros_like(A)
    for dy, x, u, v in zip(dys, xs, us, vs):
        dh = ((dy * v) @ B) * u  # h̄ = ((ȳ ⊙ v) B) ⊙ u
        dA += dh.T @ x
    return dA


def vera_params(r, shapes):
    """d (r,) and b (out,) per layer; the shared projections are frozen."""
    return sum(r + out for out, _ in shapes)
