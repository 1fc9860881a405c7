r"""Block-wise absmax quantisation: 4-bit (NF4/FP4) with packing and double quantisation, and 8-bit.

The scheme (QLoRA §3, Dettmers et al. 2023, arXiv:2305.14314; the byte layout of bitsandbytes):

1. Flatten ``x`` (``n`` values, row-major) and cut it into blocks of ``B`` values (the last one
   may be partial). Each block gets one float32 scale, its largest magnitude,
   :math:`a_b = \max_{j \in b} |x_j|`.
2. Normalise: :math:`u_j = x_j \cdot (1/a_b)` (float32; a multiply by the rounded reciprocal, as
   the reference does), clipped to ``[-1, 1]``.
3. Code: the index of the nearest level :math:`t_c` of the table, found by comparing :math:`u_j`
   with the float32 midpoints :math:`m_c = (t_c + t_{c+1})/2`: :math:`c_j = \#\{c : m_c < u_j\}`.
   A value exactly on a midpoint goes to the lower level.
4. Pack two 4-bit codes per byte, the first element in the high nibble:
   ``byte_k = (c_{2k} << 4) | c_{2k+1}``; an odd count is padded with the value 0.0 (NF4 code
   7), as bitsandbytes pads.

Dequantisation is :math:`\hat x_j = t_{c_j} \cdot a_b` (one float32 multiply), so quantising
``table * a`` gives it back exactly.

Round-trip error: a value between levels :math:`t_c` and :math:`t_{c+1}` lands on the nearer, so
:math:`|x_j - \hat x_j| \le \tfrac12 \max_c (t_{c+1} - t_c)\, a_b` (plus float32 rounding).

Storage, bits per parameter: ``4 + 32/B`` (4.5 at ``B = 64``). *Double quantisation* (QLoRA §3)
stores the absmax values themselves in 8 bits: subtract their mean ``offset`` (they are all
positive, and the signed map is symmetric), quantise them block-wise with blocks of 256 using the
signed dynamic map (:func:`~lowrank_ref.quant.tables.dynamic_map`), keeping one float32
``absmax2`` per 256 absmax values. Then the scale costs :math:`8/64 + 32/(64 \cdot 256) = 0.127`
bits per parameter instead of 0.5: 4.127 in all (the paper's figure).

The 8-bit path (:func:`quantize_blockwise`, used for the absmax values and for 8-bit Adam) works
the same way with the 256 levels of the dynamic map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lowrank_ref.nn.module import array_module, where_is
from lowrank_ref.quant.tables import dynamic_map, fp4_codebook, int4_table, midpoints, nf4_table

__all__ = [
    "Quant4Tensor", "NF4Tensor", "quantize_4bit", "quantize_nf4", "quantize_fp4", "pack_nibbles", "unpack_nibbles",
    "quantize_blockwise", "dequantize_blockwise", "check_blocksize", "as_float_input",
    "DQ_BLOCKSIZE",
]

DQ_BLOCKSIZE = 256  # QLoRA double quantisation: blocks of 256 absmax values (§3)
_CHUNK_VALUES = 32768  # quantise in chunks of about this many values (cache-sized)
_CHUNK_BYTES = 32768  # dequantise in chunks that fit in L2 cache (measured fastest here)
_TINY = np.float32(1e-38)  # the reference clamps absmax to this before taking the reciprocal


# --- checks ---------------------------------------------------------------------------------
def as_float_input(x, name: str = "x") -> np.ndarray:
    """A finite, non-empty, real floating array (as float32, same shape), or a clear error.

    Finiteness is checked twice: on the input, and after the float32 cast, where a finite
    float64 beyond float32's range (|x| > 3.4e38) would become inf and poison its block's absmax.
    """
    x = np.asarray(x)
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.floating):
        kind = "complex" if np.iscomplexobj(x) else str(x.dtype)
        raise TypeError(f"{name} must be a real floating array (float16/32/64), got {kind}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); there is nothing to quantise")
    if not np.all(np.isfinite(x)):
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} must be finite; it holds {bad} NaN or inf value(s)")
    with np.errstate(over="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32).reshape(x.shape)  # keeps a 0-d shape ()
    if not np.all(np.isfinite(x32)):
        bad = int(x32.size - np.count_nonzero(np.isfinite(x32)))
        raise ValueError(f"{name} must be finite in float32; {bad} value(s) of {name} exceed float32's "
                         f"range (largest magnitude {float(np.max(np.abs(x))):.3g} > 3.4e38)")
    return x32


def check_blocksize(blocksize, name: str = "blocksize") -> int:
    """A positive even integer (two 4-bit codes per byte must not straddle two blocks)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"{name} must be a positive even integer, got {blocksize!r}")
    blocksize = int(blocksize)
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"{name} must be a positive even integer, got {blocksize}")
    return blocksize


