"""Solutions to chapter 05's KronA and LoKr exercises (try the exercises first)."""


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
