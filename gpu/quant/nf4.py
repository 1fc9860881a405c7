r"""NF4/FP4 block-wise quantisation in PyTorch, bit-identical to :mod:`lowrank_ref.quant.blockwise`.

Same steps, same float32 roundings (the tables come from the NumPy reference): the block absmax,
``u = x · (1/a)`` clipped to ``[-1, 1]``, the code by the float32 midpoints (``bucketize`` with
``right=False`` sends a value on a midpoint to the lower level), two codes per byte with the first
in the high nibble; dequantisation ``t[c] · a`` is one float32 multiply. Works on any device; on
CUDA the layout is the one bitsandbytes' kernels read, and :func:`dequantize` uses them when
bitsandbytes is installed (never required).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lowrank_ref.quant import blockwise as ref
from lowrank_ref.quant.tables import dynamic_map, fp4_codebook, int4_table, midpoints, nf4_table

__all__ = ["TorchQuant4Tensor", "TorchNF4Tensor", "Quant4Tensor", "NF4Tensor", "quantize_nf4", "quantize_fp4",
           "quantize_4bit", "nf4_table",
           "dequantize_codes", "table_tensor", "quantize_blockwise", "dequantize_blockwise"]

_TABLES = {"nf4": nf4_table, "fp4": fp4_codebook, "int4": int4_table}
_TINY = 1e-38


def table_tensor(quant_type: str = "nf4", device=None) -> torch.Tensor:
    if quant_type not in _TABLES:
        raise ValueError(f"quant_type must be one of {sorted(_TABLES)}, got {quant_type!r}")
    return torch.from_numpy(_TABLES[quant_type]()).to(device)


def nf4_table(device=None) -> torch.Tensor:
    """The 16 NF4 levels as a float32 tensor (the NumPy reference's :func:`~lowrank_ref.quant.nf4_table`)."""
    return table_tensor("nf4", device)


def _check_input(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a real floating tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); there is nothing to quantise")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite; it holds NaN or inf")
    flat = x.detach().reshape(-1).to(torch.float32)
    if not torch.isfinite(flat).all():  # a finite float64 beyond float32's range becomes inf
        bad = int(flat.numel() - torch.isfinite(flat).sum())
        raise ValueError(f"x must be finite in float32; {bad} value(s) of x exceed float32's range "
                         f"(largest magnitude {float(x.detach().abs().max()):.3g} > 3.4e38)")
    return flat


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """8-bit block-wise (nearest level by float32 midpoints): ``(codes uint8, absmax float32)``."""
    x = x.reshape(-1).to(torch.float32)
    n = x.numel()
    nb = -(-n // blocksize)
    xp = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = xp.abs().amax(dim=1)
    recip = 1.0 / absmax.clamp_min(_TINY)
    u = (xp * recip[:, None]).reshape(-1)[:n].clamp(-1.0, 1.0)
    mids = torch.from_numpy(midpoints(code.cpu().numpy())).to(x.device)
    return torch.bucketize(u, mids, right=False).to(torch.uint8), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    n = q.numel()
    nb = -(-n // blocksize)
    v = torch.nn.functional.pad(code[q.long()], (0, nb * blocksize - n)).view(nb, blocksize)
    return (v * absmax[:, None]).reshape(-1)[:n]


def _pair_lut(table: torch.Tensor) -> torch.Tensor:
    """``lut[byte] = (table[byte >> 4], table[byte & 15])``: (256, 2), one gather per byte."""
    b = torch.arange(256, device=table.device)
    return torch.stack([table[b >> 4], table[b & 15]], dim=1)


def dequantize_codes(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, n: int,
                     blocksize: int) -> torch.Tensor:
    r"""``x̂_j = t[c_j] · a_b`` (float32, flat ``(n,)``) from packed codes.

    One ``index_select`` from a 256-entry table of value pairs decodes two codes per byte; then
    the block scales multiply in place (the same float32 products as the NumPy reference)."""
    m = packed.numel()
    vals = torch.empty((m, 2), dtype=torch.float32, device=packed.device)
    torch.index_select(_pair_lut(table), 0, packed.reshape(-1).int(), out=vals)  # (m, 2)
    flat = vals.view(-1)
    full = n // blocksize
    if full:
        flat[: full * blocksize].view(full, blocksize).mul_(absmax[:full, None])  # x̂ = t_c · a_b
    if n > full * blocksize:
        flat[full * blocksize: n].mul_(absmax[full])
    return flat[:n]


@dataclass(eq=False)
class TorchQuant4Tensor:
    """The torch twin of :class:`lowrank_ref.quant.Quant4Tensor` (NF4, FP4 or int4 codes plus
    block scales): the same stored arrays as tensors. ``TorchNF4Tensor`` is its earlier name."""

    packed: torch.Tensor
    shape: tuple
    blocksize: int
    quant_type: str = "nf4"
    stored_absmax: torch.Tensor | None = None
    qabsmax: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = ref.DQ_BLOCKSIZE

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.stored_absmax
        code = torch.from_numpy(dynamic_map(signed=True)).to(self.qabsmax.device)
        return dequantize_blockwise(self.qabsmax, self.absmax2, code, self.blocksize2) + self.offset

    def arrays(self) -> dict:
        if self.double_quant:
            return {"packed": self.packed, "qabsmax": self.qabsmax, "absmax2": self.absmax2,
                    "offset": self.offset.reshape(1)}
        return {"packed": self.packed, "absmax": self.stored_absmax}

    @property
    def nbytes(self) -> int:
        return int(sum(a.numel() * a.element_size() for a in self.arrays().values()))

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """``x̂`` with the original shape, computed in float32 then cast to ``dtype``."""
        table = table_tensor(self.quant_type, self.packed.device)
        out = _bnb_dequantize(self, table) if self.packed.is_cuda else None
        if out is None:
            out = dequantize_codes(self.packed, self.absmax, table, self.numel, self.blocksize)
        return out.view(self.shape).to(dtype)

    def to_numpy(self) -> ref.Quant4Tensor:
        a = {k: v.detach().cpu().numpy() for k, v in self.arrays().items()}
        return ref.Quant4Tensor.from_arrays(a, self.shape, self.blocksize, self.quant_type)

    @classmethod
    def from_numpy(cls, q: ref.Quant4Tensor, device=None) -> TorchQuant4Tensor:
        def t(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)
        off = None if q.offset is None else torch.tensor(np.float32(q.offset), device=device)
        return cls(t(q.packed), tuple(q.shape), q.blocksize, q.quant_type, t(q.stored_absmax),
                   t(q.qabsmax), t(q.absmax2), off)


def _bnb_dequantize(q: TorchQuant4Tensor, table: torch.Tensor):
    """bitsandbytes' CUDA kernel on our (identical) layout, or None if it is not installed.

    Not installed (an ImportError) falls back silently: bitsandbytes is optional. Any other
    failure (a native library that does not load, a kernel error, an API change) also falls back
    to the pure dequantisation, but with a ``RuntimeWarning`` naming the exception, so a broken
    install is not hidden behind a slower path. ``int4`` is not a bitsandbytes type: pure path.
    """
    if q.quant_type not in ("nf4", "fp4"):
        return None
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # not installed: the pure path, nothing to report
        return None
    except Exception as e:  # installed but unusable (e.g. no native library for this GPU)
        _warn_fallback(e)
        return None
    try:
        state = bnbf.QuantState(absmax=q.absmax.float().contiguous(), shape=torch.Size([q.numel]),
                                code=table, blocksize=q.blocksize, quant_type=q.quant_type,
                                dtype=torch.float32)
        return bnbf.dequantize_4bit(q.packed.view(-1, 1), state).reshape(-1)
    except Exception as e:
        _warn_fallback(e)
        return None


def _warn_fallback(e: Exception) -> None:
    import warnings

    warnings.warn(f"bitsandbytes' dequantize_4bit failed ({type(e).__name__}: {e}); using the pure "
                  "PyTorch dequantisation instead (same floats, slower)", RuntimeWarning, stacklevel=3)


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                  quant_type: str = "nf4") -> TorchQuant4Tensor:
    """Block-wise 4-bit quantisation, the same bytes as the NumPy reference."""
    blocksize = ref.check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else ()
    flat = _check_input(x)
    table = table_tensor(quant_type, flat.device)
    order = torch.argsort(table.cpu(), stable=True).to(flat.device)
    bounds = torch.from_numpy(midpoints(table.cpu().numpy()[order.cpu().numpy()])).to(flat.device)
    n = flat.numel()
    nb = -(-n // blocksize)
    full = n // blocksize
    absmax = torch.empty(nb, dtype=torch.float32, device=flat.device)
    u = torch.zeros(n + n % 2, dtype=torch.float32, device=flat.device)
    if full:
        blocks = flat[: full * blocksize].view(full, blocksize)
        absmax[:full] = blocks.abs().amax(dim=1)
        recip = 1.0 / absmax[:full].clamp_min(_TINY)  # 1/a_b in float32
        u[: full * blocksize] = (blocks * recip[:, None]).reshape(-1)
    if n > full * blocksize:
        tail = flat[full * blocksize:]
        absmax[full] = tail.abs().amax()
        u[full * blocksize: n] = tail * (1.0 / absmax[full].clamp_min(_TINY))
    u.clamp_(-1.0, 1.0)
    idx = torch.bucketize(u, bounds, right=False)  # #{m_c < u}
    codes = (order[idx] if quant_type != "nf4" else idx).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if double_quant:
        offset = torch.tensor(np.float32(absmax.double().mean().item()), device=flat.device)
        code = torch.from_numpy(dynamic_map(signed=True)).to(flat.device)
        q, a2 = quantize_blockwise(absmax - offset, code, ref.DQ_BLOCKSIZE)
        return TorchQuant4Tensor(packed, shape, blocksize, quant_type, None, q, a2, offset)
    return TorchQuant4Tensor(packed, shape, blocksize, quant_type, absmax)


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> TorchQuant4Tensor:
    return quantize_4bit(x, blocksize, double_quant, "nf4")


def quantize_fp4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> TorchQuant4Tensor:
    """FP4 block-wise quantisation (bitsandbytes' ``fp4``), the same bytes as the NumPy reference."""
    return quantize_4bit(x, blocksize, double_quant, "fp4")


Quant4Tensor = TorchQuant4Tensor  # the reference's name (lowrank_ref.quant.Quant4Tensor), for the mirror
TorchNF4Tensor = NF4Tensor = TorchQuant4Tensor  # the earlier names (the tensor holds FP4 and int4 too)
