r"""The chapters' key figures: the data behind each one, and the plot, in one place.

``make figures`` (``python -m lowrank_ref.experiments.figures``) writes, for every figure,
``chapters/figures/<name>.png`` and the numbers it was drawn from, ``<name>.json``. The notebooks
call the same ``plot_*`` functions. ``tests/test_figures.py`` recomputes each figure's data and
checks it equals the committed JSON, so a committed figure cannot silently stop being the one the
code makes (the PNG itself depends on the matplotlib version, the data does not).

Each entry of :data:`FIGURES` is ``name -> (data function, plot function, chapter)``; a data
function returns plain JSON-able data, computed by the package or read from the committed result
files under ``chapters/data/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["FIGURES", "OUT", "central_difference_errors", "plot_eps_curve", "plot_rank_alpha", "plot_rank_sweep",
           "plot_nf4_code_usage", "plot_learned_vs_kept", "plot_learning_forgetting", "make", "data_of"]

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "chapters" / "figures"
DATA = ROOT / "chapters" / "data"


# ---------------------------------------------------------------- 00: the error V of central differences


def central_difference_errors(epsilons=None) -> dict:
    r"""max |numeric − analytic| / max |analytic| of ``blocks.0.mlp.fc.weight``'s gradient under the
    mean cross-entropy of a tiny perturbed GPT, over steps ε, with the weights in float64 and
    rounded to float32 (the analytic gradient always in float64)."""
    import lowrank_ref.nn as nn
    from lowrank_ref.gradcheck import numeric_gradient, perturb

    epsilons = np.logspace(-1, -11, 21) if epsilons is None else np.asarray(epsilons, float)
    cfg = nn.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=2, d_model=4, mlp_ratio=1)
    base = perturb(nn.GPT(cfg, rng=np.random.default_rng(2)).astype(np.float64), np.random.default_rng(3))
    idx, tgt = np.array([[0, 3, 3, 1]]), np.array([[3, 3, 1, 2]])
    name = "blocks.0.mlp.fc.weight"
    base.zero_grad()
    base.backward(nn.cross_entropy(base.forward(idx), tgt)[1])
    g = base.parameters()[name].grad

    def curve(dtype):
        model = nn.GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)
        model.load_state_dict(base.state_dict())
        model.astype(dtype)
        W = model.parameters()[name]

        def loss():
            value = nn.cross_entropy(model.forward(idx), tgt)[0]
            for _, m in model.named_modules():
                m._cache = None
            return value

        return [float(np.abs(numeric_gradient(loss, W.data, e) - g).max() / np.abs(g).max()) for e in epsilons]

    return {"epsilons": [float(e) for e in epsilons], "float64": curve(np.float64), "float32": curve(np.float32)}


def plot_eps_curve(d: dict):
    import matplotlib.pyplot as plt

    eps, e64 = np.asarray(d["epsilons"]), np.asarray(d["float64"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(eps, e64, "o-", label="float64")
    ax.loglog(eps, d["float32"], "s-", label="float32")
    ax.loglog(eps, eps**2 * e64[0] / eps[0] ** 2, "k:", lw=1, label=r"$\propto\varepsilon^2$ (truncation)")
    ax.loglog(eps, 1.1e-16 / eps, "k--", lw=1, label=r"$u_{64}/\varepsilon$ (rounding)")
    ax.axvline(1e-6, color="grey", lw=0.8)
    ax.set_xlabel(r"step $\varepsilon$")
    ax.set_ylabel("max |numeric - analytic| / max |analytic|")
    ax.set_ylim(1e-13, 10)
    ax.set_title("central differences: error vs step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 01: rank and alpha


def rank_alpha_data() -> dict:
    """Chapter 01's committed rank sweep, summarised over seeds (mean, min, max)."""
    from lowrank_ref.experiments.lora_experiments import summarize

    full = json.loads((DATA / "01-lora-results.json").read_text(encoding="utf-8"))
    rows = summarize(full["rank_alpha"], ["rule", "r"])
    keys = [k for k in rows[0] if k in ("rule", "r") or k.startswith(("target_after", "retained_after"))]
    return {"reference": {k: full["reference"][k] for k in ("target_before", "retained_before")},
            "rows": [{k: r[k] for k in keys} for r in rows]}


