r"""Classroom mode, measured: how long each notebook takes with ``LOWRANK_REF_MODE=classroom`` and
whether the conclusions its chapter states hold at that size.

``python -m lowrank_ref.experiments.classroom`` (``make classroom``) executes every chapter notebook
(not the exercise notebooks) in a fresh kernel with ``LOWRANK_REF_MODE=classroom``, on a copy (the
committed notebooks and their outputs are not touched), and times it. For the notebooks whose
classroom runs are smaller than the full ones, a last cell added to the copy hands the notebook's
own results to :func:`conclusions`, which checks the statements the chapter makes about them; the
others run at their full size in classroom mode (their runs already fit), so their conclusions are
the chapter's by construction. Everything goes to ``chapters/data/classroom.json``;
``tests/test_classroom.py`` checks that file: every notebook within the time limit, every recorded
conclusion holding, and the recorded sizes equal to what the code uses now. The time limit is on
the kernel's CPU time (user + system, :func:`os.times`): every training run uses one BLAS thread,
so on a quiet machine that is the wall time, while the wall time on a shared machine says more
about the neighbours than about the notebook (both are recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["ROOT", "DATA_FILE", "LIMIT_SECONDS", "notebooks", "classroom_sizes", "conclusions", "export",
           "run_notebook", "run_all", "recheck", "main"]

ROOT = Path(__file__).resolve().parents[2]
DATA_FILE = ROOT / "chapters" / "data" / "classroom.json"
LIMIT_SECONDS = 300  # the syllabus promises about five minutes a notebook (here: on 2 shared cores)
_ENV_OUT = "LOWRANK_REF_CLASSROOM_EXPORT"


def notebooks() -> list[str]:
    """The chapter notebooks' stems (``"01-lora"``, ...), exercise notebooks left out."""
    return sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb") if not p.stem.endswith("-exercises"))


def classroom_sizes() -> dict:
    """The sizes classroom mode uses where they differ from the full runs, per notebook."""
    from lowrank_ref.experiments import adalora_experiments as ax
    from lowrank_ref.experiments import dora_experiments as dx
    from lowrank_ref.experiments import lora_experiments as le
    from lowrank_ref.experiments import scaling_rules as sr

    def plain(d):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    return {"01-lora": plain(le.settings(mode="classroom")),
            "02-dora": {"rank_sweep_ranks": list(dx.rank_sweep_ranks("classroom")),
                        "scaling_rules": plain(sr.settings("classroom"))},
            "07-rank": {"steps": ax.steps_for("classroom")}}


# -- the notebooks' own results, handed over by a last cell ------------------------------------------
_EXPORTS = {"01-lora": ("results",), "02-dora": ("sweep", "md_res", "scaling"), "07-rank": ("res",)}


_BULKY = ("model", "train_losses", "points", "last", "records")  # not needed by any check: left out of the record


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items() if k not in _BULKY}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def export(namespace: dict, name: str) -> None:
    """Called from the last cell of a classroom copy: write the notebook's results to the file named
    by ``LOWRANK_REF_CLASSROOM_EXPORT``."""
    t = os.times()  # this kernel's own CPU time: on a quiet machine its wall time (one BLAS thread)
    got = {"cpu_seconds": t.user + t.system + t.children_user + t.children_system,
           "results": {k: _jsonable(namespace[k]) for k in _EXPORTS.get(name, ()) if k in namespace}}
    Path(os.environ[_ENV_OUT]).write_text(json.dumps(got), encoding="utf-8")


# -- the chapters' statements, checked on those results ----------------------------------------------
def _c(claim: str, holds: bool, **values) -> dict:
    return {"claim": claim, "holds": bool(holds), **values}


