r"""A small GPT (decoder-only transformer) in NumPy, every backward by hand.

The shape of GPT-2 (Radford et al. 2019) at toy size, as in Karpathy's nanoGPT: learned token and
position embeddings, ``n_layer`` pre-LN blocks, a final LayerNorm and a linear head to the
vocabulary (no weight tying, no head bias).

.. math::
    x_0 = E_{\text{tok}}[\mathrm{idx}] + E_{\text{pos}}[0..T-1], \qquad
    x_\ell = \mathrm{Block}_\ell(x_{\ell-1}), \qquad
    z = \mathrm{LN}_f(x_L)\, W_{\text{head}}^\top .

Backward runs the same chain in reverse. The position table is shared by every sequence in the
batch, so its gradient sums :math:`\bar x_0` over the batch axis; the token table gets a
scatter-add (see :mod:`lowrank_ref.nn.embedding`).

Init (GPT-2's, as nanoGPT writes it): every Linear weight and both embeddings
:math:`\mathcal N(0, 0.02^2)`, biases 0, and the two projections that write into the residual
stream (``attn.o`` and ``mlp.proj``) :math:`\mathcal N(0, (0.02/\sqrt{2L})^2)` so the residual
variance does not grow with depth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from lowrank_ref.nn.activations import softmax
from lowrank_ref.nn.embedding import Embedding, check_indices
from lowrank_ref.nn.layernorm import LayerNorm
from lowrank_ref.nn.linear import Dropout, Linear
from lowrank_ref.nn.module import Module, ModuleList, array_module, check_condition, set_condition
from lowrank_ref.nn.transformer import Block

__all__ = ["GPTConfig", "GPT", "check_input_length"]


def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be a positive integer, got {v!r} ({type(v).__name__})")
    v = int(v.__index__())
    if v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v}")
    return v


@dataclass(frozen=True)
class GPTConfig:
    """The size of a :class:`GPT`. ``n_head`` must divide ``d_model``; ``dropout`` in [0, 1)."""

    vocab_size: int
    block_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_ratio"):
            object.__setattr__(self, name, _pos_int(getattr(self, name), name))
        if self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"dropout must be a number in [0, 1), got {p!r}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        object.__setattr__(self, "dropout", float(p))

    def to_dict(self) -> dict:
        return asdict(self)


def check_input_length(T: int, block_size: int, prompt=None) -> None:
    """``T`` in ``[1, block_size - k]`` (``k``: the prompt's length, 0 without one), else a
    ``ValueError`` that says what the prompt takes (shared by the NumPy and the torch GPT)."""
    k = 0 if prompt is None else prompt.k
    if 1 <= T <= block_size - k:
        return
    if k:
        raise ValueError(f"sequence length T={T} must be in [1, block_size - k = {block_size - k}]: the "
                         f"prompt of k={k} tokens takes {k} of the model's block_size={block_size} positions")
    raise ValueError(f"sequence length T={T} must be in [1, block_size={block_size}]")


class GPT(Module):
    """``forward(idx (B, T) int) -> logits (B, T, vocab_size)``; ``backward(dlogits) -> None``.

    Submodules: ``tok_emb``, ``pos_emb``, ``drop``, ``blocks`` (a ModuleList of :class:`Block`),
    ``ln_f``, ``head``; after prompt tuning also ``prompt`` (its ``k`` vectors go in front of the
    token embeddings and take positions ``0..k-1``, so the input may be at most ``block_size - k``
    long, :attr:`max_input_length`), after prefix tuning ``prefix`` (each forward hands layer
    ``i``'s key/value prefixes to ``blocks.i.attn.kv_prefix``). Parameter names therefore read ``blocks.0.attn.q.weight``,
    ``tok_emb.weight``, ``head.weight``, the same as in :mod:`lowrank_gpu.nn.gpt`.

    ``attention="s2"`` builds every block with LongLoRA's shifted sparse attention, used while
    training (full attention in eval mode and in :meth:`generate`); the weights are the same.
    """

    def __init__(self, config: GPTConfig, rng=None, dtype=np.float32, attention: str = "full"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        rng = np.random.default_rng() if rng is None else rng
        c = config
        self.config = c
        self.attention = attention
        self.tok_emb = Embedding(c.vocab_size, c.d_model, rng=rng, dtype=dtype)
        self.pos_emb = Embedding(c.block_size, c.d_model, rng=rng, dtype=dtype)
        self.drop = Dropout(c.dropout, rng=rng)
        self.blocks = ModuleList(
            Block(c.d_model, c.n_head, c.mlp_ratio, c.dropout, rng=rng, dtype=dtype, attention=attention)
            for _ in range(c.n_layer)
        )
        self.ln_f = LayerNorm(c.d_model, dtype=dtype)
        self.head = Linear(c.d_model, c.vocab_size, bias=False, rng=rng, dtype=dtype)
        self._init_weights(rng)

    def _init_weights(self, rng) -> None:
        std_out = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.parameters().items():
            dt = p.data.dtype
            if name.startswith("ln") or ".ln" in name:
                continue  # LayerNorm: γ = 1, β = 0 already
            if name.endswith("bias"):
                p.data = np.zeros_like(p.data)
            elif name.endswith(("attn.o.weight", "mlp.proj.weight")):
                p.data = (std_out * rng.standard_normal(p.shape)).astype(dt)
            else:
                p.data = (0.02 * rng.standard_normal(p.shape)).astype(dt)

    @property
    def dtype(self):
        return self.tok_emb.weight.data.dtype

    def forward(self, idx, cond=None) -> np.ndarray:
        """``idx (B, T)`` -> logits ``(B, T, V)``; ``cond``: ``None`` or one integer per row
        (``(B,)``, a task id), handed to the layers that take a condition."""
        idx = check_indices(idx, self.config.vocab_size)
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (B, T), got {idx.shape}")
        B, T = idx.shape
        check_input_length(T, self.config.block_size, self._modules.get("prompt"))
        set_condition((m for _, m in self.named_modules()), check_condition(cond, B))
        prompt, prefix = self._modules.get("prompt"), self._modules.get("prefix")
        x = self.tok_emb.forward(idx)  # E_tok[idx]   (B, T, C)
        if prompt is not None:  # prompt tuning: [P; E_tok[idx]], the prompt takes positions 0..k-1
            x = prompt.forward(x)  # (B, k+T, C)
        x = x + self.pos_emb.forward(np.arange(x.shape[1]))  # x0 = E_tok[idx] + E_pos[t]  (B, T, C)
        x = self.drop.forward(x)
        kv = None if prefix is None else prefix.forward()  # prefix tuning: (L, 2, p, C)
        for i, block in enumerate(self.blocks):
            block.attn.kv_prefix = None if kv is None else kv[i]  # layer i's (P_k, P_v), or none
            x = block.forward(x)  # (B, T, C)
        n_prompt = x.shape[1] - T
        x = x[:, n_prompt:]  # the prompt's own positions predict nothing: drop them  (B, T, C)
        logits = self.head.forward(self.ln_f.forward(x))  # z = LN_f(x_L) W_headᵀ   (B, T, V)
        self._cache = (B, T, n_prompt)
        return logits

    def backward(self, dlogits: np.ndarray) -> None:
        B, T, n_prompt = self._pop_cache()
        dlogits = array_module(dlogits).asarray(dlogits)
        if dlogits.shape != (B, T, self.config.vocab_size):
            raise ValueError(f"dlogits must have shape {(B, T, self.config.vocab_size)}, got {dlogits.shape}")
        dx = self.ln_f.backward(self.head.backward(dlogits))  # (B, T, C)
        xp = array_module(dx)
        if n_prompt:  # no gradient reaches the prompt's positions from the head
            dx = xp.concatenate([xp.zeros((B, n_prompt, dx.shape[2]), dtype=dx.dtype), dx], axis=1)  # (B, k+T, C)
        for block in reversed(list(self.blocks)):
            dx = block.backward(dx)
        prefix = self._modules.get("prefix")
        if prefix is not None:  # each layer's P̄_k, P̄_v, into the prefix encoder
            prefix.backward(xp.stack([block.attn.kv_prefix_grad for block in self.blocks]))  # (L, 2, p, C)
        dx = self.drop.backward(dx)
        self.pos_emb.backward(dx.sum(axis=0))  # Ē_pos[t] = Σ_b x̄0[b, t]   (k+T, C)
        if n_prompt:
            dx = self._modules["prompt"].backward(dx)  # P̄ = Σ_b x̄0[b, :k], the rest to the tokens   (B, T, C)
        self.tok_emb.backward(dx)  # scatter-add into the token table
        return None

    @property
    def max_input_length(self) -> int:
        """The longest input ``T``: ``block_size``, less the ``k`` positions a prompt takes."""
        prompt = self._modules.get("prompt")
        return self.config.block_size - (0 if prompt is None else prompt.k)

    def loss(self, idx, targets, ignore_index: int = -100, cond=None):
        """``(loss, dlogits)`` of the next-token cross-entropy; forward only (call backward after)."""
        from lowrank_ref.nn.losses import cross_entropy

        return cross_entropy(self.forward(idx, cond=cond), targets, ignore_index)

    def generate(self, idx, n_new: int, rng=None, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
        """Append ``n_new`` sampled tokens to ``idx (B, T)`` and return ``(B, T + n_new)``.

        Each step feeds the last ``block_size`` tokens, takes the last position's logits, divides
        by ``temperature`` (``0`` means greedy), keeps the ``top_k`` largest if given, and samples.
        Runs with dropout off; the train/eval flags are restored afterwards.
        """
        idx = check_indices(idx, self.config.vocab_size)
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {idx.shape}")
        n_new = _pos_int(n_new, "n_new") if n_new != 0 else 0
        temperature = float(temperature)
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if top_k is not None:
            top_k = _pos_int(top_k, "top_k")
        rng = np.random.default_rng() if rng is None else rng
        modes = [(m, m.training) for _, m in self.named_modules()]
        self.eval()
        try:
            out = idx.astype(np.int64)
            for _ in range(n_new):
                logits = self.forward(out[:, -self.max_input_length:])[:, -1, :].astype(np.float64)  # (B, V)
                if temperature == 0:
                    nxt = logits.argmax(axis=-1)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
                        logits = np.where(logits < kth, -np.inf, logits)
                    p = softmax(logits, axis=-1)  # (B, V)
                    u = rng.random((p.shape[0], 1))
                    nxt = np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)  # inverse CDF
                out = np.concatenate([out, nxt[:, None].astype(np.int64)], axis=1)
        finally:
            for _, m in self.named_modules():
                m._cache = None
            for m, flag in modes:
                object.__setattr__(m, "training", flag)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"vocab={c.vocab_size}, block={c.block_size}, layers={c.n_layer}, heads={c.n_head}, "
                f"d_model={c.d_model}")
