r"""Chapter 02's measurements: DoRA, the "double LoRA" reading of it, rsLoRA over ranks, and
layer-wise targets.

* :class:`DoubleLoRALinear`: the construction some write-ups call DoRA, two low-rank updates
  ``s1 B1 A1 + s2 B2 A2``. It is one LoRA of rank ``r1 + r2``:
  ``s1 B1 A1 + s2 B2 A2 = [s1 B1, s2 B2] [A1; A2]``; with ``s1 = s2 = s`` the factors are just
  stacked, the gradients are stacked too, and any element-wise optimizer (SGD, Adam, AdamW) takes
  the same steps. :meth:`DoubleLoRALinear.as_lora` gives that single LoRA.
* :func:`magnitude_direction`: the paper's §3 analysis (Liu et al. 2024, arXiv:2402.09353, Fig. 2):
  per output row, how far the length moved (``ΔM``) and how far the direction turned (``ΔD``).
* :func:`rank_sweep`, :func:`double_lora_vs_lora_vs_dora`, :func:`layerwise_targets`,
  :func:`magnitude_direction_run`: the runs on the built-in task behind the chapter's tables.
"""

from __future__ import annotations

import copy

import numpy as np

from lowrank_ref.adapters.base import AdapterLinear
from lowrank_ref.adapters.dora import DoRAConfig
from lowrank_ref.adapters.lora import LoRAConfig, LoRALinear, init_lora_A
from lowrank_ref.experiments.modes import quick_mode
from lowrank_ref.experiments.runner import experiment_main
from lowrank_ref.nn.module import Parameter, as_rng

__all__ = ["DoubleLoRALinear", "magnitude_direction", "quick_mode", "base_model", "finetune",
           "rank_sweep", "rank_sweep_ranks", "double_lora_vs_lora_vs_dora", "layerwise_targets", "magnitude_direction_run",
           "magnitude_direction_summary", "pretrained_losses",
           "dora_vs_lora_lr", "double_equals_lora_float64",
           "run_all", "main"]


