r"""HyperLoRA: a hypernetwork, shared across layers, generates each layer's LoRA factors from a
condition (a task id). After HyperFormer++ (Mahabadi et al. 2021, arXiv:2106.04489: one
hypernetwork for all layers, fed a task embedding plus layer-id and position embeddings) and
Text-to-LoRA (Charakorn et al. 2025, arXiv:2506.06105: an MLP trunk over task, depth and module-type
embeddings, linear heads that emit ``A`` and ``B``, head weights zero and head bias a standard LoRA
init). Facts: ``/work/shared/REFERENCES.md`` §7. Chapter 08 derives the backward.

For a layer of module type ``τ`` (the layer name's last part: ``q``, ``v``) and condition ``c``::

    z    = [T_c ; M_τ ; e]                  (d_t + d_m + d_l,)  task, module-type, layer embedding
    p    = W1 z + b1                         (hidden,)
    g    = SiLU(p) = p ⊙ σ(p)                (hidden,)
    A(c) = reshape(H_A g + h_A, (r, in))     the A head
    B(c) = reshape(H_B g + h_B, (out, r))    the B head
    y    = x W0ᵀ + b0 + s (x A(c)ᵀ) B(c)ᵀ    s = α/r (α/√r with rsLoRA)

Shared by every layer of the model (``SPEC.shared``, ``model.lowrank_shared.hyperlora``, saved
once per file): the task embeddings ``T (n_tasks, d_t)``, one module-type embedding
``M_τ (d_m,)`` per type, and the trunk ``W1 (hidden, d_z)``, ``b1 (hidden,)``. Each layer's own:
its embedding ``e (d_l,)`` and its two heads ``H_A (r·in, hidden)``, ``h_A (r·in,)``,
``H_B (out·r, hidden)``, ``h_B (out·r,)``. (Text-to-LoRA shares one head per module type across
layers; here each layer has its own heads, which costs ``r·(in+out)·hidden`` per layer and lets
the per-layer tensors alone move ``ΔW``.)

**Init (bias-HyperInit, Text-to-LoRA's ``match_lora_init``):** ``H_A = H_B = 0``,
``h_A = vec(A0)`` with ``A0`` LoRA's Kaiming-uniform init, ``h_B = 0``: every condition generates
the same ``A0`` and ``B = 0``, so ``ΔW = 0`` for every task at step 0. ``T``, ``M``, ``e`` are
``N(0, 1)``, ``W1``, ``b1`` ``U(±1/√d_z)`` (PyTorch's defaults), drawn from ``hyper_seed``.

**The condition** is per batch row: ``GPT.forward(idx, cond=...)`` hands the rows' task ids to
the layer (``layer.condition``, an int64 array ``(B,)``; ``x`` is then ``(B, ..., in)``). An
integer condition (``layer.condition``, or the constructor's ``condition=``, the layer's
``default_condition`` used when a forward brings none) applies to every row. Rows of one
condition are computed together: the hypernetwork runs once per distinct condition in the
batch, then each group is an ordinary LoRA product (the gather–matmul of a mixed batch). **Generate once, merge:** ``merge(condition=c)`` folds ``s B(c) A(c)`` into ``W0``
(a plain linear layer afterwards, zero added latency); a merged layer refuses rows of any other
condition.

Backward (upstream ȳ; rows of condition ``c`` gathered; derived in chapter 08)::

    Ā(c) = s Σ_rows (ȳ B(c))ᵀ x            B̄(c) = s Σ_rows ȳᵀ (x A(c)ᵀ)        LoRA's own
    x̄    = ȳ W0 + s (ȳ B(c)) A(c)
    H̄_A += vec(Ā) gᵀ   h̄_A += vec(Ā)       H̄_B += vec(B̄) gᵀ   h̄_B += vec(B̄)     the heads
    ḡ    = H_Aᵀ vec(Ā) + H_Bᵀ vec(B̄)
    p̄    = ḡ ⊙ σ(p) (1 + p (1 − σ(p)))                                          SiLU'
    W̄1  += p̄ zᵀ        b̄1 += p̄        z̄ = W1ᵀ p̄
    T̄_c += z̄[:d_t]     M̄_τ += z̄[d_t : d_t+d_m]     ē += z̄[d_t+d_m :]

summed over the distinct conditions of the batch (and, for the shared tensors, over layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.lora import init_lora_A
from lowrank_ref.adapters.vera import SharedTensors, check_int, one_value, own_shared
from lowrank_ref.config import ScaledLowRankConfig, scaling_metadata
from lowrank_ref.data.multitask import TASKS
from lowrank_ref.inject import as_rng
from lowrank_ref.nn.module import Parameter, array_module
from lowrank_ref.registry import CompareRow, Example, MethodSpec, PerBackend

__all__ = ["HyperLoRAConfig", "HyperLoRALinear", "hyper_generate", "hyper_generate_backward",
           "hyperlora_forward", "hyperlora_backward", "check_condition_ids", "module_type",
           "shared_init", "build_shared", "SPEC"]

OWN = ("e", "H_A", "h_A", "H_B", "h_B")  # each layer's own tensors, in file order


@dataclass(frozen=True)
class HyperLoRAConfig(ScaledLowRankConfig):
    r"""HyperLoRA: ``A(c)``, ``B(c)`` generated from a task embedding by a shared MLP.

    Args:
        r, alpha, rslora: LoRA's rank and scale ``s`` (``dropout`` must stay 0).
        n_tasks: how many conditions (task ids ``0 .. n_tasks-1``) the task-embedding table holds.
        task_dim, module_dim, layer_dim: sizes of the task, module-type and layer embeddings.
        hidden: the trunk's width (the heads' input).
        hyper_seed: the seed of the shared tensors' draw (the same in both backends).
    """

    r: int = 4
    alpha: float = 8.0
    n_tasks: int = 4
    task_dim: int = 8
    module_dim: int = 4
    layer_dim: int = 4
    hidden: int = 8
    hyper_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.dropout != 0.0:
            raise ValueError(f"dropout is not supported by HyperLoRA (it must be 0.0), got {self.dropout}")
        for f in ("n_tasks", "task_dim", "module_dim", "layer_dim", "hidden"):
            v = check_int(getattr(self, f), f)
            if v <= 0:
                raise ValueError(f"{f} must be a positive integer, got {v}")
            object.__setattr__(self, f, v)
        seed = check_int(self.hyper_seed, "hyper_seed")
        if seed < 0:
            raise ValueError(f"hyper_seed must be >= 0, got {seed}")
        object.__setattr__(self, "hyper_seed", seed)

    @property
    def z_dim(self) -> int:
        """The trunk's input size, ``d_t + d_m + d_l``."""
        return self.task_dim + self.module_dim + self.layer_dim


