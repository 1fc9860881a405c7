r"""The ``backend=`` switch: ``"numpy"`` (default), ``"torch"`` (CPU), ``"cuda"``, ``"cupy"``.

``lowrank_ref`` never imports torch or cupy at import time; :func:`require_torch` and
:func:`require_cupy` import them on demand and say what to install when they are missing.
"""

from __future__ import annotations

import importlib

from lowrank_ref.registry import check_backend

__all__ = ["require_torch", "require_cupy", "torch_device", "check_backend"]


def require_torch():
    try:
        return importlib.import_module("torch")
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "this backend needs PyTorch: pip install 'lowrank-ref[torch]' "
            "(or `make test`, which pins torch==2.13.0)"
        ) from e


def require_cupy():
    try:
        return importlib.import_module("cupy")
    except ImportError as e:
        raise ImportError(
            "backend='cupy' needs CuPy and an NVIDIA GPU: pip install 'lowrank-ref[cupy]'"
        ) from e


def torch_device(backend: str):
    """``"torch"`` -> cpu, ``"cuda"`` -> cuda (a clear error when CUDA is not there)."""
    backend = check_backend(backend)
    if backend not in ("torch", "cuda"):
        raise ValueError(f"torch_device needs backend 'torch' or 'cuda', got {backend!r}")
    torch = require_torch()
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "backend='cuda' needs a CUDA GPU and a CUDA build of PyTorch; "
                f"torch {torch.__version__} sees none (use backend='torch' for the CPU)"
            )
        return torch.device("cuda")
    return torch.device("cpu")