class DoubleLoRALinear(AdapterLinear):
    r"""``y = x W0ᵀ + b + s1 (x A1ᵀ) B1ᵀ + s2 (x A2ᵀ) B2ᵀ``: two LoRA branches on one base.

    ``A_i (r_i, in)``, ``B_i (out, r_i)``, ``s_i`` from ``config_i`` (each inits as LoRA does:
    ``A_i`` random, ``B_i = 0``). Backward, per branch ``i`` with ``h_i = x A_iᵀ``:
    ``B̄_i = s_i ȳᵀ h_i``, ``Ā_i = s_i (ȳ B_i)ᵀ x``, and ``x̄ = ȳ W0 + Σ_i s_i (ȳ B_i) A_i``.
    No dropout (this is a teaching construction)."""

    CONFIG = LoRAConfig

    def __init__(self, base, config1: LoRAConfig, config2: LoRAConfig, rng=None):
        for name, c in (("config1", config1), ("config2", config2)):
            if not isinstance(c, LoRAConfig) or c.dropout != 0 or c.init == "pissa":
                raise TypeError(f"{name} must be a LoRAConfig without dropout or PiSSA init, got {c!r}")
        super().__init__(base, config1)
        self.config2 = config2
        rng = as_rng(rng)
        dtype = base.weight.data.dtype
        self.A1 = Parameter(init_lora_A(config1.r, self.in_features, config1.init, rng, dtype))  # (r1, in)
        self.B1 = Parameter(np.zeros((self.out_features, config1.r), dtype=dtype))  # (out, r1)
        self.A2 = Parameter(init_lora_A(config2.r, self.in_features, config2.init, rng, dtype))  # (r2, in)
        self.B2 = Parameter(np.zeros((self.out_features, config2.r), dtype=dtype))  # (out, r2)

    def _branches(self):
        return ((self.A1, self.B1, self.config.scaling), (self.A2, self.B2, self.config2.scaling))

    def delta_weight(self) -> np.ndarray:
        r"""``ΔW = s1 B1 A1 + s2 B2 A2`` (out, in): rank ≤ r1 + r2."""
        return sum(s * (B.data @ A.data) for A, B, s in self._branches())

    def _forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in): 2-D products go to BLAS
        y = x @ self.base.weight.data.T  # (N, out)
        if self.base.bias is not None:
            y += self.base.bias.data
        hs = []
        for A, B, s in self._branches():
            h = x @ A.data.T  # (N, r_i)
            y += (s * h) @ B.data.T  # + s_i x A_iᵀ B_iᵀ
            hs.append(h)
        self._cache = (x, lead, hs)
        return y.reshape(*lead, self.out_features)

    def _backward(self, dy):
        x2, lead, hs = self._pop_cache()  # x2 (N, in)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dx = dy2 @ self.base.weight.data  # ȳ W0
        for (A, B, s), h in zip(self._branches(), hs):
            dh = s * (dy2 @ B.data)  # h̄_i = s_i ȳ B_i   (N, r_i)
            B.accumulate(s * (dy2.T @ h))  # B̄_i = s_i ȳᵀ h_i
            A.accumulate(dh.T @ x2)  # Ā_i = h̄_iᵀ x
            dx += dh @ A.data
        return dx.reshape(*lead, self.in_features)

    def as_lora(self, alpha: float | None = None) -> LoRALinear:
        r"""The single LoRA of rank ``r1 + r2`` with the same ``ΔW``: ``A = [A1; A2]``,
        ``B = [s1 B1, s2 B2] / s``, where ``s`` is the new layer's scaling (``alpha`` defaults to
        ``s1 · (r1 + r2)``, so that ``s = s1`` and, when ``s1 = s2``, ``B = [B1, B2]``)."""
        r = self.config.r + self.config2.r
        s1, s2 = self.config.scaling, self.config2.scaling
        alpha = s1 * r if alpha is None else alpha
        cfg = LoRAConfig(r=r, alpha=alpha)
        from lowrank_ref.nn.linear import Linear

        b = None if self.base.bias is None else self.base.bias.data
        single = LoRALinear(Linear.from_arrays(self.base.weight.data, b), cfg, rng=np.random.default_rng(0))
        s = cfg.scaling
        single.A.data = np.concatenate([self.A1.data, self.A2.data], axis=0)  # [A1; A2]   (r, in)
        single.B.data = np.concatenate([self.B1.data * (s1 / s), self.B2.data * (s2 / s)], axis=1)  # (out, r)
        return single