def module_type(layer_name: str) -> str:
    """The module type of a layer (its name's last part, ``"q"``); ``"layer"`` for a lone layer."""
    return layer_name.rsplit(".", 1)[-1] or "layer"


# --- conditions -------------------------------------------------------------------------------
def check_condition_ids(cond, n_tasks: int, owner: str = "HyperLoRALinear"):
    """``cond`` as an int (one condition for every row) or an int64 array ``(B,)``, each in
    ``[0, n_tasks)``; a ``ValueError`` for a missing or out-of-range one, ``TypeError`` for floats."""
    if cond is None:
        raise ValueError(f"{owner} needs a condition (a task id): call model.forward(idx, cond=...), "
                         f"build the layer with condition=, or set layer.condition")
    if isinstance(cond, (bool, np.bool_)):
        raise TypeError(f"condition must be an integer task id or one per batch row, got {cond!r}")
    if isinstance(cond, (int, np.integer)):
        c = int(cond)
        if not 0 <= c < n_tasks:
            raise ValueError(f"condition id {c} is out of range: task ids are 0 .. {n_tasks - 1} (n_tasks={n_tasks})")
        return c
    arr = np.asarray(cond.detach().cpu().numpy() if hasattr(cond, "detach") else cond)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"condition must be an integer task id or a 1-D integer array (one per row), "
                        f"got dtype {arr.dtype} shape {arr.shape}")
    bad = arr[(arr < 0) | (arr >= n_tasks)]
    if bad.size:
        raise ValueError(f"condition id {int(bad[0])} is out of range: task ids are 0 .. {n_tasks - 1} "
                         f"(n_tasks={n_tasks})")
    return arr.astype(np.int64)


