r"""Learning-rate schedules: linear warmup, then a cosine decay (Loshchilov & Hutter 2017,
SGDR, arXiv:1608.03983, without restarts).

.. math::
    \eta(t) = \begin{cases}
      \eta_0\, t / T_w & t < T_w \\
      \eta_{\min} + \tfrac12(\eta_0 - \eta_{\min})\bigl(1 + \cos(\pi\,\tfrac{t - T_w}{T - T_w})\bigr)
        & T_w \le t \le T \\
      \eta_{\min} & t > T
    \end{cases}

The warmup starts from 0 and reaches ``base_lr`` at ``t = T_w``, the convention of Hugging Face
``get_cosine_schedule_with_warmup``; the cosine then ends at ``min_lr`` at ``t = T``.
"""

from __future__ import annotations

import math

from lowrank_ref.optim.optimizer import check_lr

__all__ = ["cosine_schedule", "CosineWithWarmup", "check_schedule"]


def _check_int(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    v = int(v.__index__())
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_schedule(total_steps, base_lr, warmup_steps, min_lr):
    """The schedule's arguments, checked (named in errors) and converted: ``(total_steps, base_lr,
    warmup_steps, min_lr)``; shared with ``lowrank_gpu.optim``'s scheduler."""
    total_steps = _check_int(total_steps, "total_steps", 1)
    warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    base_lr = check_lr(base_lr, "base_lr")
    min_lr = check_lr(min_lr, "min_lr")
    if min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) must be <= base_lr ({base_lr})")
    return total_steps, base_lr, warmup_steps, min_lr


def cosine_schedule(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                    min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (0-based): linear warmup, cosine to ``min_lr`` at ``total_steps``."""
    step = _check_int(step, "step", 0)
    total_steps, base_lr, warmup_steps, min_lr = check_schedule(total_steps, base_lr, warmup_steps, min_lr)
    if step < warmup_steps:
        return base_lr * step / warmup_steps  # η₀ t / T_w
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class CosineWithWarmup:
    """Sets ``optimizer.lr`` from :func:`cosine_schedule`; call :meth:`step` after each
    ``optimizer.step()`` (the order ``torch.optim.lr_scheduler`` uses).

    ``base_lr`` defaults to the optimizer's ``lr`` at construction; the constructor sets the
    lr for step 0 right away (so with warmup the first update uses lr 0, as Hugging Face's does).

    Works with any object that has a settable ``lr`` (every :class:`Optimizer`).
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 base_lr: float | None = None):
        if not hasattr(optimizer, "lr"):
            raise TypeError(f"optimizer must have a settable .lr, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        base_lr = optimizer.lr if base_lr is None else base_lr
        self.total_steps, self.base_lr, self.warmup_steps, self.min_lr = check_schedule(
            total_steps, base_lr, warmup_steps, min_lr)
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        self.optimizer.lr = self.get_lr()

    def get_lr(self) -> float:
        return cosine_schedule(self.step_count, self.total_steps, self.base_lr, self.warmup_steps, self.min_lr)

    def step(self) -> float:
        """Advance one step and set the optimizer's lr; returns the new lr."""
        self.step_count += 1
        self._apply()
        return self.optimizer.lr

    @property
    def last_lr(self) -> float:
        return self.get_lr()
