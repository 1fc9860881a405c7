r"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA on a base weight stored in 4 bits.

``QLoRAConfig`` is LoRA's config plus how the base is stored: ``blocksize`` (64, the paper's),
``double_quant`` (the block scales quantised again: 4.127 bits per parameter) and ``quant_type``
(``"nf4"``, the paper's NormalFloat; ``"fp4"``; ``"int4"``, uniform). ``lora_int4`` is the same
layer with ``QLoRAInt4Config`` (``quant_type="int4"``): the data-type baseline of chapter 03.

The layers: ``QLoRALinear(base, config)`` (``blocksize``/``double_quant`` keywords are accepted
with a plain ``LoRAConfig`` too, and folded into the config).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_ref.adapters.lora import LoRAConfig
from lowrank_ref.config import check_bool, scaling_metadata
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PeftMapping

QUANT_TYPES = ("nf4", "fp4", "int4")


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    r"""LoRA's config (``r``, ``alpha``, ``dropout``, ``rslora``, ``init``) plus the 4-bit base:

    Args:
        blocksize: values per absmax block (64 in the paper).
        double_quant: quantise the block scales to 8 bits in blocks of 256 (QLoRA §3).
        quant_type: ``"nf4"`` (default), ``"fp4"`` or ``"int4"``.
    """

    blocksize: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"

    INITS = ("kaiming", "gaussian")  # PiSSA would need its residual quantised after the split

    def __post_init__(self):
        if self.init == "pissa":
            raise ValueError("QLoRA supports init 'kaiming' or 'gaussian'; PiSSA on a quantised base needs "
                             "its residual quantised after the split (not provided)")
        super().__post_init__()
        from lowrank_ref.quant.blockwise import check_blocksize

        object.__setattr__(self, "blocksize", check_blocksize(self.blocksize))
        object.__setattr__(self, "double_quant", check_bool(self.double_quant, "double_quant"))
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")


@dataclass(frozen=True)
class QLoRAInt4Config(QLoRAConfig):
    """QLoRA's layer with a uniform symmetric int4 base (one absmax per block): ``lora_int4``."""

    quant_type: str = "int4"

    def __post_init__(self):
        super().__post_init__()
        if self.quant_type != "int4":
            raise ValueError(f"QLoRAInt4Config has quant_type 'int4', got {self.quant_type!r}")


def as_qlora_config(config, cls, blocksize=None, double_quant=None):
    """``config`` as a ``cls`` (QLoRAConfig or QLoRAInt4Config): a plain ``LoRAConfig`` takes
    ``blocksize``/``double_quant`` (defaults 64, True); a ``cls`` must agree with any given."""
    if config is None:
        config = cls()
    if isinstance(config, QLoRAConfig):
        if type(config) is not cls:
            raise TypeError(f"config must be a {cls.__name__} (or a LoRAConfig), got {type(config).__name__}")
        for name, v in (("blocksize", blocksize), ("double_quant", double_quant)):
            if v is not None and v != getattr(config, name):
                raise ValueError(f"{name}={v!r} contradicts the config's {name}={getattr(config, name)!r}")
        return config
    if type(config) is not LoRAConfig:
        raise TypeError(f"config must be a {cls.__name__} or a LoRAConfig, got {type(config).__name__}")
    from dataclasses import asdict

    extra = {k: v for k, v in (("blocksize", blocksize), ("double_quant", double_quant)) if v is not None}
    return cls(**asdict(config), **extra)


from lowrank_ref.quant.qlora import (  # noqa: E402  (the layer needs the configs above)
    NF4Linear,
    QLoRAInt4Linear,
    QLoRALinear,
    qlora_backward,
    qlora_forward,
)

__all__ = ["QLoRAConfig", "QLoRAInt4Config", "QLoRALinear", "QLoRAInt4Linear", "NF4Linear", "qlora_forward",
           "qlora_backward", "SPEC", "QUANT_TYPES", "as_qlora_config"]

# a QLoRA adapter is a LoRA adapter (PEFT's keys) over a quantised base; a PEFT LoRA folder loads as "lora"
_PEFT = PeftMapping("LORA", {"A": "lora_A.weight", "B": "lora_B.weight"}, claims=lambda c: False)

SPEC = (
    MethodSpec(
        name="qlora",
        config=QLoRAConfig,
        numpy="lowrank_ref.adapters.qlora:QLoRALinear",
        torch="lowrank_gpu.adapters.qlora:QLoRALinear",
        description="QLoRA, Dettmers et al. 2023: LoRA on an NF4 (4-bit, double-quantised) base weight",
        overridable=("r", "alpha"),
        file_metadata=scaling_metadata,
        peft=_PEFT,
        example=lambda: Example(8, 4, QLoRAConfig(r=2, alpha=4.0, blocksize=16)),
        compare={
            # the adapted layers' base weights in NF4 (double-quantised); the other layers stay
            # float, so its memory column shows only those layers' saving
            "qlora": CompareRow(QLoRAConfig(r=8, alpha=16, blocksize=64, double_quant=True), lr=1e-2, order=40),
        },
    ),
    MethodSpec(
        name="lora_int4",
        config=QLoRAInt4Config,
        numpy="lowrank_ref.adapters.qlora:QLoRAInt4Linear",
        torch="lowrank_gpu.adapters.qlora:QLoRAInt4Linear",
        description="QLoRA's layer with a uniform int4 base instead of NF4 (the data-type baseline)",
        overridable=("r", "alpha"),
        file_metadata=scaling_metadata,
        peft=_PEFT,
        example=lambda: Example(8, 4, QLoRAInt4Config(r=2, alpha=4.0, blocksize=16)),
        compare={"lora_int4": CompareRow(QLoRAInt4Config(r=8, alpha=16, blocksize=64, double_quant=True),
                                         lr=1e-2, order=41)},
    ),
)
