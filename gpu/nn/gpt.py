r"""The small GPT in PyTorch: the twin of :mod:`lowrank_ref.nn.gpt`, with autograd for the backward.

Same submodule and parameter names (``blocks.0.attn.q.weight``, ``tok_emb.weight``,
``head.weight``, ...), same math (pre-LN blocks, exact-erf GELU, causal softmax attention with
``1/sqrt(hs)`` scaling, biased-variance LayerNorm with ``eps = 1e-5``), so the two agree to
rounding in float64 when they hold the same weights. Weights move between them by name with
:func:`from_numpy`, :func:`to_numpy` and :func:`copy_state`.

The attention is written out (``Q Kᵀ/√hs``, mask, softmax, ``P V``) rather than calling
``scaled_dot_product_attention``, so the code reads line for line against the NumPy version.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lowrank_gpu.nn.convert import to_numpy as _tensor_to_numpy
from lowrank_ref.nn.attention import S2_GROUPS, check_attention, s2_group_size, s2_pieces
from lowrank_ref.nn.gpt import GPTConfig, check_input_length
from lowrank_ref.nn.module import check_condition, set_condition

__all__ = ["CausalSelfAttention", "MLP", "Block", "GPT", "GPTConfig", "from_numpy", "to_numpy",
           "copy_state", "ShiftedSparseAttention", "s2_attention"]


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention; ``q``, ``k``, ``v``, ``o`` are ``nn.Linear(C, C)``."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, dtype=None, device=None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"n_head ({n_head}) must divide d_model ({d_model})")
        self.d_model, self.n_head = d_model, n_head
        kw = {"dtype": dtype, "device": device}
        self.q = nn.Linear(d_model, d_model, **kw)
        self.k = nn.Linear(d_model, d_model, **kw)
        self.v = nn.Linear(d_model, d_model, **kw)
        self.o = nn.Linear(d_model, d_model, **kw)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        n_prefix = 0
        kv = getattr(self, "kv_prefix", None)  # prefix tuning: (2, p, C) set by the model, or None
        if kv is not None:  # K ← [P_k; K], V ← [P_v; V], the same prefixes for every batch row
            n_prefix = kv.shape[1]
            pk, pv = (t.view(1, n_prefix, nh, hs).transpose(1, 2).expand(B, -1, -1, -1).to(k.dtype) for t in kv)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nh, p+T, hs)
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # S = Q Kᵀ/√hs   (B, nh, T, p+T)
        future = torch.triu(torch.ones(T, n_prefix + T, dtype=torch.bool, device=x.device), diagonal=1 + n_prefix)
        s = s.masked_fill(future, float("-inf"))  # + M (prefixes always open)
        p = self.attn_drop(torch.softmax(s, dim=-1))  # P̃ = softmax(S) ⊙ D
        y = (p @ v).transpose(1, 2).reshape(B, T, C)  # Y = P̃ V, heads concatenated   (B, T, C)
        return self.resid_drop(self.o(y))


def s2_attention(q, k, v, n_groups: int = S2_GROUPS, dropout: float = 0.0, training: bool = True):
    """LongLoRA's S²-Attn without wrap-around, the twin of ``lowrank_ref.nn.attention.s2_attention_forward``:
    ``q, k, v (B, H, T, hs)`` -> ``(B, H, T, hs)``, causal attention inside each group of
    ``s2_pieces`` (heads ``[0, H//2)`` in groups of ``G = T/n_groups``, heads ``[H//2, H)`` shifted
    by ``G/2``, with half groups at both ends). Autograd does the backward."""
    B, H, T, hs = q.shape
    y = torch.empty_like(v)
    for heads, ranges, g in s2_pieces(T, H, n_groups):
        def grouped(t, heads=heads, ranges=ranges, g=g):
            t = torch.cat([t[:, heads, a:b] for a, b in ranges], dim=2)
            return t.reshape(B, t.shape[1], -1, g, hs)  # (B, h, n, g, hs)

        qg, kg, vg = grouped(q), grouped(k), grouped(v)
        s = (qg @ kg.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, h, n, g, g)
        future = torch.triu(torch.ones(g, g, dtype=torch.bool, device=q.device), diagonal=1)
        p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
        if dropout > 0.0:
            p = torch.nn.functional.dropout(p, dropout, training)
        yg = (p @ vg).reshape(B, qg.shape[1], -1, hs)  # (B, h, L, hs)
        i = 0
        for a, b in ranges:
            y[:, heads, a:b] = yg[:, :, i:i + b - a]
            i += b - a
    return y


class ShiftedSparseAttention(CausalSelfAttention):
    """S²-Attn while training, full attention in eval mode: the twin of
    ``lowrank_ref.nn.attention.ShiftedSparseAttention`` (same names, same ``n_groups``)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, dtype=None, device=None,
                 n_groups: int = S2_GROUPS):
        super().__init__(d_model, n_head, dropout, dtype=dtype, device=device)
        s2_group_size(2 * n_groups, n_groups)  # checks n_groups
        self.n_groups = int(n_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)  # full attention at inference
        B, T, C = x.shape
        s2_group_size(T, self.n_groups)
        nh, hs = self.n_head, C // self.n_head
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, nh, hs).transpose(1, 2)
        v = self.v(x).view(B, T, nh, hs).transpose(1, 2)
        y = s2_attention(q, k, v, self.n_groups, self.attn_drop.p, self.training)
        return self.resid_drop(self.o(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, dtype=None, device=None):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, dtype=dtype, device=device)
        self.act = nn.GELU()  # exact erf form, as lowrank_ref.nn.GELU
        self.proj = nn.Linear(hidden, d_model, dtype=dtype, device=device)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 dtype=None, device=None, attention: str = "full"):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.ln1 = nn.LayerNorm(d_model, eps=1e-5, **kw)
        attn_cls = ShiftedSparseAttention if check_attention(attention) == "s2" else CausalSelfAttention
        self.attn = attn_cls(d_model, n_head, dropout, **kw)
        self.ln2 = nn.LayerNorm(d_model, eps=1e-5, **kw)
        self.mlp = MLP(d_model, mlp_ratio * d_model, dropout, **kw)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))  # h = x + Attn(LN1(x))
        return x + self.mlp(self.ln2(x))  # y = h + MLP(LN2(h))


