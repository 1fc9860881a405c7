r"""``make bench``: time the project's hot paths side by side in one process; write JSON and markdown.

    python -m bench.run [--quick] [--only NAME ...] [--out DIR]

Every module ``bench/bench_<topic>.py`` is imported and its ``run`` called. ``--only lora`` (or
``--only bench_lora``) runs one module; ``--quick`` asks each module for a smoke-test size (it
checks that the harness and the code paths work; its timings mean little). The results go to
``DIR/bench.json`` and ``DIR/bench.md`` (default ``bench/results``), and the table is printed.

The contract for a benchmark module
-----------------------------------

.. code-block:: python

    def run(quick: bool) -> list[dict]: ...

Each dict is one row of the table:

``name`` (str)
    What is measured, e.g. ``"lora_layer_fwd_bwd"``. Rows with the same name are compared.
``impl`` (str)
    Which implementation: ``"numpy"``, ``"torch"``, ``"peft"``, ``"merged"``, ... Unique within a name.
``seconds`` (float or None)
    The median wall time of one call over the repeats, after warm-up. ``None`` only for a skipped row.
``ratio_to`` (str or None)
    The ``impl`` of the row (same ``name``) that this row's time is divided by; ``None`` for a
    row that is only a reference.

Optional keys:

``goal`` (float)
    The ratio this row must not exceed; the table says whether it is met.
``skipped`` (str)
    Why there is no time (``"peft is not installed"``); ``seconds`` is then ``None``.
``flops`` (float) or ``bytes`` (float)
    The work of one call: floating-point operations (a multiply-add counts 2), or bytes read
    plus bytes written. The table then shows the achieved GFLOP/s or GB/s and its fraction of
    the machine's limit, measured in the same process before the rows (:func:`measure_peak`).
anything else
    (``shape``, ``min_seconds``, ``repeats``, ``note``, ``max_abs_diff``...) is kept in the JSON.

The machine's limits
--------------------

:func:`measure_peak` times a large float32 GEMM (NumPy's BLAS and torch, one thread each; the
faster is the GEMM peak) and a large copy (``np.copyto``: GB/s counts the bytes read and
written), in the process that then runs the rows, on one thread as the rows are. Every row with
``flops`` is divided by the GEMM peak, every row with ``bytes`` by the copy rate: a fraction near 1
means the row runs at the speed of the hardware, far below 1 says how much is left.

Use :func:`time_interleaved` to time the implementations of one ``name``: they take turns, call
by call, so the noise of a shared machine (other processes, clock changes) falls on all of them
alike rather than on whichever happened to run during a busy second; and :func:`single_thread`
to run them on one core each (say so in the row, e.g. in ``shape``). Never assert on timings in
tests: the goals live here, in the table.

A module that raises does not stop the others: its error becomes a skipped row, the traceback is
printed, and the command exits with status 1 at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

__all__ = ["time_interleaved", "single_thread", "check_rows", "add_ratios", "add_peak_fractions", "measure_peak",
           "render_markdown", "discover", "main"]

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REQUIRED = ("name", "impl", "seconds", "ratio_to")


# -- timing ---------------------------------------------------------------------------------
def time_interleaved(fns: dict, repeats: int = 10, warmup: int = 2, clock=time.perf_counter) -> dict:
    """Time each zero-argument callable in ``fns`` (``{impl: fn}``), taking turns.

    Each callable runs ``warmup`` times first (untimed), then ``repeats`` rounds in which every
    callable runs once, in an order rotated each round. The garbage collector is paused while
    timing. Returns ``{impl: {"seconds": median, "min_seconds": min, "repeats": repeats}}``.
    ``clock``: wall time by default; ``time.process_time`` counts this process's CPU time only,
    which a machine busy with other jobs disturbs far less (for single-threaded work).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = clock()
                fns[name]()
                times[name].append(clock() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return {n: {"seconds": statistics.median(ts), "min_seconds": min(ts), "repeats": repeats}
            for n, ts in times.items()}


def time_numpy_steps(layers: dict, x, dy, repeats: int, warmup: int = 2, clock=time.perf_counter) -> dict:
    """:func:`time_interleaved` of one forward + hand-written backward step of each NumPy layer in
    ``layers`` (``{impl: layer}``) on ``x`` with upstream ``dy``, the gradients dropped after each
    (the NumPy twin of :func:`time_torch_steps`, which the method benchmarks share)."""
    def step(layer):
        def fn():
            layer.forward(x)
            layer.backward(dy)
            layer.zero_grad()

        return fn

    return time_interleaved({k: step(v) for k, v in layers.items()}, repeats=repeats, warmup=warmup, clock=clock)


def time_torch_steps(modules: dict, x, dy, repeats: int, device: str = "cpu", clock=time.perf_counter) -> dict:
    """:func:`time_interleaved` of one forward + backward step of each torch module in
    ``modules`` (``{impl: module}``) on ``x`` with upstream ``dy``; on the CPU torch runs on one
    thread, as the NumPy rows do (the benchmarks of the methods share this step)."""
    import torch

    def step(m):
        def fn():
            x.grad = None
            m(x).backward(dy)
            m.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        return fn

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        return time_interleaved({k: step(v) for k, v in modules.items()}, repeats=repeats, clock=clock)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def single_thread():
    """Run NumPy's BLAS, OpenMP and torch on one thread inside the block (both sides alike).

    On a small shared machine, multi-threaded kernels stall whenever another process holds one of
    the cores (a thread waits at a barrier for its descheduled sibling), which turns timings into
    noise; one thread each compares the implementations, not the scheduler."""
    from threadpoolctl import threadpool_limits

    try:
        import torch
    except ImportError:
        torch = None
    n = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=1):  # BLAS and OpenMP (bitsandbytes' CPU kernels use OpenMP)
        if torch is not None:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(n)


