r"""The frozen 4-bit linear layer in PyTorch, the twin of :mod:`lowrank_ref.quant.linear`.

``QuantizedLinear`` keeps a weight's 4-bit storage (NF4, FP4 or int4 codes plus block scales) as
buffers and a frozen bias; ``y = x W̃ᵀ + b``. The matmul is a custom autograd function that
dequantises ``W̃`` in the forward and again in the backward (saving only the 4-bit storage), as
QLoRA does, so no float ``(out, in)`` weight lives between the two passes. Compute runs in the
dtype of ``x``; the storage keeps its exact bytes whatever ``.to(dtype)`` is called (the float32
scales are kept as their raw bits in integer buffers, which ``.to(dtype)`` does not convert).
Any adapter of :mod:`lowrank_gpu.adapters` takes it as its ``base`` (QLoRA is LoRA on it). This
module imports nothing from ``adapters``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.nn.checks import check_finite, check_input, check_linear
from lowrank_gpu.quant.nf4 import TorchQuant4Tensor, quantize_4bit
from lowrank_ref.nn.checks import check_bias_shape

__all__ = ["QuantizedLinear", "NF4Linear"]


def _bits(t: torch.Tensor | None):
    return None if t is None else t.contiguous().view(torch.int32)


def _floats(t: torch.Tensor | None):
    return None if t is None else t.view(torch.float32)


class _Quant4Matmul(torch.autograd.Function):
    """``y = x W̃ᵀ``; backward ``x̄ = ȳ W̃`` with ``W̃`` dequantised again (nothing float saved)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        W = module.dequantized_weight(x.dtype)  # (out, in), transient
        return x @ W.T  # (..., out)

    @staticmethod
    def backward(ctx, dy):
        W = ctx.module.dequantized_weight(dy.dtype)
        return dy @ W, None  # x̄ = ȳ W̃


class QuantizedLinear(nn.Module):
    """A frozen linear layer with its weight in 4 bits (buffers) and a frozen bias."""

    def __init__(self, qweight: TorchQuant4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(qweight, TorchQuant4Tensor) or len(qweight.shape) != 2:
            raise TypeError(f"qweight must be a 2-D TorchQuant4Tensor (out, in), got {qweight!r}")
        if bias is not None:
            check_bias_shape(tuple(bias.shape), bias.is_floating_point(), bias.dtype, qweight.shape[0], "bias")
            check_finite("bias", bias)
        self.shape = tuple(qweight.shape)
        self.blocksize = qweight.blocksize
        self.quant_type = qweight.quant_type
        self.register_buffer("packed", qweight.packed)
        self.register_buffer("absmax_bits", _bits(qweight.stored_absmax))
        self.register_buffer("qabsmax", qweight.qabsmax)
        self.register_buffer("absmax2_bits", _bits(qweight.absmax2))
        self.register_buffer("offset_bits", _bits(None if qweight.offset is None else qweight.offset.reshape(1)))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> QuantizedLinear:
        """Quantise a ``torch.nn.Linear``'s weight (the ``Linear`` is not kept); bias in float32."""
        linear = check_linear(linear)
        q = quantize_4bit(linear.weight.detach(), blocksize, double_quant, quant_type)
        return cls(q, None if linear.bias is None else linear.bias.detach().float())

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def qweight(self) -> TorchQuant4Tensor:
        off = None if self.offset_bits is None else _floats(self.offset_bits).reshape(())
        return TorchQuant4Tensor(self.packed, self.shape, self.blocksize, self.quant_type,
                                 _floats(self.absmax_bits), self.qabsmax, _floats(self.absmax2_bits), off)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x):
        check_input(x, self.in_features)
        y = _Quant4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias


NF4Linear = QuantizedLinear  # the earlier name (the layer holds NF4, FP4 or int4)