def condition_groups(cond, x_shape: tuple):
    """``[(c, rows)]``: each distinct condition and the batch rows that carry it (``rows`` is
    ``None`` for an int condition: every row). A per-row condition needs ``x (B, ..., in)``."""
    if isinstance(cond, int):
        return [(cond, None)]
    if len(x_shape) < 2 or x_shape[0] != cond.shape[0]:
        raise ValueError(f"the condition has one id per batch row ({cond.shape[0]} rows) but x has shape "
                         f"{tuple(x_shape)}: x must be (B, ..., in) with B = {cond.shape[0]}")
    return [(int(c), np.flatnonzero(cond == c)) for c in np.unique(cond)]


# --- the hypernetwork ------------------------------------------------------------------------
class GenCache(NamedTuple):
    """What :func:`hyper_generate_backward` needs (``U`` distinct conditions)."""

    c: np.ndarray  # (U,) the condition ids
    z: np.ndarray  # (U, d_z)
    p: np.ndarray  # (U, hidden) pre-activation
    g: np.ndarray  # (U, hidden) SiLU(p)
    params: dict
    dims: tuple  # (d_t, d_m, r, in, out)


def _sigmoid(p):
    xp = array_module(p)
    return 1.0 / (1.0 + xp.exp(-p))


def hyper_generate(c, params: dict, r: int, in_features: int, out_features: int):
    r"""``A(c) (U, r, in)``, ``B(c) (U, out, r)`` for the condition ids ``c (U,)``, and a cache.

    ``params``: ``T (n_tasks, d_t)``, ``M (d_m,)`` (this layer's module type), ``e (d_l,)``,
    ``W1 (hidden, d_z)``, ``b1 (hidden,)``, ``H_A (r·in, hidden)``, ``h_A (r·in,)``,
    ``H_B (out·r, hidden)``, ``h_B (out·r,)``. The module docstring has the formulas."""
    xp = array_module(params["W1"])
    T, M, e = params["T"], params["M"], params["e"]
    U = len(c)
    z = xp.concatenate([T[c], xp.broadcast_to(M, (U, M.shape[0])), xp.broadcast_to(e, (U, e.shape[0]))],
                       axis=1)  # z = [T_c ; M_τ ; e]   (U, d_z)
    p = z @ params["W1"].T + params["b1"]  # p = W1 z + b1   (U, hidden)
    g = p * _sigmoid(p)  # g = SiLU(p)
    A = (g @ params["H_A"].T + params["h_A"]).reshape(U, r, in_features)  # A(c) = H_A g + h_A
    B = (g @ params["H_B"].T + params["h_B"]).reshape(U, out_features, r)  # B(c) = H_B g + h_B
    return A, B, GenCache(np.asarray(c), z, p, g, params, (T.shape[1], M.shape[0], r, in_features, out_features))


def hyper_generate_backward(dA, dB, cache: GenCache) -> dict:
    r"""Gradients of every hypernetwork tensor from ``Ā (U, r, in)``, ``B̄ (U, out, r)``."""
    c, z, p, g, P, (d_t, d_m, r, inn, out) = cache
    xp = array_module(z)
    U = len(c)
    dA2, dB2 = dA.reshape(U, r * inn), dB.reshape(U, out * r)
    grads = {"H_A": dA2.T @ g, "h_A": dA2.sum(axis=0),  # H̄_A = Σ_c vec(Ā) gᵀ,  h̄_A = Σ_c vec(Ā)
             "H_B": dB2.T @ g, "h_B": dB2.sum(axis=0)}
    dg = dA2 @ P["H_A"] + dB2 @ P["H_B"]  # ḡ = H_Aᵀ vec(Ā) + H_Bᵀ vec(B̄)   (U, hidden)
    sig = _sigmoid(p)
    dp = dg * sig * (1.0 + p * (1.0 - sig))  # SiLU'(p) = σ(p)(1 + p(1 − σ(p)))
    grads["W1"] = dp.T @ z  # W̄1 = Σ_c p̄ zᵀ
    grads["b1"] = dp.sum(axis=0)
    dz = dp @ P["W1"]  # z̄ = W1ᵀ p̄   (U, d_z)
    dT = xp.zeros_like(P["T"])
    for k in range(U):  # the condition ids are distinct: one row of T each
        dT[int(c[k])] += dz[k, :d_t]
    grads["T"] = dT
    grads["M"] = dz[:, d_t : d_t + d_m].sum(axis=0)
    grads["e"] = dz[:, d_t + d_m :].sum(axis=0)
    return grads


