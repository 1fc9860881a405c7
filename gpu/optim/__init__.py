r"""The torch side of ``lowrank_ref.optim``: torch's own optimizers under the same names, the same
cosine schedule function, a scheduler object that sets every param group's lr, and clipping.

    opt = AdamW(model.parameters(), lr=1e-3)          # torch.optim.AdamW
    sched = CosineWithWarmup(opt, total_steps=100, warmup_steps=10)
    clip_grad_norm(model.parameters(), 1.0); opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer

from lowrank_ref.optim.schedule import check_schedule, cosine_schedule

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "cosine_schedule", "CosineWithWarmup",
           "clip_grad_norm", "state_bytes", "grow_state"]


class CosineWithWarmup:
    """Sets ``lr`` of every param group of a ``torch.optim.Optimizer`` from :func:`cosine_schedule`.

    Same behaviour as ``lowrank_ref.optim.CosineWithWarmup``: the lr for step 0 is set at
    construction; call :meth:`step` after each ``optimizer.step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, base_lr: float | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        base_lr = optimizer.param_groups[0]["lr"] if base_lr is None else base_lr
        self.total_steps, self.base_lr, self.warmup_steps, self.min_lr = check_schedule(
            total_steps, base_lr, warmup_steps, min_lr)
        self.step_count = 0
        self._apply()

    def get_lr(self) -> float:
        return cosine_schedule(self.step_count, self.total_steps, self.base_lr, self.warmup_steps, self.min_lr)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        self.step_count += 1
        self._apply()
        return self.get_lr()

    @property
    def last_lr(self) -> float:
        return self.get_lr()


def clip_grad_norm(params, max_norm: float, norm_type: float = 2.0) -> float:
    """``torch.nn.utils.clip_grad_norm_`` returning a Python float (the norm before clipping)."""
    if isinstance(params, dict):
        params = list(params.values())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by tensors in ``optimizer.state`` (the torch twin of ``Optimizer.state_bytes``)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def grow_state(optimizer: torch.optim.Optimizer) -> None:
    """Pad the state tensors of every parameter that grew (same number of axes, larger shape:
    SeLoRA-style rank growth) with zeros at the end of each grown axis, so ``torch.optim``'s next
    step sees matching shapes; the twin of ``lowrank_ref.optim.grow_state``. A ``ValueError`` for a
    state tensor that would have to shrink."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            for key, v in list(st.items()):
                if not isinstance(v, torch.Tensor) or v.dim() != p.dim() or v.shape == p.shape:
                    continue
                if any(o > n for o, n in zip(v.shape, p.shape)):
                    raise ValueError(f"optimizer state {key!r} of shape {tuple(v.shape)} cannot follow its "
                                     f"parameter to {tuple(p.shape)} (only growth is supported)")
                grown = v.new_zeros(p.shape)
                grown[tuple(slice(0, o) for o in v.shape)] = v
                st[key] = grown
