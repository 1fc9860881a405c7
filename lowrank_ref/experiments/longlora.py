r"""Chapter 09's long-context experiment (LongLoRA, Chen et al. 2024, arXiv:2309.12307), in miniature.

The shipped GPT reads 32 tokens and has **learned** absolute positions (a ``(32, d)`` table, no
rotary positions). To read 128 tokens (four times as many) without re-training from scratch:

1. **Position interpolation of the learned table**: the new table at position ``j`` is the old
   table linearly interpolated at ``j·32/128 = j/4`` (:func:`interpolate_positions`): positions
   ``0, 4, 8, ...`` get the old rows ``0, 1, 2, ...`` and the others lie on the segments between them;
   ``j/4 > 31`` (the last three) keeps row 31. This is Chen et al.'s (2023) position interpolation
   — squeeze the new positions into the trained range instead of extrapolating past it — applied
   to a table instead of to RoPE's angles. (Adding RoPE would mean pre-training the model again;
   a learned table has no rows past 31 to extrapolate to.)
2. **Fine-tune at 128 tokens** on the dialect, with S²-Attn (``GPT(attention="s2")``, four groups of
   32) or with full attention, and with LoRA (``q``, ``v``, r = 8) or LongLoRA's "LoRA+" (the same
   LoRA plus trainable embeddings and norms, ``inject(train_also=("embeddings", "norms"))``), with
   full fine-tuning as the reference.
3. **Evaluate with full attention** (inference never uses S²-Attn) on held-out dialect windows of
   128 tokens, per quarter of the window (positions 0-31, 32-63, 64-95, 96-127): the later
   quarters are the positions the model never saw before.

Cost per step: the forward FLOPs of the model at 128 tokens with each attention
(:func:`forward_flops`, counted from the shapes) and the measured time of a training step: the
median over the run's steps of the process's CPU time (``time.process_time``, one BLAS thread),
which a machine shared with other jobs inflates less than wall time does.

``python -m lowrank_ref.experiments.longlora [--quick] [--out FILE]`` writes the JSON that
``chapters/data/09-longlora.json`` holds; :func:`format_table` prints chapter 09's table from it.
"""

from __future__ import annotations

import time

import numpy as np

from lowrank_ref.experiments.modes import quick_mode

__all__ = ["interpolate_positions", "long_context_model", "forward_flops", "loss_by_quarter", "run",
           "format_table", "format_bench_tables", "main", "FACTOR", "RUNS"]

FACTOR = 4  # the context is extended four-fold: 32 -> 128
# (row name, method, attention, train_also, lr)
RUNS = (
    ("LoRA", "lora", "full", None, 1e-2),
    ("LoRA + S²-Attn", "lora", "s2", None, 1e-2),
    ("LoRA+ (embed, norm)", "lora", "full", ("embeddings", "norms"), 1e-2),
    ("LoRA+ + S²-Attn", "lora", "s2", ("embeddings", "norms"), 1e-2),
    ("full fine-tuning", "full", "full", None, 1e-3),
    ("full fine-tuning + S²-Attn", "full", "s2", None, 1e-3),
)


def interpolate_positions(table: np.ndarray, new_length: int) -> np.ndarray:
    r"""Position interpolation for a learned table ``E (L, d)`` -> ``E' (L', d)``:
    ``E'[j] = (1 - w) E[⌊u⌋] + w E[⌊u⌋ + 1]`` with ``u = j·L/L'`` and ``w = u - ⌊u⌋``; ``u > L - 1``
    keeps ``E[L - 1]`` (no extrapolation)."""
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be (L, d), got shape {table.shape}")
    if isinstance(new_length, bool) or not isinstance(new_length, (int, np.integer)) or new_length < table.shape[0]:
        raise ValueError(f"new_length must be an integer >= the table's length {table.shape[0]}, got {new_length!r}")
    L = table.shape[0]
    u = np.arange(new_length) * (L / new_length)  # where position j falls on the old axis
    lo = np.minimum(np.floor(u).astype(int), L - 1)
    hi = np.minimum(lo + 1, L - 1)
    w = (u - lo)[:, None] * (hi > lo)[:, None]  # 0 past the last row: keep E[L-1]
    return ((1 - w) * table[lo] + w * table[hi]).astype(table.dtype)