# --- the layer's forward and backward, given the generated factors ---------------------------
class HyperCache(NamedTuple):
    x: np.ndarray
    W: np.ndarray  # W0 (out, in)
    A: np.ndarray  # (U, r, in)
    B: np.ndarray  # (U, out, r)
    groups: list  # [(c, rows or None)]
    h: list  # per group: x A(c)ᵀ
    s: float
    gen: GenCache


def hyperlora_forward(x, cond, params: dict, cfg: HyperLoRAConfig):
    r"""y = x W0ᵀ + b0 + s (x A(c)ᵀ) B(c)ᵀ, the rows of each condition together.

    ``x (..., in)`` (``(B, ..., in)`` for a per-row ``cond``); ``cond``: checked ids
    (:func:`check_condition_ids`); ``params``: the hypernetwork's (:func:`hyper_generate`) plus
    ``W (out, in)`` and ``b (out,)`` or None. Returns ``(y, cache)``."""
    W, b = params["W"], params["b"]
    out, inn = W.shape
    groups = condition_groups(cond, x.shape)
    c = np.array([g[0] for g in groups], dtype=np.int64)
    A, B, gen = hyper_generate(c, params, cfg.r, inn, out)
    s = cfg.scaling
    y = x @ W.T  # (..., out)
    if b is not None:
        y = y + b
    hs = []
    for k, (_, rows) in enumerate(groups):
        xk = x if rows is None else x[rows]
        h = xk @ A[k].T  # x A(c)ᵀ   (rows, ..., r)
        upd = s * (h @ B[k].T)  # s (x A(c)ᵀ) B(c)ᵀ
        if rows is None:
            y = y + upd
        else:
            y[rows] += upd
        hs.append(h)
    return y, HyperCache(x, W, A, B, groups, hs, s, gen)


def hyperlora_backward(dy, cache: HyperCache):
    r"""``(x̄, grads)``: ``grads`` holds every hypernetwork tensor's gradient; ``W``, ``b`` None."""
    x, W, A, B, groups, hs, s, gen = cache
    xp = array_module(x)
    dx = dy @ W  # ȳ W0
    dA, dB = xp.zeros_like(A), xp.zeros_like(B)
    for k, (_, rows) in enumerate(groups):
        xk, dyk, h = (x, dy, hs[k]) if rows is None else (x[rows], dy[rows], hs[k])
        dh = s * (dyk @ B[k])  # h̄ = s ȳ B(c)   (rows, ..., r)
        dxk = dh @ A[k]  # s (ȳ B(c)) A(c)
        if rows is None:
            dx = dx + dxk
        else:
            dx[rows] += dxk
        dA[k] = dh.reshape(-1, dh.shape[-1]).T @ xk.reshape(-1, xk.shape[-1])  # Ā = Σ h̄ᵀ x
        dB[k] = s * dyk.reshape(-1, dyk.shape[-1]).T @ h.reshape(-1, h.shape[-1])  # B̄ = s Σ ȳᵀ h
    grads = hyper_generate_backward(dA, dB, gen)
    grads.update({"W": None, "b": None})
    return dx, grads


# --- the shared state ------------------------------------------------------------------------
def shared_init(configs: dict, shapes: dict) -> dict:
    """The shared tensors (float64), ``{"T", "M_<type>", ..., "W1", "b1"}``, from the configs'
    one ``hyper_seed`` (both backends' builders call this)."""
    for f in ("n_tasks", "task_dim", "module_dim", "layer_dim", "hidden", "hyper_seed"):
        one_value(configs, f, "HyperLoRA")
    cfg = next(iter(configs.values()))
    rng = np.random.default_rng(cfg.hyper_seed)
    out = {"T": rng.standard_normal((cfg.n_tasks, cfg.task_dim))}
    for t in sorted({module_type(n) for n in shapes}):
        out[f"M_{t}"] = rng.standard_normal(cfg.module_dim)
    bound = 1.0 / math.sqrt(cfg.z_dim)
    out["W1"] = rng.uniform(-bound, bound, (cfg.hidden, cfg.z_dim))
    out["b1"] = rng.uniform(-bound, bound, cfg.hidden)
    return out


