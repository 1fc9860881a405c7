r"""Rank growth in the style of SeLoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.selora`,
backward by autograd.

``y = x W0ᵀ + b + s (x̃ Aᵀ) Bᵀ`` with ``s = α / init_r`` at every rank. On a check step
(``probing``, set by :class:`lowrank_ref.adapters.selora.SeLoRAHooks`, which drives both backends)
the forward routes ``A``, ``B`` and a zero stand-in for the trial's new column ``b_new`` through an
identity whose backward records the raw gradient, so ``F_r = ‖Ā‖² + ‖B̄‖²`` and
``‖∂L/∂b_new‖² = ‖s ȳᵀ (x̃ a)‖²`` come from the one backward pass (no second run of the batch).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lora import init_lora_A
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.selora import SeLoRAConfig, growth_ratio

__all__ = ["SeLoRALinear"]


class _Record(torch.autograd.Function):
    """Identity forward; the backward adds the incoming gradient into ``box[key]`` and passes it on."""

    @staticmethod
    def forward(ctx, t, box, key):
        ctx.box, ctx.key = box, key
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        prev = ctx.box.get(ctx.key)
        ctx.box[ctx.key] = g.detach().clone() if prev is None else prev + g.detach()
        return g, None, None


class SeLoRALinear(AdapterLinear):
    CONFIG = SeLoRAConfig

    def __init__(self, base: nn.Linear, config: SeLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        r, dtype, device = config.rank, self.weight_dtype, self._base_device()
        self._gen = generator_from(rng, device="cpu")
        A = init_lora_A(r, self.in_features, "kaiming", self._gen)
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))  # (r, in)
        self.B = nn.Parameter(torch.zeros((self.out_features, r), dtype=dtype, device=device))  # B = 0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # (in,), not trained; a non-persistent buffer, so .to(device/dtype) moves it and files skip it
        self.register_buffer("a_trial", self._draw_trial(), persistent=False)
        self.probing = False
        self._probe: dict | None = None
        self.last_ratio: float | None = None

    def _draw_trial(self) -> torch.Tensor:
        a = init_lora_A(1, self.in_features, "kaiming", self._gen)[0]  # U(±1/√in)
        return a.to(device=self._base_device(), dtype=self.weight_dtype)

    @property
    def r(self) -> int:
        return self.config.rank

    @property
    def active_rank(self) -> int:
        return self.config.rank

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # ΔW = s B A

    def _delta_weight_f64(self) -> torch.Tensor:
        return self.scaling * (self.B.detach().double() @ self.A.detach().double())

    def _forward(self, x):
        y = self.base(x)  # x W0ᵀ + b   (..., out)
        xd = self.dropout(x)
        A, B = self.A, self.B
        probe = self.probing and self.training and torch.is_grad_enabled()
        if probe:
            if self._probe is None:
                self._probe = {}
            A, B = _Record.apply(A, self._probe, "A"), _Record.apply(B, self._probe, "B")
        h = xd @ A.T  # (..., r)
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.T, alpha=self.scaling)
        if probe:  # + s (x̃ a) b_newᵀ with b_new = 0: the output is unchanged, b_new's gradient recorded
            zero = torch.zeros(self.out_features, dtype=out.dtype, device=out.device, requires_grad=True)
            b_new = _Record.apply(zero, self._probe, "new")
            t = (xd.reshape(-1, self.in_features) @ self.a_trial.to(xd.dtype))  # (N,)
            out = out + self.scaling * t[:, None] * b_new[None, :]
        return out.view(y.shape)

    # the growth test -----------------------------------------------------------------------
    def growth_ratio(self) -> float | None:
        p = self._probe
        if not p or "new" not in p:
            return None
        sq = lambda t: float(t.double().pow(2).sum())  # noqa: E731
        return growth_ratio(sq(p["A"]) + sq(p["B"]), sq(p["new"]))

    def end_probe(self) -> None:
        self.probing, self._probe = False, None

    @torch.no_grad()
    def grow(self) -> None:
        if self.merged:
            raise ValueError(f"{type(self).__name__}.grow() while merged: unmerge() first")
        if self.r >= self.config.max_r:
            raise ValueError(f"{type(self).__name__}.grow(): already at max_r={self.config.max_r}")
        A, B = self.A.detach(), self.B.detach()
        grown = {"A": (torch.cat([A, self.a_trial[None, :].to(A.dtype)], dim=0), 0),  # (r+1, in)
                 "B": (torch.cat([B, B.new_zeros((B.shape[0], 1))], dim=1), 1)}  # (out, r+1)
        for name, (data, axis) in grown.items():
            p = getattr(self, name)
            g, p.grad = p.grad, None
            # a new tensor under the same Python object (the optimizer's key): ``p.data = ...`` of
            # another shape would leave autograd's cached gradient accumulator with the old shape
            torch.utils.swap_tensors(p, nn.Parameter(data, requires_grad=p.requires_grad))
            if g is not None:
                pad = list(g.shape)
                pad[axis] = 1
                p.grad = torch.cat([g, g.new_zeros(pad)], dim=axis)
        self.config = self.config.replace(r=self.r + 1)
        self.a_trial = self._draw_trial()

    def load_adapter_state(self, state: dict) -> None:
        super().load_adapter_state(state)
        self.end_probe()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.config}, rank={self.r}"
