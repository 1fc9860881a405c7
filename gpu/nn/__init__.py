"""The torch side of the nn core: conversions between the two backends and the small GPT.

``to_numpy`` takes a tensor (-> array) or a torch GPT (-> NumPy GPT); ``from_numpy`` takes a
NumPy GPT (-> torch GPT)."""

from lowrank_gpu.nn.convert import as_torch_linear, generator_from, to_torch
from lowrank_gpu.nn.gpt import (
           GPT,
           MLP,
           Block,
           CausalSelfAttention,
           GPTConfig,
           ShiftedSparseAttention,
           copy_state,
           from_numpy,
           to_numpy,
)

__all__ = ["as_torch_linear", "to_torch", "to_numpy", "generator_from",
           "GPT", "GPTConfig", "CausalSelfAttention", "MLP", "Block", "from_numpy", "copy_state",
           "ShiftedSparseAttention"]