# -- rows -----------------------------------------------------------------------------------
def check_rows(rows, source: str = "run()") -> list[dict]:
    """Raise ``ValueError`` unless ``rows`` follows the contract above; return it as a list."""
    if not isinstance(rows, list):
        raise ValueError(f"{source} must return a list of dicts, got {type(rows).__name__}")
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source} row {i} must be a dict, got {type(row).__name__}")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"{source} row {i} lacks {missing}: {row}")
        if not isinstance(row["name"], str) or not isinstance(row["impl"], str):
            raise ValueError(f"{source} row {i}: name and impl must be strings: {row}")
        key = (row["name"], row["impl"])
        if key in seen:
            raise ValueError(f"{source} row {i}: impl {row['impl']!r} appears twice under {row['name']!r}")
        seen.add(key)
        s = row["seconds"]
        if s is None:
            if not row.get("skipped"):
                raise ValueError(f"{source} row {i}: seconds is None but no 'skipped' reason is given")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"{source} row {i}: seconds must be a finite number >= 0, got {s!r}")
        goal = row.get("goal")
        if goal is not None and (isinstance(goal, bool) or not isinstance(goal, (int, float)) or goal <= 0):
            raise ValueError(f"{source} row {i}: goal must be a positive number, got {goal!r}")
        if goal is not None and row["ratio_to"] is None:
            raise ValueError(f"{source} row {i}: a goal needs ratio_to (what the ratio is taken against)")
        for key in ("flops", "bytes"):
            w = row.get(key)
            if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0):
                raise ValueError(f"{source} row {i}: {key} must be a positive number, got {w!r}")
        if row.get("flops") is not None and row.get("bytes") is not None:
            raise ValueError(f"{source} row {i}: give flops or bytes, not both (one limit per row)")
    for i, row in enumerate(rows):
        ref = row["ratio_to"]
        if ref is not None and (row["name"], ref) not in seen:
            raise ValueError(f"{source} row {i}: ratio_to={ref!r} names no row under {row['name']!r}")
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``ratio`` (seconds / the ``ratio_to`` row's seconds) and ``met`` (``ratio <= goal``)."""
    by_key = {(r["name"], r["impl"]): r for r in rows}
    for r in rows:
        r["ratio"], r["met"] = None, None
        ref = by_key.get((r["name"], r["ratio_to"])) if r["ratio_to"] is not None else None
        if ref is None or r["seconds"] is None or not ref["seconds"]:
            continue
        r["ratio"] = r["seconds"] / ref["seconds"]
        if r.get("goal") is not None:
            r["met"] = bool(r["ratio"] <= r["goal"])
    return rows


def add_peak_fractions(rows: list[dict], peak: dict | None) -> list[dict]:
    """Fill ``achieved`` (GFLOP/s or GB/s), ``unit`` and ``peak_fraction`` from ``flops``/``bytes``."""
    for r in rows:
        r["achieved"] = r["unit"] = r["peak_fraction"] = None
        if r["seconds"] is None or not r["seconds"]:
            continue
        for key, unit, limit in (("flops", "GFLOP/s", "gemm_gflops"), ("bytes", "GB/s", "copy_gbs")):
            if r.get(key) is not None:
                r["achieved"], r["unit"] = r[key] / r["seconds"] / 1e9, unit
                if peak and peak.get(limit):
                    r["peak_fraction"] = r["achieved"] / peak[limit]
    return rows


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peak(quick: bool = False) -> dict:
    """The machine's limits on one thread: float32 GEMM GFLOP/s and copy GB/s (best of a few calls).

    GEMM: ``C = A B`` with ``n × n`` float32 matrices (``2 n³`` flops), NumPy's BLAS and torch;
    the faster is ``gemm_gflops``. Copy: ``np.copyto`` of a float32 array much larger than the
    caches (bytes read + written). The best call, not the median: a limit is what the machine can
    do, and on a shared machine the slow calls measure the neighbours."""
    import numpy as np

    n = 256 if quick else 2048
    size = (1 << 16) if quick else (1 << 25)  # 128 MiB per array: far beyond the L3 cache
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    repeats = 2 if quick else 7
    out = {"gemm_n": n, "copy_mib": size * 4 / 2**20}
    with single_thread():
        out["gemm_numpy_gflops"] = 2 * n**3 / _best_seconds(lambda: np.matmul(a, b, out=c), repeats) / 1e9
        try:
            import torch

            ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
            out["gemm_torch_gflops"] = 2 * n**3 / _best_seconds(lambda: torch.mm(ta, tb, out=tc), repeats) / 1e9
        except ImportError:
            out["gemm_torch_gflops"] = None
        src = np.ones(size, dtype=np.float32)
        dst = np.empty_like(src)
        out["copy_gbs"] = 2 * src.nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats) / 1e9
    out["gemm_gflops"] = max(v for v in (out["gemm_numpy_gflops"], out["gemm_torch_gflops"]) if v)
    return out