def build_shared(configs: dict, shapes: dict, rng=None) -> SharedTensors:
    """The hypernetwork's shared, trained tensors (:func:`shared_init`); the engine's ``rng`` is
    not used (the seed is the config's, so both backends build the same)."""
    return SharedTensors(shared_init(configs, shapes), {}, save_frozen=True)


def own_init(cfg: HyperLoRAConfig, in_features: int, out_features: int, rng) -> dict:
    """A layer's own tensors (float64): ``e ~ N(0, 1)``, heads' weights 0, ``h_A = vec(A0)``, ``h_B = 0``."""
    e = rng.standard_normal(cfg.layer_dim)
    A0 = init_lora_A(cfg.r, in_features, "kaiming", rng, np.float64)
    return {"e": e, "H_A": np.zeros((cfg.r * in_features, cfg.hidden)), "h_A": A0.reshape(-1),
            "H_B": np.zeros((out_features * cfg.r, cfg.hidden)), "h_B": np.zeros(out_features * cfg.r)}


class HyperLoRALinear(AdapterLinear):
    """A frozen :class:`~lowrank_ref.nn.Linear` plus ``s B(c) A(c)``, generated per condition.

    Args:
        base: the pretrained layer (frozen by this constructor).
        config: a :class:`HyperLoRAConfig`.
        rng: draws the layer's own init (its embedding and ``A0``).
        shared: the model's hypernetwork (a ``SharedRef``, passed by the engine; its layer name
            gives the module type). Without it the layer has a hypernetwork of its own.
        condition: the layer's default task id (``default_condition``), used for every row when a
            forward brings no condition (``None``: the model's forward must pass ``cond=``).

    ``layer.condition`` is the current forward's condition (``GPT.forward(idx, cond=...)`` sets
    it, ``None`` without ``cond``); an int or one id per row. Without one, ``default_condition``.
    """

    CONFIG = HyperLoRAConfig
    takes_condition = True

    def __init__(self, base, config: HyperLoRAConfig | None = None, rng=None, shared=None, condition=None):
        config = self.check_config(config)
        super().__init__(base, config)
        rng = as_rng(rng)
        if condition is not None:
            condition = check_condition_ids(condition, config.n_tasks)
            if not isinstance(condition, int):
                raise TypeError("condition= must be one integer task id (per-row ids come with forward)")
        if shared is None:  # a lone layer: a hypernetwork of its own
            shared = own_shared(self, "hyperlora", build_shared({"": config}, {"": (self.out_features, self.in_features)}))
        self.shared = shared
        self.module_type = module_type(shared.layer)
        for n, want in (("T", (config.n_tasks, config.task_dim)), (f"M_{self.module_type}", (config.module_dim,)),
                        ("W1", (config.hidden, config.z_dim))):
            got = tuple(getattr(shared, n).shape)
            if got != want:
                raise ValueError(f"the shared hypernetwork's {n} has shape {got}, this layer's config needs {want}")
        W = base.weight.data if not self.quantized else np.zeros(0, self.weight_dtype)
        xp = array_module(W)
        for n, v in own_init(config, self.in_features, self.out_features, rng).items():
            setattr(self, n, Parameter(xp.asarray(v, dtype=self.weight_dtype)))
        self.default_condition = condition  # used when a forward brings no condition
        self.condition = None  # the current forward's (set by GPT.forward(idx, cond=...))
        self.merged_condition: int | None = None
        self._merging: int | None = None

    # the hypernetwork's tensors for this layer
    def _condition(self):
        """The condition the next forward uses: the forward's own, else the layer's default."""
        return self.default_condition if self.condition is None else self.condition

    def _hyper(self) -> dict:
        sh = self.shared
        out = {"T": sh.T, "M": getattr(sh, f"M_{self.module_type}"), "W1": sh.W1, "b1": sh.b1}
        out.update({n: self._params[n] for n in OWN})
        return out

    def _arrays(self) -> dict:
        return {n: p.data for n, p in self._hyper().items()}

    def _fixed_condition(self, condition, what: str) -> int:
        """One condition id for ``what`` (``merge``, ``delta_weight``): ``condition``, else the
        layer's own when it is one id (or a per-row array holding one id)."""
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

    def generate(self, condition=None) -> tuple[np.ndarray, np.ndarray]:
        """``(A(c) (r, in), B(c) (out, r))`` for one condition (the layer's own by default)."""
        c = self._fixed_condition(condition, "generate")
        A, B, _ = hyper_generate(np.array([c]), self._arrays(), self.r, self.in_features, self.out_features)
        return A[0], B[0]

    def delta_weight(self, condition=None) -> np.ndarray:
        r"""ΔW(c) = s B(c) A(c), (out, in), for one condition."""
        c = self._merging if self._merging is not None else self._fixed_condition(condition, "delta_weight")
        A, B = self.generate(c)
        return self.scaling * (B @ A)

    def _delta_weight_f64(self) -> np.ndarray:
        A, B = self.generate(self._merging)
        return self.scaling * (B.astype(np.float64) @ A.astype(np.float64))

    def merge(self, condition=None) -> None:
        """Generate ``A(c)``, ``B(c)`` once and fold ``s B(c) A(c)`` into ``W0`` (for condition
        ``condition``, else the layer's own one). Rows of another condition are refused until
        ``unmerge()``."""
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

    def forward(self, x):
        if self.merged and self._condition() is not None:
            c = check_condition_ids(self._condition(), self.config.n_tasks, type(self).__name__)
            ids = {c} if isinstance(c, int) else set(np.unique(c).tolist())
            if ids != {self.merged_condition}:
                raise ValueError(f"{type(self).__name__} is merged for condition {self.merged_condition}; "
                                 f"got condition(s) {sorted(ids)}: unmerge() to run other or mixed conditions")
        return super().forward(x)

    def _forward(self, x):
        cond = check_condition_ids(self._condition(), self.config.n_tasks, type(self).__name__)
        condition_groups(cond, x.shape)  # a row-count mismatch is refused before any work
        params = self._arrays()
        params["W"] = self.w0()
        params["b"] = None if self.base.bias is None else self.base.bias.data
        y, self._cache = hyperlora_forward(x, cond, params, self.config)
        return y

    def _backward(self, dy):
        dx, g = hyperlora_backward(dy, self._pop_cache())
        for n, p in self._hyper().items():
            p.accumulate(g[n])  # the shared tensors: every layer adds its share
        return dx


