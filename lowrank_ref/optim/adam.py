r"""Adam (Kingma & Ba 2015, arXiv:1412.6980) and AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101).

Per parameter, with step count :math:`t` (from 1), gradient :math:`g`, and state
``exp_avg`` :math:`m`, ``exp_avg_sq`` :math:`v` (both start at zero, shaped like the parameter):

.. math::
    m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad
    v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
    \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\;
        \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon} .

This is the arrangement ``torch.optim.Adam`` uses (``ε`` is added *after* the bias correction of
``v``), so trajectories agree to rounding in float64.

Weight decay differs between the two:

* ``Adam``: L2 regularisation folded into the gradient, :math:`g \leftarrow g + \lambda\theta`
  (so it is rescaled by the adaptive denominator, the effect AdamW's paper argues against);
* ``AdamW``: decoupled, :math:`\theta \leftarrow (1 - \eta\lambda)\,\theta` before the Adam step.

State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (parameter's dtype): two extra
copies of every trainable tensor, the "optimizer state" that LoRA shrinks along with the gradients.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_ref.optim.optimizer import Optimizer, check_beta, check_lr, check_nonneg

__all__ = ["Adam", "AdamW", "adam_direction"]


def adam_direction(grad, state: dict, betas, eps: float, lr: float) -> np.ndarray:
    r"""Advance ``m``, ``v`` and ``t`` in ``state``; return the step ``Δθ`` (to add to ``θ``).

    ``Δθ = -(η / (1-β₁ᵗ)) · m / (√v / √(1-β₂ᵗ) + ε)``."""
    b1, b2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(grad)
        state["exp_avg_sq"] = np.zeros_like(grad)
    state["step"] += 1
    t = state["step"]
    m = state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad  # m = β₁m + (1-β₁)g
    v = state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * grad * grad  # v = β₂v + (1-β₂)g²
    step_size = lr / (1 - b1**t)  # η / (1-β₁ᵗ)
    denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps  # √v̂ + ε
    return -step_size * m / denom


class Adam(Optimizer):
    """``Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)`` (L2 in the gradient)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (check_beta(betas[0], "betas[0]"), check_beta(betas[1], "betas[1]"))
        self.eps = check_lr(eps, "eps")
        self.weight_decay = check_nonneg(weight_decay, "weight_decay")
        super().__init__(params, lr)

    def _decay(self, param, grad):
        """Adam: g + λθ (coupled L2). AdamW overrides this."""
        if self.weight_decay:
            return grad + self.weight_decay * param.data
        return grad

    def _update(self, name, param, grad, state):
        grad = self._decay(param, grad)
        d = adam_direction(grad, state, self.betas, self.eps, self.lr)
        param.data = (param.data + d).astype(param.data.dtype, copy=False)


class AdamW(Adam):
    """``AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)`` (decoupled decay)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _decay(self, param, grad):
        if self.weight_decay:
            param.data = param.data * (1 - self.lr * self.weight_decay)  # θ ← (1 - ηλ) θ
        return grad
