r"""Prompt tuning in PyTorch: the twin of :mod:`lowrank_ref.adapters.prompt_tuning`, backward by autograd.

``H = [P; X_e]`` with ``P (k, C)`` in front of every row's token embeddings; the prompt takes
positions ``0..k-1`` and its own logits are dropped (in :class:`lowrank_gpu.nn.gpt.GPT`). The
initial ``P`` comes from the same NumPy function as the reference's
(:func:`~lowrank_ref.adapters.prompt_tuning.prompt_init`), so one seed gives one prompt in both.
Not mergeable: ``merge()`` is the same ``ValueError``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowrank_ref.adapters.prompt_tuning import (
    NOT_MERGEABLE_WHY,
    PromptTuningConfig,
    check_prompt_model,
    prompt_init,
)

__all__ = ["PromptEmbedding", "prompt_tuning", "numpy_rng"]


def numpy_rng(rng) -> np.random.Generator:
    """A NumPy Generator from None, a seed, a NumPy Generator, or a torch.Generator (one draw)."""
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(2**62, (1,), generator=rng)))
    from lowrank_ref.nn.module import as_rng

    return as_rng(rng)


class PromptEmbedding(nn.Module):
    """``P (k, C)``, an ``nn.Parameter``; ``forward(x_e (B, T, C)) -> (B, k+T, C)``."""

    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, P: torch.Tensor, config: PromptTuningConfig):
        super().__init__()
        self.config = config
        self.P = nn.Parameter(P)

    @property
    def k(self) -> int:
        return self.P.shape[0]

    def forward(self, x_e: torch.Tensor) -> torch.Tensor:
        B = x_e.shape[0]
        return torch.cat([self.P.to(x_e.dtype).unsqueeze(0).expand(B, -1, -1), x_e], dim=1)  # [P; X_e]

    def merge(self) -> None:
        raise ValueError(f"PromptEmbedding is not mergeable: {NOT_MERGEABLE_WHY}")

    def extra_repr(self) -> str:
        return f"k={self.k}, d_model={self.P.shape[1]}"


def prompt_tuning(model: nn.Module, config: PromptTuningConfig | None = None, rng=None) -> int:
    """Freeze ``model`` (a torch GPT) and hang a :class:`PromptEmbedding` on it as ``model.prompt``;
    returns the trainable count. Bad input changes nothing."""
    from lowrank_gpu.inject import set_trainable

    config = PromptTuningConfig() if config is None else config
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config must be a PromptTuningConfig, got {type(config).__name__}")
    check_prompt_model(model, config)
    w = model.tok_emb.weight
    P = prompt_init(config, w.detach().double().cpu().numpy(), numpy_rng(rng))
    set_trainable(model, "none")
    model.prompt = PromptEmbedding(torch.from_numpy(P).to(dtype=w.dtype, device=w.device), config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
