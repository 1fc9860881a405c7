"""Solutions to notebooks/00-toolkit-exercises.ipynb (try the exercises first)."""


def linear_backward(dy, x, W):
    """y = x Wᵀ + b: x̄ = ȳ W, W̄ = ȳᵀ x, b̄ = Σ_n ȳ_n (leading axes flattened into N rows)."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    dx = dy @ W  # (..., in)
    dW = dy2.T @ x2  # (out, in)
    db = dy2.sum(axis=0)  # (out,)
    return dx, dW, db


def layernorm_backward(dy, xhat, rho, gamma):
    """x̄ = ρ (g − mean(g) − x̂ mean(g ⊙ x̂)) with g = ȳ ⊙ γ; γ̄ = Σ ȳ ⊙ x̂; β̄ = Σ ȳ."""
    d = xhat.shape[-1]
    g = dy * gamma
    dx = rho * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    dgamma = (dy * xhat).reshape(-1, d).sum(0)
    dbeta = dy.reshape(-1, d).sum(0)
    return dx, dgamma, dbeta


def softmax_backward(p, dp):
    """z̄_j = p_j (p̄_j − Σ_i p̄_i p_i): an elementwise product and a row sum."""
    return p * (dp - (dp * p).sum(-1, keepdims=True))


def broken_layernorm_backward(dy, xhat, rho, gamma):
    """The LayerNorm backward with its last term dropped: both oracles must reject it."""
    d = xhat.shape[-1]
    g = dy * gamma
    dx = rho * (g - g.mean(-1, keepdims=True))  # − x̂ mean(g ⊙ x̂) is missing
    return dx, (dy * xhat).reshape(-1, d).sum(0), dy.reshape(-1, d).sum(0)
