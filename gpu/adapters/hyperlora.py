r"""HyperLoRA in PyTorch: the twin of :mod:`lowrank_ref.adapters.hyperlora`, backward by autograd.

The shared hypernetwork (task embeddings ``T``, module-type embeddings ``M_τ``, trunk ``W1``,
``b1``) is the model's ``lowrank_shared.hyperlora``, drawn in NumPy from ``hyper_seed`` so both
backends start equal; each layer owns its embedding ``e`` and heads ``H_A``, ``h_A``, ``H_B``,
``h_B``. Per-row conditions: the rows of each distinct condition are gathered and get their own
generated ``A(c)``, ``B(c)``; ``merge(condition=c)`` folds ``s B(c) A(c)`` into ``W0``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_gpu.adapters.base import AdapterLinear
from lowrank_gpu.adapters.vera import SharedTensors, own_shared
from lowrank_gpu.nn.convert import generator_from
from lowrank_ref.adapters.hyperlora import (
    OWN,
    HyperLoRAConfig,
    check_condition_ids,
    module_type,
    own_init,
    shared_init,
)

__all__ = ["HyperLoRALinear", "build_shared"]


def build_shared(configs: dict, shapes: dict, rng=None) -> SharedTensors:
    return SharedTensors(shared_init(configs, shapes), {}, save_frozen=True)


class HyperLoRALinear(AdapterLinear):
    CONFIG = HyperLoRAConfig
    takes_condition = True

    def __init__(self, base: nn.Linear, config: HyperLoRAConfig | None = None, rng=None, shared=None,
                 condition=None):
        config = self.check_config(config)
        super().__init__(base, config)
        g = generator_from(rng, device="cpu")
        if condition is not None:
            condition = check_condition_ids(condition, config.n_tasks)
            if not isinstance(condition, int):
                raise TypeError("condition= must be one integer task id (per-row ids come with forward)")
        if shared is None:
            shared = own_shared(self, "hyperlora", build_shared({"": config}, {"": (self.out_features, self.in_features)}))
        self.shared = shared
        self.module_type = module_type(shared.layer)
        for n, want in (("T", (config.n_tasks, config.task_dim)), (f"M_{self.module_type}", (config.module_dim,)),
                        ("W1", (config.hidden, config.z_dim))):
            got = tuple(getattr(shared, n).shape)
            if got != want:
                raise ValueError(f"the shared hypernetwork's {n} has shape {got}, this layer's config needs {want}")
        draw = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
        kw = {"dtype": self.weight_dtype, "device": self._base_device()}
        for n, v in own_init(config, self.in_features, self.out_features, draw).items():
            setattr(self, n, nn.Parameter(torch.as_tensor(v).to(**kw)))
        self.default_condition = condition  # used when a forward brings no condition
        self.condition = None  # the current forward's (set by GPT.forward(idx, cond=...))
        self.merged_condition: int | None = None
        self._merging: int | None = None

    def _condition(self):
        """The condition the next forward uses: the forward's own, else the layer's default."""
        return self.default_condition if self.condition is None else self.condition

    def _hyper(self) -> dict:
        sh = self.shared
        out = {"T": sh.T, "M": getattr(sh, f"M_{self.module_type}"), "W1": sh.W1, "b1": sh.b1}
        out.update({n: getattr(self, n) for n in OWN})
        return out

    def _generate(self, c: torch.Tensor):
        """``A (U, r, in)``, ``B (U, out, r)`` for the condition ids ``c (U,)`` (autograd)."""
        P = self._hyper()
        U = c.shape[0]
        z = torch.cat([P["T"][c], P["M"].expand(U, -1), P["e"].expand(U, -1)], dim=1)  # [T_c ; M_τ ; e]
        gv = F.silu(z @ P["W1"].T + P["b1"])  # g = SiLU(W1 z + b1)
        A = (gv @ P["H_A"].T + P["h_A"]).reshape(U, self.r, self.in_features)
        B = (gv @ P["H_B"].T + P["h_B"]).reshape(U, self.out_features, self.r)
        return A, B

    def _fixed_condition(self, condition, what: str) -> int:
        c = self._condition() if condition is None else condition
        if c is None:
            raise ValueError(f"{type(self).__name__}.{what} needs a condition: {what}(condition=task_id) "
                             f"(ΔW depends on the task)")
        c = check_condition_ids(c, self.config.n_tasks, type(self).__name__)
        if not isinstance(c, int):
            u = np.unique(c)
            if u.size != 1:
                raise ValueError(f"{type(self).__name__}.{what} needs one condition, the layer holds a mixed "
                                 f"batch's {u.tolist()}: give {what}(condition=task_id)")
            c = int(u[0])
        return c

    def generate(self, condition=None):
        """``(A(c) (r, in), B(c) (out, r))`` for one condition (the layer's own by default)."""
        c = self._fixed_condition(condition, "generate")
        A, B = self._generate(torch.tensor([c], device=self._base_device()))
        return A[0], B[0]

    def delta_weight(self, condition=None) -> torch.Tensor:
        c = self._merging if self._merging is not None else self._fixed_condition(condition, "delta_weight")
        A, B = self.generate(c)
        return self.scaling * (B @ A)  # ΔW(c) = s B(c) A(c)

    def _delta_weight_f64(self) -> torch.Tensor:
        A, B = self.generate(self._merging)
        return self.scaling * (B.double() @ A.double())

    def merge(self, condition=None) -> None:
        c = self._fixed_condition(condition, "merge")
        self._merging = c
        try:
            super().merge()
        finally:
            self._merging = None
        self.merged_condition = c

    def unmerge(self) -> None:
        super().unmerge()
        self.merged_condition = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and self._condition() is not None:
            c = check_condition_ids(self._condition(), self.config.n_tasks, type(self).__name__)
            ids = {c} if isinstance(c, int) else set(np.unique(c).tolist())
            if ids != {self.merged_condition}:
                raise ValueError(f"{type(self).__name__} is merged for condition {self.merged_condition}; "
                                 f"got condition(s) {sorted(ids)}: unmerge() to run other or mixed conditions")
        return super().forward(x)

    def _forward(self, x):
        cond = check_condition_ids(self._condition(), self.config.n_tasks, type(self).__name__)
        s = self.scaling
        y = self.base(x)
        if isinstance(cond, int):
            A, B = self._generate(torch.tensor([cond], device=x.device))
            return y + s * ((x @ A[0].T) @ B[0].T)  # s (x A(c)ᵀ) B(c)ᵀ
        if x.dim() < 2 or x.shape[0] != cond.shape[0]:
            raise ValueError(f"the condition has one id per batch row ({cond.shape[0]} rows) but x has shape "
                             f"{tuple(x.shape)}: x must be (B, ..., in) with B = {cond.shape[0]}")
        ids = np.unique(cond)
        A, B = self._generate(torch.as_tensor(ids, device=x.device))  # once per distinct condition
        inv = torch.as_tensor(np.searchsorted(ids, cond), device=x.device)
        Ar, Br = A[inv], B[inv]  # per row: (B, r, in), (B, out, r)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, in)
        h = torch.bmm(x3, Ar.transpose(1, 2))  # (B, N, r)
        upd = torch.bmm(h, Br.transpose(1, 2))  # (B, N, out)
        return y + s * upd.reshape(*x.shape[:-1], self.out_features)
