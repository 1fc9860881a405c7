"""The PyTorch adapters: the same public classes as ``lowrank_ref.adapters``."""

from lowrank_gpu.adapters.adalora import AdaLoRALinear, RankAllocator
from lowrank_gpu.adapters.baselines import bitfit, full_finetune
from lowrank_gpu.adapters.dora import DoRALinear
from lowrank_gpu.adapters.dylora import DyLoRALinear
from lowrank_gpu.adapters.houlsby import HoulsbyLinear
from lowrank_gpu.adapters.hyperlora import HyperLoRALinear
from lowrank_gpu.adapters.ia3 import IA3Linear
from lowrank_gpu.adapters.krona import KronALinear
from lowrank_gpu.adapters.loha import LoHaLinear
from lowrank_gpu.adapters.lokr import LoKrLinear
from lowrank_gpu.adapters.lora import LoRALinear
from lowrank_gpu.adapters.lora_moe import LoRAMoELinear
from lowrank_gpu.adapters.multitask_lora import MultiTaskLoRALinear
from lowrank_gpu.adapters.prefix_tuning import PrefixEncoder
from lowrank_gpu.adapters.prompt_tuning import PromptEmbedding
from lowrank_gpu.adapters.qlora import QLoRAInt4Linear, QLoRALinear
from lowrank_gpu.adapters.selora import SeLoRALinear
from lowrank_gpu.adapters.sora import SoRALinear
from lowrank_gpu.adapters.ssf import SSFLinear
from lowrank_gpu.adapters.tied_lora import TiedLoRALinear
from lowrank_gpu.adapters.vera import VeRALinear

__all__ = ["LoRALinear", "DoRALinear", "QLoRALinear", "QLoRAInt4Linear", "IA3Linear", "LoHaLinear", "DyLoRALinear", "SoRALinear", "LoKrLinear", "KronALinear", "AdaLoRALinear", "RankAllocator", "VeRALinear", "TiedLoRALinear", "SeLoRALinear"]

__all__ += ["SSFLinear", "HoulsbyLinear"]
__all__ += ["HyperLoRALinear"]
__all__ += ["MultiTaskLoRALinear", "LoRAMoELinear"]
__all__ += ["PromptEmbedding", "PrefixEncoder"]  # what prompt and prefix tuning (whole-model modes) add
__all__ += ["full_finetune", "bitfit"]  # whole-model baselines (functions)
