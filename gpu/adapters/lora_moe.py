r"""A mixture of LoRA experts in PyTorch: the twin of :mod:`lowrank_ref.adapters.lora_moe`, backward
by autograd.

``y = x W0ᵀ + b + s Σ_e g_e(x) (x A_eᵀ) B_eᵀ`` with ``g = softmax(x W_gᵀ)`` (dense) or a softmax
over each token's ``top_k`` largest logits; ``A (E, r, in)``, ``B (E, out, r)``, ``Wg (E, in)``.
Same config, names, balancing term (on the detached input, as in NumPy) and refusal to merge.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.lora_moe import NOT_MERGEABLE_WHY, LoRAMoEConfig
from lowrank_ref.train import TrainingHooks

__all__ = ["LoRAMoELinear", "LoRAMoEHooks", "router_gates", "balance_loss"]


def router_gates(z: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """``softmax(z)`` over the last axis, or over each row's ``top_k`` largest logits (others 0)."""
    if top_k is not None and top_k < z.shape[-1]:
        keep = torch.topk(z, top_k, dim=-1).indices
        mask = torch.zeros_like(z, dtype=torch.bool).scatter(-1, keep, True)
        z = z.masked_fill(~mask, float("-inf"))
    return torch.softmax(z, dim=-1)


def balance_loss(g: torch.Tensor) -> torch.Tensor:
    """cv²(I) = var(I) / mean(I)² (population variance), I = Σ_n g_n (E,)."""
    imp = g.sum(dim=0)
    return imp.var(unbiased=False) / imp.mean() ** 2


class LoRAMoELinear(AdapterLinear):
    CONFIG = LoRAMoEConfig
    MERGEABLE = False
    NOT_MERGEABLE_WHY = NOT_MERGEABLE_WHY

    def __init__(self, base: nn.Linear, config: LoRAMoEConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        E, r, n_in = config.n_experts, config.r, self.in_features
        dtype, device = self.weight_dtype, self._base_device()
        bound = 1.0 / n_in ** 0.5  # kaiming_uniform(a=√5): U(±1/√in)
        A = (torch.rand((E, r, n_in), generator=g, dtype=torch.float64) * 2 - 1) * bound
        Wg = (torch.rand((E, n_in), generator=g, dtype=torch.float64) * 2 - 1) * bound
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros((E, self.out_features, r), dtype=dtype, device=device))  # B_e = 0
        self.Wg = nn.Parameter(Wg.to(device=device, dtype=dtype))
        self._balance_input = None  # the last training-mode forward's input (N, in), detached

    @property
    def n_experts(self) -> int:
        return self.config.n_experts

    def _forward(self, x):
        E, r = self.config.n_experts, self.config.r
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        gates = router_gates(x2 @ self.Wg.T, self.config.top_k)  # (N, E)
        h = (x2 @ self.A.reshape(E * r, -1).T).reshape(-1, E, r)  # h_{n,e} = A_e x_n
        u = (h * gates[:, :, None]).reshape(-1, E * r)  # g_{n,e} h_{n,e}
        Bcat = self.B.permute(1, 0, 2).reshape(self.out_features, E * r)  # [B_1 … B_E]
        delta = self.scaling * (u @ Bcat.T)  # s Σ_e g_e B_e A_e x
        if self.training and torch.is_grad_enabled():
            self._balance_input = x2.detach()
        else:
            self._balance_input = None
        return self.base(x) + delta.reshape(*x.shape[:-1], self.out_features)

    def balance_loss(self):
        """cv²(I) of the last training-mode forward's gates, recomputed from its detached input (a
        scalar tensor with a graph to ``Wg``); ``None`` when none ran since the last call."""
        if self._balance_input is None:
            return None
        x2, self._balance_input = self._balance_input, None
        return balance_loss(router_gates(x2 @ self.Wg.T, self.config.top_k))


class LoRAMoEHooks(TrainingHooks):
    """The torch twin of :class:`lowrank_ref.adapters.lora_moe.LoRAMoEHooks`: returns
    ``Σ λ · cv²(I)`` as a tensor, which the loop adds to the loss before ``backward``."""

    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.history: list[float] = []

    def loss_terms(self, step: int):
        total, cv2 = 0.0, 0.0
        for layer in self.layers.values():
            value = layer.balance_loss()
            if value is None:
                continue
            cv2 += float(value.detach())
            total = total + layer.config.balance_weight * value
        self.history.append(cv2)
        return total
