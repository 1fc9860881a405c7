"""Shared test settings: Hypothesis profiles, the visible GPU skip, seeded generators."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# "ci": bounded examples and no deadline (2 slow cores); "dev": more examples for local runs.
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


CUDA = _cuda_available()
# Use as a decorator; pytest -ra prints the reason for every skip, so GPU tests never vanish.
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")


def _cupy_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


requires_cupy = pytest.mark.skipif(not _cupy_available(), reason="needs CuPy and an NVIDIA GPU (not installed here)")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
