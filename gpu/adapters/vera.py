r"""VeRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.vera`, backward by autograd.

``y = base(x) + ((x A_sᵀ) ⊙ d) B_sᵀ ⊙ b`` with the model's shared frozen projections ``A (r, in_max)``,
``B (out_max, r)`` sliced per layer (``A[:, :in]``, ``B[:out, :]``); trainable ``d (r,)``, ``b (out,)``.
The projections are the same NumPy draw as the reference's (so both backends hold the same
matrices for a seed), kept as buffers: frozen, moved and cast with the model, never trained.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.vera import VeRAConfig, shared_projections

__all__ = ["VeRALinear", "SharedTensors", "build_shared"]


class SharedTensors(nn.Module):
    """Shared state with trained tensors (``nn.Parameter``) and frozen ones (buffers); both are in
    :meth:`adapter_state`, the frozen ones only when ``save_frozen``."""

    def __init__(self, trained: dict, frozen: dict, save_frozen: bool = True):
        super().__init__()
        self.save_frozen = bool(save_frozen)
        for n, v in trained.items():
            setattr(self, n, nn.Parameter(torch.as_tensor(v)))
        for n, v in frozen.items():
            self.register_buffer(n, torch.as_tensor(v), persistent=False)

    def adapter_state(self) -> dict:
        out = {n: p.detach() for n, p in self.named_parameters(recurse=False)}
        if self.save_frozen:
            out.update({n: b for n, b in self.named_buffers(recurse=False)})
        return out

    @torch.no_grad()
    def load_adapter_state(self, state: dict) -> None:
        own = self.adapter_state()
        if set(state) != set(own):
            raise ValueError(f"shared state names {sorted(state)} do not match {sorted(own)}")
        for n, v in state.items():
            if tuple(v.shape) != tuple(own[n].shape):
                raise ValueError(f"shared state {n!r} has shape {tuple(v.shape)}, expected {tuple(own[n].shape)}")
        for n, v in state.items():
            own[n].copy_(torch.as_tensor(v).to(device=own[n].device, dtype=own[n].dtype))
            if n in dict(self.named_parameters(recurse=False)):
                getattr(self, n).grad = None


def own_shared(layer, method: str, module):
    """Attach ``module`` to a lone ``layer`` as ``layer.lowrank_shared.<method>`` and return its ``SharedRef``."""
    from lowrank_gpu.inject import TORCH
    from lowrank_ref.inject import SharedRef

    if not layer.quantized:
        module = TORCH.ops.like(module, layer.base)
    else:
        module = module.to(device=layer._base_device(), dtype=layer.weight_dtype)
    TORCH.attach_shared(layer, method, module)
    return SharedRef(module, "")


def build_shared(configs: dict, shapes: dict, rng=None) -> SharedTensors:
    A, B, save = shared_projections(configs, shapes)
    return SharedTensors({}, {"A": A, "B": B}, save_frozen=save)


class VeRALinear(AdapterLinear):
    CONFIG = VeRAConfig

    def __init__(self, base: nn.Linear, config: VeRAConfig | None = None, rng=None, shared=None):
        config = self.check_config(config)
        super().__init__(base, config)
        generator_from(rng, device="cpu")  # no randomness here (the projections come from the seed); checked
        if shared is None:  # a lone layer: its own projections, held as self.lowrank_shared.vera
            shared = own_shared(self, "vera", build_shared({"": config}, {"": (self.out_features, self.in_features)}))
        A, B = shared.A, shared.B
        if A.shape[0] != config.r or B.shape[1] != config.r:
            raise ValueError(f"the shared projections have rank {A.shape[0]}, this layer's config r={config.r}")
        if A.shape[1] < self.in_features or B.shape[0] < self.out_features:
            raise ValueError(f"VeRA layer (out={self.out_features}, in={self.in_features}) is larger than the "
                             f"shared projections A {tuple(A.shape)}, B {tuple(B.shape)}: they need "
                             f"in <= {A.shape[1]} and out <= {B.shape[0]}")
        self.shared = shared
        kw = {"dtype": self.weight_dtype, "device": self._base_device()}
        self.d = nn.Parameter(torch.full((config.r,), config.d_initial, **kw))
        self.b = nn.Parameter(torch.zeros(self.out_features, **kw))  # b = 0: ΔW = 0 at init

    def projections(self):
        return self.shared.A[:, : self.in_features], self.shared.B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        A, B = self.projections()
        return (self.b[:, None] * B) @ (self.d[:, None] * A)  # diag(b) B_s diag(d) A_s

    def _forward(self, x):
        A, B = self.projections()
        return self.base(x) + (((x @ A.T) * self.d) @ B.T) * self.b
