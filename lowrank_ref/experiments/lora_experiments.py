r"""Chapter 01's measurements: counting LoRA's parameters, rank and alpha, which layers to adapt.

* :func:`bert_base_parameters` and :func:`bert_lora_counts`: the parameter counts of a BERT-base
  shape (Devlin et al. 2019: 12 layers, ``d = 768``, FFN 3072, a 30,522-token vocabulary, 512
  positions, 2 segment types) and of LoRA on it, to check the claim "109M trainable parameters
  down to about 5,000" term by term.
* :func:`finetune`: one LoRA run on the built-in task, set up as ``lowrank-ref compare`` sets up
  its ``lora`` row (same model, data, steps, batch, schedule, evaluation).
* :func:`rank_alpha_sweep`: rank against three scaling rules that agree at ``r = 8``:
  ``alpha = 2r`` (``s = 2`` at every rank), a fixed ``alpha = 16`` with ``s = alpha/r``, and
  rsLoRA's ``s = alpha/sqrt(r)`` (Kalajdzievski 2023, arXiv:2312.03732) with ``alpha = 2 sqrt(8)``.
* :func:`scaling_lr_grid`: ``s`` against the learning rate at a fixed rank (with Adam, ``s``
  acts much like a learning-rate multiplier).
* :func:`target_sets`: ``q, v`` only vs all attention projections vs the MLP vs everything,
  at the same rank and at a matched parameter budget.
* :func:`init_comparison`: Kaiming-uniform ``A`` (the reference code's) vs Gaussian ``A``.
* :func:`baselines`: full fine-tuning, BitFit and LoRA through :func:`run_compare`.
* :func:`naive_unmerge_drift`: what unmerging by subtracting ``s B A`` (instead of restoring the
  kept ``W0``) does to ``W0`` over repeated merge/unmerge cycles in a low-precision dtype.

``python -m lowrank_ref.experiments.lora_experiments [--quick] [--out FILE]`` runs them all and
writes JSON. ``LOWRANK_REF_QUICK=1`` (the notebook tests set it) shrinks every run.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from lowrank_ref.adapters.lora import LoRAConfig
from lowrank_ref.experiments.modes import quick_mode
from lowrank_ref.experiments.runner import experiment_main

__all__ = ["BERT_BASE", "bert_base_parameters", "lora_parameters", "bert_lora_counts", "quick_mode",
           "settings", "finetune", "summarize", "rank_alpha_sweep", "scaling_lr_grid", "target_sets",
           "init_comparison", "reference", "compare_lr", "baselines", "run_all", "main", "RS_ALPHA", "EXPERIMENTS", "tables", "join_results",
           "naive_unmerge_drift"]

# -- counting --------------------------------------------------------------------------------------
BERT_BASE = {"n_layer": 12, "d_model": 768, "d_ff": 3072, "vocab": 30522, "positions": 512, "token_types": 2}


def bert_base_parameters(shape: dict | None = None) -> dict[str, int]:
    r"""BERT-base's parameters, by part (every weight and bias; LayerNorm has ``γ`` and ``β``).

    * embeddings: token ``V d`` + position ``P d`` + segment ``2 d`` + LayerNorm ``2 d``;
    * per layer: ``W_q, W_k, W_v, W_o`` (``d × d`` + bias each), FFN ``d → d_ff → d`` with biases,
      two LayerNorms;
    * pooler: ``d × d`` + bias (the ``[CLS]`` head that BERT's pre-training uses).
    """
    s = dict(BERT_BASE if shape is None else shape)
    d, f, L = s["d_model"], s["d_ff"], s["n_layer"]
    emb = s["vocab"] * d + s["positions"] * d + s["token_types"] * d + 2 * d
    attn = 4 * (d * d + d)
    ffn = (d * f + f) + (f * d + d)
    layer = attn + ffn + 2 * (2 * d)
    pooler = d * d + d
    biases = d + L * (4 * d + (f + d) + 2 * d) + d  # embedding LN β; per layer q,k,v,o, FFN, 2 LN β; pooler
    return {"embeddings": emb, "attention_per_layer": attn, "ffn_per_layer": ffn, "per_layer": layer,
            "layers": L * layer, "pooler": pooler, "total": emb + L * layer + pooler, "biases": biases}


def lora_parameters(shapes, r: int) -> int:
    """Trainable scalars of rank-``r`` LoRA on linear layers of the given ``(out, in)`` shapes:
    ``A (r, in)`` and ``B (out, r)``, i.e. ``r (in + out)`` per layer."""
    return sum(r * (o + i) for o, i in shapes)


def bert_lora_counts(shape: dict | None = None) -> list[dict]:
    """What "LoRA on BERT-base" trains, for the configurations people mean by it.

    Each row: ``what`` (the configuration), ``trainable`` (scalars), ``fraction`` (of the whole
    model), ``reduction`` (whole model / trainable)."""
    s = dict(BERT_BASE if shape is None else shape)
    d, f, L = s["d_model"], s["d_ff"], s["n_layer"]
    total = bert_base_parameters(s)["total"]
    sq = (d, d)
    head2 = 2 * d + 2  # a 2-class classifier on [CLS]: trained in every method
    rows = [
        ("full fine-tuning (every weight and bias)", total),
        ("BitFit: every bias (linear and LayerNorm β)", bert_base_parameters(s)["biases"]),
        ("LoRA r=1 on W_q, W_v of one layer", lora_parameters([sq, sq], 1)),
        ("LoRA r=1 on W_q, W_v of one layer + a 2-class head", lora_parameters([sq, sq], 1) + head2),
        ("LoRA r=1 on W_q, W_v of all 12 layers", L * lora_parameters([sq, sq], 1)),
        ("LoRA r=8 on W_q, W_v of all 12 layers (the paper's RoBERTa-base setting)",
         L * lora_parameters([sq, sq], 8)),
        ("LoRA r=8 on every linear layer of all 12 layers (q, k, v, o, FFN in and out)",
         L * lora_parameters([sq] * 4 + [(f, d), (d, f)], 8)),
    ]
    return [{"what": w, "trainable": int(n), "fraction": n / total, "reduction": total / n} for w, n in rows]


# -- the runs --------------------------------------------------------------------------------------
RS_ALPHA = 2.0 * math.sqrt(8.0)  # rsLoRA's alpha that gives s = 2 at r = 8, like alpha = 16 with alpha/r


def settings(quick: bool | None = None, mode: str | None = None) -> dict:
    """Steps, seeds, evaluation size and the rank sweep's ranks for a run size
    (:func:`lowrank_ref.experiments.modes.mode`, or ``quick=True``): ``compare``'s defaults over
    three seeds (full), the same runs on one seed and five ranks (classroom), or a smoke test."""
    from lowrank_ref.experiments.compare import DEFAULTS
    from lowrank_ref.experiments.modes import mode as current_mode

    m = ("quick" if quick else "full") if quick is not None else (mode or current_mode())
    if m == "quick":
        return {"steps": 40, "batch_size": 16, "warmup": 4, "eval_windows": 32, "seeds": (0,), "quick": True,
                "mode": "quick", "ranks": (1, 8, 32)}
    full = {"steps": DEFAULTS["steps"], "batch_size": DEFAULTS["batch_size"], "warmup": DEFAULTS["warmup"],
            "eval_windows": DEFAULTS["eval_windows"], "seeds": (0, 1, 2), "quick": False, "mode": "full",
            "ranks": (1, 2, 4, 8, 16, 32, 64)}
    if m == "classroom":
        return {**full, "seeds": (0,), "mode": "classroom", "ranks": (1, 2, 8, 16, 64)}
    if m != "full":
        raise ValueError(f"mode must be one of quick, classroom, full, got {m!r}")
    return full


def compare_lr() -> float:
    """The learning rate of ``lowrank-ref compare``'s ``lora`` row: every run here uses it."""
    from lowrank_ref.experiments.compare import VARIANTS

    return float(VARIANTS["lora"].lr)


def finetune(config: LoRAConfig, targets=("q", "v"), lr: float | None = None, seed: int = 0, steps: int = 300,
             batch_size: int = 16, warmup: int = 20, eval_windows: int = 256, ranks=None, base=None) -> dict:
    """Fine-tune the shipped model with LoRA on the dialect; return what it learned and kept.

    The same recipe as ``lowrank-ref compare``'s ``lora`` row (AdamW, cosine schedule with warmup,
    clip 1.0, one BLAS thread); ``seed`` picks the adapters' init (``seed``) and the batch order
    (``seed + 1``), as there. Returns ``target_after`` / ``retained_after`` (next-token accuracy
    on held-out dialect / base-language text), the matching losses, ``trainable_params``, the
    final training loss (mean of the last 10 steps) and the wall time.
    """
    from lowrank_ref.experiments.runner import finetune as run

    lr = compare_lr() if lr is None else lr
    out = run(base, config, targets=targets, ranks=ranks, lr=lr, seed=seed, steps=steps, batch_size=batch_size,
              warmup=warmup, eval_windows=eval_windows)
    return {
        "r": config.r, "alpha": config.alpha, "rslora": config.rslora, "scaling": config.scaling,
        "init": config.init, "targets": list(targets) if not isinstance(targets, str) else [targets],
        "lr": lr, "seed": seed, "steps": steps, "trainable_params": out["trainable_params"],
        **{k: out[k] for k in ("target_after", "target_loss_after", "retained_after", "retained_loss_after",
                               "final_train_loss", "seconds")},
    }


_MEMO: dict = {}  # runs are deterministic: the same arguments give the same row (r=8 recurs)


def _over_seeds(cfg: dict, config: LoRAConfig, targets=("q", "v"), lr: float | None = None) -> list[dict]:
    lr = compare_lr() if lr is None else lr
    run = {k: cfg[k] for k in ("steps", "batch_size", "warmup", "eval_windows")}
    rows = []
    for s in cfg["seeds"]:
        # configs giving the same s train identically (rsLoRA is only another way to reach s)
        key = (config.r, round(config.scaling, 12), config.init, config.dropout, repr(targets), lr, s,
               tuple(sorted(run.items())))
        if key not in _MEMO:
            _MEMO[key] = finetune(config, targets=targets, lr=lr, seed=s, **run)
        row = dict(_MEMO[key])
        row.update(alpha=config.alpha, rslora=config.rslora)
        rows.append(row)
    return rows


def summarize(rows: list[dict], keys) -> list[dict]:
    """Group ``rows`` by ``keys`` and give each group's mean, min and max of the metrics."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r[k]) for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["n_seeds"] = len(rs)
        row["trainable_params"] = rs[0]["trainable_params"]
        row["scaling"] = rs[0]["scaling"]
        for m in ("target_after", "retained_after", "target_loss_after", "final_train_loss"):
            v = [r[m] for r in rs]
            row[m] = float(np.mean(v))
            row[m + "_min"], row[m + "_max"] = float(np.min(v)), float(np.max(v))
        out.append(row)
    return out


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def rank_alpha_sweep(ranks=None, cfg: dict | None = None, lr: float | None = None) -> list[dict]:
    """LoRA on ``q, v`` at each rank under three scaling rules that all give ``s = 2`` at r = 8.

    ``rule``: ``"alpha=2r"`` (``s = 2`` everywhere: the rule of thumb), ``"alpha=16, alpha/r"``
    (``s = 16/r``: the paper's scaling with alpha held fixed) and ``"rsLoRA alpha/sqrt(r)"``
    (``s = RS_ALPHA/sqrt(r)``). One row per (rule, rank, seed)."""
    cfg = settings() if cfg is None else cfg
    if ranks is None:
        ranks = cfg.get("ranks", (1, 8, 32) if cfg["quick"] else (1, 2, 4, 8, 16, 32, 64))
    rows = []
    for r in ranks:
        for rule, c in (("alpha=2r", LoRAConfig(r=r, alpha=2 * r)),
                        ("alpha=16, alpha/r", LoRAConfig(r=r, alpha=16)),
                        ("rsLoRA alpha/sqrt(r)", LoRAConfig(r=r, alpha=RS_ALPHA, rslora=True))):
            for row in _over_seeds(cfg, config=c, lr=lr):
                row["rule"] = rule
                rows.append(row)
    return rows


def scaling_lr_grid(scalings=None, lrs=None, r: int = 8, cfg: dict | None = None) -> list[dict]:
    """LoRA r=8 on ``q, v`` for each scaling ``s`` (``alpha = s r``) and learning rate (default:
    compare's lr and a third and three times it)."""
    cfg = settings() if cfg is None else cfg
    scalings = ((0.5, 2.0, 8.0) if not cfg["quick"] else (0.5, 8.0)) if scalings is None else scalings
    base_lr = compare_lr()
    lrs = ((base_lr / 3, base_lr, 3 * base_lr) if not cfg["quick"] else (base_lr,)) if lrs is None else lrs
    rows = []
    for s in scalings:
        for lr in lrs:
            rows += _over_seeds(cfg, config=LoRAConfig(r=r, alpha=s * r), lr=lr)
    return rows


TARGET_SETS = {
    "q, v": ("q", "v"),
    "q, k, v, o": ("attn",),
    "MLP (fc, proj)": ("mlp",),
    "all linear": "all",
}


def target_sets(r: int = 8, budget_r: int = 2, cfg: dict | None = None, lr: float | None = None) -> list[dict]:
    """LoRA (alpha = 2r) on each target set at rank ``r``, and on every linear layer at
    ``budget_r`` (about the parameter budget of ``q, v`` at rank ``r``). One row per set and seed."""
    cfg = settings() if cfg is None else cfg
    plan = [(name, t, r) for name, t in TARGET_SETS.items()]
    plan.append((f"all linear, r={budget_r}", "all", budget_r))
    if cfg["quick"]:
        plan = [plan[0], plan[3]]
    rows = []
    for name, targets, rank in plan:
        for row in _over_seeds(cfg, config=LoRAConfig(r=rank, alpha=2 * rank), targets=targets, lr=lr):
            row["target_set"] = name
            rows.append(row)
    return rows


def init_comparison(cfg: dict | None = None, r: int = 8) -> list[dict]:
    """LoRA r=8, alpha=16 on ``q, v`` with Kaiming-uniform ``A`` vs Gaussian ``A`` (B = 0 in both)."""
    cfg = settings() if cfg is None else cfg
    rows = []
    for init in ("kaiming", "gaussian"):
        rows += _over_seeds(cfg, config=LoRAConfig(r=r, alpha=2 * r, init=init))
    return rows


def reference(cfg: dict | None = None) -> dict:
    """The shipped model before any fine-tuning: accuracy on held-out dialect and base text."""
    from lowrank_ref import data
    from lowrank_ref.models import blas_threads, load_pretrained
    from lowrank_ref.train import evaluate

    cfg = settings() if cfg is None else cfg
    task, model = data.builtin_task(0), load_pretrained(progress=False)
    with blas_threads(1):
        t = evaluate(model, task.dialect_heldout, max_windows=cfg["eval_windows"])
        b = evaluate(model, task.base_heldout, max_windows=cfg["eval_windows"])
    return {"target_before": t["accuracy"], "retained_before": b["accuracy"],
            "target_loss_before": t["loss"], "retained_loss_before": b["loss"]}


def baselines(cfg: dict | None = None) -> list[dict]:
    """``full``, ``bitfit`` and ``lora`` through :func:`lowrank_ref.experiments.run_compare`
    (the main job, unchanged), once per seed; rows carry compare's columns plus ``seed``."""
    from lowrank_ref.experiments.compare import run_compare

    cfg = settings() if cfg is None else cfg
    rows = []
    for s in cfg["seeds"]:
        for row in run_compare(["full", "bitfit", "lora"], steps=cfg["steps"], batch_size=cfg["batch_size"],
                               seed=s, eval_windows=cfg["eval_windows"], progress=False):
            row["seed"] = s
            rows.append(row)
    return rows


# -- merging in low precision ----------------------------------------------------------------------
def naive_unmerge_drift(cycles: int = 1000, dtype: str = "bfloat16", adapter_dtype: str | None = None,
                        shape=(256, 256), r: int = 8, alpha: float = 16.0, b_std: float = 0.1, seed: int = 0,
                        checkpoints=(1, 10, 100, 1000)) -> list[dict]:
    r"""Merge and unmerge by arithmetic, ``cycles`` times, and report how far ``W`` ends from ``W0``.

    The naive cycle (PEFT's ``merge()``/``unmerge()`` for plain LoRA, written out in torch):

    .. code-block:: text

        ΔW = s B A                    computed in the adapter dtype
        W <- W + ΔW                   in place on the weight (dtype): one rounding
        W <- W - ΔW.to(dtype)         in place: ΔW rounded to the weight's dtype first

    ``W0 (out, in)`` ~ N(0, 1/in) in ``dtype``; ``A (r, in)`` Kaiming-uniform, ``B (out, r)`` ~
    N(0, b_std²) (non-zero, as after training), both in ``adapter_dtype`` (default: ``dtype``).
    With ``adapter_dtype == dtype`` the same rounded ``ΔW`` is added and subtracted; with
    float32 adapters on a bf16 base (what ``get_peft_model`` gives by default: it keeps the
    adapters in float32) merging adds the float32 ``ΔW`` and unmerging subtracts its bf16
    rounding, so each cycle leaves a bias behind. This project's ``unmerge()`` does neither: it
    puts back the bits kept at ``merge()``.

    Returns one row per checkpoint ``c <= cycles``: ``cycle``, ``max_abs`` (``max |W - W0|``),
    ``rel`` (that over ``max |W0|``) and ``changed`` (the share of entries not equal to ``W0``).
    Needs torch (bfloat16 does not exist in NumPy)."""
    import torch

    dt = getattr(torch, dtype)
    adt = getattr(torch, adapter_dtype or dtype)
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    W0 = (torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(in_f)).to(dt)  # (out, in)
    A = ((torch.rand((r, in_f), generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(in_f)).to(adt)  # (r, in)
    B = (torch.randn((out_f, r), generator=g, dtype=torch.float64) * b_std).to(adt)  # (out, r)
    s = alpha / r
    W = W0.clone()
    w0 = W0.double()
    w0_max = float(w0.abs().max())
    marks = set(c for c in checkpoints if c <= cycles)
    rows = []
    # ΔW = s B A (out, in) in the adapter dtype. The adapter does not change between cycles, so
    # it is the same tensor every cycle: computed once, in float32 and rounded to a 16-bit adapter
    # dtype, as PEFT's get_delta_weight does on the CPU.
    dW = (s * (B.float() @ A.float())).to(adt) if adt in (torch.bfloat16, torch.float16) else s * (B @ A)
    for c in range(1, cycles + 1):
        W += dW  # merge
        W -= dW.to(dt)  # the naive unmerge
        if c in marks:
            err = (W.double() - w0).abs()
            rows.append({"cycle": c, "max_abs": float(err.max()), "rel": float(err.max()) / w0_max,
                         "changed": float((W != W0).double().mean())})
    return rows


# -- tables ----------------------------------------------------------------------------------------
def _pm(row: dict, m: str) -> str:
    """``mean (min–max)`` over seeds, as accuracy percentages."""
    if row["n_seeds"] == 1:
        return f"{100 * row[m]:.1f}"
    return f"{100 * row[m]:.1f} ({100 * row[m + '_min']:.1f}–{100 * row[m + '_max']:.1f})"


def _md(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])


def tables(results: dict) -> dict[str, str]:
    """Markdown tables of :func:`run_all`'s results (the ones in chapter 01), by experiment name.

    Accuracies are next-token accuracies on held-out text, in percent: the mean over seeds and,
    in brackets, the lowest and highest seed."""
    out = {}
    if "bert_lora_counts" in results:
        out["bert"] = _md(["what is trained", "trainable parameters", "share of 109,482,240", "reduction"],
                          [[r["what"], f"{r['trainable']:,}", f"{100 * r['fraction']:.4f}%", f"{r['reduction']:,.0f}×"]
                           for r in results["bert_lora_counts"]])
    if "baselines" in results:
        rows = results["baselines"]
        body = []
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["method"] == m]
            ta, ra = [r["target_after"] for r in rs], [r["retained_after"] for r in rs]
            body.append([m, f"{rs[0]['trainable_params']:,}", f"{rs[0]['adapter_bytes']:,}",
                         f"{100 * np.mean([r['target_before'] for r in rs]):.1f}",
                         f"{100 * np.mean(ta):.1f} ({100 * min(ta):.1f}–{100 * max(ta):.1f})",
                         f"{100 * np.mean(ra):.1f} ({100 * min(ra):.1f}–{100 * max(ra):.1f})"])
        out["baselines"] = _md(["method", "trainable", "file bytes", "target before", "target after",
                                "retained after"], body)
    if "rank_alpha" in results:
        summ = summarize(results["rank_alpha"], ["rule", "r"])
        rules = list(dict.fromkeys(r["rule"] for r in summ))
        ranks = sorted({r["r"] for r in summ})
        by = {(r["rule"], r["r"]): r for r in summ}
        body = []
        for rk in ranks:
            cells = [str(rk), f"{by[(rules[0], rk)]['trainable_params']:,}"]
            for rule in rules:
                row = by.get((rule, rk))
                cells.append("—" if row is None else f"s={row['scaling']:.2g}: {_pm(row, 'target_after')}")
            body.append(cells)
        out["rank_alpha"] = _md(["r", "trainable"] + [f"{rule} (target after)" for rule in rules], body)
        body = []
        for rk in ranks:
            cells = [str(rk)] + ["—" if (rule, rk) not in by else _pm(by[(rule, rk)], "retained_after")
                                 for rule in rules]
            body.append(cells)
        out["rank_alpha_retained"] = _md(["r"] + [f"{rule} (retained after)" for rule in rules], body)
    if "scaling_lr" in results:
        summ = summarize(results["scaling_lr"], ["scaling", "lr"])
        lrs = sorted({r["lr"] for r in summ})
        ss = sorted({r["scaling"] for r in summ})
        by = {(r["scaling"], r["lr"]): r for r in summ}
        body = [[f"s = {sv:g} (alpha = {8 * sv:g})"] + [
            "—" if (sv, lr_) not in by else f"{_pm(by[(sv, lr_)], 'target_after')} / {_pm(by[(sv, lr_)], 'retained_after')}"
            for lr_ in lrs] for sv in ss]
        out["scaling_lr"] = _md(["r = 8"] + [f"lr = {lr_:.2g}: target / retained" for lr_ in lrs], body)
    if "targets" in results:
        summ = summarize(results["targets"], ["target_set"])
        out["targets"] = _md(["adapted layers", "trainable", "target after", "retained after"],
                             [[r["target_set"], f"{r['trainable_params']:,}", _pm(r, "target_after"),
                               _pm(r, "retained_after")] for r in summ])
    if "init" in results:
        summ = summarize(results["init"], ["init"])
        out["init"] = _md(["init of A (B = 0)", "target after", "retained after", "final train loss"],
                          [[r["init"], _pm(r, "target_after"), _pm(r, "retained_after"),
                            f"{r['final_train_loss']:.3f}"] for r in summ])
    return out


def join_results(*parts: dict) -> dict:
    """Join the JSON results of runs split with ``--only`` / ``--ranks`` into one."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if k in EXPERIMENTS and k in out:
                out[k] = out[k] + v  # the runs; everything else (settings, counts) is the same in each
            else:
                out.setdefault(k, v)
    return out


EXPERIMENTS = ("baselines", "rank_alpha", "targets", "scaling_lr", "init")


def run_all(quick: bool | None = None, progress: bool = True, only=None, ranks=None) -> dict:
    """Every measurement of chapter 01, as plain data (what :func:`main` writes as JSON).

    ``only``: a subset of :data:`EXPERIMENTS`; ``ranks``: the ranks of the rank sweep (to split a
    long run over several processes and join the JSON files afterwards)."""
    cfg = settings(quick)
    out = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
           "bert_base": bert_base_parameters(), "bert_lora_counts": bert_lora_counts(),
           "reference": reference(cfg)}
    fns = {"baselines": baselines, "rank_alpha": lambda cfg: rank_alpha_sweep(ranks=ranks, cfg=cfg),
           "targets": target_sets, "scaling_lr": scaling_lr_grid, "init": init_comparison}
    for name in EXPERIMENTS if only is None else only:
        if name not in fns:
            raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
        fn = fns[name]
        t0 = time.perf_counter()
        out[name] = fn(cfg=cfg)
        if progress:
            print(f"[lora_experiments] {name}: {len(out[name])} runs in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    def add(p):
        p.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="run only these experiments")
        p.add_argument("--ranks", type=lambda v: tuple(int(r) for r in v.split(",")), default=None,
                       help="ranks of the rank sweep, comma-separated (default 1,2,4,8,16,32,64)")

    return experiment_main(lambda a: run_all(quick=a.quick, only=a.only, ranks=a.ranks), argv,
                           prog="python -m lowrank_ref.experiments.lora_experiments",
                           description="Chapter 01's measurements (rank and alpha, targets, init, baselines)",
                           default_out="runs/lora_experiments.json", add_arguments=add)


if __name__ == "__main__":
    raise SystemExit(main())
