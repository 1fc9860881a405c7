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
