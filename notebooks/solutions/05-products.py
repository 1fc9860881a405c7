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


# --- KronA and LoKr ------------------------------------------------------------------------
def kron_matvec(x, C, D):
    """x (C ⊗ D)ᵀ through the row-major reshape identity: per row, C X Dᵀ with X = x.reshape(m, n)."""
    (p, m), (q, n) = C.shape, D.shape
    X = x.reshape(-1, m, n)
    return (C @ X @ D.T).reshape(x.shape[0], p * q)  # (N, p, q) -> (N, p·q)


def kron_backward(dy, x, C, D):
    """Ȳ = ȳ.reshape(N, p, q), T = X Dᵀ, Z = Cᵀ Ȳ: C̄ = Σ Ȳ Tᵀ, D̄ = Σ Zᵀ X, X̄ = Z D."""
    (p, m), (q, n) = C.shape, D.shape
    X = x.reshape(-1, m, n)
    dY = dy.reshape(-1, p, q)
    T = X @ D.T  # (N, m, q)
    Z = C.T @ dY  # (N, m, q)
    dC = (dY @ T.transpose(0, 2, 1)).sum(axis=0)  # (p, m)
    dD = (Z.transpose(0, 2, 1) @ X).sum(axis=0)  # (q, n)
    dx = (Z @ D).reshape(x.shape)
    return dx, dC, dD


def lokr_factorization(dim, factor=-1):
    """PEFT's rule: a dividing factor as (factor, dim/factor), unsorted; else the divisor walk."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    if factor == -1:
        factor = dim
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_params(n_in, n_out, r, decompose_both=False, factor=-1):
    """C (p, m) and D (q, n), each full or two rank-r factors (the low-rank-or-full rule)."""
    p, q = lokr_factorization(n_out, factor)
    m, n = lokr_factorization(n_in, factor)
    c = r * (p + m) if decompose_both and r < max(p, m) / 2 else p * m
    d = r * (q + n) if r < max(q, n) / 2 else q * n
    return c + d