def _conclusions_01(res: dict) -> list[dict]:
    from lowrank_ref.experiments.lora_experiments import summarize

    res = res["results"]  # the notebook's own variable
    ra = {(r["rule"], r["r"]): r for r in summarize(res["rank_alpha"], ["rule", "r"])}
    ranks = sorted({r for _, r in ra})
    lo, hi = ranks[0], ranks[-1]
    t = {k: v["target_after"] for k, v in ra.items()}
    out = [
        _c("at compare's learning rate each rule wins where it gives the larger s: at the smallest rank "
           "alpha/r (s = 16/r) beats alpha = 2r",
           t[("alpha=16, alpha/r", lo)] > t[("alpha=2r", lo)], r=lo, alpha_r=t[("alpha=16, alpha/r", lo)],
           alpha_2r=t[("alpha=2r", lo)]),
        _c("at compare's learning rate alpha/r with alpha fixed starves large ranks: at the largest rank "
           "alpha = 2r beats it",
           t[("alpha=2r", hi)] > t[("alpha=16, alpha/r", hi)], r=hi, alpha_2r=t[("alpha=2r", hi)],
           alpha_r=t[("alpha=16, alpha/r", hi)]),
        _c("rank helps with diminishing returns (alpha = 2r): r = 1 -> 8 gains more than 8 -> the largest, "
           "which still gains", t[("alpha=2r", 8)] - t[("alpha=2r", lo)] > t[("alpha=2r", hi)] - t[("alpha=2r", 8)] > 0,
           gain_low=t[("alpha=2r", 8)] - t[("alpha=2r", lo)], gain_high=t[("alpha=2r", hi)] - t[("alpha=2r", 8)]),
    ]
    learned = [r["target_after"] for r in res["rank_alpha"]]
    kept = [r["retained_after"] for r in res["rank_alpha"]]
    corr = float(np.corrcoef(learned, kept)[0, 1])
    out.append(_c("forgetting follows learning: over the rank sweep, retained accuracy falls as target accuracy "
                  "rises", corr < 0, correlation=corr))
    sl = {(r["scaling"], r["lr"]): r["target_after"] for r in summarize(res["scaling_lr"], ["scaling", "lr"])}
    cells = sorted(sl.values())
    lrs, ss = sorted({k[1] for k in sl}), sorted({k[0] for k in sl})
    out.append(_c("s acts like a learning-rate multiplier: at the smallest lr a larger s learns more, and the best "
                  "cells of every row of the s x lr grid are within a point of each other",
                  all(sl[(a, lrs[0])] < sl[(b, lrs[0])] for a, b in zip(ss, ss[1:]))
                  and max(max(sl[(s, lr)] for lr in lrs) for s in ss) - min(max(sl[(s, lr)] for lr in lrs) for s in ss) < 0.01,
                  best=cells[-1]))
    tg = {r["target_set"]: r["target_after"] for r in summarize(res["targets"], ["target_set"])}
    out.append(_c("more kinds of layers learn more at the same rank (q, v < q, k, v, o < all linear), and every "
                  "linear layer at r = 2 beats q, v at r = 8", tg["q, v"] < tg["q, k, v, o"] <= tg["all linear"] + 0.005
                  and tg["all linear, r=2"] > tg["q, v"], **{k: v for k, v in tg.items()}))
    it = {r["init"]: r["target_after"] for r in summarize(res["init"], ["init"])}
    out.append(_c("Kaiming-uniform and Gaussian A end within a point of each other",
                  abs(it["kaiming"] - it["gaussian"]) < 0.01, **it))
    return out


def _conclusions_02(res: dict) -> list[dict]:
    from lowrank_ref.experiments import scaling_rules as sr

    sweep = res["sweep"]
    by = {(r["rule"] != "alpha/r", r["r"]): r["dialect_loss"] for r in sweep}  # True: alpha/sqrt(r)
    ranks = sorted({r for _, r in by})
    out = [_c("at one learning rate alpha/sqrt(r) reaches a lower dialect loss than alpha/r at every rank > 1 "
              "(the confounded comparison: its s is larger)", all(by[(True, r)] < by[(False, r)] for r in ranks if r > 1),
              ranks=ranks)]
    md = res["md_res"]
    out.append(_c("row by row, LoRA's turned rows are also its lengthened ones; in DoRA the two decouple "
                  "(its correlation over rows is nearer zero than LoRA's)",
                  md["lora"]["row_corr"] > 0.2 and abs(md["dora"]["row_corr"]) < md["lora"]["row_corr"],
                  dora=md["dora"]["row_corr"], lora=md["lora"]["row_corr"]))
    c = sr.conclusions(res["scaling"])
    out.append(_c("rsLoRA and LoRA at the same s train to the same numbers", c["matched_s_identical"]))
    out.append(_c("at one learning rate rsLoRA learns more than alpha/r at large rank (its s is larger)",
                  c["fixed_lr_gain"] > 0, fixed_lr_gain=c["fixed_lr_gain"]))
    out.append(_c("with each rule at its own best learning rate, rsLoRA and alpha/r are within a point",
                  c["best_lr_gap"] < 0.01, best_lr_gap=c["best_lr_gap"], fixed_lr_gain=c["fixed_lr_gain"]))
    return out


def _conclusions_07(res: dict) -> list[dict]:
    res = res["res"]  # the notebook's own variable
    budget = [b for _, b, _ in res["budget"]]
    ranks = list(res["final_ranks"].values())
    return [
        _c("the rank budget only decreases", all(b2 <= b1 for b1, b2 in zip(budget, budget[1:])),
           start=budget[0], end=budget[-1]),
        _c("the final ranks are not spread evenly: some layers keep more than the even share, some less",
           max(ranks) > res["config"]["target_r"] > min(ranks), final_ranks=res["final_ranks"]),
        _c("no triplet comes back in the final phase", sum(res["revivals_in_final_phase"].values()) == 0),
        _c("the allocator is a small part of a training step (the chapter: about 0.6%; checked: under 5%)",
           res["seconds_per_step"]["allocator"] < 0.05 * res["seconds_per_step"]["adalora"],
           allocator=res["seconds_per_step"]["allocator"], step=res["seconds_per_step"]["adalora"]),
    ]


