r"""Method name -> config class -> implementation, one per backend.

Implementations are named by ``"module:attribute"`` strings, so looking up a method never imports
torch: the PyTorch class is imported only when a torch backend is asked for.

Each later method adds one :func:`register` call here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

__all__ = ["MethodSpec", "register", "get_method", "method_names", "config_class", "method_for_config",
           "BACKENDS", "check_backend", "load_object"]

BACKENDS = ("numpy", "torch", "cuda", "cupy")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: str  # "module:Class" of the backend-neutral config
    numpy: str | None  # "module:Class" of the NumPy layer (None for whole-model baselines)
    torch: str | None  # "module:Class" of the PyTorch layer
    kwargs: dict = field(default_factory=dict)  # extra constructor keywords (e.g. blocksize)
    description: str = ""
    # whole-model modes (numpy = torch = None): "module:function" applied to the model itself
    model_fn: str | None = None  # NumPy models
    torch_model_fn: str | None = None  # torch models


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    _METHODS[spec.name] = spec
    return spec


def load_object(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_names() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[key]


def config_class(name: str):
    """The config class called ``name`` (as stored in adapter-file metadata)."""
    for spec in _METHODS.values():
        cls = load_object(spec.config)
        if cls.__name__ == name:
            return cls
    known = sorted({load_object(s.config).__name__ for s in _METHODS.values()})
    raise ValueError(f"unknown config class {name!r}; known: {', '.join(known)}")


def method_for_config(cfg) -> MethodSpec:
    """The first registered layer method whose config class is ``type(cfg)``."""
    for spec in _METHODS.values():
        if (spec.numpy is not None or spec.model_fn is not None) and type(cfg) is load_object(spec.config):
            return spec
    raise TypeError(f"no method takes a config of type {type(cfg).__name__}")


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    return backend.lower()


# --- the methods ---------------------------------------------------------------------------
register(MethodSpec(
    "full", "lowrank_ref.adapters.baselines:FullFinetuneConfig", None, None,
    model_fn="lowrank_ref.adapters.baselines:full_finetune",
    torch_model_fn="lowrank_gpu.adapters.baselines:full_finetune",
    description="full fine-tuning: every parameter trains",
))
register(MethodSpec(
    "bitfit", "lowrank_ref.adapters.baselines:BitFitConfig", None, None,
    model_fn="lowrank_ref.adapters.baselines:bitfit",
    torch_model_fn="lowrank_gpu.adapters.baselines:bitfit",
    description="BitFit, Ben Zaken et al. 2021: only the bias terms train",
))
register(MethodSpec(
    "lora", "lowrank_ref.config:LoRAConfig",
    "lowrank_ref.adapters.lora:LoRALinear", "lowrank_gpu.adapters.lora:LoRALinear",
    description="LoRA, Hu et al. 2021: ΔW = (α/r) B A",
))
register(MethodSpec(
    "qlora", "lowrank_ref.config:LoRAConfig",
    "lowrank_ref.adapters.qlora:QLoRALinear", "lowrank_gpu.adapters.qlora:QLoRALinear",
    kwargs={"blocksize": 64, "double_quant": True},
    description="QLoRA, Dettmers et al. 2023: LoRA on an NF4 (4-bit, double-quantised) base weight",
))
register(MethodSpec(
    "lora_int4", "lowrank_ref.config:LoRAConfig",
    "lowrank_ref.adapters.qlora:QLoRAInt4Linear", "lowrank_gpu.adapters.qlora:QLoRAInt4Linear",
    kwargs={"blocksize": 64, "double_quant": True},
    description="QLoRA's layer with a uniform int4 base instead of NF4 (the data-type baseline)",
))
register(MethodSpec(
    "dora", "lowrank_ref.config:DoRAConfig",
    "lowrank_ref.adapters.dora:DoRALinear", "lowrank_gpu.adapters.dora:DoRALinear",
    description="DoRA, Liu et al. 2024: W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖ row-wise",
))