def long_context_model(base, factor: int = FACTOR, attention: str = "full"):
    """A NumPy GPT with ``factor`` times ``base``'s context: the same weights, the position table
    interpolated (:func:`interpolate_positions`), ``attention`` ``"full"`` or ``"s2"``."""
    from dataclasses import replace

    from lowrank_ref.nn.gpt import GPT

    cfg = replace(base.config, block_size=base.config.block_size * factor)
    model = GPT(cfg, rng=np.random.default_rng(0), dtype=base.dtype, attention=attention)
    state = {n: p.data for n, p in base.parameters().items()}
    state["pos_emb.weight"] = interpolate_positions(state["pos_emb.weight"], cfg.block_size)
    model.load_state_dict(state)
    return model


def forward_flops(cfg, T: int, attention: str = "full", batch: int = 1) -> dict:
    r"""Forward FLOPs (a multiply-add counts 2) of the GPT ``cfg`` on ``batch`` sequences of ``T``
    tokens, from the shapes: ``linear`` (the four projections and the MLP, ``24·T·d²`` per layer at
    ``mlp_ratio = 4``), ``attention`` (``QKᵀ`` and ``PV``: ``4·T·T·d`` per layer for full attention,
    which computes every entry and masks the future; for S²-Attn the groups of
    :func:`~lowrank_ref.nn.attention.s2_pieces`), ``head`` (``2·T·d·V``) and ``total``."""
    from lowrank_ref.nn.attention import s2_pieces

    d, L, V, H = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.n_head
    hs = d // H
    linear = L * (4 * 2 * T * d * d + 2 * 2 * T * d * cfg.mlp_ratio * d)
    if attention == "s2":
        per_layer = sum((hd.stop - hd.start) * (sum(b - a for a, b in r) // g) * 2 * (2 * g * g * hs)
                        for hd, r, g in s2_pieces(T, H))
    else:
        per_layer = H * 2 * (2 * T * T * hs)
    att = L * per_layer
    head = 2 * T * d * V
    return {k: int(batch * v) for k, v in (("linear", linear), ("attention", att), ("head", head),
                                            ("total", linear + att + head))}


def loss_by_quarter(model, tokens, max_windows: int = 64, training_mode: bool = False) -> dict:
    """Mean next-token loss and accuracy of ``model`` on windows of its whole context, overall and
    per quarter of the window. In eval mode (the default: full attention, as at inference); with
    ``training_mode`` the model stays in training mode, so an ``attention="s2"`` model runs S²-Attn
    (the shipped model has no dropout, so this is deterministic)."""
    from lowrank_ref.data import eval_windows
    from lowrank_ref.nn.losses import log_softmax

    T = model.config.block_size
    x, y = eval_windows(tokens, T, max_windows)
    was = model.training
    model.train(bool(training_mode))
    nll, hit = np.zeros(T), np.zeros(T)
    try:
        for i in range(0, x.shape[0], 32):
            logits = model.forward(x[i:i + 32]).astype(np.float64)  # (b, T, V)
            logp = np.take_along_axis(log_softmax(logits), y[i:i + 32, :, None], axis=-1)[..., 0]
            nll -= logp.sum(0)
            hit += (logits.argmax(-1) == y[i:i + 32]).sum(0)
    finally:
        for _, m in model.named_modules():
            m._cache = None
        model.train(was)
    n, q = x.shape[0], T // 4
    return {"loss": float(nll.sum() / (n * T)), "accuracy": float(hit.sum() / (n * T)),
            "loss_by_quarter": [float(nll[i * q:(i + 1) * q].sum() / (n * q)) for i in range(4)],
            "accuracy_by_quarter": [float(hit[i * q:(i + 1) * q].sum() / (n * q)) for i in range(4)]}


def run(quick: bool | None = None, steps: int = 200, batch_size: int = 8, seeds=(0, 1, 2)) -> dict:
    """Every run of :data:`RUNS` at each seed (quick: two runs, one seed, three steps, a few windows).
    Each row holds the mean over the seeds (losses per quarter, accuracy), the lowest and highest
    accuracy, and each seed's numbers under ``"seeds"``."""
    from lowrank_ref import data
    from lowrank_ref.adapters.lora import LoRAConfig
    from lowrank_ref.experiments.runner import finetune
    from lowrank_ref.models import blas_threads, load_pretrained

    quick = quick_mode() if quick is None else quick
    steps, windows = (3, 4) if quick else (steps, 64)
    runs = RUNS[:2] if quick else RUNS
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    task = data.builtin_task(0)
    short = load_pretrained(progress=False)
    T = short.config.block_size * FACTOR
    with blas_threads(1):
        before = {"context 32 (as shipped)": loss_by_quarter(short, task.dialect_heldout, windows * FACTOR),
                  "context 128, interpolated, not tuned": loss_by_quarter(long_context_model(short),
                                                                          task.dialect_heldout, windows)}
    rows = []
    for name, method, attention, also, lr in runs:
        config = LoRAConfig(r=8, alpha=16) if method == "lora" else None
        extra = {} if also is None else {"train_also": also}
        per_seed, ticks = [], []
        for seed in seeds:
            res = finetune(long_context_model(short, attention=attention), config,
                           method=None if config else method, targets=("q", "v") if config else (), steps=steps,
                           lr=lr, batch_size=batch_size, seed=seed, eval_windows=windows, keep_model=True,
                           record=lambda m, s: time.process_time(), record_every=1, **extra)
            model = res.pop("model")
            ticks += list(np.diff(res.pop("records"))[1:])  # CPU seconds per step (the first one warms up)
            with blas_threads(1):
                ev = loss_by_quarter(model, task.dialect_heldout, windows)
                if attention == "s2":  # the same model read with S²-Attn, as it was trained
                    ev["s2_loss_by_quarter"] = loss_by_quarter(model, task.dialect_heldout, windows,
                                                               training_mode=True)["loss_by_quarter"]
            per_seed.append({"seed": seed, "final_train_loss": res["final_train_loss"],
                             "retained_accuracy": res["retained_after"], "trainable_params": res["trainable_params"],
                             **ev})
        mean = {k: np.mean([p[k] for p in per_seed], axis=0).tolist()
                for k in ("loss_by_quarter", "accuracy_by_quarter", "s2_loss_by_quarter") if k in per_seed[0]}
        rows.append({"name": name, "method": method, "attention": attention, "train_also": list(also or ()),
                     "lr": lr, "trainable_params": per_seed[0]["trainable_params"],
                     "loss": float(np.mean([p["loss"] for p in per_seed])),
                     "accuracy": float(np.mean([p["accuracy"] for p in per_seed])),
                     "accuracy_min": float(min(p["accuracy"] for p in per_seed)),
                     "accuracy_max": float(max(p["accuracy"] for p in per_seed)),
                     "cpu_seconds_per_step": float(np.median(ticks)) if ticks else None, **mean, "seeds": per_seed})
    cfg = long_context_model(short).config
    return {"about": "lowrank_ref.experiments.longlora (python -m lowrank_ref.experiments.longlora); "
                     "chapter 09 §4 renders it",
            "quick": bool(quick), "steps": steps, "batch_size": batch_size, "seeds": list(seeds), "context": T,
            "shipped_context": short.config.block_size, "eval_windows": windows,
            "lora": {"r": 8, "alpha": 16, "targets": ["q", "v"]},
            "flops_forward": {a: forward_flops(cfg, T, a, batch_size) for a in ("full", "s2")},
            "before": before, "runs": rows}


def format_table(res: dict) -> str:
    """Chapter 09's table from :func:`run`'s result (or the committed JSON)."""
    n = len(res["seeds"])
    lines = [f"| run | trainable | CPU s / step | loss, positions 0-31 | 32-63 | 64-95 | 96-127 | accuracy "
             f"(mean of {n}; lowest-highest) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, ev in res["before"].items():
        q = ev["loss_by_quarter"]
        cells = " | ".join(f"{v:.3f}" for v in q) if "128" in name else f"{ev['loss']:.3f} | — | — | —"
        lines.append(f"| {name} | — | — | {cells} | {ev['accuracy']:.3f} |")
    for r in res["runs"]:
        q = " | ".join(f"{v:.3f}" for v in r["loss_by_quarter"])
        sps = "—" if r["cpu_seconds_per_step"] is None else f"{r['cpu_seconds_per_step']:.3f}"
        lines.append(f"| {r['name']} | {r['trainable_params']:,} | {sps} | {q} | {r['accuracy']:.3f} "
                     f"({r['accuracy_min']:.3f}-{r['accuracy_max']:.3f}) |")
    s2 = [r for r in res["runs"] if "s2_loss_by_quarter" in r]
    if s2:
        lines += ["", "| trained with S²-Attn, read with S²-Attn | loss, positions 0-31 | 32-63 | 64-95 | 96-127 |",
                  "|---|---:|---:|---:|---:|"]
        for r in s2:
            lines.append(f"| {r['name']} | " + " | ".join(f"{v:.3f}" for v in r["s2_loss_by_quarter"]) + " |")
    f = res["flops_forward"]
    lines += ["", "| forward FLOPs per step (batch of "
              f"{res['batch_size']} × {res['context']}) | full attention | S²-Attn | S² / full |",
              "|---|---:|---:|---:|"]
    for k in ("attention", "total"):
        lines.append(f"| {k} | {f['full'][k] / 1e6:.1f} M | {f['s2'][k] / 1e6:.1f} M | {f['s2'][k] / f['full'][k]:.2f} |")
    return "\n".join(lines)


def format_bench_tables(data: dict) -> str:
    """Chapter 09's two benchmark tables from ``chapters/data/09-baselines-bench.json`` (the rows of
    ``python -m bench.run --only longlora``): the adapter's inference latency against merged LoRA,
    and S²-Attn's forward + backward against full attention."""
    rows = [r for r in data["rows"] if r.get("seconds") is not None]
    lines = ["| backend | batch | merged LoRA (CPU ms) | LoRA, unmerged | Houlsby adapter |", "|---|---:|---:|---:|---:|"]
    for backend in ("numpy", "torch"):
        for B in sorted({r["batch"] for r in rows if r["name"].startswith("adapter_latency_")}):
            by = {r["impl"]: r["seconds"] for r in rows if r["name"] == f"adapter_latency_b{B}_{backend}"}
            if "merged_lora" in by:
                lines.append(f"| {backend} | {B} | {1e3 * by['merged_lora']:.2f} | "
                             f"{by['lora_unmerged'] / by['merged_lora']:.2f}× | {by['houlsby'] / by['merged_lora']:.2f}× |")
    lines += ["", "| one attention layer, forward + backward | full attention (CPU ms) | S²-Attn |", "|---|---:|---:|"]
    for r in rows:
        if r["name"].startswith("s2_attn_") and r["impl"] == "full":
            s2 = next(x for x in rows if x["name"] == r["name"] and x["impl"] == "s2")
            lines.append(f"| {r['shape'].split(', S²')[0].removeprefix('one attention layer, ')}, "
                         f"{r['name'].rsplit('_', 1)[-1]} | {1e3 * r['seconds']:.2f} | {s2['seconds'] / r['seconds']:.2f}× |")
    m = data["meta"]
    lines += ["", f"{m['date']}, {m['cpu']}, {m['cpu_count']} cores (load average {m['loadavg'][0]:.1f} at the end), "
              f"NumPy {m['numpy']} and torch {m.get('torch')}, one thread each; each time is the process's CPU "
              f"time, the median of {min(r['repeats'] for r in rows)} to {max(r['repeats'] for r in rows)} "
              "interleaved runs."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from lowrank_ref.experiments.runner import experiment_main

    return experiment_main(lambda a: run(a.quick), argv, prog="python -m lowrank_ref.experiments.longlora",
                           description="Chapter 09: the shipped GPT's context extended 4x by position "
                                       "interpolation, fine-tuned with S²-Attn or full attention, LoRA vs LoRA+",
                           default_out="chapters/data/09-longlora.json")


if __name__ == "__main__":
    raise SystemExit(main())
