r"""QLoRA in PyTorch: a ``torch.nn.Linear``'s weight stored in NF4, LoRA on top, autograd elsewhere.

Same math, names and constructor as :mod:`lowrank_ref.quant.qlora`. The base matmul is a custom
autograd function that dequantises ``W̃0`` in the forward and again in the backward (saving only
the 4-bit storage), as QLoRA does, so no float ``(out, in)`` weight lives between the two passes.
Compute runs in the dtype of ``A`` and ``B`` (``layer.to(torch.bfloat16)`` for bf16 on a GPU);
the NF4 storage keeps its exact bytes whatever ``.to(dtype)`` is called (the float32 scales are
kept as their raw bits in integer buffers, which ``.to(dtype)`` does not convert).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lora import init_lora_A
from lowrank_gpu.nn.convert import generator_from
from lowrank_gpu.quant.nf4 import TorchNF4Tensor, quantize_4bit
from lowrank_ref.config import LoRAConfig
from lowrank_ref.quant.blockwise import check_blocksize

__all__ = ["NF4Linear", "QLoRALinear", "QLoRAInt4Linear"]


def _bits(t: torch.Tensor | None):
    return None if t is None else t.contiguous().view(torch.int32)


def _floats(t: torch.Tensor | None):
    return None if t is None else t.view(torch.float32)


class _NF4Matmul(torch.autograd.Function):
    """``y = x W̃ᵀ``; backward ``x̄ = ȳ W̃`` with ``W̃`` dequantised again (nothing float saved)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        W = module.dequantized_weight(x.dtype)  # (out, in), transient
        return x @ W.T  # (..., out)

    @staticmethod
    def backward(ctx, dy):
        W = ctx.module.dequantized_weight(dy.dtype)
        return dy @ W, None  # x̄ = ȳ W̃


class NF4Linear(nn.Module):
    """A frozen linear layer with its weight in NF4 (buffers) and a frozen bias."""

    def __init__(self, qweight: TorchNF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(qweight.shape)
        self.blocksize = qweight.blocksize
        self.quant_type = qweight.quant_type
        self.register_buffer("packed", qweight.packed)
        self.register_buffer("absmax_bits", _bits(qweight.stored_absmax))
        self.register_buffer("qabsmax", qweight.qabsmax)
        self.register_buffer("absmax2_bits", _bits(qweight.absmax2))
        self.register_buffer("offset_bits", _bits(None if qweight.offset is None else qweight.offset.reshape(1)))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4") -> NF4Linear:
        q = quantize_4bit(linear.weight.detach(), blocksize, double_quant, quant_type)
        return cls(q, None if linear.bias is None else linear.bias.detach().float())

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def qweight(self) -> TorchNF4Tensor:
        off = None if self.offset_bits is None else _floats(self.offset_bits).reshape(())
        return TorchNF4Tensor(self.packed, self.shape, self.blocksize, self.quant_type,
                              _floats(self.absmax_bits), self.qabsmax, _floats(self.absmax2_bits), off)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x):
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias


class QLoRALinear(AdapterLinear):
    CONFIG = LoRAConfig
    QUANT_TYPE = "nf4"

    def __init__(self, base: nn.Linear, config: LoRAConfig | None = None, blocksize: int | None = None,
                 double_quant: bool | None = None, rng=None):
        from lowrank_ref.adapters.qlora import as_qlora_config

        config = as_qlora_config(config, self.qlora_config(), blocksize, double_quant)
        blocksize, double_quant = config.blocksize, config.double_quant
        if config.init == "pissa":
            raise ValueError("QLoRALinear supports init 'kaiming' or 'gaussian'; PiSSA on a quantised "
                             "base needs its residual quantised after the split (not provided)")
        from lowrank_gpu.adapters.base import check_base

        check_base(base)
        blocksize = check_blocksize(blocksize)
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
        nf4_base = NF4Linear.from_linear(base, blocksize, double_quant, config.quant_type)
        nn.Module.__init__(self)
        self.base = nf4_base  # the only copy of W0; the given nn.Linear is not kept
        self.config = config
        self._w0_backup = None
        # the merged float weight: a non-persistent buffer, so .to(device/dtype) moves it with the
        # layer (a plain attribute would stay behind) and state_dict() does not save it
        self.register_buffer("_merged_W", None, persistent=False)
        device = base.weight.device
        g = generator_from(rng, device="cpu")
        r = config.r
        A = init_lora_A(r, self.in_features, config.init, g)  # as LoRALinear: kaiming or gaussian
        self.A = nn.Parameter(A.to(device=device, dtype=torch.float32))  # (r, in)
        self.B = nn.Parameter(torch.zeros((self.out_features, r), device=device))  # (out, r), B = 0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @classmethod
    def qlora_config(cls):
        """The config class of this layer (QLoRAConfig; QLoRAInt4Config for the int4 base)."""
        from lowrank_ref.adapters.qlora import QLoRAConfig, QLoRAInt4Config

        return QLoRAInt4Config if cls.QUANT_TYPE == "int4" else QLoRAConfig

    @property
    def blocksize(self) -> int:
        return self.base.blocksize

    @property
    def double_quant(self) -> bool:
        return self.base.qabsmax is not None

    @property
    def qweight(self) -> TorchNF4Tensor:
        return self.base.qweight

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # ΔW = s B A   (out, in)

    def _delta_weight_f64(self) -> torch.Tensor:
        return self.scaling * (self.B.detach().double() @ self.A.detach().double())

    def dequantized_weight(self) -> torch.Tensor:
        return self.base.dequantized_weight(torch.float32)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return (self.dequantized_weight().double() + self._delta_weight_f64()).float()

    @property
    def merged(self) -> bool:
        return self._merged_W is not None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("QLoRALinear is already merged; call unmerge() first")
        W = self.merged_weight()
        if not torch.isfinite(W).all():
            raise ValueError("merged weight must be finite; it holds NaN or inf")
        self._merged_W = W

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("QLoRALinear is not merged; there is nothing to unmerge")
        self._merged_W = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features} (in_features), got shape {tuple(x.shape)}")
        if self.merged:
            y = x @ self._merged_W.to(device=x.device, dtype=x.dtype).T
            return y if self.base.bias is None else y + self.base.bias
        return self.base(x) + self.scaling * (self.dropout(x) @ self.A.T @ self.B.T)  # x W̃0ᵀ + b + s x̃ Aᵀ Bᵀ

    def memory_bytes(self) -> dict:
        q = self.base.qweight
        el = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {"base_nf4": q.nbytes, "bias": el(self.base.bias), "adapter": el(self.A) + el(self.B),
                "merged_float": el(self._merged_W)}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.config}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, merged={self.merged}")


class QLoRAInt4Linear(QLoRALinear):
    """The base in uniform symmetric int4 instead of NF4 (the ``lora_int4`` row of ``compare``)."""

    QUANT_TYPE = "int4"
