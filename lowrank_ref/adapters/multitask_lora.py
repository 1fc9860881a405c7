r"""MTL-LoRA: one low-rank update per task, built from parts that the tasks share (Yang, Muhtar,
Shen et al. 2024, "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning", arXiv:2410.09437; the
reference code is pUmpKin-Co/MTL-LoRA ``src/adapter/mlora.py`` @7848a70). Chapter 08, §MTL-LoRA,
derives the backward.

For a row of task ``t`` (PyTorch layout, ``W0 (out, in)``)::

    y = x W0ᵀ + b + s (x Aᵀ Λ_tᵀ) B_tᵀ,     B_t = Σ_i π_{t,i} B_i,     π_t = softmax(w_t / τ)

* ``A (r, in)``: the down-projection, shared by every task;
* ``Λ (T, r, r)``: one task-specific ``r × r`` transform per task;
* ``B (n, out, r)``: a bank of ``n`` up-projections shared by every task;
* ``w (T, n)``: each task's mixing logits over the bank; ``τ`` the temperature; ``s = α / r``.

The task is a per-row condition, ``GPT.forward(idx, cond=task_ids)``: a batch mixes tasks. The
layer reads ``self.condition`` (set by the model, or by hand): one integer for every row, or one
per batch row (``(B,)`` for ``x (B, ..., in)``); without one, ``self.default_condition`` (``None``:
the forward refuses; ``lowrank-ref train`` sets 0, one data stream being one task).

Init (the reference code): ``A`` Kaiming-uniform (``U(±1/√in)``), ``Λ_t = I``, ``B_i = 0``, ``w``
Kaiming-uniform (``U(±1/√n)``), so ``ΔW_t = 0`` for every task at the start.

**Merging, per task.** ``ΔW_t = s B_t Λ_t A`` is one fixed matrix per task, so ``merge(task=t)``
folds task ``t``'s update into the base: the merged layer is a plain linear layer that serves task
``t`` only (a batch naming another task is refused until ``unmerge()``); serving a mixed batch
needs the unmerged layer.

**The temperature.** The reference code's default ``B_scale = 0.0`` divides the logits by zero
(NaN, or a hard arg-max at best); its scripts pass ``--temperature 0.1``
(``script/llama2_7B_mlora_qkvo.sh``), which is the default here, and ``τ ≤ 0`` is refused.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import init_lora_A
from lowrank_ref.config import check_alpha, check_rank
from lowrank_ref.nn.checks import state_message
from lowrank_ref.nn.linear import check_last_dim
from lowrank_ref.nn.module import Parameter, array_module, as_rng, where_is
from lowrank_ref.registry import CompareRow, Example, MethodSpec

__all__ = ["MultiTaskLoRAConfig", "MultiTaskLoRALinear", "mixing_weights", "task_up_projections",
           "multitask_lora_forward", "multitask_lora_backward", "task_rows", "check_task", "SPEC"]


def check_temperature(tau, name: str = "temperature") -> float:
    """``τ`` as a positive finite float: the softmax divides the logits by it."""
    if isinstance(tau, (bool, np.bool_)) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {tau!r}")
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"{name} must be a positive finite number (softmax(w / {name}) divides by it), "
                         f"got {tau}; the MTL-LoRA reference code's default 0.0 divides by zero")
    return tau


@dataclass(frozen=True)
class MultiTaskLoRAConfig:
    r"""MTL-LoRA (Yang et al. 2024): ``ΔW_t = s B_t Λ_t A`` with ``B_t = Σ_i softmax(w_t/τ)_i B_i``.

    Args:
        r: the rank of the shared ``A (r, in)`` and of each ``Λ_t (r, r)``.
        alpha: ``s = alpha / r``.
        n_tasks: ``T``, how many tasks (condition ids ``0 .. T-1``).
        n_up: ``n``, how many shared up-projections ``B_i (out, r)`` the tasks mix (the reference
            scripts: 3).
        temperature: ``τ > 0`` of the mixing softmax (the reference scripts: 0.1).
    """

    r: int = 8
    alpha: float = 16.0
    n_tasks: int = 4
    n_up: int = 3
    temperature: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "r", check_rank(self.r))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "n_tasks", check_rank(self.n_tasks, "n_tasks"))
        object.__setattr__(self, "n_up", check_rank(self.n_up, "n_up"))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))

    @property
    def scaling(self) -> float:
        """``s = alpha / r``."""
        return self.alpha / self.r

    def replace(self, **changes):
        return type(self)(**{**asdict(self), **changes})


# --- the condition: which task each row is -----------------------------------------------------
def check_task(task, n_tasks: int, name: str = "task") -> int:
    """One task id as an ``int`` in ``[0, n_tasks)``; a ``TypeError`` for a non-integer, a
    ``ValueError`` out of range."""
    if hasattr(task, "detach"):  # a 0-d torch tensor
        task = task.detach().cpu().numpy()
    if isinstance(task, np.ndarray) and task.ndim == 0:
        task = task[()]
    if isinstance(task, (bool, np.bool_)) or not hasattr(task, "__index__"):
        raise TypeError(f"{name} must be an integer task id, got {task!r} ({type(task).__name__})")
    t = int(task.__index__())
    if not 0 <= t < n_tasks:
        raise ValueError(f"{name} {t} is out of range: this layer has n_tasks={n_tasks} (ids 0..{n_tasks - 1})")
    return t


def task_rows(condition, lead: tuple, n_tasks: int, owner: str = "MultiTaskLoRALinear") -> np.ndarray:
    """The task id of every row of ``x`` flattened to ``(N, in)``, as an ``int64`` array ``(N,)``.

    ``condition``: one integer (every row), or one per batch row, ``(B,)`` with ``B = lead[0]``
    (each repeated over the other leading axes, a sequence's positions). ``None`` is an error:
    the layer cannot guess the task."""
    n = int(np.prod(lead)) if lead else 1
    if condition is None:
        raise ValueError(f"{owner} needs a condition: a task id per batch row "
                         "(model.forward(idx, cond=task_ids), or layer.condition = ...)")
    c = condition.detach().cpu().numpy() if hasattr(condition, "detach") else np.asarray(condition)
    if c.dtype == bool or not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"the condition must hold integer task ids, got dtype {c.dtype}")
    if c.ndim == 0:
        return np.full(n, check_task(c, n_tasks, "task id"), dtype=np.int64)
    if c.ndim != 1 or not lead or c.shape[0] != lead[0]:
        raise ValueError(f"the condition must be one task id, or one per batch row (shape ({lead[0] if lead else 1},) "
                         f"for x of leading shape {lead}), got shape {c.shape}")
    bad = c[(c < 0) | (c >= n_tasks)]
    if bad.size:
        raise ValueError(f"task id {int(bad[0])} is out of range: this layer has n_tasks={n_tasks} "
                         f"(ids 0..{n_tasks - 1})")
    return np.repeat(c.astype(np.int64), n // lead[0])


def task_groups(rows: np.ndarray) -> list:
    """``[(t, indices of the rows of task t)]`` for each task present, in task order."""
    return [(int(t), np.flatnonzero(rows == t)) for t in np.unique(rows)]


# --- the math ---------------------------------------------------------------------------------
def mixing_weights(w, temperature: float):
    r"""π = softmax(w / τ) over the bank, row by row: ``w (T, n)`` -> ``π (T, n)``, rows sum to 1."""
    xp = array_module(w)
    z = w / temperature
    z = z - z.max(axis=1, keepdims=True)  # the same softmax, no overflow
    e = xp.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def task_up_projections(B, pi):
    r"""B_t = Σ_i π_{t,i} B_i for every task: ``B (n, out, r)``, ``π (T, n)`` -> ``(T, out, r)``."""
    xp = array_module(B)
    return xp.einsum("ti,ior->tor", pi, B)


class MultiTaskLoRACache(NamedTuple):
    """What ``multitask_lora_backward`` needs from the forward (leading axes flattened to ``N``)."""

    x2: np.ndarray  # x (N, in)
    h: np.ndarray  # x Aᵀ (N, r)
    g: np.ndarray  # row n: Λ_{t_n} h_n (N, r)
    groups: list  # [(t, row indices)]
    W: np.ndarray  # W0 (out, in)
    A: np.ndarray  # (r, in)
    Lam: np.ndarray  # Λ (T, r, r)
    B: np.ndarray  # the bank (n, out, r)
    pi: np.ndarray  # π (T, n)
    Bt: np.ndarray  # B_t (T, out, r)
    s: float
    tau: float
    lead: tuple


def multitask_lora_forward(x, params, rows, cfg: MultiTaskLoRAConfig):
    r"""y_n = x_n W0ᵀ + b + s B_{t_n} Λ_{t_n} A x_n for every row ``n`` of task ``t_n``.

    Args:
        x: ``(..., in)``.
        params: ``{"W": W0 (out, in), "b": (out,) or None, "A": (r, in), "Lambda": (T, r, r),
            "B": (n, out, r), "w": (T, n)}``.
        rows: the task of every row of ``x`` flattened to ``(N, in)``: ``(N,)`` ints (:func:`task_rows`).
        cfg: gives ``s`` and ``τ``.
    Returns:
        ``(y (..., out), cache)``.

    Backward, for upstream ȳ (N, out), with h = x Aᵀ (N, r) and g_n = Λ_{t_n} h_n; per task t,
    over its rows R_t (derived in chapter 08, §MTL-LoRA)::

        B̄_t = s ȳ_Rᵀ g_R   (out, r)        ḡ_R = s ȳ_R B_t   (|R_t|, r)
        Λ̄_t = ḡ_Rᵀ h_R     (r, r)          h̄_R = ḡ_R Λ_t
        Ā = h̄ᵀ x           (r, in)         x̄ = ȳ W0 + h̄ A
        B̄_i = Σ_t π_{t,i} B̄_t              π̄_{t,i} = ⟨B̄_t, B_i⟩   (Frobenius)
        w̄_t = π_t ⊙ (π̄_t − ⟨π_t, π̄_t⟩) / τ                      (the softmax's backward)

    A task with no row in the batch gets ``Λ̄_t = 0`` and ``w̄_t = 0``: it did not take part.
    """
    W, b, A, Lam, B, w = (params[k] for k in ("W", "b", "A", "Lambda", "B", "w"))
    s, tau = cfg.scaling, cfg.temperature
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    pi = mixing_weights(w, tau)  # π_t = softmax(w_t / τ)   (T, n)
    Bt = task_up_projections(B, pi)  # B_t = Σ_i π_ti B_i   (T, out, r)
    h = x2 @ A.T  # (N, r)
    y = x2 @ W.T  # (N, out)
    if b is not None:
        y += b
    g = np.empty_like(h)
    groups = [(t, where_is(x2, idx)) for t, idx in task_groups(rows)]  # on CuPy: the row indices to the device
    for t, idx in groups:  # the rows of one task share Λ_t and B_t: one matmul each
        g[idx] = h[idx] @ Lam[t].T  # g = h Λ_tᵀ   (|R_t|, r)
        y[idx] += (s * g[idx]) @ Bt[t].T  # + s g B_tᵀ
    cache = MultiTaskLoRACache(x2, h, g, groups, W, A, Lam, B, pi, Bt, s, tau, lead)
    return y.reshape(*lead, W.shape[0]), cache


def multitask_lora_backward(dy, cache: MultiTaskLoRACache):
    r"""Return ``(x̄, grads)``; grads: ``A``, ``Lambda``, ``B``, ``w`` arrays, ``W`` and ``b`` None."""
    x2, h, g, groups, W, A, Lam, B, pi, Bt, s, tau, lead = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    dLam = np.zeros_like(Lam)
    dBt = np.zeros_like(Bt)
    dh = np.empty_like(h)
    for t, idx in groups:
        dyt = dy2[idx]  # (|R_t|, out)
        dBt[t] = s * (dyt.T @ g[idx])  # B̄_t = s ȳ_Rᵀ g_R   (out, r)
        dg = s * (dyt @ Bt[t])  # ḡ_R = s ȳ_R B_t   (|R_t|, r)
        dLam[t] = dg.T @ h[idx]  # Λ̄_t = ḡ_Rᵀ h_R   (r, r)
        dh[idx] = dg @ Lam[t]  # h̄_R = ḡ_R Λ_t
    dA = dh.T @ x2  # Ā = h̄ᵀ x   (r, in)
    dx = dy2 @ W + dh @ A  # x̄ = ȳ W0 + h̄ A
    dB = np.einsum("ti,tor->ior", pi, dBt)  # B̄_i = Σ_t π_ti B̄_t   (n, out, r)
    dpi = np.einsum("tor,ior->ti", dBt, B)  # π̄_ti = ⟨B̄_t, B_i⟩   (T, n)
    dw = pi * (dpi - (pi * dpi).sum(axis=1, keepdims=True)) / tau  # softmax backward, / τ
    return dx.reshape(*lead, W.shape[1]), {"A": dA, "Lambda": dLam, "B": dB, "w": dw, "W": None, "b": None}


# --- the layer --------------------------------------------------------------------------------
class MultiTaskLoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus one low-rank update per task,
    ``s B_t Λ_t A``. Trainable: ``A (r, in)``, ``Lambda (T, r, r)``, ``B (n, out, r)``, ``w (T, n)``.

    The task of each row comes from ``self.condition`` (``takes_condition``: ``GPT.forward(idx,
    cond=...)`` sets it): ``None`` (forward refuses), one integer, or one per batch row.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`MultiTaskLoRAConfig`.
        rng: a ``numpy.random.Generator`` (or a seed) for the init.
    """

    CONFIG = MultiTaskLoRAConfig
    takes_condition = True

    def __init__(self, base, config: MultiTaskLoRAConfig | None = None, rng=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        r, T, n, dtype = config.r, config.n_tasks, config.n_up, self.weight_dtype
        self.A = Parameter(init_lora_A(r, self.in_features, "kaiming", rng, dtype))  # (r, in), shared
        self.Lambda = Parameter(np.tile(np.eye(r, dtype=dtype), (T, 1, 1)))  # Λ_t = I   (T, r, r)
        self.B = Parameter(np.zeros((n, self.out_features, r), dtype=dtype))  # B_i = 0   (n, out, r)
        bound = 1.0 / np.sqrt(n)  # kaiming_uniform(a=√5) on a (T, n) weight: U(±1/√n)
        self.w = Parameter(rng.uniform(-bound, bound, (T, n)).astype(dtype))  # (T, n)
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
        """The task whose update is folded into the base while merged, else ``None``."""
        return self._merge_task if self.merged else None

    def _task_for(self, task) -> int:
        """The one task a dense view is for: ``task``; else the merged (or being-merged) task;
        else the single task that ``self.condition`` names."""
        if task is not None:
            return check_task(task, self.n_tasks)
        if self._merge_task is not None:
            return self._merge_task
        if self.active_condition is None:
            raise ValueError(f"{type(self).__name__}: ΔW is per task: pass task=t (or set a condition "
                             "that names one task)")
        cond = self.active_condition
        c = cond.detach().cpu().numpy() if hasattr(cond, "detach") else np.asarray(cond)
        ids = np.unique(task_rows(c, c.shape or (1,), self.n_tasks, type(self).__name__))
        if ids.size != 1:
            raise ValueError(f"{type(self).__name__}: the condition names tasks {ids.tolist()}; ΔW and "
                             "merge() are per task: pass task=t")
        return int(ids[0])

    def delta_weight(self, task=None) -> np.ndarray:
        r"""ΔW_t = s B_t Λ_t A (out, in) for ``task`` (default: see :meth:`merge`)."""
        t = self._task_for(task)
        pi = mixing_weights(self.w.data, self.config.temperature)
        Bt = task_up_projections(self.B.data, pi)[t]
        return self.scaling * (Bt @ self.Lambda.data[t] @ self.A.data)

    def _delta_weight_f64(self) -> np.ndarray:
        t = self._task_for(None)
        pi = mixing_weights(self.w.data.astype(np.float64), self.config.temperature)
        Bt = task_up_projections(self.B.data.astype(np.float64), pi)[t]
        return self.scaling * (Bt @ self.Lambda.data[t].astype(np.float64) @ self.A.data.astype(np.float64))

    def merge(self, task=None) -> None:
        """Fold task ``task``'s update into the base: ``W0 + s B_t Λ_t A``. Without ``task``, the
        one task the current condition names (a mixed condition is an error). The merged layer
        serves that task only: a forward whose condition names another task is refused."""
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

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.merged and self.active_condition is not None:
            x = check_last_dim(x, self.in_features)
            rows = task_rows(self.active_condition, x.shape[:-1], self.n_tasks, type(self).__name__)
            other = np.unique(rows[rows != self._merge_task])
            if other.size:
                raise ValueError(f"{type(self).__name__} is merged for task {self._merge_task}; the batch "
                                 f"names tasks {other.tolist()} too: unmerge() to serve a mixed batch")
        return super().forward(x)

    def _forward(self, x):
        rows = task_rows(self.active_condition, x.shape[:-1], self.n_tasks, type(self).__name__)
        b = None if self.base.bias is None else self.base.bias.data
        params = {"W": self.w0(), "b": b, "A": self.A.data, "Lambda": self.Lambda.data,
                  "B": self.B.data, "w": self.w.data}
        y, self._cache = multitask_lora_forward(x, params, rows, self.config)
        return y

    def _backward(self, dy):
        dx, grads = multitask_lora_backward(dy, self._pop_cache())
        for name in ("A", "Lambda", "B", "w"):
            getattr(self, name).accumulate(grads[name])
        return dx

    def extra_repr(self) -> str:
        return super().extra_repr() + f", merged_task={self.merged_task}"


def _shapes(cfg: MultiTaskLoRAConfig, in_features: int, out_features: int) -> dict:
    return {"A": (cfg.r, in_features), "Lambda": (cfg.n_tasks, cfg.r, cfg.r),
            "B": (cfg.n_up, out_features, cfg.r), "w": (cfg.n_tasks, cfg.n_up)}


SPEC = MethodSpec(
    name="multitask_lora",
    config=MultiTaskLoRAConfig,
    numpy="lowrank_ref.adapters.multitask_lora:MultiTaskLoRALinear",
    torch="lowrank_gpu.adapters.multitask_lora:MultiTaskLoRALinear",
    description="MTL-LoRA, Yang et al. 2024: ΔW_t = (α/r) B_t Λ_t A, B_t = Σ_i softmax(w_t/τ)_i B_i, per-row task",
    overridable=("r", "alpha"),
    file_metadata=lambda cfg: {"scaling": float(cfg.scaling), "scaling_rule": "alpha/r",
                               "temperature": float(cfg.temperature)},
    shapes=_shapes,
    # PEFT has no MTL-LoRA: no PEFT mapping
    example=lambda: Example(6, 5, MultiTaskLoRAConfig(r=3, alpha=6.0, n_tasks=3, n_up=2, temperature=0.5),
                            condition=1),
    compare={
        # on the four dialects of lowrank_ref.data.multitask, next to lora_shared / lora_per_task
        # (the same rank and targets); the reference scripts' n_up = 3 and τ = 0.1
        "multitask_lora": CompareRow(MultiTaskLoRAConfig(r=8, alpha=16, n_tasks=4, n_up=3, temperature=0.1),
                                     targets=("q", "v"), lr=1e-2, order=83, task="multitask"),
    },
)
