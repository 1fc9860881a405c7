"""The PyTorch adapters: the same public classes as ``lowrank_ref.adapters``."""

from lowrank_gpu.adapters.adalora import AdaLoRALinear, RankAllocator
from lowrank_gpu.adapters.baselines import bitfit, full_finetune
from lowrank_gpu.adapters.dora import DoRALinear
from lowrank_gpu.adapters.dylora import DyLoRALinear
from lowrank_gpu.adapters.ia3 import IA3Linear
from lowrank_gpu.adapters.krona import KronALinear
from lowrank_gpu.adapters.loha import LoHaLinear
from lowrank_gpu.adapters.lokr import LoKrLinear
from lowrank_gpu.adapters.lora import LoRALinear
from lowrank_gpu.adapters.qlora import QLoRAInt4Linear, QLoRALinear
from lowrank_gpu.adapters.sora import SoRALinear

__all__ = ["LoRALinear", "DoRALinear", "QLoRALinear", "QLoRAInt4Linear"]
__all__ += ["IA3Linear"]
__all__ += ["LoHaLinear"]
__all__ += ["DyLoRALinear", "SoRALinear"]
__all__ += ["LoKrLinear", "KronALinear"]
__all__ += ["AdaLoRALinear", "RankAllocator"]
__all__ += ["full_finetune", "bitfit"]  # whole-model baselines (functions)
