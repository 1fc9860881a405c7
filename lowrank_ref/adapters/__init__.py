"""One file per method: pure forward/backward functions plus a Module that wraps them."""

from lowrank_ref.adapters.adalora import AdaLoRALinear, RankAllocator
from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.baselines import bitfit, full_finetune
from lowrank_ref.adapters.dora import DoRALinear
from lowrank_ref.adapters.dylora import DyLoRALinear
from lowrank_ref.adapters.ia3 import IA3Linear
from lowrank_ref.adapters.krona import KronALinear
from lowrank_ref.adapters.loha import LoHaLinear
from lowrank_ref.adapters.lokr import LoKrLinear
from lowrank_ref.adapters.lora import LoRALinear
from lowrank_ref.adapters.qlora import QLoRAInt4Linear, QLoRALinear
from lowrank_ref.adapters.sora import SoRALinear

__all__ = ["LoRALinear", "DoRALinear", "QLoRALinear", "QLoRAInt4Linear"]
__all__ += ["IA3Linear"]
__all__ += ["LoHaLinear"]
__all__ += ["DyLoRALinear", "SoRALinear"]
__all__ += ["LoKrLinear", "KronALinear"]
__all__ += ["AdaLoRALinear", "RankAllocator"]
__all__ += ["full_finetune", "bitfit"]  # whole-model baselines (functions)
_ = AdapterLinear  # the shared base class, importable as lowrank_ref.adapters.base.AdapterLinear
