r"""Quantisation from first principles: uniform int-k, NF4/FP4 tables from their recipes,
block-wise absmax with 4-bit packing and double quantisation, the 8-bit dynamic map, the QLoRA
layer, and memory accounting (chapter 03).

    q = quantize_nf4(W, blocksize=64, double_quant=True)
    q.packed, q.qabsmax, q.absmax2, q.offset, q.dequantize(), q.bits_per_param   # ~4.127
    nf4_table()                                                                  # 16 levels
    QLoRALinear(base, LoRAConfig(r=8, alpha=16), blocksize=64, double_quant=True)
"""

from lowrank_ref.quant.blockwise import (
    NF4Tensor,
    dequantize_blockwise,
    pack_nibbles,
    quantize_4bit,
    quantize_blockwise,
    quantize_fp4,
    quantize_nf4,
    unpack_nibbles,
)
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
    "NF4Tensor", "quantize_nf4", "quantize_fp4", "quantize_4bit", "pack_nibbles", "unpack_nibbles",
    "quantize_blockwise", "dequantize_blockwise", "nf4_table", "fp4_table", "fp4_codebook",
    "nf4_paper_eq4", "dynamic_map", "quantize_affine", "affine_roundtrip", "quantize_absmax_int8",
    "absmax_int8_roundtrip", "absmax_int_roundtrip", "roundtrip_error", "QLoRALinear", "NF4Linear",
]


def __getattr__(name):  # the layer imports the adapters package; load it on first use
    if name in ("QLoRALinear", "NF4Linear"):
        from lowrank_ref.quant import qlora

        return getattr(qlora, name)
    if name in ("memory", "qlora", "nf4"):
        import importlib

        return importlib.import_module(f"lowrank_ref.quant.{name}")
    raise AttributeError(f"module 'lowrank_ref.quant' has no attribute {name!r}")
