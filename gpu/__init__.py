"""lowrank_gpu: the PyTorch (and CuPy) mirror of lowrank_ref, with the same names and configs.

    import lowrank_gpu as lg
    layer = lg.adapters.LoRALinear(torch_linear, lr.LoRAConfig(r=8, alpha=16))
"""

from lowrank_gpu import adapters, nn, quant
from lowrank_ref import DoRAConfig, LoRAConfig, QLoRAConfig, QLoRAInt4Config

# as in lowrank_ref: `lg.quant.QLoRALinear` names the adapter (gpu/adapters/qlora.py); quant/
# itself imports nothing from adapters/
quant.QLoRALinear = adapters.QLoRALinear

__all__ = ["adapters", "nn", "LoRAConfig", "DoRAConfig", "QLoRAConfig", "QLoRAInt4Config"]


def __getattr__(name):
    import importlib

    if name in ("quant", "optim", "inject", "train", "models", "serve"):
        return importlib.import_module(f"lowrank_gpu.{name}")
    raise AttributeError(f"module 'lowrank_gpu' has no attribute {name!r}")
