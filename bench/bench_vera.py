r"""VeRA's and Tied-LoRA's step against LoRA's (NumPy, one BLAS thread; torch).

A "step" is one forward and one backward of a single adapted ``d × d`` layer on ``N`` tokens (no
optimizer). At one rank VeRA does LoRA's two thin matmuls forward and two backward for ``x̄``, two
elementwise products, and skips ``Ā``, ``B̄`` (its projections are frozen): it should cost about
LoRA's. Its parameters are cheap in ``r`` but its compute is not: at PEFT's default ``r = 256``
the thin matmuls are 16× LoRA r = 16's (a row without a goal, to show it). Goal: VeRA at LoRA's
rank at most 1.2× LoRA (issue 8).
"""

from __future__ import annotations

import numpy as np

import lowrank_ref as lr
from bench.run import time_numpy_steps, time_torch_steps


def _layers(d, r, rng, torch_backend=False):
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    b = np.zeros(d, np.float32)
    backend = "torch" if torch_backend else "numpy"

    def base():
        return lr.nn.Linear.from_arrays(W.copy(), b.copy())

    layers = {
        "lora": lr.adapt(base(), lr.LoRAConfig(r=r, alpha=2 * r), backend=backend, rng=0),
        "vera": lr.adapt(base(), lr.VeRAConfig(r=r), backend=backend, rng=0),
        "vera_r256": lr.adapt(base(), lr.VeRAConfig(r=256), backend=backend, rng=0),
        "tied_lora": lr.adapt(base(), lr.TiedLoRAConfig(r=r), backend=backend, rng=0),
    }
    state_rng = np.random.default_rng(1)
    for layer in layers.values():  # away from the zero init
        layer.load_adapter_state({n: (0.01 * state_rng.standard_normal(tuple(v.shape))).astype(np.float32)
                                  for n, v in layer.adapter_state().items()})
    return layers


def run(quick: bool) -> list[dict]:
    from lowrank_ref.models import blas_threads

    d, N, r = (128, 256, 8) if quick else (1024, 8192, 16)
    repeats = 3 if quick else 10
    shape = f"N={N}, d_in=d_out={d}, r={r} (vera_r256: r=256), float32"
    rng = np.random.default_rng(0)
    rows = []
    with blas_threads(1):
        layers = _layers(d, r, rng)
        x = rng.standard_normal((N, d)).astype(np.float32)
        dy = rng.standard_normal((N, d)).astype(np.float32)

        t = time_numpy_steps(layers, x, dy, repeats=repeats)
    for impl, res in t.items():
        row = {"name": "vera_vs_lora_step_numpy", "impl": impl, "ratio_to": None if impl == "lora" else "lora",
               "shape": shape + ", BLAS 1 thread", **res}
        if impl == "vera":
            row["goal"] = 1.2
        rows.append(row)
    try:
        import torch
    except ImportError:
        return rows + [{"name": "vera_vs_lora_step_torch", "impl": "vera", "seconds": None, "ratio_to": "lora",
                        "skipped": "torch is not installed"}]
    tl = _layers(d, r, rng, torch_backend=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    t = time_torch_steps(tl, xt, dyt, repeats)
    for impl, res in t.items():
        row = {"name": "vera_vs_lora_step_torch", "impl": impl, "ratio_to": None if impl == "lora" else "lora",
               "shape": shape + ", CPU, 1 thread", **res}
        if impl == "vera":
            row["goal"] = 1.2
        rows.append(row)
    return rows
