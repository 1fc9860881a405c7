r"""The frozen 4-bit linear layer: ``y = x W̃ᵀ + b`` with ``W̃ = dequant(Q(W))`` rebuilt per call.

``QuantizedLinear`` holds its weight as a :class:`~lowrank_ref.quant.blockwise.Quant4Tensor` (NF4,
FP4 or int4 codes, two per byte, plus block scales) and a frozen float bias; it keeps no float
``(out, in)`` array. Forward and backward each dequantise ``W̃`` for the one product they need
and drop it:

.. math::
    y = x \tilde W^\top + b, \qquad \bar x = \bar y\, \tilde W .

Nothing here trains (the paper: gradients only reach the adapter's weights). Any adapter of
:mod:`lowrank_ref.adapters` takes a ``QuantizedLinear`` as its ``base`` the way it takes a
:class:`~lowrank_ref.nn.Linear`; it reads ``W0`` through :func:`weight_array`. QLoRA is LoRA on
this base; a DoRA adapter on it is QDoRA. This module imports nothing from ``adapters``.
"""

from __future__ import annotations

import numpy as np

from lowrank_ref.nn.checks import check_bias_shape
from lowrank_ref.nn.linear import check_dy, check_last_dim, check_linear
from lowrank_ref.nn.module import Module, Parameter, check_finite
from lowrank_ref.quant.blockwise import Quant4Tensor, check_blocksize, quantize_4bit

__all__ = ["QuantizedLinear", "NF4Linear", "weight_array"]


def weight_array(W, dtype=None):
    """``W`` as a float array: a float array as it is; a :class:`Quant4Tensor` dequantised for
    this call only (float32, then cast to ``dtype`` if given), never stored.

    The adapters' pure functions take ``W0`` through this, so their caches can hold the 4-bit
    tensor itself between forward and backward instead of a float copy."""
    if isinstance(W, Quant4Tensor):
        Wd = W.dequantize()
        return Wd if dtype is None or Wd.dtype == dtype else Wd.astype(dtype)
    return W


class QuantizedLinear(Module):
    r"""A frozen linear layer whose weight is stored in 4 bits: ``y = x W̃ᵀ + b``.

    Args:
        qweight: a 2-D :class:`~lowrank_ref.quant.blockwise.Quant4Tensor` ``(out, in)`` (not a
            Parameter: it is not trainable and not a float array).
        bias: ``(out,)`` floating, or None; kept as a frozen Parameter.

    Backward returns ``x̄ = ȳ W̃`` and gives no gradient to anything.
    """

    def __init__(self, qweight: Quant4Tensor, bias=None):
        super().__init__()
        if not isinstance(qweight, Quant4Tensor) or len(qweight.shape) != 2:
            raise TypeError(f"qweight must be a 2-D Quant4Tensor (out, in), got {qweight!r}")
        self.qweight = qweight
        if bias is not None:
            b = np.asarray(bias)
            check_bias_shape(b.shape, bool(np.issubdtype(b.dtype, np.floating)), b.dtype, qweight.shape[0], "bias")
            check_finite("bias", b)
            bias = Parameter(b.copy(), trainable=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> QuantizedLinear:
        """Quantise a :class:`~lowrank_ref.nn.Linear`'s weight (the ``Linear`` is not kept); the
        bias is kept in float32, the compute dtype."""
        linear = check_linear(linear)
        blocksize = check_blocksize(blocksize)
        q = quantize_4bit(linear.weight.data, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        b = None if linear.bias is None else linear.bias.data.astype(np.float32)
        return cls(q, b)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def blocksize(self) -> int:
        return self.qweight.blocksize

    @property
    def double_quant(self) -> bool:
        return self.qweight.double_quant

    @property
    def quant_type(self) -> str:
        return self.qweight.quant_type

    def dequantized_weight(self, dtype=np.float32) -> np.ndarray:
        """``W̃ (out, in)`` in ``dtype``: rebuilt on each call, never stored."""
        return weight_array(self.qweight, dtype)

    def forward(self, x):
        x = check_last_dim(x, self.in_features)
        self._cache = x.shape[:-1] + (self.out_features,)  # what backward's dy must match
        y = x @ self.dequantized_weight(x.dtype).T  # (..., out)
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dy):
        if self._cache is not None:
            check_dy(dy, self._cache, type(self).__name__)
        self._pop_cache()
        return dy @ self.dequantized_weight(dy.dtype)  # x̄ = ȳ W̃   (..., in)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qweight!r}"


NF4Linear = QuantizedLinear  # the earlier name (the layer holds NF4, FP4 or int4)