# --- packing --------------------------------------------------------------------------------
def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble; odd counts padded with a 0 code."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if c.size and c.max() > 15:
        raise ValueError("codes must be in [0, 15] to be packed in 4 bits")
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, np.uint8)])
    return (c[0::2] << 4) | c[1::2]  # byte_k = c_{2k}·16 + c_{2k+1}   (ceil(n/2),)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 4-bit codes of ``packed`` (uint8)."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(2 * p.size, dtype=np.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0x0F
    return out[:n]


_PAIR_LUT_CACHE: dict[bytes, np.ndarray] = {}


def _pair_lut(table: np.ndarray) -> np.ndarray:
    """``lut[byte] = (table[byte >> 4], table[byte & 15])`` as 256 uint64 words (two float32).

    One gather from this 2 KiB table decodes two values per byte: the fast dequantisation path.
    """
    key = table.tobytes()
    lut = _PAIR_LUT_CACHE.get(key)
    if lut is None:
        b = np.arange(256)
        pairs = np.stack([table[b >> 4], table[b & 15]], axis=1).astype(np.float32)  # (256, 2)
        lut = np.ascontiguousarray(pairs).view(np.uint64).reshape(256)
        _PAIR_LUT_CACHE[key] = lut
    return lut


# --- 8-bit block-wise (dynamic map) ---------------------------------------------------------
def quantize_blockwise(x, code: np.ndarray | None = None, blocksize: int = 256):
    r"""8-bit block-wise quantisation: ``(codes uint8 (n,), absmax float32 (n_blocks,))``.

    ``u = x · (1/a_b)``; the code is the nearest of the 256 sorted levels, found with the float32
    midpoints like the 4-bit path (a value on a midpoint goes to the lower level). A block of
    zeros gets ``a_b = 0`` and the code of the level 0. ``code`` defaults to the signed dynamic map.

    bitsandbytes' CPU kernel (0.50) is not always nearest: on normal data about 0.15% of its codes
    are the farther of the two neighbours (tests/quant measures this), so 8-bit codes are
    compared with it by distance, not byte for byte.
    """
    code = dynamic_map(signed=True) if code is None else np.asarray(code, dtype=np.float32)
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    blocksize = int(blocksize)
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    xp = np.concatenate([x, np.zeros(pad, np.float32)]) if pad else x
    blocks = xp.reshape(nb, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)  # a_b   (n_blocks,)
    recip = np.float32(1.0) / np.maximum(absmax, _TINY)  # 1/a_b
    u = np.clip((blocks * recip[:, None]).reshape(-1)[:n], -1.0, 1.0)  # u = x·(1/a_b)   (n,)
    q = np.searchsorted(midpoints(code), u, side="left").astype(np.uint8)  # nearest level
    return q, absmax


