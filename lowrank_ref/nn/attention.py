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
from typing import NamedTuple

import numpy as np

from lowrank_ref.nn.activations import softmax, softmax_backward
from lowrank_ref.nn.linear import Dropout, Linear, check_last_dim
from lowrank_ref.nn.module import Module, array_module, where_is

__all__ = ["CausalSelfAttention", "causal_mask", "additive_causal_mask",
           "ShiftedSparseAttention", "S2_GROUPS", "ATTENTIONS", "check_attention", "s2_group_size", "s2_attention_mask", "s2_pieces",
           "s2_attention_forward", "s2_attention_backward", "s2_attention_roll"]


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


# --- LongLoRA's shifted sparse attention (S²-Attn) -----------------------------------------
S2_GROUPS = 4  # LongLoRA's group_size_ratio = 1/4: four groups of G = T/4 tokens
ATTENTIONS = ("full", "s2")  # the models' ``attention=`` choices


def check_attention(attention) -> str:
    """``attention`` checked against :data:`ATTENTIONS` (a ``TypeError``/``ValueError`` naming it)."""
    if not isinstance(attention, str):
        raise TypeError(f"attention must be a string, one of {ATTENTIONS}, got {type(attention).__name__}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    return attention


def s2_group_size(T: int, n_groups: int = S2_GROUPS) -> int:
    """``G = T / n_groups``, checked: S²-Attn needs whole groups of an even size (the shift is G/2).

    A length that does not divide is a ``ValueError`` (no silent padding): pad the batch to a
    multiple of ``2·n_groups`` tokens, or run full attention."""
    for name, v in (("n_groups", n_groups), ("T", T)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if T % (2 * n_groups):
        raise ValueError(f"S²-Attn splits the sequence into n_groups={n_groups} groups of an even size G "
                         f"(half of the heads are shifted by G/2), so the sequence length must be a multiple "
                         f"of {2 * n_groups}, got T={T}; pad the batch or use full attention")
    return int(T) // int(n_groups)


def s2_attention_mask(T: int, n_head: int, n_groups: int = S2_GROUPS, roll: bool = False) -> np.ndarray:
    r"""The dense picture of S²-Attn: ``(n_head, T, T)`` booleans, ``True`` where query ``t`` may
    attend to key ``s`` (the reference implementation for tests and the chapter, not the fast path).

    With ``G = T/n_groups`` and ``seg(t)`` a position's segment, ``t`` sees ``s`` iff
    ``s <= t`` and ``seg(s) = seg(t)``:

    * heads ``[0, H//2)``: ``seg(t) = ⌊t/G⌋`` (groups ``[0, G), [G, 2G), ...``);
    * heads ``[H//2, H)``, shifted by half a group, no wrap: ``seg(t) = ⌊(t + G/2)/G⌋``
      (segments ``[0, G/2), [G/2, 3G/2), ..., [T - G/2, T)``, as LongLoRA's flash version's
      ``cu_seqlens``);
    * ``roll=True``, the shifted heads of the reference's ``roll`` version: position ``t`` sits at
      ``i(t) = (t - G/2) mod T``; ``t`` sees ``s`` iff ``⌊i(s)/G⌋ = ⌊i(t)/G⌋`` and ``i(s) <= i(t)``.
      Tokens ``[0, G/2)`` land after tokens ``[T - G/2, T)`` in the last group and see them: the
      future (the leak, REFERENCES §11).
    """
    G = s2_group_size(T, n_groups)
    h = G // 2
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    plain = (t // G == s // G) & (s <= t)
    if roll:
        it, js = (t - h) % T, (s - h) % T
        shifted = (it // G == js // G) & (js <= it)
    else:
        shifted = ((t + h) // G == (s + h) // G) & (s <= t)
    h0 = n_head // 2
    return np.stack([plain] * h0 + [shifted] * (n_head - h0))


def s2_pieces(T: int, n_head: int, n_groups: int = S2_GROUPS) -> list[tuple[slice, tuple, int]]:
    """How S²-Attn cuts ``(heads, tokens)`` into independent causal attentions: a list of
    ``(heads, token ranges, group size)``. Each range is a whole number of groups; together the
    pieces cover every (head, token) once.

    * heads ``[0, H//2)``: all of ``[0, T)`` in groups of ``G``;
    * heads ``[H//2, H)``: ``[G/2, T - G/2)`` in groups of ``G`` (the shifted groups), and the two
      half groups at the ends, ``[0, G/2)`` and ``[T - G/2, T)``, as two groups of ``G/2``."""
    G = s2_group_size(T, n_groups)
    h, h0 = G // 2, n_head // 2
    pieces = [(slice(0, h0), ((0, T),), G),
              (slice(h0, n_head), ((h, T - h),), G),
              (slice(h0, n_head), ((0, h), (T - h, T)), h)]
    return [p for p in pieces if p[0].stop > p[0].start and sum(b - a for a, b in p[1]) > 0]


def _gather_groups(x: np.ndarray, ranges, g: int) -> np.ndarray:
    """``x (B, h, T, hs)`` -> the tokens in ``ranges`` as groups ``(B, h, n, g, hs)``."""
    parts = [x[:, :, a:b] for a, b in ranges]
    y = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
    B, nh, L, hs = y.shape
    return y.reshape(B, nh, L // g, g, hs)


def _scatter_groups(out: np.ndarray, yg: np.ndarray, ranges) -> None:
    """Write groups ``yg (B, h, n, g, hs)`` back into the token ``ranges`` of ``out (B, h, T, hs)``."""
    B, nh, n, g, hs = yg.shape
    flat = yg.reshape(B, nh, n * g, hs)
    i = 0
    for a, b in ranges:
        out[:, :, a:b] = flat[:, :, i:i + b - a]
        i += b - a


class S2Part(NamedTuple):
    """One piece of :func:`s2_attention_forward`'s cache: where it sits and what its backward needs."""

    heads: slice
    ranges: tuple
    g: int
    q: np.ndarray  # (B, h, n, g, hs)
    k: np.ndarray
    v: np.ndarray
    p: np.ndarray  # P = softmax(S)   (B, h, n, g, g)
    keep: np.ndarray | None  # the inverted-dropout mask D, or None


class S2Cache(NamedTuple):
    parts: list
    scale: float
    shape: tuple  # (B, nh, T, hs)


def s2_attention_forward(q, k, v, n_groups: int = S2_GROUPS, dropout: float = 0.0, rng=None):
    r"""Shifted sparse attention (LongLoRA, Chen et al. 2024, arXiv:2309.12307, §3.2), the version
    that does not wrap around.

    Args:
        q, k, v: ``(B, H, T, hs)``, the heads already split.
        n_groups: the groups per sequence (LongLoRA: 4, ``G = T/4``); ``T`` must be a multiple of
            ``2·n_groups`` (:func:`s2_group_size`).
        dropout, rng: attention-weight dropout (inverted), as the full attention's ``attn_drop``.
    Returns:
        ``(Y (B, H, T, hs), cache)``.

    Each piece of :func:`s2_pieces` (a set of heads, groups of ``g`` tokens) is causal attention
    within each group, exactly the formulas of this module's docstring with ``T`` replaced by
    ``g``: per group ``S = Q_g K_gᵀ/√hs + M_g``, ``P = softmax(S)``, ``Y_g = (P ⊙ D) V_g``. Heads
    ``[0, H//2)`` use groups ``[0, G), [G, 2G), ...``; heads ``[H//2, H)`` use the groups shifted by
    ``G/2`` — ``[G/2, 3G/2), ...`` plus the two half groups ``[0, G/2)`` and ``[T - G/2, T)`` at the
    ends, so no token sees a later one. Equal to attention with the dense mask
    :func:`s2_attention_mask`; the work is ``O(T·G)`` per head instead of ``O(T²)``.

    Backward (:func:`s2_attention_backward`): the groups share nothing, so it is the full
    attention's backward in every group, and each (head, token) gets its gradient from the one
    group it belongs to.
    """
    B, H, T, hs = q.shape
    scale = 1.0 / np.sqrt(hs)
    y = np.zeros_like(v)
    parts = []
    for heads, ranges, g in s2_pieces(T, H, n_groups):
        qg, kg, vg = (_gather_groups(t[:, heads], ranges, g) for t in (q, k, v))  # (B, h, n, g, hs)
        s = qg @ kg.swapaxes(-1, -2)  # Q_g K_gᵀ   (B, h, n, g, g)
        s *= s.dtype.type(scale)
        s += where_is(s, additive_causal_mask(g, s.dtype))  # + M_g: causal inside the group
        p = softmax(s, axis=-1)
        keep = None
        if dropout > 0.0:
            keep = where_is(p, ((rng.random(p.shape) >= dropout) / (1.0 - dropout)).astype(p.dtype))
        pd = p if keep is None else p * keep  # P̃ = P ⊙ D
        _scatter_groups(y[:, heads], pd @ vg, ranges)  # Y_g = P̃ V_g
        parts.append(S2Part(heads, ranges, g, qg, kg, vg, p, keep))
    return y, S2Cache(parts, scale, (B, H, T, hs))


def s2_attention_backward(dy, cache: S2Cache):
    r"""``(Q̄, K̄, V̄)``, each ``(B, H, T, hs)``, for upstream ``Ȳ``: per group, as the full
    attention's, ``V̄ = P̃ᵀ Ȳ``, ``P̄ = (Ȳ Vᵀ) ⊙ D``, ``S̄ = P ⊙ (P̄ - rowsum(P̄ ⊙ P))``,
    ``Q̄ = S̄ K/√hs``, ``K̄ = S̄ᵀ Q/√hs``."""
    xp = array_module(dy)
    dq, dk, dv = (xp.zeros(cache.shape, dtype=np.result_type(dy, cache.parts[0].q)) for _ in range(3))
    for part in cache.parts:
        dyg = _gather_groups(dy[:, part.heads], part.ranges, part.g)  # Ȳ_g   (B, h, n, g, hs)
        pd = part.p if part.keep is None else part.p * part.keep
        dvg = pd.swapaxes(-1, -2) @ dyg  # V̄ = P̃ᵀ Ȳ
        dp = dyg @ part.v.swapaxes(-1, -2)  # Ȳ Vᵀ   (B, h, n, g, g)
        if part.keep is not None:
            dp *= part.keep  # P̄ = (Ȳ Vᵀ) ⊙ D
        ds = softmax_backward(dp, part.p)  # S̄
        ds *= ds.dtype.type(cache.scale)
        _scatter_groups(dq[:, part.heads], ds @ part.k, part.ranges)  # Q̄ = S̄ K/√hs
        _scatter_groups(dk[:, part.heads], ds.swapaxes(-1, -2) @ part.q, part.ranges)  # K̄ = S̄ᵀ Q/√hs
        _scatter_groups(dv[:, part.heads], dvg, part.ranges)
    return dq, dk, dv


def s2_attention_roll(q, k, v, n_groups: int = S2_GROUPS) -> np.ndarray:
    r"""The LongLoRA reference's ``roll`` version of S²-Attn (``forward_noflashattn``), forward
    only, kept to show its leak: the shifted heads are rolled by ``-G/2`` along the sequence,
    attention runs causally within groups of ``G``, and the output is rolled back by ``+G/2``.

    ``roll`` wraps around: the last group of the shifted heads holds tokens ``[T - G/2, T)`` and
    then ``[0, G/2)``, so under the in-group causal mask the first ``G/2`` tokens attend to the
    last ``G/2`` — later tokens, at training time. :func:`s2_attention_forward` does not wrap."""
    B, H, T, hs = q.shape
    G = s2_group_size(T, n_groups)
    h0, shift = H // 2, G // 2

    def rolled(t, by):
        t = t.copy()
        t[:, h0:] = np.roll(t[:, h0:], by, axis=2)
        return t

    q, k, v = (rolled(t, -shift) for t in (q, k, v))
    qg, kg, vg = (t.reshape(B, H, T // G, G, hs) for t in (q, k, v))  # (B, H, n, G, hs)
    s = (qg @ kg.swapaxes(-1, -2)) * (1.0 / np.sqrt(hs)) + additive_causal_mask(G, q.dtype)
    y = (softmax(s, axis=-1) @ vg).reshape(B, H, T, hs)
    return rolled(y, shift)


class ShiftedSparseAttention(CausalSelfAttention):
    r"""Causal self-attention that runs LongLoRA's S²-Attn while training and full attention in
    eval mode (LongLoRA: S²-Attn "is not required during inference"). The same ``q``, ``k``, ``v``,
    ``o`` and parameter names as :class:`CausalSelfAttention`, so adapters inject the same way and
    weights load unchanged.

    Args:
        n_groups: groups per sequence while training (4: ``G = T/4``); a training sequence whose
            length is not a multiple of ``2·n_groups`` is a ``ValueError``.
        the rest: as :class:`CausalSelfAttention`.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, rng=None, dtype=np.float32,
                 n_groups: int = S2_GROUPS):
        super().__init__(d_model, n_head, dropout=dropout, rng=rng, dtype=dtype)
        s2_group_size(2 * n_groups, n_groups)  # checks n_groups
        self.n_groups = int(n_groups)
        self._s2 = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training:
            self._s2 = False
            return super().forward(x)  # full attention at inference
        x = check_last_dim(x, self.d_model)
        if x.ndim != 3:
            raise ValueError(f"x must have shape (B, T, {self.d_model}), got {x.shape}")
        s2_group_size(x.shape[1], self.n_groups)  # a clear error before any work
        q = self._split(self.q.forward(x))  # (B, nh, T, hs)
        k = self._split(self.k.forward(x))
        v = self._split(self.v.forward(x))
        y, cache = s2_attention_forward(q, k, v, self.n_groups, self.attn_drop.p, self.attn_drop.rng)
        out = self.resid_drop.forward(self.o.forward(self._merge(y)))  # (B, T, C)
        self._s2 = True
        self._cache = cache
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if not self._s2:
            return super().backward(dout)
        cache = self._pop_cache()
        dy = self._split(self.o.backward(self.resid_drop.backward(dout)))  # Ȳ   (B, nh, T, hs)
        dq, dk, dv = s2_attention_backward(dy, cache)
        dx = self.q.backward(self._merge(dq))
        dx = dx + self.k.backward(self._merge(dk))
        dx = dx + self.v.backward(self._merge(dv))  # x̄ = x̄_q + x̄_k + x̄_v
        return dx

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, s2_groups={self.n_groups}"
