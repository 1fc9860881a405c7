r"""NF4 benchmarks: dequantising and quantising a 4096 x 4096 weight (float32 output).

Rows (see :mod:`bench.run` for the contract):

``nf4_dequantize_4096x4096``
    ``numpy`` (:meth:`lowrank_ref.quant.NF4Tensor.dequantize` into a preallocated output),
    ``numpy_alloc`` (the same, allocating its output like the others do), ``bitsandbytes``
    (``bitsandbytes.functional.dequantize_4bit`` on the CPU, when installed), ``torch`` (this
    project's torch mirror, CPU: its C kernel where one could be built, :mod:`lowrank_gpu.quant.native`;
    the note names the kernel that ran), and ``memcpy`` (copying a float32 array of the output's size:
    the floor, since dequantisation must at least write it). Goal: numpy <= 1.2x bitsandbytes.
    Each row records the largest difference of its output from NumPy's (0: same floats).
``nf4_dequantize_4096x4096_fresh_pages``
    ``numpy_alloc``, ``torch``, ``bitsandbytes`` again, every output in fresh pages (no goal),
    each call after ``malloc_trim(0)``, whose own time is the row ``malloc_trim``.
``nf4_quantize_4096x4096``
    ``numpy`` vs ``bitsandbytes`` vs ``torch``.

Goals (issue 13): torch <= 1.0x bitsandbytes, both directions. Every row carries the ``bytes`` it
must move (dequantise: read ``n/2`` code bytes and ``4n/64`` scale bytes, write ``4n``; quantise the
reverse; the copy reads and writes ``4n``), so the table shows GB/s against the machine's copy rate.

Every row runs on one thread (NumPy's BLAS, torch, and so bitsandbytes' CPU path through torch:
:func:`bench.run.single_thread`), as ``bench_lora`` does, and its note says so.

**Fresh pages.** Each call of ``dequantize_4bit`` (and of the allocating rows) asks for a new
64 MiB output. Whether that costs anything depends on the allocator's state, not on the kernel:
glibc hands a request that large either memory it kept from the last call (the call then takes
bitsandbytes' kernel time, 2.3 ms here) or a fresh ``mmap``, whose 16,384 4-KiB pages fault in
one by one while the kernel writes them (25 ms here: the same call, measured back to back in one
process with ``MALLOC_MMAP_THRESHOLD_`` set and unset). That was the 2.3 ms / 25 ms flip between
``make bench`` runs; the thread count and the repeats change nothing. So the dequantisation rows
run under :func:`large_blocks` ``(keep=True)`` (glibc keeps freed memory for reuse, ``mallopt``), where every row
pays for its output the same way and the ratios compare the kernels; a machine without glibc runs
them as before, and the rows say which.
"""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from bench.run import single_thread, time_interleaved
from lowrank_ref import quant

FULL = {"shape": (4096, 4096), "repeats": 11, "warmup": 2, "q_repeats": 5}
QUICK = {"shape": (64, 128), "repeats": 1, "warmup": 1, "q_repeats": 1}


def _bnb():
    try:
        import bitsandbytes.functional as F
        import torch
    except Exception as e:  # not installed, or no usable native library
        return None, f"bitsandbytes is not usable here ({type(e).__name__}: {e})"
    return (F, torch), None


# glibc's mallopt parameters (malloc.h) and their documented defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_DEFAULT = 128 * 1024


