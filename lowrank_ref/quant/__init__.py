r"""Quantisation from first principles: uniform int-k, NF4/FP4 tables from their recipes,
block-wise absmax with 4-bit packing and double quantisation, the 8-bit dynamic map, the frozen
4-bit linear layer, and memory accounting (chapter 03).

    q = quantize_nf4(W, blocksize=64, double_quant=True)                         # a Quant4Tensor
    q.packed, q.qabsmax, q.absmax2, q.offset, q.dequantize(), q.bits_per_param   # ~4.127
    nf4_table()                                                                  # 16 levels
    QuantizedLinear.from_linear(base, blocksize=64, double_quant=True)          # y = x W̃ᵀ + b

This package imports nothing from ``lowrank_ref.adapters``: the adapters sit on top of it. The
QLoRA layer lives with the other methods (``lowrank_ref.adapters.qlora``); ``lowrank_ref``
also names it here, as ``lr.quant.QLoRALinear``, for the public surface.
"""

from lowrank_ref.quant import memory, nf4
from lowrank_ref.quant.blockwise import (
    NF4Tensor,
    Quant4Tensor,
    dequantize_blockwise,
    pack_nibbles,
    quantize_4bit,
    quantize_blockwise,
    quantize_fp4,
    quantize_nf4,
    unpack_nibbles,
)
from lowrank_ref.quant.linear import NF4Linear, QuantizedLinear, weight_array
from lowrank_ref.quant.tables import dynamic_map, fp4_codebook, fp4_table, nf4_paper_eq4, nf4_table
from lowrank_ref.quant.uniform import (
    absmax_int8_roundtrip,
    absmax_int_roundtrip,
    affine_roundtrip,
    quantize_absmax_int8,
    quantize_affine,
    roundtrip_error,
)

__all__ = [
    "Quant4Tensor", "NF4Tensor", "quantize_nf4", "quantize_fp4", "quantize_4bit", "pack_nibbles", "unpack_nibbles",
    "quantize_blockwise", "dequantize_blockwise", "nf4_table", "fp4_table", "fp4_codebook",
    "nf4_paper_eq4", "dynamic_map", "quantize_affine", "affine_roundtrip", "quantize_absmax_int8",
    "absmax_int8_roundtrip", "absmax_int_roundtrip", "roundtrip_error", "QuantizedLinear", "NF4Linear",
    "weight_array", "memory", "nf4",
]
