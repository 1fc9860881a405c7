r"""The optimizer base class: a named set of parameters, inspectable state, a settable ``lr``.

An optimizer holds ``params``, a dict ``{name: Parameter}`` (``model.trainable_parameters()``
gives dotted names; a plain list gets the names ``"0"``, ``"1"``, ...), and ``state``, a dict
``{name: {"exp_avg": array, "step": int, ...}}`` that a reader can open and count
(:meth:`Optimizer.state_bytes`).

Writing a new optimizer (the 8-bit and paged Adam variants do this) means implementing one
method::

    class MyOpt(Optimizer):
        def __init__(self, params, lr=1e-3, beta=0.9):
            super().__init__(params, lr)
            self.beta = beta

        def _update(self, name, param, grad, state):
            # state: this parameter's dict (empty on the first step; fill it here)
            # grad: param.grad (never None here); write the new value into param.data
            ...

:meth:`Optimizer.step` calls ``_update`` once per parameter whose ``.grad`` is not ``None``,
in the order of ``params``, and skips the rest (a frozen parameter never gets a gradient, so it
is never touched and gets no state). ``_update`` must replace ``param.data`` (in place or by
assignment) with an array of the same shape and dtype.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank_ref.nn.module import Parameter

__all__ = ["Optimizer", "check_lr", "check_nonneg", "as_named_params"]


def check_lr(lr, name: str = "lr") -> float:
    """A learning rate: a finite, non-negative real number."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {lr!r} ({type(lr).__name__})")
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {lr}")
    return lr


def check_nonneg(v, name: str) -> float:
    return check_lr(v, name)


def check_beta(b, name: str) -> float:
    b = check_lr(b, name)
    if not b < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {b}")
    return b


def as_named_params(params) -> dict[str, Parameter]:
    """``{name: Parameter}`` from a dict of Parameters or a list/tuple of Parameters."""
    if isinstance(params, dict):
        items = list(params.items())
    elif isinstance(params, (list, tuple)):
        items = [(str(i), p) for i, p in enumerate(params)]
    else:
        raise TypeError(
            "params must be a dict {name: Parameter} (e.g. model.trainable_parameters()) or a "
            f"list of Parameters, got {type(params).__name__}"
        )
    if not items:
        raise ValueError("params is empty: the optimizer has nothing to update "
                         "(did you freeze every parameter?)")
    seen: dict[int, str] = {}
    for name, p in items:
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {name!r}")
        if not isinstance(p, Parameter):
            raise TypeError(f"params[{name!r}] must be a lowrank_ref.nn.Parameter, got {type(p).__name__}")
        if id(p) in seen:
            raise ValueError(f"params holds the same Parameter twice ({seen[id(p)]!r} and {name!r})")
        seen[id(p)] = name
    return dict(items)


class Optimizer:
    """Base class. Subclasses implement ``_update(name, param, grad, state)``.

    Attributes:
        params: ``{name: Parameter}``.
        state: ``{name: dict}``, one dict per parameter that has been stepped.
        lr: the learning rate (settable; a schedule sets it before each step).
        steps: how many times :meth:`step` has run.
    """

    def __init__(self, params, lr: float):
        self.params: dict[str, Parameter] = as_named_params(params)
        self.lr = lr
        self.state: dict[str, dict] = {}
        self.steps = 0

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        self._lr = check_lr(value)

    def step(self) -> None:
        """Update every parameter that has a gradient; leave the others alone."""
        for name, p in self.params.items():
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise ValueError(f"{name}: grad has shape {p.grad.shape}, parameter {p.data.shape}")
            state = self.state.setdefault(name, {})
            self._update(name, p, p.grad, state)
        self.steps += 1

    def _update(self, name: str, param: Parameter, grad: np.ndarray, state: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """``{"steps": n, "state": {name: {key: array or number}}}``: copies, for a checkpoint
        (the learning rate is not in it: the schedule sets it before every step)."""
        return {"steps": self.steps,
                "state": {n: {k: (v.copy() if hasattr(v, "shape") else v) for k, v in st.items()}
                          for n, st in self.state.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what :meth:`state_dict` gave, checking names, keys and shapes first: on a
        mismatch a ``ValueError`` names it and the optimizer is left as it was."""
        if not isinstance(sd, dict) or set(sd) != {"steps", "state"}:
            raise ValueError("optimizer state must be a dict with keys 'steps' and 'state'")
        state = sd["state"]
        unknown = sorted(set(state) - set(self.params))
        if unknown:
            raise ValueError(f"optimizer state names parameters this optimizer does not hold: {unknown[:3]}")
        current = self.state_dict()["state"] if self.state else {}
        for name, st in state.items():
            have = current.get(name)
            if have is not None and set(have) != set(st):
                raise ValueError(f"optimizer state for {name}: keys {sorted(st)}, expected {sorted(have)}")
            for k, v in st.items():
                if hasattr(v, "shape") and k in ("exp_avg", "exp_avg_sq", "momentum_buffer") \
                        and tuple(v.shape) != tuple(self.params[name].data.shape):
                    raise ValueError(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, "
                                     f"the parameter's is {tuple(self.params[name].data.shape)}")
        steps = int(sd["steps"])
        if steps < 0:
            raise ValueError(f"optimizer state: steps must be >= 0, got {steps}")
        self.state = {n: {k: (v.copy() if hasattr(v, "shape") else v) for k, v in st.items()}
                      for n, st in state.items()}
        self.steps = steps

    def zero_grad(self) -> None:
        """Set every parameter's ``.grad`` to ``None`` (not zeros: "no gradient" stays visible)."""
        for p in self.params.values():
            p.grad = None

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (every array in every state dict)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                total += int(getattr(v, "nbytes", 0)) if not isinstance(v, (int, float)) else 0
        return total

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr}, params={len(self.params)})"