def _shapes(cfg: HyperLoRAConfig, in_features: int, out_features: int) -> dict:
    return {"e": (cfg.layer_dim,), "H_A": (cfg.r * in_features, cfg.hidden), "h_A": (cfg.r * in_features,),
            "H_B": (out_features * cfg.r, cfg.hidden), "h_B": (out_features * cfg.r,)}


def _metadata(cfg: HyperLoRAConfig) -> dict:
    return {**scaling_metadata(cfg), "n_tasks": cfg.n_tasks}


SPEC = MethodSpec(
    name="hyperlora",
    config=HyperLoRAConfig,
    numpy="lowrank_ref.adapters.hyperlora:HyperLoRALinear",
    torch="lowrank_gpu.adapters.hyperlora:HyperLoRALinear",
    description="HyperLoRA (HyperFormer++ / Text-to-LoRA): A(c), B(c) generated per task by an MLP shared across layers",
    overridable=(),
    file_metadata=_metadata,
    shapes=_shapes,
    # a fixed condition (task 2 of 3) for the layer-level contract; the model passes cond= per row
    example=lambda: Example(6, 5, HyperLoRAConfig(r=2, alpha=4, n_tasks=3, task_dim=3, module_dim=2,
                                                  layer_dim=2, hidden=4), kwargs={"condition": 2}),
    shared=PerBackend("lowrank_ref.adapters.hyperlora:build_shared", "lowrank_gpu.adapters.hyperlora:build_shared"),
    compare={
        # the multi-task rows (chapter 08): one hypernetwork for the four dialects, task ids as cond
        "hyperlora": CompareRow(HyperLoRAConfig(r=4, alpha=8, n_tasks=len(TASKS)), targets=("q", "v"),
                                lr=1e-2, order=82, task="multitask"),
    },
)