def magnitude_direction(W0: np.ndarray, W: np.ndarray):
    r"""The paper's §3 measures between a pretrained weight and a fine-tuned one, row by row.

    With ``M_j = ‖W_j‖`` the length of output row j (over the input axis):

    .. math::
        \Delta M = \tfrac{1}{\text{out}} \textstyle\sum_j |M_j - M_{0,j}|, \qquad
        \Delta D = \tfrac{1}{\text{out}} \textstyle\sum_j \big(1 - \cos(W_j, W_{0,j})\big).

    (The paper writes ``W`` as ``(d, k)`` and takes column norms; its columns are our rows.)
    Returns ``(ΔM, ΔD)`` as floats.
    """
    W0 = np.asarray(W0, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    n0, n = np.linalg.norm(W0, axis=1), np.linalg.norm(W, axis=1)
    dM = float(np.mean(np.abs(n - n0)))
    cos = np.sum(W * W0, axis=1) / np.maximum(n * n0, np.finfo(np.float64).tiny)
    dD = float(np.mean(1.0 - cos))
    return dM, dD


# -- the runs on the built-in task -----------------------------------------------------------------
def base_model(quick: bool | None = None):
    """The package's pre-trained small GPT (NumPy, float32): :func:`lowrank_ref.models.load_pretrained`.

    In quick mode, if the shipped weights file is missing, a 60-step stand-in is trained instead
    of rebuilding the real one (a smoke test must not take minutes)."""
    from lowrank_ref import models

    quick = quick_mode() if quick is None else quick
    if quick and not (models.ASSET_DIR / models.WEIGHTS_FILE).exists():
        return models.pretrain(out=None, steps=60, progress=False)[0]
    return models.load_pretrained(progress=False)


def _replace_with_double(model, names, r: int, alpha: float, rng):
    """Swap each LoRA layer in ``names`` (rank ``r``, even) for a :class:`DoubleLoRALinear` of
    ranks ``r/2 + r/2``, each half given ``alpha`` (so each half's scaling is ``α/(r/2)``).

    The halves start from the LoRA layer's own ``A`` split in two (``[A1; A2] = A``), so the only
    difference from that LoRA layer is the scaling: the comparison is not blurred by the init."""
    if r % 2:
        raise ValueError(f"the double LoRA needs an even rank, got r={r}")
    half = LoRAConfig(r=r // 2, alpha=alpha)
    for n in names:
        layer = model.get_submodule(n)
        dbl = DoubleLoRALinear(layer.base, half, half, rng=rng)
        dbl.A1.data = layer.A.data[: r // 2].copy()
        dbl.A2.data = layer.A.data[r // 2 :].copy()
        model.set_submodule(n, dbl)


def finetune(base, config=None, targets=("q", "v"), steps: int = 300, lr: float = 1e-2, batch_size: int = 16,
             seed: int = 0, ranks=None, alphas=None, double: bool = False, record=None, record_every: int = 0,
             eval_windows: int | None = None) -> dict:
    """Copy ``base``, inject ``config`` at ``targets``, train on the dialect, evaluate.

    Returns a dict: ``dialect_loss`` / ``base_loss`` (held-out next-token loss: what it learned and
    what it forgot), ``dialect_accuracy``, ``trainable_params``, ``train_losses`` and, if
    ``record(model, step)`` is given, its results every ``record_every`` steps.

    The recipe is :func:`lowrank_ref.experiments.runner.finetune`'s (AdamW, cosine schedule with
    ``min(20, steps // 10)`` warmup steps, clip 1.0); ``record`` runs as its training hook.
    """
    from lowrank_ref.experiments.runner import finetune as run
    from lowrank_ref.inject import adapter_layers

    if eval_windows is None:
        eval_windows = 16 if quick_mode() else 128

    def prepare(model, res, rng):
        if double:
            _replace_with_double(model, res.replaced, config.r, config.alpha, rng)

    res = run(base, config, targets=targets, ranks=ranks, alphas=alphas, steps=steps, lr=lr,
              batch_size=batch_size, warmup=min(20, steps // 10), seed=seed, eval_windows=eval_windows,
              prepare=prepare, record=record, record_every=record_every, threads=1, keep_model=True)
    model = res["model"]
    out = {"method": "double_lora" if double else res["method"], "targets": res["targets"],
           "r": config.r, "alpha": config.alpha, "scaling": getattr(config, "scaling", None),
           "trainable_params": res["trainable_params"], "steps": steps}
    if record is not None:
        out["records"] = res["records"]
    out["delta_norm"] = float(sum(np.linalg.norm(layer.delta_weight().astype(np.float64))
                                  for layer in adapter_layers(model).values()))
    out.update(dialect_loss=res["target_loss_after"], dialect_accuracy=res["target_after"],
               base_loss=res["retained_loss_after"], train_losses=res["train_losses"], seconds=res["seconds"])
    out["model"] = model
    return out


def pretrained_losses(base, eval_windows: int | None = None) -> dict:
    """The un-adapted model's held-out losses and accuracies, evaluated as :func:`finetune` does:
    where every run of the chapter starts."""
    from lowrank_ref import data
    from lowrank_ref.models import blas_threads
    from lowrank_ref.train import evaluate

    task = data.builtin_task()
    if eval_windows is None:
        eval_windows = 16 if quick_mode() else 128
    with blas_threads(1):
        d = evaluate(base, task.dialect_heldout, max_windows=eval_windows)
        b = evaluate(base, task.base_heldout, max_windows=eval_windows)
    return {"dialect_loss": d["loss"], "dialect_accuracy": d["accuracy"], "base_loss": b["loss"],
            "base_accuracy": b["accuracy"]}


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "model"}


def rank_sweep_ranks(mode: str | None = None) -> tuple:
    """The ranks of :func:`rank_sweep` for a run size (default: the current mode)."""
    from lowrank_ref.experiments.modes import sized

    return sized(quick=(2, 8), classroom=(1, 4, 16, 64), full=(1, 2, 4, 8, 16, 32, 64), current=mode)


def rank_sweep(base, ranks=(1, 2, 4, 8, 16, 32, 64), alpha: float = 8.0, steps: int = 300, lr: float = 1e-2,
               targets=("q", "v"), seed: int = 0) -> list[dict]:
    r"""LoRA at each rank with ``s = α/r`` and with rsLoRA's ``s = α/√r`` (same ``α``); each row
    also has ``delta_norm``, how far training moved the weights (``Σ_layers ‖ΔW‖_F``)."""
    rows = []
    for rslora in (False, True):
        for r in ranks:
            cfg = LoRAConfig(r=r, alpha=alpha, rslora=rslora)
            row = _strip(finetune(base, cfg, targets=targets, steps=steps, lr=lr, seed=seed))
            row["rule"] = "alpha/sqrt(r)" if rslora else "alpha/r"
            rows.append(row)
    return rows


def double_lora_vs_lora_vs_dora(base, r: int = 8, alpha: float = 16.0, steps: int = 300, lr: float = 1e-2,
                                targets=("q", "v"), seeds=(0,)) -> list[dict]:
    """LoRA at rank r; the "double" r/2 + r/2 with each half given ``alpha`` (scaling ``2α/r``);
    the double with each half given ``α/2`` (scaling ``α/r``: LoRA's, so it *is* LoRA at rank r);
    LoRA at rank r with ``2α`` (the double's scaling); DoRA at rank r. Each seed gives one row
    per run (the doubles start from the same ``A`` as the LoRA of their seed)."""
    runs = [
        ("lora", LoRAConfig(r=r, alpha=alpha), False),
        ("double_lora (each half alpha)", LoRAConfig(r=r, alpha=alpha), True),
        ("double_lora (each half alpha/2)", LoRAConfig(r=r, alpha=alpha / 2), True),
        ("lora (alpha x2)", LoRAConfig(r=r, alpha=2 * alpha), False),
        ("dora", DoRAConfig(r=r, alpha=alpha), False),
    ]
    rows = []
    for seed in seeds:
        for label, cfg, double in runs:
            row = _strip(finetune(base, cfg, targets=targets, steps=steps, lr=lr, seed=seed, double=double))
            row.update(label=label, seed=seed)
            if double:
                row["scaling"] = cfg.alpha / (cfg.r // 2)
            rows.append(row)
    return rows


def dora_vs_lora_lr(base, lrs=(3e-3, 1e-2, 3e-2, 1e-1), r: int = 8, alpha: float = 16.0, steps: int = 300,
                    targets=("q", "v"), seed: int = 0) -> list[dict]:
    """LoRA and DoRA (both gradients) over learning rates: a method is compared at its own best lr."""
    rows = []
    for lr in lrs:
        for label, cfg in (("lora", LoRAConfig(r=r, alpha=alpha)), ("dora", DoRAConfig(r=r, alpha=alpha)),
                           ("dora (exact gradient)", DoRAConfig(r=r, alpha=alpha, detach_norm=False))):
            row = _strip(finetune(base, cfg, targets=targets, steps=steps, lr=lr, seed=seed))
            row.update(label=label, lr=lr)
            rows.append(row)
    return rows


def double_equals_lora_float64(base, r: int = 8, alpha: float = 16.0, steps: int = 30, lr: float = 1e-2,
                               targets=("q", "v"), seed: int = 0) -> dict:
    """In float64, LoRA at rank r and the double with halves given α/2 (same A) train to the same
    weights: the largest difference of their training losses over ``steps`` steps."""
    b64 = copy.deepcopy(base).astype(np.float64)
    a = finetune(b64, LoRAConfig(r=r, alpha=alpha), targets=targets, steps=steps, lr=lr, seed=seed)
    d = finetune(b64, LoRAConfig(r=r, alpha=alpha / 2), targets=targets, steps=steps, lr=lr, seed=seed, double=True)
    return {"steps": steps, "max_abs_loss_diff": float(np.max(np.abs(np.subtract(a["train_losses"], d["train_losses"])))),
            "dialect_loss": [a["dialect_loss"], d["dialect_loss"]]}


def layerwise_targets(base, r: int = 8, alpha: float = 16.0, steps: int = 300, lr: float = 1e-2,
                      seed: int = 0) -> list[dict]:
    """LoRA on more and more layers, at a fixed rank, and "all" at a rank that matches q,v's
    parameter count; plus per-block targeting (only the first or only the last block)."""
    runs = [("q", dict(targets="q")), ("q,v", dict(targets=("q", "v"))), ("attn", dict(targets="attn")),
            ("mlp", dict(targets="mlp")), ("all", dict(targets="all")),
            ("all, rank matched to q,v params", dict(targets="all", r=max(1, r // 4))),
            ("block 0 only (attn+mlp)", dict(targets=("blocks.0.*",))),
            ("last block only (attn+mlp)", dict(targets=("blocks.1.*",))),
            ("all, rank 2*r on mlp", dict(targets="all", ranks={"mlp": 2 * r}))]
    rows = []
    for label, kw in runs:
        kw = dict(kw)
        rr = kw.pop("r", r)
        row = _strip(finetune(base, LoRAConfig(r=rr, alpha=alpha * rr / r), steps=steps, lr=lr, seed=seed, **kw))
        row["label"] = label
        rows.append(row)
    return rows


def _md_record(model, step):
    """(ΔM, ΔD) per adapted layer, and per row, against the pre-trained W0."""
    from lowrank_ref.inject import adapter_layers

    out = {"step": step, "layers": {}}
    for name, layer in adapter_layers(model).items():
        W0 = layer.base.weight.data.astype(np.float64)
        W = layer.merged_weight().astype(np.float64)
        n0, n = np.linalg.norm(W0, axis=1), np.linalg.norm(W, axis=1)
        dM, dD = magnitude_direction(W0, W)
        out["layers"][name] = {"dM": dM, "dD": dD, "row_dM": np.abs(n - n0).tolist(),
                               "row_dD": (1 - np.sum(W * W0, 1) / (n * n0)).tolist()}
    return out


def magnitude_direction_run(base, r: int = 8, alpha: float = 16.0, steps: int = 300, lr: float = 1e-2,
                            every: int = 50, targets=("q", "v"), seed: int = 0) -> dict:
    r"""The paper's Fig. 2 analysis on the built-in task: LoRA and DoRA trained alike, ``(ΔD, ΔM)``
    recorded for every adapted layer every ``every`` steps.

    Returns ``{method: {"points": [(step, layer, ΔD, ΔM)], "corr": ..., "row_corr": ...}}`` where
    ``corr`` is the Pearson correlation of ΔD and ΔM over (layer, checkpoint) points, and
    ``row_corr`` the mean over layers of the correlation over output rows at the last checkpoint
    (does a row that turned more also change its length more?)."""
    result = {}
    for name, cfg in (("lora", LoRAConfig(r=r, alpha=alpha)), ("dora", DoRAConfig(r=r, alpha=alpha))):
        run = finetune(base, cfg, targets=targets, steps=steps, lr=lr, seed=seed, record=_md_record,
                       record_every=every)
        pts = [(rec["step"], ln, v["dD"], v["dM"]) for rec in run["records"][1:] for ln, v in rec["layers"].items()]
        dD = np.array([p[2] for p in pts])
        dM = np.array([p[3] for p in pts])
        last = run["records"][-1]["layers"]
        row_corr = [float(np.corrcoef(v["row_dD"], v["row_dM"])[0, 1]) for v in last.values()]
        result[name] = {"points": pts, "corr": float(np.corrcoef(dD, dM)[0, 1]) if len(pts) > 2 else float("nan"),
                        "row_corr": float(np.mean(row_corr)), "dialect_loss": run["dialect_loss"],
                        "base_loss": run["base_loss"], "last": last}
    return result


def magnitude_direction_summary(by_seed: dict) -> dict:
    """``{method: {"corr": [per seed], "row_corr": [...], "corr_mean", "corr_std", "row_corr_mean",
    "row_corr_std"}}`` from ``{seed: magnitude_direction_run(...)}`` (std: population, ``ddof=0``)."""
    seeds = sorted(by_seed)
    out = {"seeds": seeds}
    for method in by_seed[seeds[0]]:
        row = {}
        for key in ("corr", "row_corr", "dialect_loss", "base_loss"):
            vals = [float(by_seed[s][method][key]) for s in seeds]
            row[key] = vals
            row[key + "_mean"] = float(np.mean(vals))
            row[key + "_std"] = float(np.std(vals))
        out[method] = row
    return out


def run_all(quick: bool | None = None, steps: int | None = None) -> dict:
    """Every measurement of chapter 02, as plain data (what ``main`` writes to JSON)."""
    quick = quick_mode() if quick is None else quick
    steps = (20 if quick else 300) if steps is None else steps
    base = base_model(quick)
    ranks = (2, 8) if quick else (1, 2, 4, 8, 16, 32, 64)
    md_seeds = {}
    for seed in (0,) if quick else (0, 1, 2):
        md = magnitude_direction_run(base, steps=steps, every=max(steps // 6, 1), seed=seed)
        for v in md.values():
            v.pop("last")
        md_seeds[seed] = md
    return {
        "steps": steps,
        "pretrained": pretrained_losses(base),
        "rank_sweep": rank_sweep(base, ranks=ranks, steps=steps),
        "double_lora": double_lora_vs_lora_vs_dora(base, steps=steps, seeds=(0,) if quick else (0, 1, 2)),
        "layerwise": layerwise_targets(base, steps=steps),
        "dora_vs_lora_lr": dora_vs_lora_lr(base, steps=steps, lrs=(1e-2,) if quick else (3e-3, 1e-2, 3e-2, 1e-1)),
        "double_equals_lora_float64": double_equals_lora_float64(base, steps=min(steps, 30)),
        "magnitude_direction": md_seeds[0],
        "magnitude_direction_seeds": magnitude_direction_summary(md_seeds),
    }


def _without_losses(res: dict) -> dict:
    for row in res["rank_sweep"] + res["double_lora"] + res["layerwise"] + res["dora_vs_lora_lr"]:
        row.pop("train_losses")
    return res


def main(argv=None) -> int:
    return experiment_main(lambda a: run_all(quick=a.quick, steps=a.steps), argv,
                           prog="python -m lowrank_ref.experiments.dora_experiments",
                           description="Chapter 02's measurements (DoRA, double LoRA, rsLoRA, layer-wise)",
                           default_out="runs/dora_experiments.json",
                           add_arguments=lambda p: p.add_argument("--steps", type=int, default=None),
                           finish=_without_losses)


if __name__ == "__main__":
    raise SystemExit(main())
