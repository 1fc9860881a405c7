r"""``make gpu-check``: everything that needs a CUDA GPU, in one run, into one report file.

    python scripts/gpu_check.py [--out DIR]     # on the GPU machine: about 5 minutes on one H200
    python scripts/gpu_check.py --dry           # anywhere (``make test`` runs it): checks the plan

Made for a lent GPU machine that has its own Python (PyTorch with CUDA, CuPy, PEFT) and on which
nothing can be installed: the project is carried as a plain folder, not installed. So the script
puts the folder on ``PYTHONPATH`` (with a ``lowrank_gpu`` link to ``gpu/``, the name the package
installs it under), runs every step as a subprocess of the same Python with its own time limit,
and writes ``DIR/gpu_check.md`` (a table and each step's output tail) and ``DIR/gpu_check.json``.
A step whose modules are missing there is reported as skipped, with the module named; a failing
step does not stop the others.

The steps (limits in seconds; the sum stays under 8 minutes):

1. the GPU-marked tests (``pytest -m gpu`` over :data:`GPU_TESTS`);
2. ``lowrank-ref compare --backend cuda`` (every compare row);
3. ``lowrank-ref train --backend cuda`` in fp32 and in bf16 autocast, and under
   ``torchrun --nproc_per_node 1`` (NCCL), on the built-in model;
4. the benchmarks (``python -m bench.run``; the torch rows run on CUDA where the module does).

``--dry`` runs nothing: it checks that every test file and test function named here exists, that
every step's command parses, and that the limits add up to less than :data:`BUDGET_S`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 8 * 60

# The tests that need a GPU: a folder (every gpu-marked test in it) or file::function.
GPU_TESTS = (
    "tests/contract",
    "tests/test_io.py::test_cuda_model_saves_and_loads",
    "tests/test_peft_interop.py::test_cuda_model_loads_and_saves_peft_folders",
    "tests/adapters/test_lora.py::test_cuda_layer_matches_numpy",
)

_TRAIN = ["-m", "lowrank_ref", "train", "--method", "lora", "--backend", "cuda", "--steps", "300",
          "--batch-size", "32", "--quiet"]


def steps(out: str) -> list[dict]:
    """What runs: ``name``, ``argv`` (after the Python executable), ``limit`` s, ``needs`` (modules)."""
    return [
        {"name": "gpu-marked tests", "limit": 120, "needs": ["torch", "pytest", "hypothesis", "safetensors"],
         "argv": ["-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS]},
        {"name": "compare --backend cuda", "limit": 140, "needs": ["torch", "safetensors", "matplotlib"],
         "argv": ["-m", "lowrank_ref", "compare", "--backend", "cuda", "--quiet", "--out", f"{out}/compare"]},
        {"name": "train --backend cuda fp32", "limit": 40, "needs": ["torch", "safetensors", "matplotlib"],
         "argv": [*_TRAIN, "--precision", "fp32", "--out", f"{out}/train-fp32"]},
        {"name": "train --backend cuda bf16", "limit": 40, "needs": ["torch", "safetensors", "matplotlib"],
         "argv": [*_TRAIN, "--precision", "bf16", "--out", f"{out}/train-bf16"]},
        {"name": "train --backend cupy (the reference's own code on CuPy arrays)", "limit": 25,
         "needs": ["cupy", "safetensors", "matplotlib"],
         "argv": ["-m", "lowrank_ref", "train", "--method", "lora", "--backend", "cupy", "--steps", "50",
                  "--batch-size", "16", "--quiet", "--out", f"{out}/train-cupy"]},
        {"name": "torchrun 1 rank (NCCL)", "limit": 30, "needs": ["torch", "safetensors", "matplotlib"],
         "argv": ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                  "--master_port", "29517", *_TRAIN, "--precision", "fp32", "--out", f"{out}/train-ddp"]},
        {"name": "benchmarks", "limit": 60, "needs": ["torch", "numpy"],
         "argv": ["-m", "bench.run", "--out", f"{out}/bench"]},
    ]


def check_plan(out: str = "gpu-check") -> list[str]:
    """Problems with the plan (empty: fine): missing tests, unparsable commands, over budget."""
    problems = []
    for item in GPU_TESTS:
        path, _, func = item.partition("::")
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            problems.append(f"{item}: no such file or folder")
            continue
        if func:
            with open(full, encoding="utf-8") as f:
                tree = ast.parse(f.read(), filename=full)
            names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if func not in names:
                problems.append(f"{item}: {path} has no test {func!r}")
    sys.path.insert(0, ROOT)
    from lowrank_ref.cli import build_parser

    parser = build_parser()
    total = 0
    for st in steps(out):
        total += st["limit"]
        argv = st["argv"]
        if argv[:2] == ["-m", "torch.distributed.run"]:
            argv = argv[argv.index("lowrank_ref") - 1:]
        if argv[:2] == ["-m", "lowrank_ref"]:
            try:
                parser.parse_args(argv[2:])
            except SystemExit:
                problems.append(f"{st['name']}: the command does not parse: {' '.join(argv)}")
        elif argv[:2] == ["-m", "bench.run"] and not os.path.isfile(os.path.join(ROOT, "bench", "run.py")):
            problems.append(f"{st['name']}: bench/run.py is missing")
    if total >= BUDGET_S:
        problems.append(f"the steps' limits add up to {total} s, over the {BUDGET_S} s budget")
    return problems


def _env(link_dir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, link_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def run_all(out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    link_dir = tempfile.mkdtemp(prefix="lowrank-gpu-check-")
    os.symlink(os.path.join(ROOT, "gpu"), os.path.join(link_dir, "lowrank_gpu"))  # the installed name
    env = _env(link_dir)
    info = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                           "torch.cuda.is_available() and torch.cuda.get_device_name(0))"],
                          capture_output=True, text=True, env=env, timeout=120)
    report = {"python": sys.version.split()[0], "torch": info.stdout.strip() or info.stderr.strip()[-300:],
              "steps": []}
    for st in steps(out):
        missing = [m for m in st["needs"] if importlib.util.find_spec(m) is None]
        row = {"name": st["name"], "command": " ".join(["python", *st["argv"]]), "limit_s": st["limit"]}
        if missing:
            row.update(status="skipped", why=f"not installed here: {', '.join(missing)}")
            report["steps"].append(row)
            continue
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, *st["argv"]], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=st["limit"])
            row.update(status="passed" if r.returncode == 0 else f"failed (exit {r.returncode})",
                       tail=(r.stdout + r.stderr)[-4000:])
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            row.update(status=f"timed out after {st['limit']} s", tail=text[-4000:])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report["steps"].append(row)
        print(f"{row['status']:>24s}  {row['seconds']:6.1f} s  {st['name']}", flush=True)
    for kind in ("fp32", "bf16"):
        path = os.path.join(out, f"train-{kind}", "metrics.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                m = json.load(f)
            report[f"train_{kind}"] = {k: m.get(k) for k in ("tokens_per_second", "peak_memory_bytes", "evaluation")}
    with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    lines = ["# GPU check", "", f"python {report['python']}, torch {report['torch']}", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']}{' — ' + r['why'] if 'why' in r else ''} | {r.get('seconds', '')} |"
              for r in report["steps"]]
    for r in report["steps"]:
        if r.get("tail"):
            lines += ["", f"## {r['name']}", "", f"`{r['command']}`", "", "```", r["tail"], "```"]
    with open(os.path.join(out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu-check"),
                    help="where the report and the runs go (default $OUT, else runs/gpu-check)")
    ap.add_argument("--dry", action="store_true", help="check the plan only; run nothing")
    args = ap.parse_args(argv)
    if args.dry:
        problems = check_plan(args.out)
        for p in problems:
            print(f"gpu-check: {p}", file=sys.stderr)
        if not problems:
            total = sum(s["limit"] for s in steps(args.out))
            print(f"gpu-check plan: {len(steps(args.out))} steps, {len(GPU_TESTS)} test targets, "
                  f"limits {total} s of {BUDGET_S} s")
        return 1 if problems else 0
    report = run_all(args.out)
    bad = [r["name"] for r in report["steps"] if r["status"] not in ("passed",) and not r["status"].startswith("skipped")]
    print(f"wrote {args.out}/gpu_check.md" + (f"; not passed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
