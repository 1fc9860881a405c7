r"""The torch side of :mod:`lowrank_ref.nn.checks`: the same checks, read off tensors.

Each function reads a tensor's shape, whether its dtype is real floating, and the dtype, and
hands them to the shared check in ``lowrank_ref.nn.checks``, so a bad input gives the same
exception type and message as in the NumPy reference (``TypeError`` for a non-floating or
complex dtype, ``ValueError`` for a shape or a NaN/inf).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_ref.nn.checks import (
    check_bias_shape,
    check_input_shape,
    check_weight_shape,
    nonfinite_error,
)

__all__ = ["check_input", "check_finite", "check_linear"]


def check_input(x, in_features: int, name: str = "x") -> torch.Tensor:
    """``x``: a real floating tensor whose last axis has ``in_features`` entries."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_input_shape(tuple(x.shape), x.is_floating_point(), x.dtype, in_features, name)
    return x


def check_finite(name: str, t: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name`` if ``t`` holds NaN or inf."""
    ok = torch.isfinite(t.detach())
    if not bool(ok.all()):
        raise nonfinite_error(name, int(ok.numel() - ok.sum()))


def check_linear(base, name: str = "base") -> nn.Linear:
    """``base`` as a valid ``torch.nn.Linear``: real floating, a non-empty 2-D weight, a bias of
    shape ``(out,)`` or None, every value finite (what ``lowrank_ref.nn.linear.check_linear``
    checks on a NumPy ``Linear``)."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(base).__name__}")
    W = base.weight
    check_weight_shape(tuple(W.shape), W.is_floating_point(), W.dtype, f"{name} weight")
    check_finite(f"{name} weight", W)
    if base.bias is not None:
        b = base.bias
        check_bias_shape(tuple(b.shape), b.is_floating_point(), b.dtype, W.shape[0], f"{name} bias")
        check_finite(f"{name} bias", b)
    return base
