r"""Causal multi-head self-attention (Vaswani et al. 2017, arXiv:1706.03762, §3.2), backward by hand.

Forward, for ``x (B, T, C)`` with ``n_head`` heads of size ``hs = C / n_head``. The four
projections are modules (``q``, ``k``, ``v``, ``o``, each a :class:`~lowrank_ref.nn.Linear` with
bias) and are always *called*, never read, so an adapter swapped in for ``attn.q`` takes part in
both passes. Per head, with :math:`Q, K, V` of shape ``(T, hs)``:

.. math::
    S = \frac{Q K^\top}{\sqrt{hs}} + M, \qquad
    M_{ts} = \begin{cases} 0 & s \le t \\ -\infty & s > t \end{cases}, \qquad
    P = \operatorname{softmax}_{\text{rows}}(S), \qquad
    Y = (P \odot D)\, V,

then the heads are concatenated back to ``(B, T, C)`` and projected by ``o``. :math:`D` is the
attention-dropout mask (inverted, so all ones in eval). The mask :math:`M` lets position
:math:`t` attend only to :math:`s \le t`: no token sees the future.

Backward, for upstream :math:`\bar Y` (per head, writing :math:`\tilde P = P \odot D`):

.. math::
    \bar V = \tilde P^\top \bar Y, \qquad
    \bar P = (\bar Y V^\top) \odot D, \qquad
    \bar S = P \odot \big(\bar P - \operatorname{rowsum}(\bar P \odot P)\big), \qquad
    \bar Q = \frac{\bar S K}{\sqrt{hs}}, \qquad
    \bar K = \frac{\bar S^\top Q}{\sqrt{hs}} .

:math:`\bar V` and :math:`\bar P` are the two halves of the product rule for :math:`Y = \tilde P V`;
:math:`\bar S` is the softmax backward (see :mod:`lowrank_ref.nn.activations`); the last two are
the product rule for :math:`S = QK^\top/\sqrt{hs}`. The masked entries need no special case: there
:math:`P = 0`, so :math:`\bar S = 0` and nothing flows to the future. Finally
:math:`\bar x = \bar x_q + \bar x_k + \bar x_v`, since ``x`` feeds all three projections.

Prefix tuning (Li & Liang 2021; chapter 09 derives it): when the model sets ``kv_prefix`` to
``(P_k, P_v)``, each ``(p, C)``, the keys and values become :math:`K' = [P_k; K]`, :math:`V' = [P_v; V]`
(per head, ``(p + T, hs)``), the mask gains ``p`` open columns in front, and the same backward
gives :math:`\bar K'`, :math:`\bar V'`; their first ``p`` rows, summed over the batch (the prefixes
are shared by every row), are :math:`\bar P_k`, :math:`\bar P_v` (stored as ``kv_prefix_grad``,
``(2, p, C)``), and the remaining ``T`` rows are :math:`\bar K`, :math:`\bar V` as before.
"""

from __future__ import annotations

import functools

import numpy as np

from lowrank_ref.nn.activations import softmax, softmax_backward
from lowrank_ref.nn.linear import Dropout, Linear, check_last_dim
from lowrank_ref.nn.module import Module, array_module, where_is

__all__ = ["CausalSelfAttention", "causal_mask", "additive_causal_mask"]