def _achieved(r) -> str:
    if r.get("achieved") is None:
        return ""
    return f"{r['achieved']:.1f} {r['unit']}"


def _fraction(r) -> str:
    return "" if r.get("peak_fraction") is None else f"{100 * r['peak_fraction']:.0f}%"


def _ms(s) -> str:
    return "—" if s is None else f"{s * 1e3:.1f}"


def render_markdown(rows: list[dict], meta: dict) -> str:
    """The results as a markdown table, with the machine they were measured on."""
    lines = [
        "| benchmark | impl | median ms | min ms | ratio | goal | met | achieved | of peak |",
        "|---|---|---:|---:|---|---|---|---:|---:|",
    ]
    for r in rows:
        if r["seconds"] is None:
            ratio = f"skipped: {r.get('skipped')}"
        elif r.get("ratio") is not None:
            ratio = f"{r['ratio']:.2f}× {r['ratio_to']}"
        else:
            ratio = "reference" if r["ratio_to"] is None else "—"
        goal = f"≤ {r['goal']:.2f}× {r['ratio_to']}" if r.get("goal") is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        lines.append(f"| {r['name']} | {r['impl']} | {_ms(r['seconds'])} | {_ms(r.get('min_seconds'))} "
                     f"| {ratio} | {goal} | {met} | {_achieved(r)} | {_fraction(r)} |")
    notes = []
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        shape = next((r["shape"] for r in group if r.get("shape")), None)
        if isinstance(shape, (list, tuple)):
            shape = "×".join(map(str, shape))
        said = list(dict.fromkeys(r["note"] for r in group if r.get("note")))
        if shape or said:
            notes.append(f"- `{name}`: " + "; ".join(([shape] if shape else []) + said))
    seen_notes = notes
    machine = (f"{meta['cpu']}, {meta['cpu_count']} cores; Python {meta['python']}, NumPy {meta['numpy']}"
               f" ({meta['blas']}), torch {meta.get('torch') or 'not installed'}"
               f" ({meta.get('torch_threads')} threads by default; rows run on one thread where their"
               f" notes say so), PEFT {meta.get('peft') or 'not installed'}")
    head = [f"Measured {meta['date']} on {machine}."]
    if meta.get("loadavg"):
        head.append(f"Load average (1, 5, 15 min) when it finished: {meta['loadavg']}; the machine is shared, "
                    "so compare ratios within a run rather than times across runs.")
    if meta.get("openblas_env"):
        head.append(f"Environment: {meta['openblas_env']}.")
    if meta.get("blas_arch"):
        head.append(f"NumPy's OpenBLAS kernel: {meta['blas_arch']}.")
    peak = meta.get("peak")
    if peak:
        torch_part = (f", torch {peak['gemm_torch_gflops']:.1f}" if peak.get("gemm_torch_gflops") else "")
        head.append(f"The machine's limits on one thread, measured in the same process: float32 GEMM "
                    f"({peak['gemm_n']}³) {peak['gemm_gflops']:.1f} GFLOP/s (NumPy {peak['gemm_numpy_gflops']:.1f}"
                    f"{torch_part}), copy {peak['copy_gbs']:.1f} GB/s (read + write, "
                    f"{peak['copy_mib']:.0f} MiB); `of peak` divides each row's rate by the one that limits it.")
    if meta.get("quick"):
        head.append("**Quick mode** (smoke-test sizes: the timings mean little).")
    return "\n".join([" ".join(head), "", *lines, *([""] + seen_notes if seen_notes else []), ""])


