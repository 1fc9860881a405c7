r"""Tied-LoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.tied_lora`, backward by autograd.

``y = base(x) + ((x Aᵀ) ⊙ u) Bᵀ ⊙ v``; ``A``, ``B`` tied across layers (the model's shared state,
``lowrank_shared.tied_lora.A_q``), ``u``, ``v`` per layer; trained tensors are parameters,
frozen ones buffers (never trained, moved and cast with the layer, stored in adapter files).
The tied tensors are the reference's NumPy draw from ``tie_seed``, so both backends agree.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.vera import SharedTensors, own_shared
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.tied_lora import (
    TENSORS,
    TiedLoRAConfig,
    init_tensor,
    shared_tensors,
    tie_group,
)

__all__ = ["TiedLoRALinear", "build_shared"]


def build_shared(configs: dict, shapes: dict, rng=None) -> SharedTensors:
    trained, frozen = shared_tensors(configs, shapes)
    return SharedTensors(trained, frozen, save_frozen=True)


class _NumpyDraw:
    """Untied random tensors are drawn in NumPy from a seed taken from the torch generator."""

    def __init__(self, g: torch.Generator):
        import numpy as np

        self.rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))

    def uniform(self, *a, **k):
        return self.rng.uniform(*a, **k)


class TiedLoRALinear(AdapterLinear):
    CONFIG = TiedLoRAConfig

    def __init__(self, base: nn.Linear, config: TiedLoRAConfig | None = None, rng=None, shared=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        if shared is None:
            shared = own_shared(self, "tied_lora", build_shared({"": config}, {"": (self.out_features, self.in_features)}))
        self.shared = shared
        self.group = tie_group(config, shared.layer)
        for n in ("A", "B"):
            if config.tied(n):
                t = self._tied(n)
                want = (config.r, self.in_features) if n == "A" else (self.out_features, config.r)
                if tuple(t.shape) != want:
                    raise ValueError(f"the tied {n} of group {self.group!r} has shape {tuple(t.shape)}, this layer "
                                     f"(out={self.out_features}, in={self.in_features}) needs {want}")
        kw = {"dtype": self.weight_dtype, "device": self._base_device()}
        draw = _NumpyDraw(g)
        for n in TENSORS:
            if config.tied(n):
                continue
            v = torch.as_tensor(init_tensor(n, config, self.out_features, self.in_features, draw)).to(**kw)
            if config.trains(n):
                setattr(self, n, nn.Parameter(v))
            else:
                self.register_buffer(n, v, persistent=False)

    def _tied(self, n):
        return getattr(self.shared, f"{n}_{self.group}")

    def tensor(self, n):
        """``A``, ``B``, ``u`` or ``v``: a parameter when it trains, else a buffer."""
        return self._tied(n) if self.config.tied(n) else getattr(self, n)

    def array(self, n) -> torch.Tensor:
        """``A``, ``B``, ``u`` or ``v`` as a plain tensor (detached)."""
        return self.tensor(n).detach()

    def delta_weight(self) -> torch.Tensor:
        A, B, u, v = (self.tensor(n) for n in TENSORS)
        return (v[:, None] * B) @ (u[:, None] * A)  # diag(v) B diag(u) A

    def _forward(self, x):
        A, B, u, v = (self.tensor(n) for n in TENSORS)
        return self.base(x) + (((x @ A.T) * u) @ B.T) * v

    def adapter_state(self) -> dict:
        return {n: self.tensor(n).detach() for n in TENSORS if not self.config.tied(n)}

    @torch.no_grad()
    def load_adapter_state(self, state: dict) -> None:
        own = self.adapter_state()
        if set(state) != set(own):
            raise ValueError(f"adapter state names {sorted(state)} do not match {sorted(own)}")
        for n, v in state.items():
            if tuple(v.shape) != tuple(own[n].shape):
                raise ValueError(f"adapter state {n!r} has shape {tuple(v.shape)}, expected {tuple(own[n].shape)}")
        if self.merged:
            raise ValueError("Tied-LoRA layer is merged: unmerge() before loading its adapters")
        for n, v in state.items():
            t = self.tensor(n)
            t.copy_(torch.as_tensor(v).to(device=t.device, dtype=t.dtype))
            if isinstance(t, nn.Parameter):
                t.grad = None
