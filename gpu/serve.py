r"""Serving many adapters over one frozen torch base: the twin of :mod:`lowrank_ref.serve`.

Same class, same bookkeeping (written once, in :class:`lowrank_ref.serve.MultiLoRA`), same errors;
the served layer runs the two kernels on torch tensors:

* ``"bgmv"``: ``A_all[k] (B, R, in)`` gathered per row, then two ``torch.bmm``: the shrink
  ``h = x Aᵀ (B, T, R)`` and the expand ``h Bᵀ (B, T, out)``, ``y = g[k] ⊙ (x W0ᵀ + s[k] h Bᵀ) + b``;
* ``"sgmv"``: rows grouped by adapter, per group the shrink and the expand with its own factors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowrank_ref.nn.module import StateError
from lowrank_ref.serve import KERNELS, NumpyServeOps, as_f64
from lowrank_ref.serve import MultiLoRA as _MultiLoRA

__all__ = ["MultiLoRA", "ServedLinear", "bgmv", "sgmv", "KERNELS"]


def bgmv(x, W0, b, A_all, B_all, s, g, slots, scaled: bool = True):
    r"""y_i = g[k_i] ⊙ (x_i W0ᵀ + s[k_i] (x_i A_all[k_i]ᵀ) B_all[k_i]ᵀ) + b.   x (N, T, in) -> (N, T, out).

    ``scaled=False`` says every ``g`` is 1 (no DoRA adapter at this layer): then the bias goes into
    the base product and the expand adds into it in place (``baddbmm``), with no pass for ``g``."""
    A = A_all.index_select(0, slots)  # gather: (N, R, in)
    Bk = B_all.index_select(0, slots)  # (N, out, R)
    h = torch.bmm(x, A.transpose(1, 2)) * s.index_select(0, slots).view(-1, 1, 1)  # shrink: s x Aᵀ (N, T, R)
    if not scaled:
        return torch.baddbmm(torch.nn.functional.linear(x, W0, b), h, Bk.transpose(1, 2))  # + h Bᵀ (expand)
    y = torch.baddbmm(torch.nn.functional.linear(x, W0), h, Bk.transpose(1, 2))  # x W0ᵀ + s h Bᵀ
    y = y * g.index_select(0, slots).unsqueeze(1)  # g ⊙ (...)
    return y if b is None else y + b


def sgmv(x, W0, b, factors, slots):
    r"""The same output, rows grouped by adapter (``factors = {k: (A, B, s, g)}``, ``g = None``: 1)."""
    y = torch.nn.functional.linear(x, W0)  # (N, T, out)
    for k in torch.unique(slots).tolist():
        if k not in factors:
            continue
        A, B, s, g = factors[k]
        rows = torch.nonzero(slots == k).flatten()  # the segment of adapter k
        xk = x.index_select(0, rows)  # (n_k, T, in)
        d = (xk @ A.T) @ B.T  # shrink then expand   (n_k, T, out)
        if g is None:  # LoRA (g = 1): add the update into the group's rows in place
            y.index_add_(0, rows, d, alpha=s)
        else:  # DoRA: g ⊙ (x W0ᵀ + s d) for the group's rows
            y.index_copy_(0, rows, g * (y.index_select(0, rows) + s * d))
    return y if b is None else y + b


class ServedLinear(nn.Module):
    """A frozen ``torch.nn.Linear`` with the stacked factors of every adapter the server holds."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.stack = None
        self.scaled = True
        self.factors = {}
        self.slots = None
        self.kernel = "bgmv"

    def set_factors(self, factors: dict, n_slots: int) -> None:
        W = self.base.weight
        kw = {"dtype": W.dtype, "device": W.device}
        out, inp = W.shape
        R = max(f["A"].shape[0] for f in factors.values())
        A_all = np.zeros((n_slots, R, inp))
        B_all = np.zeros((n_slots, out, R))
        s = np.zeros(n_slots)
        g = np.ones((n_slots, out))
        for k, f in factors.items():
            r = f["A"].shape[0]
            A_all[k, :r], B_all[k, :, :r], s[k], g[k] = f["A"], f["B"], f["s"], f["g"]
        self.stack = tuple(torch.as_tensor(a, **kw) for a in (A_all, B_all, s, g))
        self.scaled = bool(np.any(g != 1))  # a DoRA adapter is here
        self.factors = {k: (torch.as_tensor(f["A"], **kw), torch.as_tensor(f["B"], **kw), float(f["s"]),
                            None if np.all(f["g"] == 1) else torch.as_tensor(f["g"], **kw))
                        for k, f in factors.items()}

    def forward(self, x):
        W0, b = self.base.weight, self.base.bias
        if self.slots is None:
            return self.base(x)
        if torch.is_grad_enabled() and (x.requires_grad or W0.requires_grad):
            raise StateError("a served layer is inference only (MultiLoRA): train each adapter in its own model")
        lead = x.shape[:-1]
        x3 = x.reshape(lead[0], -1, x.shape[-1])  # (N, T, in)
        if self.kernel == "sgmv":
            y = sgmv(x3, W0, b, self.factors, self.slots)
        else:
            y = bgmv(x3, W0, b, *self.stack, self.slots, scaled=self.scaled)
        return y.reshape(*lead, W0.shape[0])

    def extra_repr(self) -> str:
        return f"adapters={len(self.factors)}"


class TorchServeOps(NumpyServeOps):
    name = "torch"

    def check_model(self, model):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    def adapter_layers(self, model) -> dict:
        from lowrank_gpu.inject import adapter_layers

        return adapter_layers(model)

    def set(self, model, path, module):
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)

    def served_type(self):
        return ServedLinear

    def weight(self, linear) -> tuple:
        return as_f64(linear.weight), None if linear.bias is None else as_f64(linear.bias)

    @torch.no_grad()
    def set_weight(self, linear, W) -> None:
        linear.weight.copy_(torch.as_tensor(W).to(linear.weight.dtype))

    def get_weight(self, linear):
        return linear.weight.detach().clone()

    def slots(self, slots, like):
        return torch.as_tensor(slots, dtype=torch.long, device=like.device)

    def batch_size(self, idx) -> int:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor, got {getattr(idx, 'shape', type(idx).__name__)}")
        return int(idx.shape[0])

    def method(self, layer) -> str:
        from lowrank_gpu.adapters.dora import DoRALinear
        from lowrank_gpu.adapters.lora import LoRALinear

        if getattr(layer, "quantized", False):
            return "a 4-bit base (QLoRA/QDoRA)"
        if isinstance(layer, DoRALinear):
            return "dora"
        if isinstance(layer, LoRALinear):
            return "lora"
        return type(layer).__name__


class MultiLoRA(_MultiLoRA):
    __doc__ = _MultiLoRA.__doc__
    OPS = TorchServeOps()

    @torch.no_grad()
    def forward(self, idx, adapters=None, kernel=None, **kwargs):
        return super().forward(idx, adapters, kernel=kernel, **kwargs)

    __call__ = forward
