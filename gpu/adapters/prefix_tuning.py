r"""Prefix tuning in PyTorch: the twin of :mod:`lowrank_ref.adapters.prefix_tuning`, backward by autograd.

``P = tanh(E W1ᵀ + b1) W2ᵀ + b2`` reshaped to ``(L, 2, p, C)`` (or ``P`` itself without the MLP,
and after :meth:`PrefixEncoder.finalize`); layer ``l``'s keys and values become ``[P_k^l; K]``,
``[P_v^l; V]`` in :class:`lowrank_gpu.nn.gpt.CausalSelfAttention`. The initial tensors come from
the reference's :func:`~lowrank_ref.adapters.prefix_tuning.prefix_init`: one seed, one init.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.prompt_tuning import numpy_rng
from lowrank_ref.adapters.prefix_tuning import NOT_MERGEABLE_WHY, PrefixTuningConfig, prefix_init
from lowrank_ref.adapters.prompt_tuning import check_prompt_model

__all__ = ["PrefixEncoder", "prefix_tuning"]

_MLP = ("E", "W1", "b1", "W2", "b2")


class PrefixEncoder(nn.Module):
    """``forward() -> (L, 2, p, C)``; parameters ``E, W1, b1, W2, b2`` or ``P`` (as NumPy's)."""

    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, tensors: dict, config: PrefixTuningConfig, n_layer: int):
        super().__init__()
        self.config = config
        self.n_layer = int(n_layer)
        for n, v in tensors.items():
            setattr(self, n, nn.Parameter(v))

    @property
    def projection(self) -> bool:
        return "P" not in self._parameters

    @property
    def k(self) -> int:
        return (self.E if self.projection else self.P).shape[-2]

    def _mlp(self) -> torch.Tensor:
        p, C = self.E.shape
        Z = torch.tanh(self.E @ self.W1.T + self.b1)  # (p, h)
        P = Z @ self.W2.T + self.b2  # (p, 2·L·C)
        return P.view(p, self.n_layer, 2, C).permute(1, 2, 0, 3)  # (L, 2, p, C)

    def forward(self) -> torch.Tensor:
        return self._mlp() if self.projection else self.P

    @torch.no_grad()
    def finalize(self) -> None:
        """Replace the MLP by its output ``P``; the outputs stay the same. A no-op without the MLP."""
        if not self.projection:
            return
        P = self._mlp().contiguous().clone()
        trainable = self.E.requires_grad
        for n in _MLP:
            delattr(self, n)
        self.P = nn.Parameter(P, requires_grad=trainable)

    def merge(self) -> None:
        raise ValueError(f"PrefixEncoder is not mergeable: {NOT_MERGEABLE_WHY}")

    def extra_repr(self) -> str:
        return f"k={self.k}, layers={self.n_layer}, projection={self.projection}"


def prefix_tuning(model: nn.Module, config: PrefixTuningConfig | None = None, rng=None) -> int:
    """Freeze ``model`` (a torch GPT) and hang a :class:`PrefixEncoder` on it as ``model.prefix``;
    returns the trainable count. Bad input changes nothing."""
    from lowrank_gpu.inject import set_trainable

    config = PrefixTuningConfig() if config is None else config
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"config must be a PrefixTuningConfig, got {type(config).__name__}")
    check_prompt_model(model, config, "prefix tuning")
    c = model.config
    w = model.tok_emb.weight
    tensors = prefix_init(config, c.n_layer, c.d_model, numpy_rng(rng))
    set_trainable(model, "none")
    model.prefix = PrefixEncoder({n: torch.from_numpy(v).to(dtype=w.dtype, device=w.device)
                                  for n, v in tensors.items()}, config, c.n_layer)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
