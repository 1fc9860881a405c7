r"""The transformer MLP and the pre-LN block, assembled from modules with their own backward.

MLP: :math:`\mathrm{MLP}(x) = \mathrm{drop}\big(\mathrm{GELU}(x W_{fc}^\top + b_{fc})\, W_{proj}^\top + b_{proj}\big)`;
its backward is the chain of its parts in reverse order.

Block, pre-LN (as GPT-2, Radford et al. 2019; Xiong et al. 2020, arXiv:2002.04745):

.. math::
    h = x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad y = h + \mathrm{MLP}(\mathrm{LN}_2(h)).

Backward. A residual connection copies its input into two paths, so the gradients of the two
paths add:

.. math::
    \bar h = \bar y + \mathrm{LN}_2^{\,\prime\top}\big(\mathrm{MLP}^{\prime\top}\,\bar y\big), \qquad
    \bar x = \bar h + \mathrm{LN}_1^{\,\prime\top}\big(\mathrm{Attn}^{\prime\top}\,\bar h\big),

where :math:`F^{\prime\top} g` denotes the backward of module :math:`F` applied to :math:`g`.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.activations import GELU
from lowrank_ref.nn.attention import CausalSelfAttention, ShiftedSparseAttention, check_attention
from lowrank_ref.nn.layernorm import LayerNorm
from lowrank_ref.nn.linear import Dropout, Linear
from lowrank_ref.nn.module import Module

__all__ = ["MLP", "Block"]


class MLP(Module):
    """``fc`` (C -> hidden) -> ``act`` (GELU) -> ``proj`` (hidden -> C) -> ``drop``."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, rng=None, dtype=np.float32):
        super().__init__()
        rng = np.random.default_rng() if rng is None else rng
        self.fc = Linear(d_model, hidden, rng=rng, dtype=dtype)
        self.act = GELU()
        self.proj = Linear(hidden, d_model, rng=rng, dtype=dtype)
        self.drop = Dropout(dropout, rng=rng)

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = self.act.forward(self.fc.forward(x))  # (..., hidden)
        return self.drop.forward(self.proj.forward(h))  # (..., C)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dh = self.proj.backward(self.drop.backward(dy))  # (..., hidden)
        return self.fc.backward(self.act.backward(dh))  # (..., C)


class Block(Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``h + mlp(ln2(h))``.

    ``attention``: ``"full"`` (:class:`CausalSelfAttention`) or ``"s2"``
    (:class:`ShiftedSparseAttention`: LongLoRA's S²-Attn while training, full attention in eval)."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 rng=None, dtype=np.float32, attention: str = "full"):
        super().__init__()
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, np.integer)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive integer, got {mlp_ratio!r}")
        rng = np.random.default_rng() if rng is None else rng
        self.ln1 = LayerNorm(d_model, dtype=dtype)
        attn_cls = ShiftedSparseAttention if check_attention(attention) == "s2" else CausalSelfAttention
        self.attn = attn_cls(d_model, n_head, dropout=dropout, rng=rng, dtype=dtype)
        self.ln2 = LayerNorm(d_model, dtype=dtype)
        self.mlp = MLP(d_model, mlp_ratio * d_model, dropout=dropout, rng=rng, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = x + self.attn.forward(self.ln1.forward(x))  # h = x + Attn(LN1(x))    (B, T, C)
        y = h + self.mlp.forward(self.ln2.forward(h))  # y = h + MLP(LN2(h))      (B, T, C)
        self._cache = True  # the parts keep their own caches; this marks that forward ran
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        self._pop_cache()
        dh = dy + self.ln2.backward(self.mlp.backward(dy))  # h̄ = ȳ + LN2'ᵀ MLP'ᵀ ȳ
        return dh + self.ln1.backward(self.attn.backward(dh))  # x̄ = h̄ + LN1'ᵀ Attn'ᵀ h̄