@contextlib.contextmanager
def large_blocks(keep: bool):
    """Fix what glibc does with large blocks inside the block; yields whether it could (glibc only).

    ``keep=True``: requests up to 1 GiB are served from memory freed earlier (mmap and trim
    thresholds at 1 GiB), so after the warm-up no call pays for fresh pages. ``keep=False``: every
    request of 128 KiB or more is a fresh ``mmap``, unmapped again when freed (both thresholds at
    glibc's documented default, 128 KiB, with its dynamic raising turned off), so every call pays
    for its output's pages. Afterwards both are left at 128 KiB (the dynamic threshold stays off)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield False
        return
    value = (1 << 30) if keep else _GLIBC_DEFAULT
    ok = bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))
    try:
        yield ok
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
        mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)


def run(quick: bool) -> list[dict]:
    """Every row on one thread (see :func:`bench.run.single_thread`); the note says so."""
    with single_thread():
        rows = _rows(quick)
    for r in rows:
        r["threads"] = 1
        r["note"] = "1 thread (bench.run.single_thread)" + r.pop("_memory_note", "")
    return rows


def _rows(quick: bool) -> list[dict]:
    cfg = QUICK if quick else FULL
    shape = cfg["shape"]
    W = (np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 0.02)
    q = quant.quantize_nf4(W, 64)
    ref = q.dequantize().copy()
    out = np.empty(W.size, dtype=np.float32)
    src = np.empty_like(out)
    src[:] = ref.reshape(-1)
    rows_meta = {"shape": list(shape), "blocksize": 64}

    deq = {"numpy": lambda: q.dequantize(out), "numpy_alloc": q.dequantize,
           "memcpy": lambda: np.copyto(out, src)}
    diffs = {"numpy": 0.0, "numpy_alloc": 0.0}
    skipped = {}
    mods, why = _bnb()
    tq = None
    torch_kernel = None
    try:
        import torch

        from lowrank_gpu.quant.nf4 import TorchNF4Tensor
        tq = TorchNF4Tensor.from_numpy(q)
        from lowrank_gpu.quant import native
        deq["torch"] = lambda: tq.dequantize()
        torch_kernel = native.status()
        diffs["torch"] = float(np.abs(tq.dequantize().numpy().reshape(-1) - ref.reshape(-1)).max())
    except ImportError:
        skipped["torch"] = "torch is not installed"
    if mods is not None:
        F, torch = mods
        packed, state = F.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4")
        deq["bitsandbytes"] = lambda: F.dequantize_4bit(packed, state)
        diffs["bitsandbytes"] = float(np.abs(F.dequantize_4bit(packed, state).numpy().reshape(-1)
                                             - ref.reshape(-1)).max())
    else:
        skipped["bitsandbytes"] = why

    n = W.size
    moved = float(n // 2 + 4 * (-(-n // 64)) + 4 * n)  # codes + scales in, float32 out (or the reverse)
    name = "nf4_dequantize_4096x4096" if not quick else "nf4_dequantize"
    with large_blocks(keep=True) as kept:
        t = time_interleaved(deq, repeats=cfg["repeats"], warmup=cfg["warmup"])
    note = ("; freed memory kept for reuse (mallopt): no call pays for fresh pages" if kept
            else "; allocator as it is (no glibc mallopt): fresh pages may be paid")
    if torch_kernel is not None:
        note += f"; torch dequantises with its {torch_kernel}"
    rows = _deq_rows(name, t, skipped, diffs, rows_meta, n, moved, note, goals=True)
    # the same calls when every output is fresh pages: what a call pays where glibc maps large blocks.
    # A low mmap threshold alone does not do it: glibc first serves a request from free memory its
    # heap still holds (run 1 of 2026-12-01 13:09 showed bitsandbytes at 3.0 ms that way), so each
    # call is preceded by malloc_trim(0), which returns that memory to the kernel; its own cost is
    # the row "malloc_trim" (every allocating row pays it once per call).
    alloc = {k: v for k, v in deq.items() if k in ("numpy_alloc", "torch", "bitsandbytes")}
    trim = _malloc_trim()
    if kept and alloc and trim is not None:
        fresh = {k: _after(trim, v) for k, v in alloc.items()} | {"malloc_trim": trim}
        with large_blocks(keep=False):
            t_fresh = time_interleaved(fresh, repeats=cfg["repeats"], warmup=cfg["warmup"])
        rows += _deq_rows(name + "_fresh_pages", t_fresh, {}, diffs, rows_meta, n, moved,
                          "; every output fresh pages (mallopt, malloc_trim(0) before each call), as a call "
                          "pays where glibc maps it anew",
                          goals=False)
    base = "bitsandbytes" if "bitsandbytes" in t else "memcpy"
    if base == "bitsandbytes":  # also against the floor
        rows.append({"name": name + "_vs_memcpy", "impl": "numpy", **t["numpy"], **rows_meta, "ratio_to": "memcpy",
                     "bytes": moved, "_memory_note": note})
        rows.append({"name": name + "_vs_memcpy", "impl": "memcpy", **t["memcpy"], **rows_meta, "ratio_to": None,
                     "bytes": float(8 * n), "_memory_note": note})

    qf = {"numpy": lambda: quant.quantize_nf4(W, 64)}
    if tq is not None:
        from lowrank_gpu.quant.nf4 import quantize_nf4 as tquant

        Wt = torch.from_numpy(W)
        qf["torch"] = lambda: tquant(Wt, 64)
    if mods is not None:
        Wt = torch.from_numpy(W)
        qf["bitsandbytes"] = lambda: F.quantize_4bit(Wt, blocksize=64, quant_type="nf4")
    tq_times = time_interleaved(qf, repeats=cfg["q_repeats"], warmup=1)
    qname = "nf4_quantize_4096x4096" if not quick else "nf4_quantize"
    qbase = "bitsandbytes" if "bitsandbytes" in tq_times else "numpy"
    for impl, tt in tq_times.items():
        row = {"name": qname, "impl": impl, **tt, **rows_meta, "ratio_to": None if impl == qbase else qbase,
               "bytes": moved}
        if impl == "torch" and qbase == "bitsandbytes":
            row["goal"] = 1.0
        rows.append(row)
    return rows


def _malloc_trim():
    """``malloc_trim(0)`` as a zero-argument callable (glibc), or None."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: fn(0)


def _after(first, fn):
    def both():
        first()
        return fn()

    return both


def _deq_rows(name, t, skipped, diffs, meta, n, moved, note, goals: bool) -> list[dict]:
    """The dequantisation rows of one timing (``t``: :func:`bench.run.time_interleaved`'s result)."""
    rows = []
    base = "bitsandbytes" if "bitsandbytes" in t else ("memcpy" if "memcpy" in t else None)
    for impl in ("numpy", "numpy_alloc", "torch", "bitsandbytes", "memcpy", "malloc_trim"):
        if impl in skipped:
            rows.append({"name": name, "impl": impl, "seconds": None, "ratio_to": None, "skipped": skipped[impl]})
            continue
        if impl not in t:
            continue
        row = {"name": name, "impl": impl, **t[impl], **meta,
               "ratio_to": None if impl in ("bitsandbytes", "memcpy", "malloc_trim") or base is None else base,
               "_memory_note": note}
        if impl != "malloc_trim":
            row["bytes"] = float(8 * n) if impl == "memcpy" else moved
        if impl in diffs:
            row["max_abs_diff"] = diffs[impl]
        if goals and impl in ("numpy", "torch") and base == "bitsandbytes":
            row["goal"] = 1.2 if impl == "numpy" else 1.0
        rows.append(row)
    return rows
