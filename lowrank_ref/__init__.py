"""lowrank-ref: the LoRA family built twice, in NumPy by hand and in PyTorch, and tested to agree.

    import lowrank_ref as lr
    base = lr.nn.Linear.from_arrays(W, b)
    layer = lr.adapters.LoRALinear(base, lr.LoRAConfig(r=4, alpha=8))

``import lowrank_ref`` imports NumPy and SciPy only; torch and cupy load when a backend asks.
"""

from lowrank_ref import adapters, nn, quant, registry
from lowrank_ref.adapters.adalora import AdaLoRAConfig
from lowrank_ref.adapters.dora import DoRAConfig
from lowrank_ref.adapters.dylora import DyLoRAConfig
from lowrank_ref.adapters.houlsby import HoulsbyConfig
from lowrank_ref.adapters.hyperlora import HyperLoRAConfig
from lowrank_ref.adapters.ia3 import IA3Config
from lowrank_ref.adapters.krona import KronAConfig, KronAResConfig
from lowrank_ref.adapters.loha import LoHaConfig
from lowrank_ref.adapters.lokr import LoKrConfig
from lowrank_ref.adapters.lora import LoRAConfig
from lowrank_ref.adapters.lora_moe import LoRAMoEConfig
from lowrank_ref.adapters.multitask_lora import MultiTaskLoRAConfig
from lowrank_ref.adapters.prefix_tuning import PrefixTuningConfig
from lowrank_ref.adapters.prompt_tuning import PromptTuningConfig
from lowrank_ref.adapters.qlora import QLoRAConfig, QLoRAInt4Config
from lowrank_ref.adapters.selora import SeLoRAConfig
from lowrank_ref.adapters.sora import SoRAConfig
from lowrank_ref.adapters.ssf import SSFConfig
from lowrank_ref.adapters.tied_lora import TiedLoRAConfig
from lowrank_ref.adapters.vera import VeRAConfig
from lowrank_ref.api import adapt
from lowrank_ref.gradcheck import gradcheck

__version__ = "0.1.0"

# DESIGN's `lr.quant.QLoRALinear(base, cfg, blocksize=64, double_quant=True)`: the layer lives in
# adapters/qlora.py (LoRA over quant.QuantizedLinear), and quant/ imports nothing from adapters/,
# so the package names it there once both are loaded
quant.QLoRALinear = adapters.QLoRALinear

__all__ = ["nn", "adapters", "registry", "adapt", "gradcheck", "LoRAConfig", "DoRAConfig", "QLoRAConfig", "QLoRAInt4Config",
           "IA3Config", "LoHaConfig", "DyLoRAConfig", "SoRAConfig", "LoKrConfig", "KronAConfig", "AdaLoRAConfig", "VeRAConfig", "TiedLoRAConfig", "SeLoRAConfig"]
__all__ += ["SSFConfig", "HoulsbyConfig"]
__all__ += ["HyperLoRAConfig"]
__all__ += ["MultiTaskLoRAConfig", "LoRAMoEConfig"]
__all__ += ["PromptTuningConfig", "PrefixTuningConfig"]
__all__ += ["KronAResConfig"]  # KronA^B_res (a block wrapper, not a registered method)


def __getattr__(name):  # lazy sub-packages that later issues fill in
    import importlib

    if name in ("quant", "optim", "data", "experiments", "io", "inject", "cli", "train", "models", "serve"):
        return importlib.import_module(f"lowrank_ref.{name}")
    raise AttributeError(f"module 'lowrank_ref' has no attribute {name!r}")
