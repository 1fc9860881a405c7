r"""What the methods' configs share: the argument checks, the rank-and-scaling base class, and the
conversion to and from adapter-file metadata.

Each method's config is defined in the method's own file (``LoRAConfig`` in ``adapters/lora.py``,
``DoRAConfig`` in ``adapters/dora.py``, ...); ``lowrank_ref.config.LoRAConfig`` and the other
names that lived here before still resolve (module ``__getattr__`` below). One config object builds
the NumPy layer and the PyTorch layer (see ``registry.py``). Every field is validated on
construction, so a bad rank fails before any array is touched.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["ScaledLowRankConfig", "check_rank", "check_alpha",
           "check_dropout", "check_bool", "config_to_dict", "config_from_dict", "scaling_metadata"]


def check_rank(r, name: str = "r") -> int:
    if isinstance(r, bool) or not hasattr(r, "__index__"):
        raise TypeError(f"{name} must be a positive integer, got {r!r} ({type(r).__name__})")
    r = int(r.__index__())
    if r <= 0:
        raise ValueError(f"{name} must be a positive integer, got {r}")
    return r


def check_alpha(alpha, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or isinstance(alpha, np.bool_) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {alpha}")
    return alpha


def check_dropout(p, name: str = "dropout") -> float:
    if isinstance(p, bool) or isinstance(p, np.bool_) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {p!r}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def check_bool(v, name: str) -> bool:
    """``True``/``False`` (a NumPy ``bool_`` is taken as the bool it holds); 0, 1, "yes" are refused."""
    if isinstance(v, np.bool_):
        return bool(v)
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {v!r} ({type(v).__module__}.{type(v).__qualname__})")
    return v


@dataclass(frozen=True)
class ScaledLowRankConfig:
    """What LoRA-style configs share: a rank ``r`` and a scaling ``s`` from ``alpha``.

    ``s = alpha / r`` (Hu et al. 2021, §4.1) or ``alpha / sqrt(r)`` with ``rslora``
    (Kalajdzievski 2023). Subclasses add their own fields and name their allowed ``INITS``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False

    INITS = ()  # a class attribute, not a field: the allowed values of ``init``

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "dropout", check_dropout(self.dropout))
        object.__setattr__(self, "rslora", check_bool(self.rslora, "rslora"))
        init = getattr(self, "init", None)
        if init is not None and init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS} for {type(self).__name__}, got {init!r}")

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def replace(self, **changes):
        d = asdict(self)
        d.update(changes)
        return type(self)(**d)


def scaling_metadata(cfg) -> dict:
    """What adapter files record for a scaled low-rank config besides the config itself: the
    scale ``s`` and the rule that gave it (a reader need not know the method to apply it)."""
    return {"scaling": float(cfg.scaling), "scaling_rule": "alpha/sqrt(r)" if cfg.rslora else "alpha/r"}


def config_to_dict(cfg) -> dict:
    """``{"config_class": ..., field: value, ...}`` for metadata in adapter files."""
    return {"config_class": type(cfg).__name__, **asdict(cfg)}


def config_from_dict(d: dict):
    """Rebuild a config from :func:`config_to_dict`'s output (validated like any config)."""
    from lowrank_ref import registry

    d = dict(d)
    name = d.pop("config_class", None)
    cls = registry.config_class(name)
    allowed = {f.name for f in fields(cls)}
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"unknown fields for {name}: {sorted(unknown)}")
    # a class may read the files written before one of its fields existed (DoRAConfig.from_file_fields)
    return getattr(cls, "from_file_fields", cls)(**d)


# the configs that lived here before the method contract; each is now in its method's file
_MOVED = {"LoRAConfig": "lowrank_ref.adapters.lora", "LORA_INITS": "lowrank_ref.adapters.lora",
          "DoRAConfig": "lowrank_ref.adapters.dora", "DORA_INITS": "lowrank_ref.adapters.dora",
          "QLoRAConfig": "lowrank_ref.adapters.qlora"}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lowrank_ref.config' has no attribute {name!r}")