def causal_mask(T: int) -> np.ndarray:
    """A ``(T, T)`` boolean array, ``True`` where position ``t`` may NOT look (``s > t``)."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


@functools.lru_cache(maxsize=32)
def additive_causal_mask(T: int, dtype, n_prefix: int = 0) -> np.ndarray:
    """M of the formula above, ``(T, T)``: 0 where ``s <= t``, ``-inf`` where ``s > t`` (read-only, cached).

    With ``n_prefix = p`` key/value prefixes in front of the keys (prefix tuning) it is
    ``(T, p + T)``: the first ``p`` columns are 0 (every position sees every prefix), the rest the
    causal mask, so column ``p + s`` is open for ``s <= t``.

    Adding it is one pass over S; ``np.where(causal_mask(T), -inf, S)`` builds the boolean mask
    and a third array every call, and branches on every entry."""
    closed = np.triu(np.ones((T, n_prefix + T), dtype=bool), k=1 + n_prefix)  # key column j > p + t
    m = np.where(closed, np.asarray(-np.inf, dtype=dtype), np.asarray(0, dtype=dtype))
    m.setflags(write=False)
    return m


class CausalSelfAttention(Module):
    """Masked multi-head self-attention with projections ``q``, ``k``, ``v``, ``o`` (C -> C, bias).

    Args:
        d_model: ``C``, the width of the residual stream.
        n_head: the number of heads; must divide ``d_model``.
        dropout: the probability for the attention-weight dropout (``attn_drop``) and the output
            dropout (``resid_drop``); both are off in eval.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rng=None, dtype=np.float32):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_head", n_head)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if d_model % n_head:
            raise ValueError(f"n_head ({n_head}) must divide d_model ({d_model})")
        rng = np.random.default_rng() if rng is None else rng
        self.d_model, self.n_head = int(d_model), int(n_head)
        self.q = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.k = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.v = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.o = Linear(d_model, d_model, rng=rng, dtype=dtype)
        self.attn_drop = Dropout(dropout, rng=rng)
        self.resid_drop = Dropout(dropout, rng=rng)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    def _split(self, t: np.ndarray) -> np.ndarray:
        B, T, C = t.shape
        return t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3)  # (B, nh, T, hs)

    def _merge(self, t: np.ndarray) -> np.ndarray:
        B, nh, T, hs = t.shape
        return t.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)  # (B, T, C)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_last_dim(x, self.d_model)
        if x.ndim != 3:
            raise ValueError(f"x must have shape (B, T, {self.d_model}), got {x.shape}")
        T = x.shape[1]
        scale = 1.0 / np.sqrt(self.head_size)
        q = self._split(self.q.forward(x))  # (B, nh, T, hs)
        k = self._split(self.k.forward(x))  # (B, nh, T, hs)
        v = self._split(self.v.forward(x))  # (B, nh, T, hs)
        n_prefix = 0
        kv = getattr(self, "kv_prefix", None)  # prefix tuning: (2, p, C) set by the model, or None
        if kv is not None:  # K ← [P_k; K], V ← [P_v; V], the same prefixes for every batch row
            xp = array_module(k)
            n_prefix = kv.shape[1]
            pk, pv = (self._split(xp.broadcast_to(t, (x.shape[0], *t.shape))) for t in kv)  # (B, nh, p, hs)
            k = xp.concatenate([pk.astype(k.dtype, copy=False), k], axis=2)  # (B, nh, p+T, hs)
            v = xp.concatenate([pv.astype(v.dtype, copy=False), v], axis=2)  # (B, nh, p+T, hs)
        s = q @ k.transpose(0, 1, 3, 2)  # Q Kᵀ   (B, nh, T, p+T)
        s *= s.dtype.type(scale)  # S = Q Kᵀ/√hs, in place
        s += where_is(s, additive_causal_mask(T, s.dtype, n_prefix))  # + M (no looking ahead; prefixes always open)
        p = softmax(s, axis=-1)  # P, rows sum to 1   (B, nh, T, T)
        pd = self.attn_drop.forward(p)  # P̃ = P ⊙ D
        y = self._merge(pd @ v)  # Y = P̃ V, heads concatenated   (B, T, C)
        out = self.resid_drop.forward(self.o.forward(y))  # (B, T, C)
        self._cache = (q, k, v, p, pd, scale, n_prefix)
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        q, k, v, p, pd, scale, n_prefix = self._pop_cache()
        dy = self._split(self.o.backward(self.resid_drop.backward(dout)))  # Ȳ  (B, nh, T, hs)
        dv = pd.transpose(0, 1, 3, 2) @ dy  # V̄ = P̃ᵀ Ȳ       (B, nh, T, hs)
        dp = self.attn_drop.backward(dy @ v.transpose(0, 1, 3, 2))  # P̄ = (Ȳ Vᵀ) ⊙ D   (B, nh, T, T)
        ds = softmax_backward(dp, p)  # S̄
        ds *= ds.dtype.type(scale)  # S̄/√hs, in place
        dq = ds @ k  # Q̄ = S̄ K /√hs     (B, nh, T, hs)
        dk = ds.transpose(0, 1, 3, 2) @ q  # K̄ = S̄ᵀ Q /√hs   (B, nh, T, hs)
        if n_prefix:  # the first p rows of K̄, V̄ belong to the prefixes, summed over the batch
            self.kv_prefix_grad = array_module(dk).stack([self._merge(dk[:, :, :n_prefix]).sum(axis=0),
                                                          self._merge(dv[:, :, :n_prefix]).sum(axis=0)])  # (2, p, C)
            dk, dv = dk[:, :, n_prefix:], dv[:, :, n_prefix:]  # the input's own keys and values
        dx = self.q.backward(self._merge(dq))  # (B, T, C)
        dx = dx + self.k.backward(self._merge(dk))
        dx = dx + self.v.backward(self._merge(dv))  # x̄ = x̄_q + x̄_k + x̄_v
        return dx

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_head={self.n_head}"
