r"""AdaLoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.adalora`, backward by autograd.

``y = x W0ᵀ + b + s ((x Qᵀ) ⊙ E) Pᵀ`` with ``P (out, r)``, ``E (r,)`` (0 at init), ``Q (r, in)``
(N(0, 0.02²)), ``s = α / init_r``. Same config, names, shapes, rank pattern and files; the
allocator is the NumPy one reading the tensors (:class:`RankAllocator`), the regulariser a
torch expression that autograd differentiates (:class:`AdaLoRAHooks`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters import adalora as _ref
from lowrank_ref.adapters.adalora import INIT_STD, AdaLoRAConfig
from lowrank_ref.train import TrainingHooks

__all__ = ["AdaLoRALinear", "RankAllocator", "AdaLoRAHooks", "orth_reg"]


class AdaLoRALinear(AdapterLinear):
    CONFIG = AdaLoRAConfig

    def __init__(self, base: nn.Linear, config: AdaLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        r, dtype, device = config.rank, self.weight_dtype, self._base_device()
        g = generator_from(rng, device="cpu")
        P = torch.randn((self.out_features, r), generator=g, dtype=torch.float64) * INIT_STD
        Q = torch.randn((r, self.in_features), generator=g, dtype=torch.float64) * INIT_STD
        self.P = nn.Parameter(P.to(device=device, dtype=dtype))  # (out, r)
        self.E = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))  # (r,): 0, the base layer
        self.Q = nn.Parameter(Q.to(device=device, dtype=dtype))  # (r, in)
        self.keep = np.ones(r, dtype=bool)
        self.allocated = False
        self.trained = False

    @property
    def r(self) -> int:
        return self.config.rank

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def set_keep(self, keep) -> None:
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if keep.shape != (self.E.shape[0],):
            raise ValueError(f"keep must have {self.E.shape[0]} entries, got {keep.shape[0]}")
        self.keep = keep.copy()
        self.config = self.config.replace(r=int(keep.sum()))
        self.allocated = True

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * ((self.P * self.E) @ self.Q)  # s P diag(E) Q   (out, in)

    def _delta_weight_f64(self) -> torch.Tensor:
        P, E, Q = (t.detach().double() for t in (self.P, self.E, self.Q))
        return self.scaling * ((P * E) @ Q)

    def _forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.trained = True
        y = self.base(x)
        g = (x @ self.Q.T) * self.E  # (x Qᵀ) ⊙ E   (..., r)
        return y + self.scaling * (g @ self.P.T)

    def _index(self):
        return torch.as_tensor(self.keep, device=self.E.device)

    def adapter_state(self) -> dict:
        _ref.warn_if_not_allocated(self)
        k = self._index()
        return {"P": self.P.detach()[:, k], "E": self.E.detach()[k], "Q": self.Q.detach()[k]}

    @torch.no_grad()
    def load_adapter_state(self, state: dict) -> None:
        from lowrank_ref.nn.checks import state_message

        if self.merged:
            raise ValueError(state_message("merged loading", type(self).__name__))
        k = int(self.keep.sum())
        want = {"P": (self.out_features, k), "E": (k,), "Q": (k, self.in_features)}
        if set(state) != set(want):
            raise ValueError(f"adapter state names {sorted(state)} do not match {sorted(want)}")
        for n, v in state.items():
            if tuple(v.shape) != want[n]:
                raise ValueError(f"adapter state {n!r} has shape {tuple(v.shape)}, expected {want[n]}")
        idx = self._index()
        as_t = lambda v, p: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(  # noqa: E731
            device=p.device, dtype=p.dtype)
        self.P[:, idx] = as_t(state["P"], self.P)
        self.Q[idx] = as_t(state["Q"], self.Q)
        self.E.zero_()
        self.E[idx] = as_t(state["E"], self.E)
        for p in (self.P, self.E, self.Q):
            p.grad = None
        self.allocated, self.trained = True, False


# one allocator for both backends (it reads torch tensors as float64 arrays on the CPU)
RankAllocator = _ref.RankAllocator


def orth_reg(P: torch.Tensor, Q: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """``‖QQᵀ − I‖_F + ‖PᵀP − I‖_F`` (or the squares), a torch expression."""
    M = Q @ Q.T - torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
    N = P.T @ P - torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
    if squared:
        return (M * M).sum() + (N * N).sum()
    return torch.linalg.matrix_norm(M) + torch.linalg.matrix_norm(N)


class AdaLoRAHooks(TrainingHooks):
    def __init__(self, model=None, layers: dict | None = None):
        super().__init__(model, layers)
        self.allocator = RankAllocator(self.layers)

    def loss_terms(self, step: int):
        cfg = self.allocator.config
        if cfg.orth_reg_weight == 0:
            return 0.0
        total = sum(orth_reg(lay.P, lay.Q, cfg.orth_squared) for lay in self.layers.values())
        return cfg.orth_reg_weight * total / (2 * len(self.layers))

    def after_step(self, step: int) -> None:
        self.allocator.update_and_mask(step)
