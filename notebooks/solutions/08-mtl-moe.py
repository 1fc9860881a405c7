"""Solutions to notebooks/08-mtl-moe-exercises.ipynb (try the exercises first)."""

import numpy as np


def mtl_mixing_grad(dBt, B, w, tau):
    """B_t = Σ_i π_ti B_i with π_t = softmax(w_t / τ): B̄_i sums over tasks, π̄ is a Frobenius
    product, and the softmax's backward (divided by τ) turns π̄ into w̄."""
    z = w / tau
    e = np.exp(z - z.max(axis=1, keepdims=True))
    pi = e / e.sum(axis=1, keepdims=True)  # (T, n)
    dB = np.einsum("ti,tor->ior", pi, dBt)  # B̄_i = Σ_t π_ti B̄_t
    dpi = np.einsum("tor,ior->ti", dBt, B)  # π̄_ti = ⟨B̄_t, B_i⟩
    dw = pi * (dpi - (pi * dpi).sum(axis=1, keepdims=True)) / tau
    return dB, dw


def topk_gates_backward(dg, z, k):
    """The gates are a softmax over the kept logits and 0 elsewhere; with g = 0 off the kept set,
    the softmax's backward g ⊙ (ḡ − ⟨g, ḡ⟩) is already 0 there."""
    keep = np.argsort(-z, axis=1)[:, :k]
    mask = np.zeros(z.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    zm = np.where(mask, z, -np.inf)
    e = np.exp(zm - zm.max(axis=1, keepdims=True))
    g = e / e.sum(axis=1, keepdims=True)
    return g * (dg - (g * dg).sum(axis=1, keepdims=True))


def balance_loss_grad(g):
    """cv² = v/μ² with I = Σ_n g_n, μ = mean(I), v = mean((I − μ)²); every g_{n,e} reaches the loss
    through I_e only, so each row of the gradient is ∂cv²/∂I."""
    E = g.shape[1]
    imp = g.sum(axis=0)
    mu = imp.mean()
    v = ((imp - mu) ** 2).mean()
    dimp = 2.0 / (E * mu**2) * ((imp - mu) - v / mu)
    return v / mu**2, np.broadcast_to(dimp, g.shape).copy()
