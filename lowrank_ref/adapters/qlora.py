r"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): LoRA on a base weight stored in 4 bits.

``QLoRAConfig`` is LoRA's config plus how the base is stored: ``blocksize`` (64, the paper's),
``double_quant`` (the block scales quantised again: 4.127 bits per parameter) and ``quant_type``
(``"nf4"``, the paper's NormalFloat; ``"fp4"``; ``"int4"``, uniform). ``lora_int4`` is the same
layer with ``QLoRAInt4Config`` (``quant_type="int4"``): the data-type baseline of chapter 03.

**The layer is LoRA over a quantised base.** ``QLoRALinear(base, config)`` quantises the float
``base`` into a :class:`~lowrank_ref.quant.QuantizedLinear` (the ``Linear`` is not kept) and is
then :class:`~lowrank_ref.adapters.lora.LoRALinear` on it: the same math, life cycle and checks.
With :math:`\tilde W_0 = \operatorname{dequant}(\operatorname{Q}(W_0))`,

.. math::
    y = x \tilde W_0^\top + b + s\,(\tilde x A^\top) B^\top, \qquad
    \bar x = \bar y\,\tilde W_0 + (\bar h A) \odot M

and ``Ā``, ``B̄`` exactly as LoRA's. ``W̃0`` is rebuilt in the compute dtype (float32 here, bf16
on a GPU) for the forward matmul and again in the backward, and dropped each time: the cache
holds the 4-bit tensor. No float copy of ``W0`` is kept. The quantised weight and the bias are
frozen (the paper: "gradients are only computed with respect to the adapter weights").

Quantising the base is orthogonal to the adapter: ``DoRALinear(QuantizedLinear.from_linear(base,
64, True), DoRAConfig(...))`` is QDoRA, with the same storage and merge rules.

**Merging**, for any adapter on a 4-bit base (:class:`~lowrank_ref.adapters.base.AdapterLinear`):
``merge()`` keeps :math:`\tilde W_0 + \Delta W` (float64 sum, rounded once) as a float weight, so
the merged layer is a plain float linear layer (4 bytes per weight while merged) whose output
equals the unmerged one up to rounding; the 4-bit storage is untouched and ``unmerge()`` drops the
float weight. Re-quantising the merged weight to keep the 4-bit footprint is explicit,
:func:`requantize_merged`, and :func:`merge_requant_error` measures what it costs: an update
smaller than the quantisation step is largely lost (chapter 03).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowrank_ref.adapters.base import check_base
from lowrank_ref.adapters.lora import LoRAConfig, LoRALinear, lora_backward, lora_forward
from lowrank_ref.config import check_bool, scaling_metadata
from lowrank_ref.quant.blockwise import Quant4Tensor, check_blocksize, quantize_4bit
from lowrank_ref.quant.linear import NF4Linear, QuantizedLinear
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


def check_storage(base, config) -> None:
    """An already-quantised ``base`` must be stored as ``config`` says (both backends call this)."""
    for name in ("blocksize", "double_quant", "quant_type"):
        if getattr(base, name) != getattr(config, name):
            raise ValueError(f"base is stored with {name}={getattr(base, name)!r}; the config has "
                             f"{name}={getattr(config, name)!r}")


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


# QLoRA's math is LoRA's, with params["W"] a 4-bit tensor (dequantised per pass)
qlora_forward = lora_forward
qlora_backward = lora_backward


