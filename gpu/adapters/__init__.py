"""The PyTorch adapters: the same public classes as ``lowrank_ref.adapters``."""

from lowrank_gpu.adapters.baselines import bitfit, full_finetune
from lowrank_gpu.adapters.dora import DoRALinear
from lowrank_gpu.adapters.houlsby import HoulsbyLinear
from lowrank_gpu.adapters.ia3 import IA3Linear
from lowrank_gpu.adapters.lora import LoRALinear
from lowrank_gpu.adapters.qlora import QLoRAInt4Linear, QLoRALinear
from lowrank_gpu.adapters.ssf import SSFLinear

__all__ = ["LoRALinear", "DoRALinear", "QLoRALinear", "QLoRAInt4Linear"]
__all__ += ["IA3Linear"]
__all__ += ["SSFLinear", "HoulsbyLinear"]
__all__ += ["full_finetune", "bitfit"]  # whole-model baselines (functions)
