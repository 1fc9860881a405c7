"""Solutions to notebooks/07-rank-exercises.ipynb (try the exercises first)."""

import numpy as np


def adalora_backward(dy, x, W, P, E, Q, s):
    """y = x Wᵀ + b + s ((x Qᵀ) ⊙ E) Pᵀ, leading axes flattened to N rows."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    h = x2 @ Q.T  # (N, r)
    g = h * E
    dP = s * dy2.T @ g  # P̄ = s ȳᵀ g
    dg = s * dy2 @ P  # ḡ = s ȳ P
    dE = (dg * h).sum(axis=0)  # Ē = Σ_n ḡ_n ⊙ h_n
    dh = dg * E
    dQ = dh.T @ x2  # Q̄ = h̄ᵀ x
    dx = dy2 @ W + dh @ Q  # x̄ = ȳ W + h̄ Q
    return dx.reshape(x.shape), dP, dE, dQ


def orth_reg_grad(P, Q):
    """R = ‖QQᵀ − I‖ + ‖PᵀP − I‖; ∂‖M‖/∂Q = 2MQ/‖M‖, ∂‖N‖/∂P = 2PN/‖N‖."""
    M = Q @ Q.T - np.eye(Q.shape[0])
    N = P.T @ P - np.eye(P.shape[1])
    nm, nn = np.linalg.norm(M), np.linalg.norm(N)
    return nm + nn, 2 * P @ N / nn, 2 * M @ Q / nm


def triplet_scores(values, grads, Ibar, Ubar, beta1, beta2):
    """One allocator update of Ī and Ū, then S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)."""
    newI, newU, s = {}, {}, {}
    for n in ("P", "E", "Q"):
        sens = np.abs(values[n] * grads[n])  # I = |w ∂L/∂w|
        newI[n] = beta1 * Ibar[n] + (1 - beta1) * sens
        newU[n] = beta2 * Ubar[n] + (1 - beta2) * np.abs(sens - newI[n])  # with the new Ī
        s[n] = newI[n] * newU[n]
    return s["E"] + s["Q"].mean(axis=1) + s["P"].mean(axis=0), newI, newU


def budget_schedule(step, b0, bT, tinit, tfinal, deltaT, total_step):
    """Warm-up at b0, the cubic decrease, then bT with the pattern fixed."""
    if step <= tinit:
        return b0, False
    if step > total_step - tfinal:
        return bT, True
    u = (step - tinit) / (total_step - tfinal - tinit)
    return int((b0 - bT) * (1 - u) ** 3 + bT), step % deltaT == 0


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


def selora_growth_ratio(dy, x, A, B, a, s):
    """F_(r+1)/F_r with F = the summed squared gradients. The trial's zero column leaves the output,
    so every gradient of rank r, unchanged; its new row of A gets 0 (b_new = 0) and its new column
    of B gets s ȳᵀ (x a): F_(r+1) = F_r + ‖s ȳᵀ (x a)‖²."""
    h = x @ A.T  # (N, r)
    dB = s * dy.T @ h  # B̄ = s ȳᵀ h
    dA = (s * dy @ B).T @ x  # Ā = (s ȳ B)ᵀ x
    F_r = np.sum(dA**2) + np.sum(dB**2)
    new = s * dy.T @ (x @ a)  # ∂L/∂b_new (out,)
    return (F_r + np.sum(new**2)) / F_r
