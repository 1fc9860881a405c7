r"""QLoRA's torch layer, re-exported here so it stands with the other methods
(implementation: :mod:`lowrank_gpu.quant.qlora`)."""

from lowrank_gpu.quant.qlora import NF4Linear, QLoRAInt4Linear, QLoRALinear

__all__ = ["QLoRALinear", "QLoRAInt4Linear", "NF4Linear"]
