"""Test-only training hooks and a test-only conditional layer (importable by "module:attr" paths,
as a method's SPEC would name them)."""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.module import Module, Parameter
from lowrank_ref.train import TrainingHooks

CALLS: list = []  # (backend, what, step, layer names) of every call, for the tests to read


class CountingHooks(TrainingHooks):
    """Records every call; adds nothing to the loss."""

    backend = "numpy"

    def __init__(self, model=None, layers=None):
        super().__init__(model, layers)
        CALLS.append((self.backend, "init", -1, tuple(sorted(self.layers))))

    def before_step(self, step):
        CALLS.append((self.backend, "before_step", step, tuple(sorted(self.layers))))

    def after_step(self, step):
        CALLS.append((self.backend, "after_step", step, tuple(sorted(self.layers))))


class TorchCountingHooks(CountingHooks):
    backend = "torch"


class L2Hooks(TrainingHooks):
    r"""``λ Σ ‖B‖²`` over the LoRA layers' ``B``: value returned, gradient ``2 λ B`` added to ``B.grad``."""

    def __init__(self, model=None, layers=None, lam=0.5):
        super().__init__(model, layers)
        self.lam = lam

    def loss_terms(self, step):
        total = 0.0
        for layer in self.layers.values():
            B = layer.B
            total += self.lam * float(np.sum(B.data * B.data))
            B.accumulate(2.0 * self.lam * B.data)  # ∂(λ‖B‖²)/∂B = 2λB
        return total


class TorchL2Hooks(TrainingHooks):
    def __init__(self, model=None, layers=None, lam=0.5):
        super().__init__(model, layers)
        self.lam = lam

    def loss_terms(self, step):
        return sum(self.lam * (layer.B ** 2).sum() for layer in self.layers.values())


class TaskBias(Module):
    """``y = x + β[c]``: one learned shift per task ``c`` (the row's condition). A test-only
    conditional layer: ``takes_condition`` makes ``GPT.forward(idx, cond)`` hand it ``cond``."""

    takes_condition = True

    def __init__(self, d: int, n_tasks: int, rng):
        super().__init__()
        self.beta = Parameter(rng.standard_normal((n_tasks, d)))
        self.condition = None

    def forward(self, x):
        if self.condition is None:
            raise ValueError("TaskBias needs a condition")
        self._cache = self.condition
        return x + self.beta.data[self.condition][:, None, :]  # (B, T, d) + (B, 1, d)

    def backward(self, dy):
        cond = self._pop_cache()
        g = np.zeros_like(self.beta.data)
        np.add.at(g, cond, dy.sum(axis=1))  # β̄[c] = Σ over rows with task c, over t, of ȳ
        self.beta.accumulate(g)
        return dy
