"""The torch mirror of ``lowrank_ref.quant``: NF4/FP4 quantise/dequantise (bit-identical to the
NumPy reference), the NF4 table, and the QLoRA layer wrapping a ``torch.nn.Linear``. The names
follow the reference (``NF4Tensor`` is :class:`TorchNF4Tensor`)."""

from lowrank_gpu.quant.nf4 import (
           NF4Tensor,
           TorchNF4Tensor,
           nf4_table,
           quantize_4bit,
           quantize_fp4,
           quantize_nf4,
)
from lowrank_gpu.quant.qlora import NF4Linear, QLoRAInt4Linear, QLoRALinear

__all__ = ["NF4Tensor", "TorchNF4Tensor", "nf4_table", "quantize_nf4", "quantize_fp4", "quantize_4bit",
           "QLoRALinear", "QLoRAInt4Linear", "NF4Linear"]
