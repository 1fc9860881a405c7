r"""Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

The update is PyTorch's ``torch.optim.SGD`` (with ``dampening = 0``), step by step:

.. math::
    g \leftarrow g + \lambda\,\theta, \qquad
    v \leftarrow \begin{cases} g & \text{first step} \\ \mu v + g & \text{after} \end{cases}, \qquad
    d = \begin{cases} g + \mu v & \text{Nesterov} \\ v & \text{else} \end{cases}, \qquad
    \theta \leftarrow \theta - \eta\, d ,

and plain ``θ ← θ - η g`` when ``μ = 0`` (no state is kept then).
"""

from __future__ import annotations

from lowrank_ref.optim.optimizer import Optimizer, check_beta, check_nonneg

__all__ = ["SGD"]


class SGD(Optimizer):
    """``SGD(params, lr, momentum=0.0, weight_decay=0.0, nesterov=False)``. State: ``momentum_buffer``."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        self.momentum = check_beta(momentum, "momentum")
        self.weight_decay = check_nonneg(weight_decay, "weight_decay")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        super().__init__(params, lr)

    def _update(self, name, param, grad, state):
        g = grad
        if self.weight_decay:
            g = g + self.weight_decay * param.data  # L2: g + λθ
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = g.copy()  # v = g on the first step
            else:
                buf = self.momentum * buf + g  # v = μ v + g
            state["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        param.data = (param.data - self.lr * g).astype(param.data.dtype, copy=False)  # θ -= η d
