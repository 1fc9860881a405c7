"""Solutions to notebooks/05-products-exercises.ipynb (try the exercises first)."""

import numpy as np


def face_split(A1, A2, B1, B2):
    """K_A[(p,q), j] = A1[p,j] A2[q,j] (column-wise Kronecker); K_B[i, (p,q)] = B1[i,p] B2[i,q]
    (row-wise Kronecker); the pair (p, q) flattened to p r + q."""
    r, n_in = A1.shape
    KA = (A1[:, None, :] * A2[None, :, :]).reshape(r * r, n_in)  # (r², in)
    KB = (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], r * r)  # (out, r²)
    return KA, KB


def loha_factorised_forward(x, A1, A2, B1, B2, s):
    """z = s (x K_Aᵀ) K_Bᵀ: never builds the (out, in) matrix ΔW."""
    KA, KB = face_split(A1, A2, B1, B2)
    return (s * (x @ KA.T)) @ KB.T


def loha_backward(dz, x, A1, A2, B1, B2, s):
    """The dense route: Ḡ = z̄ᵀ x, P̄1 = s Ḡ ⊙ P2, P̄2 = s Ḡ ⊙ P1, then each P_k = B_k A_k."""
    P1, P2 = B1 @ A1, B2 @ A2
    G = dz.T @ x  # (out, in)
    dP1, dP2 = s * G * P2, s * G * P1
    dx = dz @ (s * P1 * P2)
    return dx, B1.T @ dP1, B2.T @ dP2, dP1 @ A1.T, dP2 @ A2.T


def loha_rank(out, n_in, r, seed=0):
    """Measure both ranks on random Gaussian factors (generic: the bounds are reached)."""
    rng = np.random.default_rng(seed)
    B1, B2 = rng.standard_normal((out, r)), rng.standard_normal((out, r))
    A1, A2 = rng.standard_normal((r, n_in)), rng.standard_normal((r, n_in))
    loha = np.linalg.matrix_rank((B1 @ A1) * (B2 @ A2))
    lora = np.linalg.matrix_rank(rng.standard_normal((out, 2 * r)) @ rng.standard_normal((2 * r, n_in)))
    return int(loha), int(lora)