def dequantize_blockwise(q, absmax, code: np.ndarray | None = None, blocksize: int = 256) -> np.ndarray:
    r"""``x̂_j = code[q_j] · a_b`` (float32, flat). On CuPy codes, on the device."""
    xp = array_module(q)
    code = dynamic_map(signed=True) if code is None else np.asarray(code, dtype=np.float32)
    code = where_is(q, code)
    q = xp.asarray(q, dtype=np.uint8).reshape(-1)
    n = q.size
    nb = -(-n // blocksize)
    vals = code[q]
    pad = nb * blocksize - n
    if pad:
        vals = xp.concatenate([vals, xp.zeros(pad, np.float32)])
    out = vals.reshape(nb, blocksize) * xp.asarray(absmax, dtype=np.float32)[:, None]
    return out.reshape(-1)[:n].astype(np.float32, copy=False)


# --- the 4-bit quantised tensor -------------------------------------------------------------
_TABLES = {"nf4": nf4_table, "fp4": fp4_codebook, "int4": int4_table}


def _codebook(quant_type: str) -> np.ndarray:
    if quant_type not in _TABLES:
        raise ValueError(f"quant_type must be one of {sorted(_TABLES)}, got {quant_type!r}")
    return _TABLES[quant_type]()


@dataclass(eq=False)
class Quant4Tensor:
    r"""A tensor stored in 4 bits per value plus block scales: NF4, FP4 or int4 levels
    (:attr:`quant_type`). ``NF4Tensor`` is the same class under its earlier name.

    Stored arrays (nothing else is kept):
        packed: uint8 ``(ceil(n/2),)``, two codes per byte, first element in the high nibble.
        absmax: float32 ``(n_blocks,)`` when not double-quantised, else ``None`` in storage (the
            :attr:`absmax` property then rebuilds it from the three arrays below).
        qabsmax: uint8 ``(n_blocks,)``, the absmax values minus ``offset``, in the dynamic map.
        absmax2: float32 ``(ceil(n_blocks/256),)``, the second-level scales.
        offset: float32 scalar, the mean of the absmax values.
    """

    packed: np.ndarray
    shape: tuple
    blocksize: int
    quant_type: str = "nf4"
    stored_absmax: np.ndarray | None = None
    qabsmax: np.ndarray | None = None
    absmax2: np.ndarray | None = None
    offset: np.float32 | None = None
    blocksize2: int = DQ_BLOCKSIZE

    # -- sizes ----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.qabsmax is not None

    @property
    def absmax(self) -> np.ndarray:
        """float32 per block: stored, or rebuilt as ``dyn[qabsmax] · absmax2 + offset``."""
        if not self.double_quant:
            return self.stored_absmax
        a = dequantize_blockwise(self.qabsmax, self.absmax2, dynamic_map(signed=True), self.blocksize2)
        return (a + self.offset).astype(np.float32)  # â_b = dyn[q_b]·a2 + offset

    @property
    def table(self) -> np.ndarray:
        """The 16 levels indexed by code (NF4 sorted; FP4 in bitsandbytes' code order)."""
        return _codebook(self.quant_type)

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays by name (what a file holds; what :attr:`nbytes` counts)."""
        if self.double_quant:
            return {"packed": self.packed, "qabsmax": self.qabsmax, "absmax2": self.absmax2,
                    "offset": np.asarray(self.offset, dtype=np.float32).reshape(1)}
        return {"packed": self.packed, "absmax": self.stored_absmax}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (the shared 16-level table is a constant, not counted)."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    @property
    def bits_per_param(self) -> float:
        """``8 · nbytes / n``: 4.5 for NF4 at block size 64, about 4.127 double-quantised."""
        return 8.0 * self.nbytes / self.numel

    # -- decoding -------------------------------------------------------------------------
    def codes(self) -> np.ndarray:
        """The 4-bit code of every value, uint8 ``(n,)``."""
        return unpack_nibbles(self.packed, self.numel)

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:
        r"""``x̂ = table[c] · a_b`` as float32 with the original shape.

        Fast path: one gather from a 256-entry table of value *pairs* (two codes per byte), then
        one in-place multiply by the block scales, chunk by chunk so the work stays in cache. ``out``
        (C-contiguous float32 with ``2·ceil(n/2)`` entries) may be given to avoid an allocation.
        """
        n, bs = self.numel, self.blocksize
        xp = array_module(self.packed)
        if xp is not np:  # on CuPy: the plain formula, on the device (the fast path below is NumPy's)
            if out is not None:
                raise ValueError("out is for NumPy arrays only")
            p = self.packed.reshape(-1)
            codes = xp.stack([p >> 4, p & 0x0F], axis=1).reshape(-1)[:n]  # c_{2k} = byte >> 4, c_{2k+1} = byte & 15
            vals = where_is(p, self.table)[codes]
            nb = self.n_blocks
            pad = nb * bs - n
            if pad:
                vals = xp.concatenate([vals, xp.zeros(pad, np.float32)])
            x = vals.reshape(nb, bs) * xp.asarray(self.absmax, dtype=np.float32)[:, None]  # x̂ = t_c · a_b
            return x.reshape(-1)[:n].reshape(self.shape)
        lut = _pair_lut(self.table)
        m = self.packed.size
        if out is None:
            flat = np.empty(2 * m, dtype=np.float32)
        else:
            if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.size == 2 * m
                    and out.flags.c_contiguous):
                raise ValueError(f"out must be a C-contiguous float32 array with {2 * m} entries")
            flat = out.reshape(-1)
        a = self.absmax
        flat64 = flat.view(np.uint64)
        # Work in chunks of whole blocks that stay in cache: decode the bytes (one gather of
        # value pairs), then scale each block by its absmax.
        step = max(1, _CHUNK_BYTES // (bs // 2)) * (bs // 2)  # bytes per chunk, whole blocks
        idx = np.empty(min(step, m), dtype=np.intp)
        for s in range(0, m, step):
            e = min(s + step, m)
            ii = idx[: e - s]
            ii[...] = self.packed[s:e]  # uint8 -> index (take wants intp)
            np.take(lut, ii, out=flat64[s:e])  # two table values per byte   (2(e-s),)
            v0, v1 = 2 * s, min(2 * e, n)
            b0, nfull = v0 // bs, (v1 - v0) // bs
            if nfull:
                body = flat[v0: v0 + nfull * bs].reshape(nfull, bs)
                np.multiply(body, a[b0: b0 + nfull, None], out=body)  # x̂ = t_c · a_b
            if v0 + nfull * bs < v1:  # the partial last block
                tail = flat[v0 + nfull * bs: v1]
                np.multiply(tail, a[b0 + nfull], out=tail)
        return flat[:n].reshape(self.shape)

    # -- rebuilding from stored arrays ----------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: dict, shape, blocksize: int, quant_type: str = "nf4") -> Quant4Tensor:
        """Rebuild from :meth:`arrays` output (e.g. read from a file), checking every size first."""
        shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in shape):  # () is a scalar: one value
            raise ValueError(f"shape must have positive sizes, got {shape}")
        blocksize = check_blocksize(blocksize)
        _codebook(quant_type)
        n = math.prod(shape)
        nb = -(-n // blocksize)
        if "packed" not in arrays:
            raise ValueError("arrays must hold 'packed'")
        packed = np.asarray(arrays["packed"])
        expect = {"packed": (np.uint8, (n + 1) // 2)}
        dq = "qabsmax" in arrays
        if dq:
            expect.update({"qabsmax": (np.uint8, nb), "absmax2": (np.float32, -(-nb // DQ_BLOCKSIZE)),
                           "offset": (np.float32, 1)})
        else:
            expect["absmax"] = (np.float32, nb)
        unexpected = sorted(set(arrays) - set(expect))
        if unexpected:
            raise ValueError(f"unexpected arrays {unexpected}; expected {sorted(expect)}")
        for key, (dt, size) in expect.items():
            if key not in arrays:
                raise ValueError(f"arrays must hold {key!r} (expected {sorted(expect)})")
            a = np.asarray(arrays[key])
            if a.dtype != dt:
                raise TypeError(f"{key} must be {np.dtype(dt).name}, got {a.dtype}")
            if a.size != size:
                raise ValueError(f"{key} has {a.size} entries; shape {shape} with blocksize {blocksize} "
                                 f"needs {size}")
            if dt == np.float32 and not np.all(np.isfinite(a)):
                raise ValueError(f"{key} must be finite")
        packed = packed.reshape(-1).copy()
        if dq:
            return cls(packed, shape, blocksize, quant_type, None,
                       np.asarray(arrays["qabsmax"]).reshape(-1).copy(),
                       np.asarray(arrays["absmax2"]).reshape(-1).copy(),
                       np.float32(np.asarray(arrays["offset"]).reshape(-1)[0]))
        return cls(packed, shape, blocksize, quant_type, np.asarray(arrays["absmax"]).reshape(-1).copy())

    # -- files ----------------------------------------------------------------------------
    def save(self, path) -> str:
        """Write the stored arrays and ``shape``/``blocksize``/``quant_type`` to a safetensors file."""
        import json

        from safetensors.numpy import save_file

        meta = {"format": "lowrank_ref.NF4Tensor", "shape": json.dumps(list(self.shape)),
                "blocksize": str(self.blocksize), "quant_type": self.quant_type}
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays().items()}, str(path), metadata=meta)
        return str(path)

    @classmethod
    def load(cls, path) -> Quant4Tensor:
        """Read a file written by :meth:`save`; every size is checked against the shape first."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "lowrank_ref.NF4Tensor":
                raise ValueError(f"{path} is not an NF4Tensor file (metadata format {meta.get('format')!r})")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        try:
            shape = tuple(json.loads(meta["shape"]))
            blocksize = int(meta["blocksize"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: bad or missing shape/blocksize metadata ({e})") from None
        return cls.from_arrays(arrays, shape, blocksize, meta.get("quant_type", "nf4"))

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"Quant4Tensor(shape={self.shape}, {self.quant_type}, blocksize={self.blocksize}{dq}, "
                f"{self.bits_per_param:.3f} bits/param)")


NF4Tensor = Quant4Tensor  # the earlier name (it holds FP4 and int4 too); notebooks and files use it


def _quantize_absmax_double(absmax: np.ndarray):
    r"""Double quantisation of the block scales: ``(qabsmax, absmax2, offset)``.

    ``offset = mean(a)`` (computed in float64, rounded to float32); ``a - offset`` is quantised
    block-wise (256) with the signed dynamic map.
    """
    offset = np.float32(absmax.astype(np.float64).mean())  # the absmax values are all ≥ 0
    centred = (absmax - offset).astype(np.float32)  # a - mean: signed, centred on 0
    q, a2 = quantize_blockwise(centred, dynamic_map(signed=True), DQ_BLOCKSIZE)
    return q, a2, offset


def quantize_4bit(x, blocksize: int = 64, double_quant: bool = False, quant_type: str = "nf4") -> Quant4Tensor:
    r"""Block-wise absmax 4-bit quantisation of ``x`` (any shape, flattened row-major).

    Args:
        x: a finite, non-empty real floating array (computed in float32).
        blocksize: values per block, a positive even integer (64 in QLoRA).
        double_quant: also quantise the absmax values (8-bit, blocks of 256).
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int4"`` (uniform symmetric, the baseline).
    """
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    codebook = _codebook(quant_type)
    xf = as_float_input(x)
    shape = xf.shape
    flat = xf.reshape(-1)
    n = flat.size
    nb = -(-n // blocksize)

    order = np.argsort(codebook, kind="stable")  # NF4: identity; FP4: sorted position -> code
    bounds = midpoints(codebook[order])  # float32 midpoints between sorted levels  (15,)

    absmax = np.empty(nb, dtype=np.float32)
    codes = np.empty(n + (n % 2), dtype=np.uint8)
    if n % 2:
        codes[-1] = np.count_nonzero(bounds < 0)  # the padding value 0.0 (its sorted position)
    # Chunks of whole blocks, so that the ~20 passes below stay in cache.
    step = max(1, _CHUNK_VALUES // blocksize) * blocksize
    u = np.empty(min(step, n), dtype=np.float32)
    hit = np.empty(min(step, n), dtype=np.bool_)
    for s0 in range(0, n, step):
        s1 = min(s0 + step, n)
        xs, us, cs, hs = flat[s0:s1], u[: s1 - s0], codes[s0:s1], hit[: s1 - s0]
        b0, nfull = s0 // blocksize, (s1 - s0) // blocksize
        if nfull:
            blocks = xs[: nfull * blocksize].reshape(nfull, blocksize)
            am = absmax[b0: b0 + nfull]
            np.max(np.abs(blocks), axis=1, out=am)  # a_b = max |x_j|
            recip = np.float32(1.0) / np.maximum(am, _TINY)  # 1/a_b (float32)
            np.multiply(blocks, recip[:, None], out=us[: nfull * blocksize].reshape(nfull, blocksize))  # u = x·(1/a)
        if s1 - s0 > nfull * blocksize:  # the partial last block
            tail = xs[nfull * blocksize:]
            absmax[b0 + nfull] = np.abs(tail).max()
            np.multiply(tail, np.float32(1.0) / np.maximum(absmax[b0 + nfull], _TINY), out=us[nfull * blocksize:])
        np.clip(us, -1.0, 1.0, out=us)
        # c = #{m_c < u}: the nearest level; a value on a midpoint goes to the lower one.
        np.greater(us, bounds[0], out=cs.view(np.bool_))
        for m in bounds[1:]:
            np.greater(us, m, out=hs)
            cs += hs.view(np.uint8)
    if quant_type != "nf4":
        codes = order.astype(np.uint8)[codes]  # sorted position -> code
    packed = (codes[0::2] << 4) | codes[1::2]  # first element in the high nibble
    if double_quant:
        q, a2, off = _quantize_absmax_double(absmax)
        return Quant4Tensor(packed, shape, blocksize, quant_type, None, q, a2, off)
    return Quant4Tensor(packed, shape, blocksize, quant_type, absmax)


def quantize_nf4(x, blocksize: int = 64, double_quant: bool = False) -> Quant4Tensor:
    """NF4 block-wise quantisation (QLoRA's storage type). See :func:`quantize_4bit`."""
    return quantize_4bit(x, blocksize=blocksize, double_quant=double_quant, quant_type="nf4")


def quantize_fp4(x, blocksize: int = 64, double_quant: bool = False) -> Quant4Tensor:
    """FP4 block-wise quantisation (bitsandbytes' ``fp4``), for comparison with NF4."""
    return quantize_4bit(x, blocksize=blocksize, double_quant=double_quant, quant_type="fp4")
