r"""Backend-neutral configurations, one dataclass per method, defined once.

The same config object builds the NumPy layer and the PyTorch layer (see ``registry.py``).
Every field is validated on construction, so a bad rank fails before any array is touched.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["LoRAConfig", "DoRAConfig", "check_rank", "check_alpha", "check_dropout", "config_to_dict", "config_from_dict"]

LORA_INITS = ("kaiming", "gaussian", "pissa")


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


@dataclass(frozen=True)
class LoRAConfig(ScaledLowRankConfig):
    r"""LoRA (Hu et al. 2021): ``ΔW = s · B A`` with ``A (r, in)``, ``B (out, r)``.

    Args:
        r: the rank, a positive integer. ``ΔW = s B A`` has rank at most ``min(r, in, out)``: an
            ``r`` above ``min(in, out)`` is allowed (as in PEFT) but only adds parameters.
        alpha: the numerator of the scaling ``s``; ``s = alpha / r`` (the paper, §4.1), or
            ``alpha / sqrt(r)`` with ``rslora=True`` (Kalajdzievski 2023).
        dropout: inverted dropout on the LoRA branch's input only, in [0, 1).
        rslora: use the rank-stabilised scaling.
        init: ``"kaiming"`` (A Kaiming-uniform, B = 0: the reference code's default, loralib and
            PEFT), ``"gaussian"`` (A ~ N(0, 1/r²), B = 0: PEFT's reading of the paper's "random
            Gaussian initialization", §4.1), or ``"pissa"`` (principal singular vectors of W0 in
            A and B, the residual in the base; Meng et al. 2024).
    """

    init: str = "kaiming"

    INITS = LORA_INITS


DORA_INITS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class DoRAConfig(ScaledLowRankConfig):
    r"""DoRA (Liu et al. 2024, arXiv:2402.09353): ``W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖`` row-wise.

    Args:
        r, alpha, dropout, rslora: as in :class:`LoRAConfig` (``s = alpha/r`` or ``alpha/sqrt(r)``).
        detach_norm: treat the row norm ``n = ‖W0 + s B A‖`` as a constant in the backward pass
            (the paper's §4.3, and what PEFT does); ``False`` gives the exact gradient, with the
            projection term.
        init: ``"kaiming"`` or ``"gaussian"`` for ``A`` (``B = 0`` either way).
    """

    detach_norm: bool = True
    init: str = "kaiming"

    INITS = DORA_INITS

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "detach_norm", check_bool(self.detach_norm, "detach_norm"))


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
    return cls(**d)
