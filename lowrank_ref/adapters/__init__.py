"""One file per method: pure forward/backward functions plus a Module that wraps them."""

from lowrank_ref.adapters.adalora import AdaLoRALinear, RankAllocator
from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.baselines import bitfit, full_finetune
from lowrank_ref.adapters.dora import DoRALinear
from lowrank_ref.adapters.dylora import DyLoRALinear
from lowrank_ref.adapters.houlsby import HoulsbyLinear
from lowrank_ref.adapters.hyperlora import HyperLoRALinear
from lowrank_ref.adapters.ia3 import IA3Linear
from lowrank_ref.adapters.krona import KronALinear
from lowrank_ref.adapters.loha import LoHaLinear
from lowrank_ref.adapters.lokr import LoKrLinear
from lowrank_ref.adapters.lora import LoRALinear
from lowrank_ref.adapters.lora_moe import LoRAMoELinear
from lowrank_ref.adapters.multitask_lora import MultiTaskLoRALinear
from lowrank_ref.adapters.prefix_tuning import PrefixEncoder
from lowrank_ref.adapters.prompt_tuning import PromptEmbedding
from lowrank_ref.adapters.qlora import QLoRAInt4Linear, QLoRALinear
from lowrank_ref.adapters.selora import SeLoRALinear
from lowrank_ref.adapters.sora import SoRALinear
from lowrank_ref.adapters.ssf import SSFLinear
from lowrank_ref.adapters.tied_lora import TiedLoRALinear
from lowrank_ref.adapters.vera import VeRALinear

__all__ = ["LoRALinear", "DoRALinear", "QLoRALinear", "QLoRAInt4Linear", "IA3Linear", "LoHaLinear", "DyLoRALinear", "SoRALinear", "LoKrLinear", "KronALinear", "AdaLoRALinear", "RankAllocator", "VeRALinear", "TiedLoRALinear", "SeLoRALinear"]

__all__ += ["SSFLinear", "HoulsbyLinear"]
__all__ += ["HyperLoRALinear"]
__all__ += ["MultiTaskLoRALinear", "LoRAMoELinear"]
__all__ += ["PromptEmbedding", "PrefixEncoder"]  # what prompt and prefix tuning (whole-model modes) add
__all__ += ["full_finetune", "bitfit"]  # whole-model baselines (functions)
_ = AdapterLinear  # the shared base class, importable as lowrank_ref.adapters.base.AdapterLinear
