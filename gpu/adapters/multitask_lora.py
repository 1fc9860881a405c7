r"""MTL-LoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.multitask_lora`, backward by autograd.

For a row of task ``t``: ``y = x W0ᵀ + b + s (x Aᵀ Λ_tᵀ) B_tᵀ`` with ``B_t = Σ_i softmax(w_t/τ)_i B_i``;
``A (r, in)``, ``Lambda (T, r, r)``, ``B (n, out, r)``, ``w (T, n)``. Same config, names, condition
rules and per-task merge as the NumPy layer; wraps any ``torch.nn.Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.lora import init_lora_A
from lowrank_gpu.nn.checks import check_input
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.multitask_lora import MultiTaskLoRAConfig, check_task, task_rows
from lowrank_ref.nn.checks import state_message

__all__ = ["MultiTaskLoRALinear"]


class MultiTaskLoRALinear(AdapterLinear):
    CONFIG = MultiTaskLoRAConfig
    takes_condition = True

    def __init__(self, base: nn.Linear, config: MultiTaskLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        r, T, n = config.r, config.n_tasks, config.n_up
        dtype, device = self.weight_dtype, self._base_device()
        A = init_lora_A(r, self.in_features, "kaiming", g)  # (r, in), shared
        bound = 1.0 / n ** 0.5  # kaiming_uniform(a=√5) on a (T, n) weight: U(±1/√n)
        w = (torch.rand((T, n), generator=g, dtype=torch.float64) * 2 - 1) * bound
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))
        self.Lambda = nn.Parameter(torch.eye(r, dtype=dtype, device=device).repeat(T, 1, 1))  # Λ_t = I
        self.B = nn.Parameter(torch.zeros((n, self.out_features, r), dtype=dtype, device=device))  # B_i = 0
        self.w = nn.Parameter(w.to(device=device, dtype=dtype))
        self.condition = None  # set by the model's forward (cond=), or by hand
        self.default_condition = None  # the task when a forward brings none (lowrank-ref train: 0)
        self._merge_task: int | None = None

    @property
    def n_tasks(self) -> int:
        return self.config.n_tasks

    @property
    def active_condition(self):
        """``condition``, or ``default_condition`` when the forward brought none."""
        return self.default_condition if self.condition is None else self.condition

    @property
    def merged_task(self) -> int | None:
        return self._merge_task if self.merged else None

    def _task_for(self, task) -> int:
        if task is not None:
            return check_task(task, self.n_tasks)
        if self._merge_task is not None:
            return self._merge_task
        if self.active_condition is None:
            raise ValueError(f"{type(self).__name__}: ΔW is per task: pass task=t (or set a condition "
                             "that names one task)")
        cond = self.active_condition
        c = cond.detach().cpu().numpy() if hasattr(cond, "detach") else cond
        shape = tuple(getattr(c, "shape", ())) or (1,)
        ids = sorted(set(task_rows(c, shape, self.n_tasks, type(self).__name__).tolist()))
        if len(ids) != 1:
            raise ValueError(f"{type(self).__name__}: the condition names tasks {ids}; ΔW and "
                             "merge() are per task: pass task=t")
        return ids[0]

    def _task_up_projections(self, B, w):
        pi = torch.softmax(w / self.config.temperature, dim=1)  # π_t = softmax(w_t / τ)   (T, n)
        return torch.einsum("ti,ior->tor", pi, B)  # B_t = Σ_i π_ti B_i   (T, out, r)

    def delta_weight(self, task=None) -> torch.Tensor:
        t = self._task_for(task)
        Bt = self._task_up_projections(self.B, self.w)[t]
        return self.scaling * (Bt @ self.Lambda[t] @ self.A)  # ΔW_t = s B_t Λ_t A

    def _delta_weight_f64(self) -> torch.Tensor:
        t = self._task_for(None)
        Bt = self._task_up_projections(self.B.detach().double(), self.w.detach().double())[t]
        return self.scaling * (Bt @ self.Lambda.detach()[t].double() @ self.A.detach().double())

    def merge(self, task=None) -> None:
        if self.merged:
            raise ValueError(state_message("already merged", type(self).__name__))
        self._merge_task = self._task_for(task)
        try:
            super().merge()
        except BaseException:
            self._merge_task = None
            raise

    def unmerge(self) -> None:
        super().unmerge()
        self._merge_task = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self.active_condition is not None:
            check_input(x, self.in_features)
            rows = task_rows(self.active_condition, tuple(x.shape[:-1]), self.n_tasks, type(self).__name__)
            other = sorted(set(rows[rows != self._merge_task].tolist()))
            if other:
                raise ValueError(f"{type(self).__name__} is merged for task {self._merge_task}; the batch "
                                 f"names tasks {other} too: unmerge() to serve a mixed batch")
        return super().forward(x)

    def _forward(self, x):
        lead = tuple(x.shape[:-1])
        rows = task_rows(self.active_condition, lead, self.n_tasks, type(self).__name__)
        rows_t = torch.as_tensor(rows, device=x.device)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        Bt = self._task_up_projections(self.B, self.w)  # (T, out, r)
        h = x2 @ self.A.T  # (N, r)
        delta = x2.new_zeros((x2.shape[0], self.out_features))
        for t in sorted(set(rows.tolist())):  # the rows of one task: one matmul each
            sel = rows_t == t
            g = h[sel] @ self.Lambda[t].T  # g = h Λ_tᵀ
            delta = delta.index_put((sel,), self.scaling * (g @ Bt[t].T))  # s g B_tᵀ
        return self.base(x) + delta.reshape(*lead, self.out_features)
