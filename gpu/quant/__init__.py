"""The torch mirror of ``lowrank_ref.quant``: NF4 quantise/dequantise (bit-identical to the
NumPy reference) and the QLoRA layer wrapping a ``torch.nn.Linear``."""

from lowrank_gpu.quant.nf4 import TorchNF4Tensor, quantize_4bit, quantize_nf4
from lowrank_gpu.quant.qlora import NF4Linear, QLoRALinear

__all__ = ["TorchNF4Tensor", "quantize_nf4", "quantize_4bit", "QLoRALinear", "NF4Linear"]
