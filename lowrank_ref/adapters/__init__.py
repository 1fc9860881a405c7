"""One file per method: pure forward/backward functions plus a Module that wraps them."""

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.baselines import bitfit, full_finetune
from lowrank_ref.adapters.dora import DoRALinear
from lowrank_ref.adapters.houlsby import HoulsbyLinear
from lowrank_ref.adapters.ia3 import IA3Linear
from lowrank_ref.adapters.lora import LoRALinear
from lowrank_ref.adapters.qlora import QLoRAInt4Linear, QLoRALinear
from lowrank_ref.adapters.ssf import SSFLinear

__all__ = ["LoRALinear", "DoRALinear", "QLoRALinear", "QLoRAInt4Linear"]
__all__ += ["IA3Linear"]
__all__ += ["SSFLinear", "HoulsbyLinear"]
__all__ += ["full_finetune", "bitfit"]  # whole-model baselines (functions)
_ = AdapterLinear  # the shared base class, importable as lowrank_ref.adapters.base.AdapterLinear