class QLoRALinear(LoRALinear):
    r"""LoRA on a 4-bit base: trainable ``A (r, in)``, ``B (out, r)``; ``W0`` stored in 4 bits.

    Args:
        base: the pretrained :class:`~lowrank_ref.nn.Linear`, quantised here (the layer keeps no
            reference to it: drop yours and its float weight is freed); or an already quantised
            :class:`~lowrank_ref.quant.QuantizedLinear` stored as the config says.
        config: a :class:`QLoRAConfig`, or a plain :class:`~lowrank_ref.adapters.lora.LoRAConfig`
            that ``blocksize``/``double_quant`` complete (``init`` "kaiming" or "gaussian").
        blocksize: values per absmax block (64, the paper's).
        double_quant: double-quantise the block scales (QLoRA's default; 4.127 bits/param).
        rng: a ``numpy.random.Generator`` or an int seed, for the init and dropout masks.

    ``A``, ``B`` and the bias are float32 (the compute dtype); ``astype(np.float64)`` switches
    compute to float64 (for gradcheck) and leaves the 4-bit storage as it is.
    """

    CONFIG = QLoRAConfig

    def __init__(self, base, config: LoRAConfig | None = None, blocksize: int | None = None,
                 double_quant: bool | None = None, rng=None):
        config = as_qlora_config(config, self.CONFIG, blocksize, double_quant)
        base = check_base(base)
        if isinstance(base, QuantizedLinear):
            check_storage(base, config)
        else:  # everything is checked; now quantise (the only expensive step)
            base = QuantizedLinear.from_linear(base, config.blocksize, config.double_quant, config.quant_type)
        super().__init__(base, config, rng=rng)

    @property
    def blocksize(self) -> int:
        return self.base.blocksize

    @property
    def double_quant(self) -> bool:
        return self.base.double_quant

    @property
    def qweight(self) -> Quant4Tensor:
        return self.base.qweight

    def dequantized_weight(self) -> np.ndarray:
        """``W̃0`` (out, in) float32, rebuilt from the 4-bit storage."""
        return self.base.dequantized_weight(np.float32)

    def memory_bytes(self) -> dict:
        """Bytes held: the 4-bit base, the bias, the adapter, and a merged float weight if any."""
        return {"base_nf4": self.base.qweight.nbytes,
                "bias": 0 if self.base.bias is None else self.base.bias.data.nbytes,
                "adapter": self.A.data.nbytes + self.B.data.nbytes,
                "merged_float": 0 if self._merged_W is None else self._merged_W.nbytes}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.config}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, merged={self.merged}")


class QLoRAInt4Linear(QLoRALinear):
    """The same layer with the base in uniform symmetric int4 (one absmax per block) instead of
    NF4: same storage, same bytes per weight; the ``lora_int4`` row of ``compare``."""

    CONFIG = QLoRAInt4Config


def requantize_merged(layer) -> Quant4Tensor:
    """The 4-bit tensor of the merged weight ``W̃0 + ΔW`` (same block size, double quantisation
    and data type as the base): what "merge into the 4-bit model" produces. For any adapter on a
    4-bit base; explicit on purpose, the layer is not changed."""
    if not getattr(layer, "quantized", False):
        raise TypeError(f"requantize_merged needs an adapter on a 4-bit base, got {type(layer).__name__}")
    q = layer.base.qweight
    return quantize_4bit(layer.merged_weight(), blocksize=q.blocksize, double_quant=q.double_quant,
                         quant_type=q.quant_type)


def merge_requant_error(layer) -> dict:
    r"""What re-quantising after a merge costs, measured in float64.

    Returns:
        ``delta_norm``: :math:`\|\Delta W\|_F`;
        ``requant_err``: :math:`\|Q(\tilde W_0 + \Delta W) - (\tilde W_0 + \Delta W)\|_F`;
        ``update_lost``: :math:`\|(Q(\tilde W_0+\Delta W) - \tilde W_0) - \Delta W\|_F / \|\Delta W\|_F`,
        the fraction of the learned update that the re-quantised model does not carry
        (0: kept exactly; about 1 or more: the update is drowned in rounding);
        ``output_err_merged`` / ``output_err_requant``: relative error of ``x Wᵀ`` on a random
        ``x`` against the unmerged layer, for the float merge and for the re-quantised one.
    """
    Wq = requantize_merged(layer).dequantize().astype(np.float64)
    W0t = layer.w0().astype(np.float64)
    dW = layer.delta_weight().astype(np.float64)
    Wm = layer.merged_weight().astype(np.float64)
    dn = float(np.linalg.norm(dW))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, layer.in_features))
    ref = x @ (W0t + dW).T
    rn = max(float(np.linalg.norm(ref)), 1e-300)
    return {
        "delta_norm": dn,
        "requant_err": float(np.linalg.norm(Wq - Wm)),
        "update_lost": float(np.linalg.norm((Wq - W0t) - dW) / max(dn, 1e-300)),
        "output_err_merged": float(np.linalg.norm(x @ Wm.T - ref) / rn),
        "output_err_requant": float(np.linalg.norm(x @ Wq.T - ref) / rn),
    }


__all__ = ["QLoRAConfig", "QLoRAInt4Config", "QLoRALinear", "QLoRAInt4Linear", "QuantizedLinear", "NF4Linear",
           "qlora_forward", "qlora_backward", "requantize_merged", "merge_requant_error", "SPEC", "QUANT_TYPES",
           "as_qlora_config", "check_storage"]

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
