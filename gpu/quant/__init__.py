"""The torch mirror of ``lowrank_ref.quant``: NF4/FP4/int4 quantise/dequantise (bit-identical to
the NumPy reference), the NF4 table, and the frozen 4-bit linear layer. The names follow the
reference (``Quant4Tensor`` is :class:`TorchQuant4Tensor`; ``NF4Tensor`` and ``NF4Linear`` are
the earlier names). Imports nothing from ``lowrank_gpu.adapters``; ``lowrank_gpu`` names the
QLoRA layer here too, as ``lg.quant.QLoRALinear``."""

from lowrank_gpu.quant.linear import NF4Linear, QuantizedLinear
from lowrank_gpu.quant.nf4 import (
           NF4Tensor,
           Quant4Tensor,
           TorchNF4Tensor,
           TorchQuant4Tensor,
           nf4_table,
           quantize_4bit,
           quantize_fp4,
           quantize_nf4,
)

__all__ = ["Quant4Tensor", "NF4Tensor", "TorchQuant4Tensor", "TorchNF4Tensor", "nf4_table", "quantize_nf4",
           "quantize_fp4", "quantize_4bit", "QuantizedLinear", "NF4Linear"]