class GPT(nn.Module):
    """``forward(idx (B, T) long) -> logits (B, T, vocab_size)``; the same names as the NumPy GPT.
    ``attention="s2"``: LongLoRA's S²-Attn in every block while training (full attention in eval)."""

    def __init__(self, config: GPTConfig, dtype=torch.float32, device=None, rng=None, attention: str = "full"):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        c = self.config = config
        self.attention = check_attention(attention)
        kw = {"dtype": dtype, "device": device}
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model, **kw)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model, **kw)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_head, c.mlp_ratio, c.dropout, **kw, attention=attention)
                                    for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model, eps=1e-5, **kw)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False, **kw)
        self._init_weights(rng)

    @torch.no_grad()
    def _init_weights(self, rng) -> None:
        """GPT-2's init, as in the NumPy GPT: N(0, 0.02²), residual projections 0.02/√(2L), biases 0."""
        from lowrank_gpu.nn.convert import generator_from

        g = generator_from(rng)
        std_out = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.startswith("ln") or ".ln" in name:
                continue
            if name.endswith("bias"):
                p.zero_()
            else:
                std = std_out if name.endswith(("attn.o.weight", "mlp.proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)

    def forward(self, idx: torch.Tensor, cond=None) -> torch.Tensor:
        """``idx (B, T)`` -> logits ``(B, T, V)``; ``cond``: ``None`` or one integer per row
        (``(B,)``, a task id), handed to the layers that take a condition."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        prompt, prefix = getattr(self, "prompt", None), getattr(self, "prefix", None)
        check_input_length(T, self.config.block_size, prompt)
        if cond is not None and not isinstance(cond, torch.Tensor):
            cond = torch.as_tensor(cond)
        if cond is not None:
            cond = cond.to(idx.device)
        set_condition(self.modules(), check_condition(cond, B))
        x = self.tok_emb(idx)  # (B, T, C)
        if prompt is not None:  # prompt tuning: [P; E_tok[idx]]   (B, k+T, C)
            x = prompt(x)
        pos = torch.arange(x.shape[1], device=idx.device)
        x = self.drop(x + self.pos_emb(pos))  # (B, T, C)
        kv = None if prefix is None else prefix()  # prefix tuning: (L, 2, p, C)
        for i, block in enumerate(self.blocks):
            block.attn.kv_prefix = None if kv is None else kv[i]
            x = block(x)
        return self.head(self.ln_f(x[:, x.shape[1] - T:]))  # the prompt's positions dropped   (B, T, V)

    @property
    def max_input_length(self) -> int:
        """The longest input ``T``: ``block_size``, less the ``k`` positions a prompt takes."""
        prompt = getattr(self, "prompt", None)
        return self.config.block_size - (0 if prompt is None else prompt.k)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n_new: int, rng=None, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        """Append ``n_new`` sampled tokens to ``idx (B, T)``, as the NumPy ``GPT.generate``:
        ``temperature=0`` is greedy, ``top_k`` keeps the k largest logits; dropout is off while
        sampling and the train/eval mode is restored afterwards. ``rng``: None, a seed, a NumPy
        Generator or a torch.Generator (on the CPU)."""
        from lowrank_gpu.nn.convert import generator_from

        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        g = generator_from(rng)
        was = self.training
        self.eval()
        try:
            for _ in range(n_new):
                logits = self(idx[:, -self.max_input_length:])[:, -1, :].double().cpu()  # (B, V)
                if temperature == 0:
                    nxt = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
                idx = torch.cat([idx, nxt.to(idx.device)], dim=1)
        finally:
            self.train(was)
        return idx


def _numpy_dtype_to_torch(dt) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=dt)).dtype


def copy_state(src, dst) -> None:
    """Copy every parameter of ``src`` into ``dst`` by dotted name; each may be a NumPy
    :class:`~lowrank_ref.nn.Module` or a ``torch.nn.Module``. Names and shapes are checked
    before anything is written; values take ``dst``'s dtype (and device)."""
    if isinstance(src, nn.Module):
        state = {n: _tensor_to_numpy(p) for n, p in src.named_parameters()}
    else:
        state = {n: p.data for n, p in src.parameters().items()}
    if isinstance(dst, nn.Module):
        params = dict(dst.named_parameters())
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"parameter names differ: missing {missing}, unexpected {unexpected}")
        for n, a in state.items():
            if tuple(a.shape) != tuple(params[n].shape):
                raise ValueError(f"{n}: shape {tuple(a.shape)} vs {tuple(params[n].shape)}")
        with torch.no_grad():
            for n, a in state.items():
                params[n].copy_(torch.from_numpy(np.ascontiguousarray(a)))
    else:
        dst.load_state_dict(state)  # checks every name and shape first


def from_numpy(np_gpt, device=None, dtype=None) -> GPT:
    """A torch :class:`GPT` holding the weights of a NumPy ``lowrank_ref.nn.GPT`` (same dtype unless
    ``dtype`` is given)."""
    from lowrank_ref.nn.gpt import GPT as NumpyGPT

    if not isinstance(np_gpt, NumpyGPT):
        raise TypeError(f"np_gpt must be a lowrank_ref.nn.GPT, got {type(np_gpt).__name__}")
    dtype = _numpy_dtype_to_torch(np_gpt.dtype) if dtype is None else dtype
    model = GPT(np_gpt.config, dtype=dtype, device=device, rng=0, attention=getattr(np_gpt, "attention", "full"))
    copy_state(np_gpt, model)
    model.train(np_gpt.training)
    return model


def to_numpy(torch_gpt: GPT):
    """A NumPy ``lowrank_ref.nn.GPT`` holding the weights of a torch :class:`GPT` (same dtype;
    bfloat16 becomes float32).

    Given a ``torch.Tensor`` instead, returns it as a NumPy array (as
    :func:`lowrank_gpu.nn.convert.to_numpy`), so ``lowrank_gpu.nn.to_numpy`` serves both."""
    from lowrank_ref.nn.gpt import GPT as NumpyGPT

    if isinstance(torch_gpt, torch.Tensor):
        return _tensor_to_numpy(torch_gpt)
    if not isinstance(torch_gpt, GPT):
        raise TypeError(f"torch_gpt must be a lowrank_gpu.nn.GPT (or a tensor), got {type(torch_gpt).__name__}")
    w = _tensor_to_numpy(torch_gpt.tok_emb.weight)
    model = NumpyGPT(torch_gpt.config, rng=np.random.default_rng(0), dtype=w.dtype, attention=torch_gpt.attention)
    copy_state(torch_gpt, model)
    model.train(torch_gpt.training)
    return model