# -- the machine ----------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_name() -> str:
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        return "BLAS unknown"


def _blas_arch():
    """The kernel family OpenBLAS picked (``Haswell``, ``SkylakeX``...), from threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info

        return next((i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"), None)
    except Exception:
        return None


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on this platform
        return None


def machine_info(quick: bool) -> dict:
    import numpy as np

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas_name(),
        "quick": quick,
        "loadavg": _loadavg(),
        "openblas_env": ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                                  if k in os.environ),
        "blas_arch": _blas_arch(),
    }
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["torch_threads"] = torch.get_num_threads()
    except ImportError:
        meta["torch"] = None
    try:
        from importlib.metadata import version

        meta["peft"] = version("peft")
    except Exception:
        meta["peft"] = None
    return meta


# -- running --------------------------------------------------------------------------------
def discover(only=None) -> list[str]:
    """Module names ``bench.bench_*`` found next to this file, filtered by ``only``."""
    names = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    if only:
        wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in only}
        unknown = wanted - set(names)
        if unknown:
            raise ValueError(f"--only: no benchmark module {sorted(unknown)}; known: {names}")
        names = [n for n in names if n in wanted]
    return names


def run_all(quick: bool = False, only=None, peak: dict | None = None) -> tuple[list[dict], list[str]]:
    """Run the modules; return ``(rows, errors)``. ``peak`` (from :func:`measure_peak`) fills the fractions."""
    rows: list[dict] = []
    errors: list[str] = []
    for mod_name in discover(only):
        print(f"[bench] {mod_name}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"bench.{mod_name}")
            got = check_rows(mod.run(quick=quick), f"bench.{mod_name}.run()")
        except Exception as e:  # one module's failure does not hide the others' results
            traceback.print_exc()
            errors.append(f"{mod_name}: {type(e).__name__}: {e}")
            got = [{"name": mod_name, "impl": "-", "seconds": None, "ratio_to": None,
                    "skipped": f"error: {type(e).__name__}: {e}"}]
        for r in got:
            r.setdefault("module", mod_name)
        rows.extend(got)
        print(f"[bench] {mod_name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return add_peak_fractions(add_ratios(rows), peak), errors


def write_results(rows: list[dict], meta: dict, out) -> tuple[pathlib.Path, pathlib.Path]:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "bench.json", out / "bench.md"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    mpath.write_text(render_markdown(rows, meta))
    return jpath, mpath


def rerender(out) -> pathlib.Path:
    """Rewrite ``out/bench.md`` from ``out/bench.json`` (after a change to the table's layout)."""
    out = pathlib.Path(out)
    data = json.loads((out / "bench.json").read_text())
    path = out / "bench.md"
    path.write_text(render_markdown(data["rows"], data["meta"]))
    return path


README_BEGIN = "<!-- bench:begin: generated from bench/results by `python -m bench.run --readme`; do not edit -->"
README_END = "<!-- bench:end -->"


def goal_history(json_paths) -> str:
    """A markdown table: each goal row's ratio in each of several runs (``bench.json`` files, in order)."""
    runs = [json.loads(pathlib.Path(p).read_text()) for p in json_paths]
    keys = list(dict.fromkeys((r["name"], r["impl"]) for run in runs for r in run["rows"] if r.get("goal")))
    head = "| benchmark | impl | goal | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | held in all |"
    lines = [head, "|---|---|---|" + "---:|" * len(runs) + "---|"]
    for name, impl in keys:
        cells, held = [], True
        goal = ref = None
        for run in runs:
            row = next((r for r in run["rows"] if (r["name"], r["impl"]) == (name, impl)), None)
            if row is None or row.get("ratio") is None:
                cells.append("—")
                held = False
                continue
            goal, ref = row["goal"], row["ratio_to"]
            cells.append(f"{row['ratio']:.2f}×" + ("" if row["met"] else " (no)"))
            held = held and bool(row["met"])
        lines.append(f"| {name} | {impl} | ≤ {goal:.2f}× {ref} | " + " | ".join(cells) + f" | {'yes' if held else '**no**'} |")
    dates = ", ".join(run["meta"]["date"] for run in runs)
    return f"Goals over {len(runs)} consecutive `make bench` runs ({dates}):\n\n" + "\n".join(lines) + "\n"


def readme_section(results_dir) -> str:
    """README's speed section body: the table of ``bench.json`` and, if present, ``scaling.md``."""
    results_dir = pathlib.Path(results_dir)
    data = json.loads((results_dir / "bench.json").read_text())
    parts = [render_markdown(data["rows"], data["meta"]).rstrip("\n")]
    history = sorted((results_dir / "history").glob("run*.json"))
    if history:
        parts += ["", goal_history(history).rstrip("\n")]
    scaling = results_dir / "scaling.md"
    if scaling.exists():
        parts += ["", "How the cost grows (`python -m bench.scaling`; plot: "
                  "[bench/results/scaling.png](bench/results/scaling.png)):", "",
                  scaling.read_text().rstrip("\n")]
    return "\n".join(parts) + "\n"


def update_readme(readme, results_dir) -> bool:
    """Replace the text between README's bench markers with :func:`readme_section`; True if it changed."""
    readme = pathlib.Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} lacks the markers {README_BEGIN!r} ... {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_BEGIN + "\n" + readme_section(results_dir) + README_END + tail
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (checks the code paths, not the speed)")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only bench/bench_NAME.py (repeatable)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results"), help="where bench.json and bench.md go")
    ap.add_argument("--readme", metavar="README", nargs="?", const=str(BENCH_DIR.parent / "README.md"),
                    help="only rewrite README's speed section from the results in --out (no timing)")
    args = ap.parse_args(argv)
    if args.readme:
        changed = update_readme(args.readme, args.out)
        print(f"{args.readme}: {'rewritten' if changed else 'already up to date'} from {args.out}")
        return 0
    try:
        names = discover(args.only)
    except ValueError as e:
        ap.error(str(e))
    if not names:
        ap.error("no bench/bench_*.py modules found")
    print("[bench] measuring the machine's limits (GEMM, copy) ...", file=sys.stderr, flush=True)
    peak = measure_peak(args.quick)
    rows, errors = run_all(quick=args.quick, only=args.only, peak=peak)
    meta = machine_info(args.quick)
    meta["peak"] = peak
    jpath, mpath = write_results(rows, meta, args.out)
    print(render_markdown(rows, meta))
    print(f"wrote {jpath} and {mpath}")
    if errors:
        print("errors:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
