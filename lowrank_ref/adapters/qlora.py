r"""QLoRA's adapter layer, re-exported here so it stands with the other methods.

The implementation lives in :mod:`lowrank_ref.quant.qlora` (next to the NF4 storage it needs):
``QLoRALinear(base, LoRAConfig, blocksize=64, double_quant=True)``.
"""

from lowrank_ref.quant.qlora import (
    NF4Linear,
    QLoRAInt4Linear,
    QLoRALinear,
    qlora_backward,
    qlora_forward,
)

__all__ = ["QLoRALinear", "QLoRAInt4Linear", "NF4Linear", "qlora_forward", "qlora_backward"]
