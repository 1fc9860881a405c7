r"""NF4 in one place: the tables and the 4-bit quantise functions (the path issue 3 names).

The code lives in :mod:`lowrank_ref.quant.tables` (the levels, built from their recipes) and
:mod:`lowrank_ref.quant.blockwise` (block-wise absmax, packing, double quantisation); this module
re-exports the NF4-facing names so that ``lowrank_ref.quant.nf4`` holds them too::

    from lowrank_ref.quant.nf4 import nf4_table, quantize_nf4, NF4Tensor
"""

from lowrank_ref.quant.blockwise import (
    NF4Tensor,
    Quant4Tensor,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
)
from lowrank_ref.quant.tables import (
    NF4_OFFSET,
    fp4_codebook,
    fp4_table,
    nf4_offset_explained,
    nf4_paper_eq4,
    nf4_table,
    normal_float_table,
)

__all__ = ["Quant4Tensor", "NF4Tensor", "quantize_nf4", "quantize_fp4", "quantize_4bit", "nf4_table", "normal_float_table",
           "nf4_paper_eq4", "nf4_offset_explained", "NF4_OFFSET", "fp4_table", "fp4_codebook"]
