"""Moving arrays and layers between the NumPy reference and PyTorch."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_torch_linear", "to_torch", "to_numpy", "generator_from"]


def to_torch(a, device=None, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else t.clone()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy().copy()


def as_torch_linear(base, device=None) -> torch.nn.Linear:
    """A ``torch.nn.Linear`` with the weights of ``base`` (a lowrank_ref Linear), same dtype.

    A ``torch.nn.Linear`` is returned as it is (moved to ``device`` if given)."""
    if isinstance(base, torch.nn.Linear):
        return base if device is None else base.to(device)
    from lowrank_ref.nn import Linear

    if not isinstance(base, Linear):
        raise TypeError(f"base must be a torch.nn.Linear or lowrank_ref.nn.Linear, got {type(base).__name__}")
    W = base.weight.data
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=base.bias is not None,
                          dtype=to_torch(W).dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_(to_torch(W))
        if base.bias is not None:
            lin.bias.copy_(to_torch(base.bias.data))
    return lin


def generator_from(rng, device="cpu") -> torch.Generator:
    """A torch.Generator from None (fresh), an int seed, a numpy Generator, or a torch.Generator."""
    if isinstance(rng, torch.Generator):
        return rng
    g = torch.Generator(device=device)
    if rng is None:
        g.seed()
    elif isinstance(rng, np.random.Generator):
        g.manual_seed(int(rng.integers(2**63 - 1)))
    else:
        g.manual_seed(int(rng))
    return g