def plot_rank_alpha(d: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = d["rows"]
    for rule in dict.fromkeys(r["rule"] for r in rows):
        rs = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["r"])
        for ax, m in zip(axes, ("target_after", "retained_after")):
            ax.plot([r["r"] for r in rs], [100 * r[m] for r in rs], marker="o", label=rule)
    for ax, title, ref in zip(axes, ("held-out dialect (learned)", "held-out base text (kept)"),
                              ("target_before", "retained_before")):
        ax.axhline(100 * d["reference"][ref], color="gray", ls=":", label="before fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel("next-token accuracy, % (mean of 3 seeds)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 02: α/r against α/√r over ranks


def rank_sweep_data() -> list[dict]:
    """Chapter 02's committed rank sweep (``chapters/data/02-dora-results.json``)."""
    full = json.loads((DATA / "02-dora-results.json").read_text(encoding="utf-8"))
    keep = ("rule", "r", "scaling", "dialect_loss", "base_loss", "delta_norm")
    return [{k: row[k] for k in keep} for row in full["rank_sweep"]]


def plot_rank_sweep(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for rule in ("alpha/r", "alpha/sqrt(r)"):
        rs = [r for r in rows if r["rule"] == rule]
        for ax, key in zip(axes, ("dialect_loss", "base_loss", "delta_norm")):
            ax.plot([r["r"] for r in rs], [r[key] for r in rs], "o-", label=rule)
    for ax, t in zip(axes, ("held-out dialect loss (learned)", "held-out base loss (forgotten)",
                            "Σ ‖ΔW‖_F after training")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_title(t, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 03: NF4 code usage


def nf4_code_usage_data() -> dict:
    from lowrank_ref.experiments.qlora_experiments import nf4_code_usage

    u = nf4_code_usage(n=1 << 22, blocksize=64)
    return {"share": [float(s) for s in u["share"]], "entropy_bits": u["entropy_bits"], "blocksize": 64,
            "n": 1 << 22}


def plot_nf4_code_usage(d: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(16), 100 * np.asarray(d["share"]))
    ax.axhline(100 / 16, color="k", lw=0.8, ls="--", label="equal use, 6.25%")
    ax.set_xticks(range(16))
    ax.set_xlabel("NF4 code (0 = −1, 7 = 0, 15 = +1)")
    ax.set_ylabel("% of values")
    ax.set_title(f"N(0,1), block size {d.get('blocksize', 64)}: entropy {d['entropy_bits']:.2f} bits of 4")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 04: learned against kept


def compare_data() -> dict:
    """The committed ``make demo`` run (``chapters/data/compare.json``): rows and the base score."""
    full = json.loads((DATA / "compare.json").read_text(encoding="utf-8"))
    keep = ("method", "target_before", "target_after", "retained_after", "trainable_params", "adapter_bytes")
    return {"retained_before": full["run"]["retained_before"], "rows": [{k: r[k] for k in keep} for r in full["rows"]]}


def plot_learned_vs_kept(d: dict):
    import matplotlib.pyplot as plt

    rows, before = d["rows"], d["retained_before"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, r in enumerate(rows):
        ax.scatter(r["target_after"], r["retained_after"], s=40)
        ax.annotate(r["method"], (r["target_after"], r["retained_after"]), textcoords="offset points",
                    xytext=(6, -14 + 9 * (i % 4)), fontsize=9)  # staggered: close points stay readable
    if before is not None:
        ax.axhline(before, color="0.4", ls="--", lw=1, label=f"base text, before ({before:.3f})")
    ax.axvline(rows[0]["target_before"], color="0.6", ls=":", lw=1,
               label=f"dialect, before ({rows[0]['target_before']:.3f})")
    ax.set_xlabel("dialect accuracy after (learned)")
    ax.set_ylabel("base-language accuracy after (kept)")
    ax.set_title("what each method learned and kept")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 04: learns less, forgets less?


def forgetting_data() -> dict:
    """The committed learning-forgetting grid (``chapters/data/04-forgetting.json``)."""
    full = json.loads((DATA / "04-forgetting.json").read_text(encoding="utf-8"))
    keep = ("method", "r", "lr", "learned", "kept_all", "kept_unchanged")
    return {"pretrained": full["pretrained"], "runs": [{k: r[k] for k in keep} for r in full["runs"]]}


def plot_learning_forgetting(d: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    groups = {}
    for r in d["runs"]:
        groups.setdefault("full" if r["method"] == "full" else f"LoRA r={r['r']}", []).append(r)
    for (label, rs), marker in zip(groups.items(), "so^vDP"):
        rs = sorted(rs, key=lambda r: r["lr"])
        for ax, key in zip(axes, ("kept_unchanged", "kept_all")):
            ax.plot([r["learned"] for r in rs], [r[key] for r in rs], marker=marker, label=label)
    pre = d["pretrained"]
    for ax, key, title in zip(axes, ("kept_unchanged", "kept_all"),
                              ("kept: base sentences the dialect leaves unchanged",
                               "kept: all base text (the dialect contradicts parts)")):
        ax.axhline(pre[key], color="0.4", ls="--", lw=1, label="before fine-tuning")
        ax.set_xlabel("dialect accuracy after (learned)")
        ax.set_ylabel("accuracy after (kept)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("learning against forgetting; each line is one method over three learning rates", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 05: the Hadamard rank bound


def hadamard_rank_data() -> dict:
    """Chapter 05's LoHa measurements (:mod:`lowrank_ref.experiments.loha_experiments`)."""
    from lowrank_ref.experiments.loha_experiments import hadamard_rank_data as data

    return data()


def plot_hadamard_rank(d: dict):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    rk, ft = d["rank"], d["fit"]
    out, n_in = d["shape_rank"]
    a.plot([r["params"] for r in rk], [r["loha_rank"] for r in rk], "o-", label="LoHa at r: rank of (B1A1)⊙(B2A2)")
    a.plot([r["params"] for r in rk], [r["lora_2r_rank"] for r in rk], "s-", label="LoRA at 2r: rank of BA")
    a.plot([r["params"] for r in rk], [r["r"] ** 2 for r in rk], "k:", lw=1, label="r²")
    a.axhline(min(out, n_in), color="grey", lw=0.8, ls="--", label=f"min(in, out) = {min(out, n_in)}")
    a.set_xlabel(f"trainable parameters 2r(in+out), a {out}×{n_in} layer")
    a.set_ylabel("rank of ΔW (measured)")
    a.set_title("rank at equal parameters", fontsize=10)
    a.legend(fontsize=8)
    b.plot([r["params"] for r in ft], [r["loha_error"] for r in ft], "o-", label="LoHa at r (Adam, 2000 steps)")
    b.plot([r["params"] for r in ft], [r["lora_2r_error"] for r in ft], "s-", label="LoRA at 2r (truncated SVD: optimal)")
    b.set_xlabel("trainable parameters, a {}×{} target".format(*d["shape_fit"]))
    b.set_ylabel("‖ΔW − T‖ / ‖T‖")
    b.set_title("fitting a random full-rank target T", fontsize=10)
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- 08: HyperLoRA's task embeddings


def task_embeddings_data() -> dict:
    """Chapter 08's learned task embeddings, from the committed HyperLoRA run (08-hyperlora.json)."""
    from lowrank_ref.experiments.hyperlora_experiments import embedding_figure_data

    return embedding_figure_data(json.loads((DATA / "08-hyperlora.json").read_text(encoding="utf-8")))


def plot_task_embeddings(d: dict):
    from lowrank_ref.experiments.hyperlora_experiments import embedding_figure

    return embedding_figure(d)


FIGURES = {
    "00-central-difference-error": (central_difference_errors, plot_eps_curve, "00-toolkit"),
    "01-rank-alpha": (rank_alpha_data, plot_rank_alpha, "01-lora"),
    "02-rank-sweep": (rank_sweep_data, plot_rank_sweep, "02-dora"),
    "03-nf4-code-usage": (nf4_code_usage_data, plot_nf4_code_usage, "03-qlora"),
    "04-learned-vs-kept": (compare_data, plot_learned_vs_kept, "04-compare"),
    "04-learning-forgetting": (forgetting_data, plot_learning_forgetting, "04-compare"),
    "05-hadamard-rank": (hadamard_rank_data, plot_hadamard_rank, "05-products"),
    "08-task-embeddings": (task_embeddings_data, plot_task_embeddings, "08-serving"),
}


# ---------------------------------------------------------------- 09: prompt tuning over k


def _prompt_k_data() -> dict:
    from lowrank_ref.experiments.prompt_experiments import k_sweep_data

    return k_sweep_data()


def _plot_prompt_k(d: dict):
    from lowrank_ref.experiments.prompt_experiments import plot_k_sweep

    return plot_k_sweep(d)


FIGURES["09-prompt-k"] = (_prompt_k_data, _plot_prompt_k, "09-baselines")


# ---------------------------------------------------------------- 07: rank growth per layer
def selora_growth_data() -> dict:
    """Every layer's rank after each check of the SeLoRA-style runs (``chapters/data/07-growth-sparse.json``)."""
    full = json.loads((DATA / "07-growth-sparse.json").read_text(encoding="utf-8"))
    keep = ("threshold", "final_ranks", "growth")
    return {"selora": {"runs": [{k: r[k] for k in keep} for r in full["selora"]["runs"]]}}


def plot_selora_growth(d: dict):
    from lowrank_ref.experiments.rank_growth import plot_growth

    return plot_growth(d)


FIGURES["07-selora-growth"] = (selora_growth_data, plot_selora_growth, "07-rank")
# ---------------------------------------------------------------- 05: fitting one update with each structure


def structure_fit_data() -> dict:
    """Chapter 05's fitting experiment, read from its committed result file
    (``python -m lowrank_ref.experiments.structure_fit`` writes it; minutes, so not rerun here)."""
    return json.loads((ROOT / "chapters" / "data" / "05-structure-fit.json").read_text(encoding="utf-8"))


STRUCTURE_STYLE = {"lora": ("s-", "LoRA (truncated SVD: optimal)"), "loha": ("o-", "LoHa"),
                   "lokr": ("^-", "LoKr (f = 2)"), "krona": ("v-", "KronA"), "vera": ("D-", "VeRA")}


def plot_structure_fit(d: dict):
    import matplotlib.pyplot as plt

    names = list(d["targets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8))
    for ax, name in zip(np.atleast_1d(axes), names):
        info = d["targets"][name]
        for st, (style, label) in STRUCTURE_STYLE.items():
            rows = sorted((r for r in d["rows"] if r["target"] == name and r["structure"] == st),
                          key=lambda r: r["params"])
            ax.plot([r["params"] for r in rows], [r["error"] for r in rows], style, ms=4, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("‖ΔW − T‖ / ‖T‖")
        ax.set_title(f"{name}: {info['shape'][0]}×{info['shape'][1]}, stable rank {info['stable_rank']:.1f}",
                     fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


FIGURES["05-structure-fit"] = (structure_fit_data, plot_structure_fit, "05-products")


def data_of(name: str):
    """The data figure ``name`` is drawn from, computed now."""
    return FIGURES[name][0]()


def make(names=None, out: Path = OUT) -> list[Path]:
    """Compute, plot and write ``<name>.png`` and ``<name>.json`` for each figure."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or FIGURES:
        data_fn, plot_fn, _ = FIGURES[name]
        d = data_fn()
        (out / f"{name}.json").write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")
        fig = plot_fn(d)
        fig.savefig(out / f"{name}.png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="write the chapters' figures to chapters/figures/")
    ap.add_argument("names", nargs="*", choices=[*FIGURES, []], help="figures to make (default: all)")
    args = ap.parse_args(argv)
    for p in make(args.names or None):
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
