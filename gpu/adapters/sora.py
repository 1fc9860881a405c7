r"""SoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.sora`, backward by autograd.

``y = x W0ᵀ + b + s ((x̃ Aᵀ) ⊙ g) Bᵀ``, ``ΔW = s B diag(g) A``; after each optimizer step
:class:`SoRAHooks` sets ``g ← T_{η_t λ}(g)`` (the true soft-threshold). ``prune()`` gives the
torch ``LoRALinear`` of the non-zero gates, with identical outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lora import init_lora_A
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.sora import (
    SoRAConfig,
    magnitude_mask,
    pruned_lora_config,
    sparse_factor_step,
)
from lowrank_ref.train import TrainingHooks

__all__ = ["SoRALinear", "SoRAHooks", "soft_threshold"]


def soft_threshold(x: torch.Tensor, xi: float) -> torch.Tensor:
    """T_ξ(x) = sign(x) · max(|x| − ξ, 0)."""
    return torch.sign(x) * torch.clamp(x.abs() - xi, min=0)


class SoRALinear(AdapterLinear):
    CONFIG = SoRAConfig

    def __init__(self, base: nn.Linear, config: SoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        r, dtype, device = config.r, self.weight_dtype, self._base_device()
        gen = generator_from(rng, device="cpu")
        A = init_lora_A(r, self.in_features, "kaiming", gen)
        g = torch.randn(r, generator=gen, dtype=torch.float64)  # the gate, N(0, 1)
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))  # (r, in)
        self.g = nn.Parameter(g.to(device=device, dtype=dtype))  # (r,)
        self.B = nn.Parameter(torch.zeros((self.out_features, r), dtype=dtype, device=device))  # B = 0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.factor_masks: dict | None = None  # {"A": bool, "B": bool} tensors once fixed

    @torch.no_grad()
    def fix_factor_masks(self) -> None:
        d = self.config.density  # the NumPy magnitude_mask, so both backends keep the same entries
        self.factor_masks = {n: torch.from_numpy(magnitude_mask(getattr(self, n).detach().cpu().numpy(), d))
                             .to(getattr(self, n).device) for n in ("A", "B")}
        self.apply_factor_masks()

    @torch.no_grad()
    def apply_factor_masks(self) -> None:
        if self.factor_masks is not None:
            for n, m in self.factor_masks.items():
                getattr(self, n).mul_(m.to(getattr(self, n).dtype))  # A ← A ⊙ M_A, B ← B ⊙ M_B

    def load_adapter_state(self, state: dict) -> None:
        super().load_adapter_state(state)
        self.factor_masks = None

    @property
    def factor_density(self) -> float:
        nz = int((self.A.detach() != 0).sum()) + int((self.B.detach() != 0).sum())
        return nz / (self.A.numel() + self.B.numel())

    @property
    def active_rank(self) -> int:
        return int((self.g.detach() != 0).sum())

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * ((self.B * self.g) @ self.A)  # ΔW = s B diag(g) A

    def _delta_weight_f64(self) -> torch.Tensor:
        Bg = self.B.detach().double() * self.g.detach().double()
        return self.scaling * (Bg @ self.A.detach().double())

    def _forward(self, x):
        y = self.base(x)  # x W0ᵀ + b
        u = (self.dropout(x) @ self.A.T) * self.g  # u = (x̃ Aᵀ) ⊙ g   (..., r)
        out = torch.addmm(y.reshape(-1, self.out_features), u.reshape(-1, u.shape[-1]), self.B.T,
                          alpha=self.scaling)
        return out.view(y.shape)

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        self.g.copy_(soft_threshold(self.g, float(lr) * self.config.lam))  # g ← T_{η λ}(g)

    @torch.no_grad()
    def prune(self):
        from lowrank_gpu.adapters.lora import LoRALinear

        if self.merged:
            raise ValueError(f"{type(self).__name__}.prune() while merged: unmerge() first")
        keep = torch.nonzero(self.g != 0).flatten()
        k = max(1, int(keep.numel()))
        lora = LoRALinear(self.base, pruned_lora_config(self.config, k), rng=0)
        if keep.numel():
            A = self.A[keep]
            B = (self.B[:, keep].double() * self.g[keep].double()).to(self.B.dtype)
        else:
            A, B = self.A[:1], torch.zeros((self.out_features, 1), dtype=self.B.dtype, device=self.B.device)
        lora.load_adapter_state({"A": A, "B": B})
        return lora


class SoRAHooks(TrainingHooks):
    """The torch twin of :class:`lowrank_ref.adapters.sora.SoRAHooks`."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.gate_history: list[dict] = []

    def after_step(self, step: int) -> None:
        if self.lr is None:
            raise ValueError("SoRA's proximal step needs the step's learning rate (hooks.lr); "
                             "the training loops set it, a manual loop must set it too")
        for layer in self.layers.values():
            layer.proximal_step(self.lr)
        sparse_factor_step(self.layers, step)
        self.gate_history.append({n: layer.active_rank for n, layer in self.layers.items()})
