"""Shared test helpers (importable from any test as ``import helpers``).

- ``requires_cuda`` / ``requires_cupy``: skip *visibly* (pytest -ra prints the reason).
- ``assert_close``: a "mine vs theirs" comparison that names the tensor and the worst entry.
- ``TOL``: the tolerances used for backend agreement, stated once.
"""

from __future__ import annotations

import numpy as np
import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


CUDA = _cuda_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
requires_cupy = pytest.mark.skipif(not _cupy_available(), reason="needs CuPy and an NVIDIA GPU (not available here)")

# Backend agreement tolerances (rtol, atol) by dtype. float64: both sides do the same algebra in
# a different order, so agreement is to rounding. float32: ~1e-7 relative per op, a few ops deep.
# bfloat16: 8 mantissa bits (~4e-3 relative per rounding).
TOL = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-4, 1e-5),
    "bfloat16": (3e-2, 3e-2),
}


def to_np(a) -> np.ndarray:
    """numpy array from a numpy array or a torch tensor (bf16 upcast to float32)."""
    if hasattr(a, "detach"):
        t = a.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(a)


def assert_close(mine, theirs, name: str = "value", rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Assert ``mine`` ≈ ``theirs`` elementwise; on failure say which entry and by how much."""
    mine, theirs = to_np(mine), to_np(theirs)
    assert mine.shape == theirs.shape, f"{name}: shape mine {mine.shape} vs theirs {theirs.shape}"
    err = np.abs(mine.astype(np.float64) - theirs.astype(np.float64))
    allowed = atol + rtol * np.abs(theirs.astype(np.float64))
    if mine.size and not np.all(err <= allowed):
        i = np.unravel_index(int(np.argmax(err - allowed)), err.shape)
        raise AssertionError(
            f"{name}: mine {mine[i]!r} vs theirs {theirs[i]!r} at {tuple(int(k) for k in i)} "
            f"(|diff| {err[i]:.3e} > allowed {allowed[i]:.3e}; rtol={rtol}, atol={atol})"
        )


def fixed_mask(mask):
    """A torch module standing in for a layer's dropout: multiplies by ``mask`` (already divided
    by 1 − p), so PEFT's layer, our torch layer and the NumPy layer can share one draw."""
    import torch

    class FixedMask(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.mask = m

        def forward(self, x):
            return x * self.mask

    return FixedMask(mask)


def claims_row(n: int) -> list[str]:
    """The cells of row ``n`` of the claims table (chapters/90-claims.md), stripped."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "chapters" / "90-claims.md").read_text(encoding="utf-8")
    (line,) = [ln for ln in text.splitlines() if re.match(rf"\| {n} \|", ln)]
    return [c.strip() for c in line.strip("|").split("|")]
