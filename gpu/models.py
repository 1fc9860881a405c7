"""The shipped pre-trained GPT as a torch model: the mirror of ``lowrank_ref.models``.

The weights are the same file; this only picks the torch device. ``load_pretrained("cuda")``
says clearly what is missing when there is no CUDA GPU.
"""

from __future__ import annotations

from lowrank_ref.models import load_pretrained as _load_pretrained

__all__ = ["load_pretrained"]


def load_pretrained(device: str = "cpu", dtype=None, asset_dir=None, progress: bool = True):
    """A fresh ``lowrank_gpu.nn.gpt.GPT`` with the shipped weights on ``device`` ("cpu" or "cuda")."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    backend = "torch" if device == "cpu" else "cuda"
    return _load_pretrained(backend=backend, dtype=dtype, asset_dir=asset_dir, progress=progress)
