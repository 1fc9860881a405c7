r"""Linear and Dropout, with their backward passes.

Linear, PyTorch's layout: :math:`y = x W^\top + b`, ``W`` of shape ``(out, in)``.

Backward, for a loss :math:`L` and upstream gradient :math:`\bar y = \partial L/\partial y`
(leading dimensions of ``x`` flattened into one axis of ``N`` rows):

.. math::
    \bar x = \bar y\, W, \qquad
    \bar W = \bar y^\top x \;(\text{out}\times\text{in}), \qquad
    \bar b = \textstyle\sum_{n} \bar y_n .
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.checks import (
    ShapeError,
    check_bias_shape,
    check_dy_shape,
    check_input_shape,
    check_weight_shape,
)
from lowrank_ref.nn.module import Module, Parameter, array_module, check_finite, where_is

__all__ = ["Linear", "Dropout", "linear_forward", "linear_backward", "check_last_dim", "check_dy", "check_linear",
           "ShapeError"]


def check_last_dim(x: np.ndarray, expected: int, name: str = "x") -> np.ndarray:
    """Turn ``x`` into a floating array whose last axis has ``expected`` entries, or raise."""
    if array_module(x) is np:  # a CuPy array stays on its device
        x = np.asarray(x)
    check_input_shape(x.shape, bool(np.issubdtype(x.dtype, np.floating)), x.dtype, expected, name)
    return x


def check_dy(dy, shape: tuple, owner: str) -> None:
    """``dy`` must have the shape of the forward output; checked before the cache is used up."""
    check_dy_shape(getattr(dy, "shape", ()), shape, owner)


def check_linear(base, name: str = "base") -> Linear:
    """``base`` as a valid :class:`Linear`: real floating, a non-empty 2-D weight, a bias of shape
    ``(out,)`` or None, every value finite. The checks ``Linear.from_arrays`` makes, run again on
    a layer that may have been edited since (the torch twin runs the same ones on a
    ``torch.nn.Linear``)."""
    if not isinstance(base, Linear):
        raise TypeError(f"{name} must be a lowrank_ref.nn.Linear, got {type(base).__name__}")
    W = base.weight.data
    check_weight_shape(W.shape, bool(np.issubdtype(W.dtype, np.floating)), W.dtype, f"{name} weight")
    check_finite(f"{name} weight", W)
    if base.bias is not None:
        b = base.bias.data
        check_bias_shape(b.shape, bool(np.issubdtype(b.dtype, np.floating)), b.dtype, W.shape[0], f"{name} bias")
        check_finite(f"{name} bias", b)
    return base


def linear_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    r"""y = x Wᵀ + b.   x (..., in), W (out, in), b (out,) or None -> y (..., out)."""
    # As one 2-D product: NumPy's matmul of a stacked (B, T, in) array with a transposed 2-D view
    # skips BLAS and runs ~50x slower than the same product on (B*T, in) rows.
    y = x.reshape(-1, x.shape[-1]) @ W.T  # (N, out)
    if b is not None and y.dtype == np.result_type(y, b):
        y += b  # in place: no second (N, out) array
    elif b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], W.shape[0])


def linear_backward(dy: np.ndarray, x: np.ndarray, W: np.ndarray, need_w: bool = True):
    r"""Return (x̄, W̄, b̄) for y = x Wᵀ + b: x̄ = ȳ W, W̄ = ȳᵀ x, b̄ = Σ ȳ. W̄, b̄ are None if not needed."""
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dx = (dy2 @ W).reshape(*dy.shape[:-1], W.shape[1])  # (..., in), one 2-D product as in the forward
    if not need_w:
        return dx, None, None
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    return dx, dy2.T @ x2, dy2.sum(axis=0)


class Linear(Module):
    """``y = x W^T + b`` with ``weight`` (out, in) and optional ``bias`` (out,).

    Initialised as PyTorch does: U(-1/sqrt(in), 1/sqrt(in)) for both weight and bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None, dtype=np.float32):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        rng = np.random.default_rng() if rng is None else rng
        bound = 1.0 / np.sqrt(in_features)
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, (out_features,)).astype(dtype)) if bias else None

    @classmethod
    def from_arrays(cls, weight, bias=None) -> Linear:
        """Build a Linear from a weight ``(out, in)`` and an optional bias ``(out,)`` (copied)."""
        W = np.asarray(weight)
        check_weight_shape(W.shape, bool(np.issubdtype(W.dtype, np.floating)), W.dtype, "weight")
        check_finite("weight", W)
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.weight = Parameter(W.copy())
        if bias is None:
            layer.bias = None
        else:
            b = np.asarray(bias)
            check_bias_shape(b.shape, bool(np.issubdtype(b.dtype, np.floating)), b.dtype, W.shape[0], "bias")
            check_finite("bias", b)
            layer.bias = Parameter(b.astype(W.dtype, copy=True))
        return layer

    @property
    def in_features(self) -> int:
        return self.weight.data.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.data.shape[0]

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = check_last_dim(x, self.in_features)
        self._cache = x
        b = None if self.bias is None else self.bias.data
        return linear_forward(x, self.weight.data, b)  # (..., out)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        if self._cache is not None:
            check_dy(dy, self._cache.shape[:-1] + (self.out_features,), "Linear")
        x = self._pop_cache()
        need = self.weight.trainable or (self.bias is not None and self.bias.trainable)
        dx, dW, db = linear_backward(dy, x, self.weight.data, need_w=need)
        if need:
            self.weight.accumulate(dW)
            if self.bias is not None:
                self.bias.accumulate(db)
        return dx

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Dropout(Module):
    r"""Inverted dropout: in training, ``y = x ⊙ mask / (1-p)`` with ``mask ~ Bernoulli(1-p)``;
    in eval, ``y = x``. Backward: ``x̄ = ȳ ⊙ mask / (1-p)``."""

    def __init__(self, p: float = 0.0, rng=None):
        super().__init__()
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.rng = np.random.default_rng() if rng is None else rng

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not self.training or self.p == 0.0:
            self._cache = (None,)
            return x
        keep = where_is(x, (self.rng.random(x.shape) >= self.p).astype(x.dtype) / (1.0 - self.p))
        self._cache = (keep,)
        return x * keep

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (keep,) = self._pop_cache()
        return dy if keep is None else dy * keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
