r"""Cross-entropy on logits, computed stably, with its gradient.

For logits :math:`z \in \mathbb R^V` and a target class :math:`y`,

.. math::
    \ell = -\log \operatorname{softmax}(z)_y = \operatorname{lse}(z) - z_y, \qquad
    \operatorname{lse}(z) = m + \log \textstyle\sum_j e^{z_j - m}, \quad m = \max_j z_j .

Subtracting :math:`m` keeps every exponent :math:`\le 0` (no overflow) and the largest term equal
to 1 (the sum never underflows to 0, so the log is finite). The loss is the mean of :math:`\ell`
over the :math:`N` positions whose target is not ``ignore_index``.

Gradient. :math:`\partial\,\operatorname{lse}/\partial z_j = \operatorname{softmax}(z)_j = p_j`,
so :math:`\partial \ell/\partial z_j = p_j - [j = y]`, and with the mean

.. math::
    \bar z = \frac{1}{N}\big(p - \mathrm{onehot}(y)\big) \quad\text{(rows with an ignored target: 0)}.

Softmax and cross-entropy are differentiated together: the softmax Jacobian never appears.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.module import Module, array_module

__all__ = ["cross_entropy", "CrossEntropyLoss", "log_softmax"]


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    r"""log softmax(z) = z - lse(z), computed with the max shift."""
    m = np.max(z, axis=axis, keepdims=True)
    return z - (m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True)))


def cross_entropy(logits, targets, ignore_index: int = -100):
    r"""Mean cross-entropy and its gradient.

    Args:
        logits: floating ``(..., V)``.
        targets: integer ``(...)`` (the leading shape of ``logits``), each in ``[0, V)`` or equal
            to ``ignore_index``.
        ignore_index: targets with this value contribute neither to the loss nor to the mean.
    Returns:
        ``(loss, dlogits)``: a Python float and :math:`\bar z` shaped and typed like ``logits``.
    """
    xp = array_module(logits)
    z = xp.asarray(logits)
    t = xp.asarray(targets)  # host targets go where the logits are
    if not np.issubdtype(z.dtype, np.floating):
        raise TypeError(f"logits must be a floating array, got dtype {z.dtype}")
    if z.ndim < 1 or z.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {z.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"targets must be an integer array of class ids, got dtype {t.dtype}")
    if t.shape != z.shape[:-1]:
        raise ValueError(f"targets must have shape {z.shape[:-1]} (logits without the last axis), got {t.shape}")
    V = z.shape[-1]
    keep = t != ignore_index
    bad = keep & ((t < 0) | (t >= V))
    if np.any(bad):
        raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"got {t[bad].reshape(-1)[:5].tolist()}")
    n = int(np.count_nonzero(keep))
    if n == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}: the mean over no tokens is undefined")
    z2 = z.reshape(-1, V)  # (N_all, V)
    t2 = xp.where(keep, t, 0).reshape(-1)
    k2 = keep.reshape(-1)
    logp = log_softmax(z2)  # log p = z - lse(z)
    rows = xp.arange(z2.shape[0])
    loss = -float(np.sum(logp[rows, t2][k2], dtype=np.float64)) / n  # mean of lse(z) - z_y
    dz = np.exp(logp)  # p
    dz[rows, t2] -= 1.0  # p - onehot(y)
    dz *= (k2[:, None] / n).astype(z.dtype)  # z̄ = (p - onehot(y)) / N, zero where ignored
    return loss, dz.reshape(z.shape)


class CrossEntropyLoss(Module):
    """``forward(logits, targets) -> float``; ``backward(dloss=1.0) -> dlogits``."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits, targets) -> float:
        loss, dlogits = cross_entropy(logits, targets, self.ignore_index)
        self._cache = dlogits
        return loss

    def backward(self, dloss: float = 1.0) -> np.ndarray:
        dlogits = self._pop_cache()
        return dlogits if dloss == 1.0 else dlogits * dlogits.dtype.type(dloss)
