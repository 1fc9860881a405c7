r"""The checks both backends run, written once on shapes and dtype names (no arrays, no torch).

The NumPy layers (:mod:`lowrank_ref.nn.linear`, :mod:`lowrank_ref.adapters.base`) and the torch
mirror (:mod:`lowrank_gpu.adapters.base`, :mod:`lowrank_gpu.quant.linear`) call these functions
with what they read off their own arrays or tensors: a shape tuple, whether the dtype is a real
floating one, and the dtype's name. So the same bad input gives the same exception type and the
same message in both backends:

==================================================  ==============  ============================
what                                                exception       message starts
==================================================  ==============  ============================
``x`` not real floating (int, bool, complex)         ``TypeError``   ``x must be a floating ...``
``x`` 0-d, or its last axis not ``in_features``      ``ValueError``  ``x must have last dim...``
``dy`` not the forward output's shape                ``ValueError``  ``<Layer>.backward: dy ...``
a weight not real floating                           ``TypeError``   ``base weight must be a ...``
a weight not 2-D, or with a zero size                ``ValueError``  ``base weight must be a ...``
a bias not real floating                             ``TypeError``   ``base bias must be a ...``
a bias not of shape ``(out,)``                       ``ValueError``  ``base bias must have ...``
NaN or inf                                           ``ValueError``  ``<name> must be finite...``
==================================================  ==============  ============================

The adapters' state errors are worded here too (:func:`state_message`): merging twice and
unmerging an unmerged layer (``ValueError``), training a merged layer (``StateError``, a
``ValueError``), loading adapter weights into a merged layer (``ValueError``).
"""

from __future__ import annotations

__all__ = ["ShapeError", "dtype_name", "check_input_shape", "check_dy_shape", "check_weight_shape", "check_bias_shape",
           "nonfinite_error", "state_message"]

_STATE_MESSAGES = {
    "already merged": "{owner} is already merged; call unmerge() first",
    "not merged": "{owner} is not merged; there is nothing to unmerge",
    "merged training": "{owner} is merged (inference only): unmerge() before training",
    "merged loading": "{owner} is merged: unmerge() before loading adapter weights",
    "not mergeable": "{owner} is not mergeable: no plain Linear computes it, so there is no merge() and no dense ΔW",
}


def dtype_name(dtype) -> str:
    """``"float32"`` for ``numpy.float32`` and for ``torch.float32`` alike."""
    return str(dtype).removeprefix("torch.")


def check_input_shape(shape, floating: bool, dtype, in_features: int, name: str = "x") -> None:
    """``name`` must be a real floating array whose last axis has ``in_features`` entries."""
    if not floating:
        raise TypeError(f"{name} must be a floating array, got dtype {dtype_name(dtype)}")
    shape = tuple(shape)
    if len(shape) < 1 or shape[-1] != in_features:
        raise ValueError(f"{name} must have last dimension {in_features} (in_features), got shape {shape}")


class ShapeError(ValueError, RuntimeError):
    """A gradient ``dy`` whose shape is not the forward output's. A ``ValueError`` (bad input) and
    a ``RuntimeError``, which is what PyTorch's autograd raises for the same mistake, so the same
    bad input gives the same kind of error in both backends."""


def check_dy_shape(shape, expected, owner: str) -> None:
    """``dy`` must have the forward output's shape; checked before the cache is used up."""
    if tuple(shape) != tuple(expected):
        raise ShapeError(f"{owner}.backward: dy must have shape {tuple(expected)} (the forward output), "
                         f"got {tuple(shape)}")


def check_weight_shape(shape, floating: bool, dtype, name: str = "weight") -> None:
    """A real floating, non-empty 2-D ``(out, in)`` weight."""
    if not floating:
        raise TypeError(f"{name} must be a floating array, got dtype {dtype_name(dtype)}")
    shape = tuple(shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"{name} must be a non-empty 2-D array (out, in), got shape {shape}")


def check_bias_shape(shape, floating: bool, dtype, out_features: int, name: str = "bias") -> None:
    """A real floating bias of shape ``(out,)``."""
    if not floating:
        raise TypeError(f"{name} must be a floating array, got dtype {dtype_name(dtype)}")
    if tuple(shape) != (out_features,):
        raise ValueError(f"{name} must have shape ({out_features},) to match weight, got {tuple(shape)}")


def nonfinite_error(name: str, bad: int) -> ValueError:
    """The error for ``bad`` NaN or inf values in ``name`` (raised by the caller)."""
    return ValueError(f"{name} must be finite; it holds {bad} NaN or inf value(s)")


def state_message(kind: str, owner: str) -> str:
    """The words of a life-cycle error: ``kind`` is ``"already merged"``, ``"not merged"``,
    ``"merged training"`` or ``"merged loading"``; ``owner`` the layer's class name."""
    return _STATE_MESSAGES[kind].format(owner=owner)
