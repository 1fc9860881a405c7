r"""Gradient clipping by the global norm (Pascanu et al. 2013), as ``torch.nn.utils.clip_grad_norm_``.

.. math::
    \|g\| = \Bigl(\sum_{p} \|g_p\|_q^q\Bigr)^{1/q}, \qquad
    c = \min\Bigl(1, \frac{\text{max\_norm}}{\|g\| + 10^{-6}}\Bigr), \qquad g_p \leftarrow c\, g_p ,

over every parameter that has a gradient (``q = 2`` by default; ``q = ∞`` takes the largest
absolute entry). The ``1e-6`` is PyTorch's. Returns the norm *before* clipping.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_ref.optim.optimizer import as_named_params, check_lr

__all__ = ["clip_grad_norm", "grad_norm"]


def grad_norm(params, norm_type: float = 2.0) -> float:
    """The global ``norm_type``-norm of every ``.grad`` (parameters without one are skipped)."""
    named = as_named_params(params) if params else {}
    grads = [p.grad for p in named.values() if p.grad is not None]
    if not grads:
        return 0.0
    norm_type = float(norm_type)
    if norm_type == math.inf:
        return float(max(np.max(np.abs(g)) for g in grads))
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    per = [float(np.linalg.norm(g.reshape(-1).astype(np.float64), ord=norm_type)) for g in grads]
    return float(np.linalg.norm(np.array(per), ord=norm_type))  # per-tensor norms are host floats


def clip_grad_norm(params, max_norm: float, norm_type: float = 2.0) -> float:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` in place; return ``norm``."""
    max_norm = check_lr(max_norm, "max_norm")
    named = as_named_params(params) if params else {}
    total = grad_norm(named, norm_type)
    coef = min(1.0, max_norm / (total + 1e-6))  # c = min(1, max_norm / (‖g‖ + 1e-6))
    if coef < 1.0:
        for p in named.values():
            if p.grad is not None:
                p.grad = (p.grad * coef).astype(p.grad.dtype, copy=False)
    return total