_CONCLUSIONS = {"01-lora": _conclusions_01, "02-dora": _conclusions_02, "07-rank": _conclusions_07}


def conclusions(name: str, results: dict) -> list[dict] | None:
    """The chapter's statements checked on a notebook's classroom results, or ``None`` where the
    notebook runs at full size in classroom mode."""
    fn = _CONCLUSIONS.get(name)
    return None if fn is None else fn(results)


# -- running ------------------------------------------------------------------------------------------
def run_notebook(name: str, timeout: int = 1800) -> dict:
    """Execute ``notebooks/<name>.ipynb`` on a copy in classroom mode; its wall time and results."""
    import nbclient
    import nbformat

    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        f"from lowrank_ref.experiments import classroom as _classroom\n_classroom.export(globals(), {name!r})"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export.json"
        env = {"LOWRANK_REF_MODE": "classroom", "MPLBACKEND": "Agg", _ENV_OUT: str(out)}
        old = {k: os.environ.get(k) for k in (*env, "LOWRANK_REF_QUICK", "LOWRANK_REF_RERUN")}
        os.environ.update(env)
        os.environ.pop("LOWRANK_REF_QUICK", None)
        os.environ.pop("LOWRANK_REF_RERUN", None)
        try:
            client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                             resources={"metadata": {"path": str(path.parent)}})
            t0 = time.perf_counter()
            client.execute()
            seconds = time.perf_counter() - t0
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        got = json.loads(out.read_text(encoding="utf-8"))
    return {"seconds": seconds, "cpu_seconds": got["cpu_seconds"], "results": got["results"]}


def run_all(names=None, out: Path | None = DATA_FILE, progress: bool = True) -> dict:
    """Run the notebooks (default: all) in classroom mode, check the conclusions, write the JSON
    (merged into an existing file when only some notebooks are rerun)."""
    names = notebooks() if names is None else list(names)
    prev = json.loads(out.read_text(encoding="utf-8")) if out is not None and out.exists() else {"notebooks": {}}
    rows = dict(prev.get("notebooks", {}))
    for name in names:
        r = run_notebook(name)
        try:
            concl = conclusions(name, r["results"])
        except Exception as e:  # keep the run: --recheck can redo the conclusions
            concl = [_c(f"the check itself failed: {type(e).__name__}: {e}", False)]
        rows[name] = {"seconds": round(r["seconds"], 1), "cpu_seconds": round(r["cpu_seconds"], 1),
                      "conclusions": concl, "results": r["results"],
                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                      "load_average": round(os.getloadavg()[0], 2)}
        if progress:
            bad = [c["claim"] for c in concl or [] if not c["holds"]]
            print(f"[classroom] {name}: {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU, "
                  f"{'full size' if concl is None else f'{len(concl) - len(bad)}/{len(concl)} conclusions hold'}"
                  + (f"; FAILS: {bad}" if bad else ""), file=sys.stderr, flush=True)
        data = {"limit_seconds": LIMIT_SECONDS, "sizes": classroom_sizes(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, NumPy {np.__version__}",
                "notebooks": dict(sorted(rows.items()))}
        if out is not None:
            out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def recheck(out: Path = DATA_FILE) -> dict:
    """Recompute the conclusions from the results the record keeps (after a check is changed),
    without running the notebooks again."""
    data = json.loads(out.read_text(encoding="utf-8"))
    for name, r in data["notebooks"].items():
        r["conclusions"] = conclusions(name, r["results"])
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowrank_ref.experiments.classroom", description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="stems such as 01-lora (default: every chapter notebook)")
    ap.add_argument("--out", default=str(DATA_FILE))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge records written by separate runs into --out")
    ap.add_argument("--recheck", action="store_true", help="only recompute the conclusions from the recorded results")
    a = ap.parse_args(argv)
    if a.merge:  # records of notebooks run in separate processes (to use more cores) into --out
        parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in a.merge]
        # later files win, for the notebooks and for the sizes (the newest run's)
        data = {**parts[-1], "notebooks": dict(sorted({k: v for p in parts for k, v in p["notebooks"].items()}.items()))}
        Path(a.out).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"merged into {a.out}", file=sys.stderr)
        return 0
    if a.recheck:
        recheck(Path(a.out))
        print(f"rechecked {a.out}", file=sys.stderr)
        return 0
    known = notebooks()
    bad = [n for n in a.notebooks if n not in known]
    if bad:
        ap.error(f"unknown notebook(s) {', '.join(bad)}; known: {', '.join(known)}")
    data = run_all(a.notebooks or None, out=Path(a.out))
    failing = [n for n, r in data["notebooks"].items()
               if r["cpu_seconds"] > LIMIT_SECONDS or any(not c["holds"] for c in r["conclusions"] or [])]
    print(f"wrote {a.out}" + (f"; not met: {', '.join(failing)}" if failing else ""), file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())
