"""Solutions to notebooks/02-dora-exercises.ipynb (try the exercises first)."""

import numpy as np


def dora_row_norm(W0, A, B, s):
    """n_j = ‖W0_j + s (B A)_j‖: one norm per output row, taken over the input axis."""
    V = W0 + s * (B @ A)  # (out, in)
    return np.sqrt((V * V).sum(axis=1))


def dora_detached_backward(G, V, m):
    """W' = diag(m/n) V with n held constant: V̄ = diag(m/n) G, m̄_j = ⟨G_j, V_j⟩ / n_j."""
    n = np.sqrt((V * V).sum(axis=1))
    return (m / n)[:, None] * G, (G * V).sum(axis=1) / n


def dora_norm_backward(G, V, m):
    """The exact gradient: V̄_j = (m_j/n_j)(G_j − ⟨G_j, V̂_j⟩ V̂_j), m̄_j = ⟨G_j, V̂_j⟩."""
    n = np.sqrt((V * V).sum(axis=1))
    Vhat = V / n[:, None]
    dm = (G * Vhat).sum(axis=1)
    dV = (m / n)[:, None] * (G - dm[:, None] * Vhat)
    return dV, dm
