"""The torch side of the nn core: conversions between the two backends (the small GPT lives in
``lowrank_gpu.nn.gpt``)."""

from lowrank_gpu.nn.convert import as_torch_linear, generator_from, to_numpy, to_torch

__all__ = ["as_torch_linear", "to_torch", "to_numpy", "generator_from"]
