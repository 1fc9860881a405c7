r"""The CPU dequantisation kernel in C (``nf4_cpu.c``), compiled on first use and loaded with ctypes.

Why a C kernel: on the CPU, the best pure-PyTorch form (:func:`lowrank_gpu.quant.nf4._dequantize_codes_cpu`,
one 1-D ``index_select`` per byte from a table of value pairs, then the scales in place) spends
2.9 ms in the gather alone on a 4096 × 4096 weight, one thread, where bitsandbytes' hand-written
kernel takes 2.4 ms for everything (measured on this project's 2-core machine, 2026-12-01). No
PyTorch operator does "look each 4-bit code up in 16 values and scale by its block" in one pass,
and ``torch.compile`` made a scalar loop (54 ms). The C kernel does it in one pass: per block the 16
scaled levels ``s_c = t_c · a_b`` (the same float32 products as the NumPy reference, so the same
bits), then every value a lookup ``s[c_j]``, 16 at a time with a register permute (AVX-512, AVX2,
or a plain loop elsewhere).

The kernel is optional, as bitsandbytes is: :func:`library` compiles the source with the
machine's C compiler (``$CC``, else ``cc``) into a per-user cache and returns ``None`` — and the
pure PyTorch path runs — when there is no compiler, the build fails (a ``RuntimeWarning`` says
why) or ``LOWRANK_REF_NATIVE=0`` is set. ``LOWRANK_REF_NATIVE_VARIANT=0|1|2`` caps the variant
(0 plain, 1 AVX2, 2 AVX-512), for tests. The cache (``$LOWRANK_REF_CACHE`` or
``~/.cache/lowrank-ref``, created private) is keyed by a hash of the source, the compiler's
version and flags and the machine, so an edited source or another compiler builds anew; the
library is written to a temporary name and renamed, so a half-written one is never loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["library", "variant", "dequantize_4bit_into", "status"]

SOURCE = Path(__file__).with_name("nf4_cpu.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-std=gnu11", "-fno-fast-math", "-ffp-contract=off")
_VARIANTS = {0: "plain C loop", 1: "AVX2", 2: "AVX-512"}
_STATE: dict = {}  # "lib": the loaded library or None, "why": the reason when None


def _cache_dir() -> Path:
    root = os.environ.get("LOWRANK_REF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowrank-ref")
    path = Path(root) / "native"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build(cc: str) -> Path:
    """The compiled library for this source, compiler and machine (built once, then cached)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    target = _cache_dir() / f"nf4_cpu-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: another process sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library():
    """The loaded kernel (``ctypes.CDLL``), or ``None`` (then :func:`status` says why)."""
    if "lib" in _STATE:
        return _STATE["lib"]
    lib, why = None, None
    if os.environ.get("LOWRANK_REF_NATIVE", "1") == "0":
        why = "LOWRANK_REF_NATIVE=0"
    elif (cc := _compiler()) is None:
        why = "no C compiler (set CC, or install cc)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            lib.lr_dequantize_4bit.restype = None
            lib.lr_dequantize_4bit.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int]
            lib.lr_dequant4_variant.restype = ctypes.c_int
            lib.lr_dequant4_variant.argtypes = [ctypes.c_int]
        except Exception as e:  # a compiler that fails, an unwritable cache, a library that does not load
            lib, why = None, f"building {SOURCE.name} failed ({type(e).__name__}: {e})"
            warnings.warn(f"lowrank_gpu: the C dequantisation kernel is not used: {why}; the pure "
                          "PyTorch path runs instead (same floats, slower)", RuntimeWarning, stacklevel=2)
    _STATE.update(lib=lib, why=why)
    return lib


def variant() -> int | None:
    """The kernel variant that runs here (0 plain, 1 AVX2, 2 AVX-512, capped by
    ``LOWRANK_REF_NATIVE_VARIANT``), or ``None`` without the library."""
    lib = library()
    if lib is None:
        return None
    cap = os.environ.get("LOWRANK_REF_NATIVE_VARIANT")
    return int(lib.lr_dequant4_variant(-1 if cap is None else int(cap)))


def status() -> str:
    """One line for benchmark notes: which kernel runs, or why none does."""
    v = variant()
    return f"C kernel ({_VARIANTS[v]})" if v is not None else f"pure PyTorch ({_STATE.get('why')})"


def dequantize_4bit_into(packed, absmax, table, out, n: int, blocksize: int) -> bool:
    """``out[:n] = table[c_j] · absmax[j // blocksize]`` with the C kernel; ``False`` (nothing
    written) when the kernel is not available. All four are contiguous CPU tensors: ``packed``
    uint8 with ``ceil(n/2)`` bytes, ``absmax`` float32 with ``ceil(n/blocksize)`` entries, ``table``
    float32 (16,), ``out`` float32 with at least ``n`` entries; the caller checks (the kernel reads
    and writes exactly these ranges)."""
    v = variant()
    if v is None:
        return False
    m, nb = -(-n // 2), -(-n // blocksize)
    import torch

    for name, t, size, dtype in (("packed", packed, m, torch.uint8), ("absmax", absmax, nb, torch.float32),
                                 ("table", table, 16, torch.float32), ("out", out, n, torch.float32)):
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if not t.is_contiguous() or t.device.type != "cpu" or t.numel() < size:
            raise ValueError(f"{name} must be a contiguous CPU tensor with at least {size} entries, "
                             f"got {tuple(t.shape)} on {t.device}")
    library().lr_dequantize_4bit(packed.data_ptr(), absmax.data_ptr(), table.data_ptr(), out.data_ptr(),
                                 int(n), int(blocksize), v)
    return True
