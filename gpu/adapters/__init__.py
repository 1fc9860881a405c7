"""The PyTorch adapters: the same public classes as ``lowrank_ref.adapters``."""

from lowrank_gpu.adapters.dora import DoRALinear
from lowrank_gpu.adapters.lora import LoRALinear

__all__ = ["LoRALinear", "DoRALinear"]
