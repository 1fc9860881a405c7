r"""Layer normalisation (Ba, Kiros & Hinton 2016, arXiv:1607.06450) with its backward pass.

Forward, over the last axis of size :math:`d` (biased variance, as ``torch.nn.LayerNorm``):

.. math::
    \mu = \tfrac1d \textstyle\sum_j x_j, \quad
    \sigma^2 = \tfrac1d \textstyle\sum_j (x_j-\mu)^2, \quad
    \rho = (\sigma^2+\epsilon)^{-1/2}, \quad
    \hat x = (x-\mu)\,\rho, \quad
    y = \gamma \odot \hat x + \beta .

Backward. The parameters are easy: :math:`\bar\gamma = \sum_n \bar y_n \odot \hat x_n`,
:math:`\bar\beta = \sum_n \bar y_n` (sums over every leading position :math:`n`). For the input,
write :math:`g = \bar y \odot \gamma` (the gradient reaching :math:`\hat x`). Using
:math:`\partial\mu/\partial x_i = 1/d` and :math:`\partial\rho/\partial x_i = -\rho^3 (x_i-\mu)/d
= -\rho^2 \hat x_i / d`,

.. math::
    \frac{\partial \hat x_j}{\partial x_i} = \rho\Big(\delta_{ij} - \tfrac1d - \tfrac1d\,\hat x_i \hat x_j\Big),
    \qquad
    \bar x_i = \sum_j g_j \frac{\partial \hat x_j}{\partial x_i}
             = \rho\Big(g_i - \overline{g} - \hat x_i\,\overline{g \hat x}\Big),

where :math:`\overline{g}` and :math:`\overline{g\hat x}` are means over the last axis. The two
subtracted terms remove the components of :math:`g` along the two directions that the
normalisation projects out (a shift of all entries, a scaling along :math:`\hat x`).
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.linear import check_last_dim
from lowrank_ref.nn.module import Module, Parameter

__all__ = ["LayerNorm", "layernorm_forward", "layernorm_backward"]


def layernorm_forward(x, gamma, beta, eps: float = 1e-5):
    r"""y = γ ⊙ (x - μ) ρ + β over the last axis.  x (..., d) -> (y (..., d), cache)."""
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu
    var = np.einsum("...j,...j->...", xc, xc)[..., None] / x.shape[-1]  # σ² (biased), (..., 1), no x² array
    rho = 1.0 / np.sqrt(var + eps)  # ρ = (σ² + ε)^(-1/2)
    xhat = np.multiply(xc, rho, out=xc if xc.dtype == rho.dtype else None)  # x̂ = (x - μ) ρ, over xc
    y = xhat * gamma
    y = np.add(y, beta, out=y if y.dtype == np.result_type(y, beta) else None)  # y = γ ⊙ x̂ + β
    return y, (xhat, rho, gamma)


def layernorm_backward(dy, cache):
    r"""Return (x̄, γ̄, β̄): x̄ = ρ (g - mean(g) - x̂ mean(g x̂)) with g = ȳ ⊙ γ."""
    xhat, rho, gamma = cache
    d = xhat.shape[-1]
    dgamma = (dy * xhat).reshape(-1, d).sum(axis=0)  # γ̄ = Σ_n ȳ ⊙ x̂
    dbeta = dy.reshape(-1, d).sum(axis=0)  # β̄ = Σ_n ȳ
    g = dy * gamma
    mean_g = g.mean(axis=-1, keepdims=True)
    mean_gx = np.einsum("...j,...j->...", g, xhat)[..., None] / d  # mean(g x̂) without a (…, d) temporary
    # x̄ = ρ (g - mean(g) - x̂ mean(g x̂)), built in g's own array (two temporaries fewer)
    dx = np.subtract(g, mean_g, out=g if g.dtype == np.result_type(g, mean_g) else None)
    dx -= xhat * mean_gx
    dx *= rho
    return dx, dgamma, dbeta


class LayerNorm(Module):
    """LayerNorm over the last axis: ``weight`` γ (ones) and ``bias`` β (zeros), both ``(dim,)``."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=np.float32):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        eps = float(eps)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = eps
        self.weight = Parameter(np.ones(dim, dtype=dtype))
        self.bias = Parameter(np.zeros(dim, dtype=dtype))

    @property
    def dim(self) -> int:
        return self.weight.data.shape[0]

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_last_dim(x, self.dim)
        y, cache = layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        self._cache = cache
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = layernorm_backward(dy, self._pop_cache())
        self.weight.accumulate(dgamma)
        self.bias.accumulate(dbeta)
        return dx

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
