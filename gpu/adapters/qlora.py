r"""QLoRA in PyTorch: LoRA over a 4-bit base, the twin of :mod:`lowrank_ref.adapters.qlora`.

``QLoRALinear(base, config)`` quantises a ``torch.nn.Linear`` into a
:class:`~lowrank_gpu.quant.QuantizedLinear` (the given layer is not kept) and is then
:class:`~lowrank_gpu.adapters.lora.LoRALinear` on it: the same forward, life cycle and checks.
The base matmul dequantises ``W̃0`` in the forward and again in the backward (a custom autograd
function that saves only the 4-bit storage). Compute runs in the dtype of ``A`` and ``B``
(``layer.to(torch.bfloat16)`` for bf16 on a GPU); the 4-bit bytes stay as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import check_base
from lowrank_gpu.adapters.lora import LoRALinear
from lowrank_gpu.quant.linear import NF4Linear, QuantizedLinear
from lowrank_gpu.quant.nf4 import TorchQuant4Tensor
from lowrank_ref.adapters.qlora import QLoRAConfig, QLoRAInt4Config, as_qlora_config, check_storage
from lowrank_ref.config import LoRAConfig

__all__ = ["QLoRALinear", "QLoRAInt4Linear", "QuantizedLinear", "NF4Linear"]


class QLoRALinear(LoRALinear):
    """LoRA on a 4-bit base; same config and constructor parameters as the NumPy layer."""

    CONFIG = QLoRAConfig

    def __init__(self, base: nn.Linear, config: LoRAConfig | None = None, blocksize: int | None = None,
                 double_quant: bool | None = None, rng=None):
        config = as_qlora_config(config, self.CONFIG, blocksize, double_quant)
        base = check_base(base)
        if isinstance(base, QuantizedLinear):
            check_storage(base, config)
        else:  # the given nn.Linear is not kept: the 4-bit storage is the only copy of W0
            base = QuantizedLinear.from_linear(base, config.blocksize, config.double_quant, config.quant_type)
        super().__init__(base, config, rng=rng)

    @property
    def blocksize(self) -> int:
        return self.base.blocksize

    @property
    def double_quant(self) -> bool:
        return self.base.double_quant

    @property
    def qweight(self) -> TorchQuant4Tensor:
        return self.base.qweight

    def dequantized_weight(self) -> torch.Tensor:
        return self.base.dequantized_weight(torch.float32)

    def memory_bytes(self) -> dict:
        q = self.base.qweight
        el = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {"base_nf4": q.nbytes, "bias": el(self.base.bias), "adapter": el(self.A) + el(self.B),
                "merged_float": el(self._merged_W)}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.config}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, merged={self.merged}")


class QLoRAInt4Linear(QLoRALinear):
    """The base in uniform symmetric int4 instead of NF4 (the ``lora_int4`` row of ``compare``)."""

    CONFIG = QLoRAInt4Config
