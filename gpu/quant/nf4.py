r"""NF4/FP4 block-wise quantisation in PyTorch, bit-identical to :mod:`lowrank_ref.quant.blockwise`.

Same steps, same float32 roundings (the tables come from the NumPy reference): the block absmax,
``u = x · (1/a)`` clipped to ``[-1, 1]``, the code by the float32 midpoints (``bucketize`` with
``right=False`` sends a value on a midpoint to the lower level), two codes per byte with the first
in the high nibble; dequantisation ``t[c] · a`` is one float32 multiply. Works on any device; on
CUDA the layout is the one bitsandbytes' kernels read, and :func:`dequantize` uses them when
bitsandbytes is installed (never required).

On the CPU both directions work in chunks of whole blocks that stay in cache (as the NumPy
reference does), and their large outputs are allocated by NumPy and shared with torch
(``torch.from_numpy``): NumPy asks the kernel for transparent huge pages, which makes writing a
fresh 64 MB output about 5x cheaper here than in memory from torch's CPU allocator (measured in
``bench/bench_quant.py``). Dequantising decodes a byte (two codes) per gather from a 256-entry
table of value pairs; quantising counts ``#{m_c < u}`` with 15 comparisons instead of ``bucketize``'s
binary search, the same rule and so the same codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lowrank_gpu.quant import native
from lowrank_ref.quant import blockwise as ref
from lowrank_ref.quant.tables import dynamic_map, fp4_codebook, int4_table, midpoints, nf4_table

__all__ = ["TorchQuant4Tensor", "TorchNF4Tensor", "Quant4Tensor", "NF4Tensor", "quantize_nf4", "quantize_fp4",
           "quantize_4bit", "nf4_table",
           "dequantize_codes", "table_tensor", "quantize_blockwise", "dequantize_blockwise"]

_TABLES = {"nf4": nf4_table, "fp4": fp4_codebook, "int4": int4_table}
_TINY = 1e-38
_CPU_CHUNK_VALUES = 1 << 20  # CPU: values per chunk (4 MB of float32; fewer, larger chunks measured faster)
_PAIR_LUT_CACHE: dict[bytes, torch.Tensor] = {}
_TABLE_CACHE: dict[str, torch.Tensor] = {}


def _empty_cpu(n: int, dtype) -> torch.Tensor:
    """A new 1-D CPU tensor whose memory NumPy allocated (huge pages: see the module docstring)."""
    return torch.from_numpy(np.empty(n, dtype=dtype))


def _empty_cpu_aligned(n: int) -> torch.Tensor:
    """:func:`_empty_cpu` for ``n`` float32 values starting on a 64-byte boundary (the C kernel
    streams a large output only to aligned addresses; what glibc returns is 16-byte aligned)."""
    buf = np.empty(4 * n + 64, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64
    return torch.from_numpy(buf[off: off + 4 * n].view(np.float32))


def table_tensor(quant_type: str = "nf4", device=None) -> torch.Tensor:
    if quant_type not in _TABLES:
        raise ValueError(f"quant_type must be one of {sorted(_TABLES)}, got {quant_type!r}")
    cached = _TABLE_CACHE.get(quant_type)
    if cached is None:  # NF4's levels come from normal quantiles (SciPy, ~0.3 ms): computed once
        cached = _TABLE_CACHE[quant_type] = torch.from_numpy(_TABLES[quant_type]())
    return cached.clone() if device is None or torch.device(device).type == "cpu" else cached.to(device)


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
    if x.dtype != torch.float32 and not torch.isfinite(flat).all():  # a finite float64 beyond float32's range becomes inf
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


def _pair_lut64(table: torch.Tensor) -> torch.Tensor:
    """:func:`_pair_lut` with each pair of float32 seen as one 8-byte element: ``(256,)``
    float64 *storage* (never used as numbers), so one 1-D ``index_select`` copies both values of a
    byte in memory order (cached: 2 KB, which stays in L1 whatever else runs)."""
    key = table.cpu().numpy().tobytes()
    lut = _PAIR_LUT_CACHE.get(key)
    if lut is None:
        lut = _PAIR_LUT_CACHE[key] = _pair_lut(table.cpu()).contiguous().view(torch.float64).reshape(256)
    return lut


def _dequantize_codes_cpu(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, n: int,
                          blocksize: int) -> torch.Tensor:
    r"""The CPU path of :func:`dequantize_codes`: chunk by chunk, one gather per byte (two codes).

    Per chunk of whole blocks: the bytes as int32 indices (``index_select`` takes no uint8), the
    8-byte pairs ``(t[hi], t[lo])`` gathered straight into the output, then ``x̂ = t_c · a_b`` in
    place, the chunk still in cache. Against the 65,536-entry table of four values used before (two
    bytes per gather, 1 MB), measured interleaved on the shared 2-core machine while it was busy
    (load 11-13): 8.7 ms against 82 ms (best of 21), the large table being evicted from the cache."""
    m = packed.numel()
    out = _empty_cpu(2 * m, np.float32)
    flat = packed.reshape(-1)
    pairs = out.view(torch.float64)  # (m,): the two float32 values of byte k at pairs[k]
    lut = _pair_lut64(table)
    unit = math.lcm(2, blocksize)
    step = max(1, _CPU_CHUNK_VALUES // unit) * unit  # values per chunk: whole blocks, whole bytes
    idx = torch.empty(step // 2, dtype=torch.int32)
    for v0 in range(0, 2 * m, step):
        v1 = min(v0 + step, 2 * m)
        k0, k1 = v0 // 2, v1 // 2
        ii = idx[: k1 - k0]
        ii.copy_(flat[k0:k1])  # uint8 -> int32 (the index type index_select takes)
        torch.index_select(lut, 0, ii, out=pairs[k0:k1])  # (t[c_2k], t[c_2k+1]) for each byte k
        v1 = min(v1, n)
        b0, nfull = v0 // blocksize, (v1 - v0) // blocksize
        if nfull:
            out[v0: v0 + nfull * blocksize].view(nfull, blocksize).mul_(absmax[b0: b0 + nfull, None])  # x̂ = t_c · a_b
        if v0 + nfull * blocksize < v1:  # the partial last block
            out[v0 + nfull * blocksize: v1].mul_(absmax[b0 + nfull])
    return out[:n]


def dequantize_codes(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, n: int,
                     blocksize: int) -> torch.Tensor:
    r"""``x̂_j = t[c_j] · a_b`` (float32, flat ``(n,)``) from packed codes.

    One ``index_select`` from a 256-entry table of value pairs decodes two codes per byte; then
    the block scales multiply in place (the same float32 products as the NumPy reference). On the
    CPU: the C kernel of :mod:`lowrank_gpu.quant.native` where it could be built (one pass, the
    same products), else :func:`_dequantize_codes_cpu` (the same products, in cache-sized chunks)."""
    if packed.device.type == "cpu":
        absmax, table = absmax.to(torch.float32).contiguous(), table.to(torch.float32).contiguous()
        if table.numel() == 16 and packed.dtype == torch.uint8:
            out = _empty_cpu_aligned(2 * packed.numel())
            if native.dequantize_4bit_into(packed.reshape(-1).contiguous(), absmax, table, out, n, blocksize):
                return out[:n]  # the C kernel (lowrank_gpu.quant.native): the same products, one pass
        return _dequantize_codes_cpu(packed, absmax, table, n, blocksize)
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
    if flat.device.type == "cpu":
        packed, absmax = _quantize_cpu(flat, bounds, order, blocksize, quant_type)
    else:
        packed, absmax = _quantize_any(flat, bounds, order, blocksize, quant_type)
    if double_quant:
        offset = torch.tensor(np.float32(absmax.double().mean().item()), device=flat.device)
        code = torch.from_numpy(dynamic_map(signed=True)).to(flat.device)
        q, a2 = quantize_blockwise(absmax - offset, code, ref.DQ_BLOCKSIZE)
        return TorchQuant4Tensor(packed, shape, blocksize, quant_type, None, q, a2, offset)
    return TorchQuant4Tensor(packed, shape, blocksize, quant_type, absmax)


def _quantize_cpu(flat: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor, blocksize: int,
                  quant_type: str):
    r"""``(packed, absmax)`` on the CPU: the NumPy reference's steps, chunk by chunk in cache.

    ``c = #{m_c < u}`` as a sum of 15 comparisons (uint8), which is what ``bucketize(right=False)``
    returns, without its per-value binary search."""
    n = flat.numel()
    nb = -(-n // blocksize)
    absmax = _empty_cpu(nb, np.float32)
    codes = _empty_cpu(n + n % 2, np.uint8)
    if n % 2:
        codes[-1] = int((bounds < 0).sum())  # the padding value 0.0 (its sorted position)
    step = max(1, _CPU_CHUNK_VALUES // blocksize) * blocksize  # whole blocks
    u = torch.empty(min(step, n), dtype=torch.float32)
    hit = torch.empty(min(step, n), dtype=torch.bool)
    mids = [float(m) for m in bounds]  # float32 values, exact as Python floats
    for s0 in range(0, n, step):
        s1 = min(s0 + step, n)
        xs, us, cs, hs = flat[s0:s1], u[: s1 - s0], codes[s0:s1], hit[: s1 - s0]
        b0, nfull = s0 // blocksize, (s1 - s0) // blocksize
        if nfull:
            blocks = xs[: nfull * blocksize].view(nfull, blocksize)
            am = absmax[b0: b0 + nfull]
            torch.amax(blocks.abs(), dim=1, out=am)  # a_b = max |x_j|
            recip = 1.0 / am.clamp_min(_TINY)  # 1/a_b in float32
            torch.mul(blocks, recip[:, None], out=us[: nfull * blocksize].view(nfull, blocksize))  # u = x·(1/a)
        if s1 - s0 > nfull * blocksize:  # the partial last block
            tail = xs[nfull * blocksize:]
            absmax[b0 + nfull] = tail.abs().amax()
            torch.mul(tail, 1.0 / absmax[b0 + nfull].clamp_min(_TINY), out=us[nfull * blocksize:])
        us.clamp_(-1.0, 1.0)
        torch.gt(us, mids[0], out=cs.view(torch.bool))  # c = #{m_c < u}: a midpoint goes to the lower level
        for m in mids[1:]:
            torch.gt(us, m, out=hs)
            cs.add_(hs)
    if quant_type != "nf4":
        codes = order.to(torch.uint8)[codes.long()]  # sorted position -> code
    packed = (codes[0::2] << 4) | codes[1::2]  # first element in the high nibble
    return packed, absmax


def _quantize_any(flat: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor, blocksize: int,
                  quant_type: str):
    """``(packed, absmax)`` on any device, whole-tensor operations (the GPU path)."""
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
    return packed, absmax


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> TorchQuant4Tensor:
    return quantize_4bit(x, blocksize, double_quant, "nf4")


def quantize_fp4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> TorchQuant4Tensor:
    """FP4 block-wise quantisation (bitsandbytes' ``fp4``), the same bytes as the NumPy reference."""
    return quantize_4bit(x, blocksize, double_quant, "fp4")


Quant4Tensor = TorchQuant4Tensor  # the reference's name (lowrank_ref.quant.Quant4Tensor), for the mirror
TorchNF4Tensor = NF4Tensor = TorchQuant4Tensor  # the earlier names (the tensor holds FP4 and int4 too)
