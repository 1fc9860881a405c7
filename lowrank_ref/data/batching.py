r"""Batches for next-token prediction: windows of ``block_size + 1`` tokens, cut into input and target.

A window ``t[i : i+T+1]`` gives the input ``x = t[i : i+T]`` and the target ``y = t[i+1 : i+T+1]``:
position ``j`` of ``x`` is trained to predict ``y[j]``, the token after it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["get_batch", "eval_windows", "check_tokens"]


def check_tokens(tokens, block_size: int, name: str = "tokens") -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-D integer array of token ids, got {tokens.dtype} shape {tokens.shape}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if tokens.size < block_size + 1:
        raise ValueError(f"{name} must hold at least block_size + 1 = {block_size + 1} tokens, got {tokens.size}")
    return tokens


def get_batch(tokens, batch_size: int, block_size: int, rng: np.random.Generator):
    """``batch_size`` random windows: ``x, y`` int64 arrays of shape ``(batch_size, block_size)``."""
    tokens = check_tokens(tokens, block_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    starts = rng.integers(0, tokens.size - block_size, size=batch_size)
    offsets = np.arange(block_size + 1)
    win = tokens[starts[:, None] + offsets].astype(np.int64)  # (B, T+1)
    return win[:, :-1], win[:, 1:]


def eval_windows(tokens, block_size: int, max_windows: int | None = None):
    """Non-overlapping windows from the start of ``tokens`` (deterministic): ``x, y`` of shape
    ``(n, block_size)``, at most ``max_windows`` of them."""
    tokens = check_tokens(tokens, block_size)
    n = (tokens.size - 1) // block_size
    if max_windows is not None:
        n = min(n, int(max_windows))
    x = tokens[: n * block_size].reshape(n, block_size).astype(np.int64)
    y = tokens[1 : n * block_size + 1].reshape(n, block_size).astype(np.int64)
    return x, y
