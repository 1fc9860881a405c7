r"""How the cost grows: time and memory of the LoRA and DoRA layers and the GPT step as the work grows.

    python -m bench.scaling [--quick] [--out DIR]     (``make bench`` runs it after bench.run)

Each sweep changes one size and keeps the others fixed, times the NumPy reference on one thread
(the median of a few calls), measures memory with ``tracemalloc`` (NumPy reports its array
allocations to it), and fits ``cost ∝ size^k`` by least squares on the logarithms. What the
formulas predict, for ``N`` tokens, width ``d`` (``d_in = d_out = d``) and rank ``r``:

- the layer's step (forward + backward, base frozen): ``4 N d²`` for the base plus ``12 N r d``
  for the adapter, so ``k ≈ 1`` in ``N`` and ``k ≈ 2`` in ``d`` once ``d ≫ r``;
- the adapter's own time (the step minus the frozen base layer's step): ``12 N r d`` flops, so
  ``k ≈ 1`` in ``r`` once those dominate; but its thin products are memory-bound (each reads or
  writes an ``(N, d)`` array, a cost ``∝ N d`` that does not shrink with ``r``), so at small ranks
  the time sits on that floor and the fit in ``r`` falls below 1, and the fit in ``d`` above 1;
- the adapter's resident memory (``A``, ``B``, their gradients; DoRA adds ``m``): ``∝ r (d_in + d_out)``,
  ``k = 1`` in ``r`` and in ``d``; the activations a step keeps: ``∝ N d``;
- the GPT step: ``∝ N`` in the tokens, between ``d`` and ``d²`` in the width (the attention
  scores cost ``N T d``, the projections ``N d²``);
- QLoRA's frozen base: ``0.5 + 4/64`` bytes per weight (NF4 codes and float32 block scales; with
  double quantisation about ``0.5 + 1/64``), against 4 bytes in float32: both ``∝ d²``.

Writes ``DIR/scaling.json`` (every point and every fit), ``DIR/scaling.md`` (the fits) and
``DIR/scaling.png`` (log-log plots with the fitted lines).
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import sys
import time
import tracemalloc

import numpy as np

BENCH_DIR = pathlib.Path(__file__).resolve().parent

FULL = {
    "N": [1024, 2048, 4096, 8192], "d": [256, 512, 1024, 2048], "r": [8, 32, 128, 512],
    "fixed": {"N": 4096, "d": 1024, "r": 16}, "repeats": 5,
    "gpt_batch": [4, 8, 16, 32], "gpt_d": [64, 128, 256, 512],
    "gpt_fixed": {"batch": 16, "d": 256, "T": 128, "layers": 2, "vocab": 512},
    "qlora_d": [512, 1024, 2048, 4096],
}
QUICK = {
    "N": [16, 32, 64], "d": [16, 32, 64], "r": [2, 4, 8], "fixed": {"N": 32, "d": 32, "r": 4}, "repeats": 1,
    "gpt_batch": [1, 2, 4], "gpt_d": [16, 32], "gpt_fixed": {"batch": 2, "d": 16, "T": 8, "layers": 1, "vocab": 32},
    "qlora_d": [64, 128, 256],
}


def fit_exponent(sizes, costs) -> float:
    """``k`` in ``cost ≈ c · size^k``: the slope of ``log cost`` on ``log size`` (least squares)."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(costs, float))
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("fit_exponent needs at least two different sizes")
    return float(np.polyfit(x, y, 1)[0])


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _traced(fn):
    """``(bytes still held after fn, peak bytes above the start while fn ran)`` from tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        kept = fn()
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return now - start, peak - start


_CLASSES = {"lora": ("LoRALinear", "LoRAConfig"), "dora": ("DoRALinear", "DoRAConfig")}


def _adapter(method: str, base, r: int, rng):
    import lowrank_ref as lr

    cls, cfg = (getattr(lr.adapters, _CLASSES[method][0]), getattr(lr, _CLASSES[method][1]))
    return cls(base, cfg(r=r, alpha=2 * r), rng=rng)


def _layer_point(method: str, N: int, d: int, r: int, repeats: int, rng) -> dict:
    import lowrank_ref as lr

    x = rng.standard_normal((N, d)).astype(np.float32)
    dy = rng.standard_normal((N, d)).astype(np.float32)
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    base = lr.nn.Linear.from_arrays(W, np.zeros(d, np.float32)).requires_grad_(False)  # frozen: x̄ only
    layer = _adapter(method, lr.nn.Linear.from_arrays(W, np.zeros(d, np.float32)), r, rng)
    layer.B.data = (0.01 * rng.standard_normal(layer.B.shape)).astype(np.float32)  # as if trained

    def step(m):
        def f():
            m.forward(x)
            dx = m.backward(dy)
            m.zero_grad()
            return dx
        return f

    t = _median_seconds(step(layer), repeats)
    t_base = _median_seconds(step(base), repeats)
    _, step_peak = _traced(step(layer))  # what one step allocates at its peak (activations, temporaries)

    def resident():  # the adapter's own tensors and their gradients, after one (one-token) step
        m = _adapter(method, base, r, np.random.default_rng(0))
        m.forward(x[:1])
        m.backward(dy[:1])
        return m

    kept, _ = _traced(resident)
    return {"method": method, "N": N, "d": d, "r": r, "seconds": t, "base_seconds": t_base,
            "adapter_seconds": max(t - t_base, 1e-9), "step_peak_bytes": step_peak, "adapter_bytes": kept}


def _gpt_point(batch: int, d: int, fixed: dict, repeats: int) -> dict:
    import lowrank_ref as lr
    from lowrank_ref.inject import inject
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    rng = np.random.default_rng(0)
    cfg = GPTConfig(vocab_size=fixed["vocab"], block_size=fixed["T"], n_layer=fixed["layers"],
                    n_head=max(1, d // 64), d_model=d)
    model = GPT(cfg, rng=rng)
    inject(model, lr.LoRAConfig(r=8, alpha=16), targets=("q", "v"), rng=0)
    opt = lr.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    idx = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        _, dlogits = model.loss(x, y)
        model.backward(dlogits)
        opt.step()
        opt.zero_grad()

    t = _median_seconds(step, repeats)
    _, peak = _traced(step)
    return {"method": "gpt", "N": batch * cfg.block_size, "d": d, "r": 8, "seconds": t, "step_peak_bytes": peak}


def _qlora_point(d: int) -> dict:
    from lowrank_ref import quant

    W = (np.random.default_rng(0).standard_normal((d, d)) * 0.02).astype(np.float32)
    out = {"method": "qlora_base", "d": d, "float32_bytes": W.nbytes}
    for dq in (False, True):
        kept, _ = _traced(lambda dq=dq: quant.quantize_nf4(W, 64, double_quant=dq))
        out["nf4_dq_bytes" if dq else "nf4_bytes"] = kept
    return out


def run(quick: bool = False) -> dict:
    """Every sweep and every fit (see the module docstring for what each should show)."""
    from bench.run import single_thread

    cfg = QUICK if quick else FULL
    fx, reps = cfg["fixed"], cfg["repeats"]
    rng = np.random.default_rng(0)
    points = []
    with single_thread():
        for method in ("lora", "dora"):
            for N in cfg["N"]:
                points.append({"sweep": "N", **_layer_point(method, N, fx["d"], fx["r"], reps, rng)})
            for d in cfg["d"]:
                points.append({"sweep": "d", **_layer_point(method, fx["N"], d, fx["r"], reps, rng)})
            for r in cfg["r"]:
                points.append({"sweep": "r", **_layer_point(method, fx["N"], fx["d"], r, reps, rng)})
        g = cfg["gpt_fixed"]
        for b in cfg["gpt_batch"]:
            points.append({"sweep": "N", **_gpt_point(b, g["d"], g, reps)})
        for d in cfg["gpt_d"]:
            points.append({"sweep": "d", **_gpt_point(g["batch"], d, g, reps)})
    for d in cfg["qlora_d"]:
        points.append({"sweep": "d", **_qlora_point(d)})
    return {"points": points, "fits": fits(points), "fixed": fx, "gpt_fixed": cfg["gpt_fixed"], "quick": quick}


# (method, sweep, cost key) -> what the formulas predict
EXPECTED = {
    ("lora", "N", "seconds"): "1 (N d²)", ("lora", "d", "seconds"): "2 (N d²)",
    ("lora", "r", "adapter_seconds"): "1 (N r d)", ("lora", "d", "adapter_seconds"): "1 (N r d)",
    ("lora", "r", "adapter_bytes"): "1 (r d)", ("lora", "d", "adapter_bytes"): "1 (r d)",
    ("lora", "N", "step_peak_bytes"): "1 (N d)",
    ("dora", "N", "seconds"): "1 (N d²)", ("dora", "d", "seconds"): "2 (N d²)",
    ("dora", "r", "adapter_seconds"): "1 (N r d)", ("dora", "d", "adapter_seconds"): "1 (N r d)",
    ("dora", "r", "adapter_bytes"): "1 (r d)", ("dora", "d", "adapter_bytes"): "1 (r d)",
    ("dora", "N", "step_peak_bytes"): "1 (N d)",
    ("gpt", "N", "seconds"): "1 (N)", ("gpt", "d", "seconds"): "1 to 2 (N T d + N d²)",
    ("gpt", "N", "step_peak_bytes"): "1 (N)",
    ("qlora_base", "d", "float32_bytes"): "2 (d²)", ("qlora_base", "d", "nf4_bytes"): "2 (d²)",
    ("qlora_base", "d", "nf4_dq_bytes"): "2 (d²)",
}


def fits(points: list[dict]) -> list[dict]:
    out = []
    for (method, sweep, key), expected in EXPECTED.items():
        pts = [p for p in points if p["method"] == method and p["sweep"] == sweep and p.get(key)]
        if len({p[sweep] for p in pts}) < 2:
            continue
        xs, ys = [p[sweep] for p in pts], [p[key] for p in pts]
        out.append({"method": method, "sweep": sweep, "cost": key, "exponent": fit_exponent(xs, ys),
                    "expected": expected, "sizes": xs})
    return out


def render_markdown(res: dict, meta: dict) -> str:
    fx, g = res["fixed"], res["gpt_fixed"]
    lines = [f"Measured {meta['date']} on {meta['cpu']} (NumPy on one thread; OpenBLAS kernel "
             f"{meta.get('blas_arch')}). Layers: one sweep at a time around N={fx['N']}, d={fx['d']}, r={fx['r']}; "
             f"GPT: {g['layers']} layers, T={g['T']}, vocab {g['vocab']}, LoRA r=8 on q, v, around batch {g['batch']}, "
             f"d={g['d']}." + (" **Quick mode** (smoke-test sizes)." if res.get("quick") else ""),
             "", "| what | grows with | cost | fitted exponent | expected | sizes |", "|---|---|---|---:|---|---|"]
    for f in res["fits"]:
        lines.append(f"| {f['method']} | {f['sweep']} | {f['cost']} | {f['exponent']:.2f} | {f['expected']} "
                     f"| {', '.join(map(str, f['sizes']))} |")
    q = [p for p in res["points"] if p["method"] == "qlora_base"]
    if q:
        big = max(q, key=lambda p: p["d"])
        lines += ["", f"QLoRA's frozen base at d={big['d']}: float32 {big['float32_bytes'] / 2**20:.1f} MiB, "
                  f"NF4 {big['nf4_bytes'] / 2**20:.2f} MiB ({8 * big['nf4_bytes'] / big['d'] ** 2:.2f} bits per weight), "
                  f"NF4 with double quantisation {big['nf4_dq_bytes'] / 2**20:.2f} MiB "
                  f"({8 * big['nf4_dq_bytes'] / big['d'] ** 2:.2f} bits per weight)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    panels = [
        (axes[0, 0], "N", "seconds", ("lora", "dora", "gpt"), "tokens N", "step time (s)"),
        (axes[0, 1], "d", "seconds", ("lora", "dora", "gpt"), "width d", "step time (s)"),
        (axes[1, 0], "r", "adapter_seconds", ("lora", "dora"), "rank r", "adapter time: step − base step (s)"),
        (axes[1, 1], None, None, None, "width d (QLoRA) / rank r (adapters)", "bytes"),
    ]
    for ax, sweep, key, methods, xl, yl in panels:
        if sweep is None:
            q = sorted((p for p in pts if p["method"] == "qlora_base"), key=lambda p: p["d"])
            for k, lab in (("float32_bytes", "float32 base"), ("nf4_bytes", "NF4 base"), ("nf4_dq_bytes", "NF4 + double quant")):
                if q:
                    ax.loglog([p["d"] for p in q], [p[k] for p in q], "o-", label=lab)
            for m in ("lora", "dora"):
                a = sorted((p for p in pts if p["method"] == m and p["sweep"] == "r"), key=lambda p: p["r"])
                if a:
                    ax.loglog([p["r"] for p in a], [p["adapter_bytes"] for p in a], "s--", label=f"{m} adapter vs r")
        else:
            for m in methods:
                a = sorted((p for p in pts if p["method"] == m and p["sweep"] == sweep and p.get(key)),
                           key=lambda p: p[sweep])
                if len(a) < 2:
                    continue
                xs, ys = np.array([p[sweep] for p in a], float), np.array([p[key] for p in a], float)
                k = fit_exponent(xs, ys)
                c = np.exp(np.mean(np.log(ys) - k * np.log(xs)))
                ax.loglog(xs, ys, "o", label=f"{m}: k = {k:.2f}")
                ax.loglog(xs, c * xs**k, "-", alpha=0.6, color=ax.lines[-1].get_color())
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("How the cost grows (NumPy reference, one thread; lines: fitted cost ∝ size^k)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from bench.run import machine_info

    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes")
    ap.add_argument("--out", default=str(BENCH_DIR / "results"), help="where scaling.json/.md/.png go")
    args = ap.parse_args(argv)
    res = run(args.quick)
    meta = machine_info(args.quick)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"meta": meta, **res}, indent=2, default=str) + "\n")
    md = render_markdown(res, meta)
    (out / "scaling.md").write_text(md)
    plot(res, out / "scaling.png")
    print(md)
    print(f"wrote {out / 'scaling.json'}, {out / 'scaling.md'} and {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
