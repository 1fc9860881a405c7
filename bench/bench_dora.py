r"""DoRA's step against LoRA's, NumPy and torch; the row norm factored vs materialised.

A "step" is one forward and one backward of a single adapted ``d × d`` layer on ``N`` tokens
(no optimizer: it is the same for both). DoRA's extra work per step: the row norm
(``W0 Aᵀ``: ``d·d·r`` multiply-adds, against ``2·N·d·d`` for the base layer's forward and input
gradient), the (N, out) rescale, and with the exact gradient one more ``d·d·r`` matmul. With
dropout, the default ``dropout_correction="shared"`` (``dora``, ``dora_exact``,
``dora_dense_norm``) rescales the base output the layer computes anyway, so it does LoRA's
products; PEFT's form ``"dropped"`` (``dora_dropped``) recomputes the base on the dropped input:
one more ``N·d·d`` matmul forward and one backward (the module docstring derives both), so its
ratio to LoRA grows towards 1.5–2. Goal: DoRA (no dropout, detached norm) at most 1.2× LoRA; with
dropout (the default form) at most 1.25× LoRA with dropout (issue 13), both backends. Every row
carries its ``flops``: the products above, the extra ``N·d·d`` pair included for ``dora_dropped``
(elementwise work and the norm not counted).
"""

from __future__ import annotations

import numpy as np

import lowrank_ref as lr
from bench.run import time_interleaved, time_numpy_steps
from lowrank_ref.adapters.dora import dora_row_norm


def step_flops(impl: str, N: int, d: int, r: int, dropout: float) -> float:
    """Multiply-adds x 2 of one forward + backward of a ``d × d`` layer (base frozen): two ``N·d·d``
    products (the base and ``x̄``), PEFT's dropout form two more, plus the rank-``r`` products."""
    base = 2 * (2 * N * d * d) * (2 if impl == "dora_dropped" and dropout else 1)
    return float(base + 6 * 2 * N * r * d)


def _numpy_layers(d, r, dropout, rng):
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    b = np.zeros(d, np.float32)
    layers = {
        "lora": lr.adapters.LoRALinear(lr.nn.Linear.from_arrays(W, b), lr.LoRAConfig(r=r, alpha=2 * r, dropout=dropout), rng=rng),
        "dora": lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout), rng=rng),
        "dora_exact": lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b),
                                             lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout, detach_norm=False), rng=rng),
    }
    dense = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout), rng=rng)
    dense.norm_method = "dense"
    layers["dora_dense_norm"] = dense
    if dropout:  # PEFT's form (the same function without dropout: no row then)
        layers["dora_dropped"] = lr.adapters.DoRALinear(
            lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout, dropout_correction="dropped"),
            rng=rng)
    for layer in layers.values():
        layer.B.data = (0.01 * rng.standard_normal(layer.B.shape)).astype(np.float32)  # non-zero B
    return layers



def run(quick: bool) -> list[dict]:
    # NumPy's BLAS on one thread: both sides alike, and on a shared 2-core machine two spinning
    # OpenBLAS threads made timings swing by 2x (see lowrank_ref.models.blas_threads)
    from lowrank_ref.models import blas_threads

    with blas_threads(1):
        rows = _run_numpy(quick)
    return rows + _run_torch(quick)


def _run_numpy(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    d, N, r = (128, 128, 8) if quick else (768, 2048, 16)
    repeats = 3 if quick else 15
    rows = []
    shape = f"N={N}, d_in=d_out={d}, r={r}, float32"
    # -- NumPy, without and with dropout --------------------------------------------------------
    for dropout in (0.0, 0.1):
        layers = _numpy_layers(d, r, dropout, rng)
        x = rng.standard_normal((N, d)).astype(np.float32)
        dy = rng.standard_normal((N, d)).astype(np.float32)
        t = time_numpy_steps(layers, x, dy, repeats=repeats)
        name = "dora_vs_lora_step_numpy" + ("_dropout" if dropout else "")
        for impl, res in t.items():
            row = {"name": name, "impl": impl, "ratio_to": None if impl == "lora" else "lora",
                   "shape": shape + (f", dropout={dropout}" if dropout else "") + ", BLAS 1 thread", **res,
                   "flops": step_flops(impl, N, d, r, dropout)}
            if impl == "dora":
                row["goal"] = 1.25 if dropout else 1.2
            rows.append(row)
    # -- the norm alone: factored (W0 Aᵀ reused, ‖W0‖² cached) vs materialising V -------------------
    layer = _numpy_layers(d, r, 0.0, rng)["dora"]
    W, A, B, s = layer.base.weight.data, layer.A.data, layer.B.data, layer.scaling
    w0_sq = layer._w0_sq()
    t = time_interleaved({
        "dense": lambda: dora_row_norm(W, A, B, s, method="dense"),
        "factored": lambda: dora_row_norm(W, A, B, s, w0_sq=w0_sq, method="factored"),
    }, repeats=repeats * 3)
    n_f = dora_row_norm(W, A, B, s, w0_sq=w0_sq)[0]
    n_d = dora_row_norm(W, A, B, s, method="dense")[0]
    for impl, res in t.items():
        rows.append({"name": "dora_row_norm_numpy", "impl": impl, "ratio_to": None if impl == "dense" else "dense",
                     "shape": f"d={d}, r={r}, float32", "max_rel_diff": float(np.max(np.abs(n_f - n_d) / n_d)),
                     "note": "dense builds V = W0 + sBA (d×d temp); factored never does", **res})
    return rows


def _run_torch(quick: bool) -> list[dict]:
    d, N, r = (128, 128, 8) if quick else (768, 2048, 16)
    repeats = 3 if quick else 15
    shape = f"N={N}, d_in=d_out={d}, r={r}, float32"
    rows = []
    # -- torch (CPU here; the device of the machine running it) ----------------------------------
    try:
        import torch

        import lowrank_gpu as lg
    except ImportError:
        rows.append({"name": "dora_vs_lora_step_torch", "impl": "dora", "seconds": None, "ratio_to": "lora",
                     "skipped": "torch is not installed"})
        return rows
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dropout in (0.0, 0.1):
        rows += _run_torch_one(torch, lg, device, d, N, r, dropout, repeats, shape)
    return rows


def _run_torch_one(torch, lg, device, d, N, r, dropout, repeats, shape) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    base = torch.nn.Linear(d, d, device=device)
    tl = {
        "lora": lg.adapters.LoRALinear(base, lr.LoRAConfig(r=r, alpha=2 * r, dropout=dropout), rng=0),
        "dora": lg.adapters.DoRALinear(torch.nn.Linear(d, d, device=device),
                                       lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout), rng=0),
        "dora_exact": lg.adapters.DoRALinear(torch.nn.Linear(d, d, device=device),
                                             lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout, detach_norm=False), rng=0),
    }
    if dropout:  # PEFT's form
        tl["dora_dropped"] = lg.adapters.DoRALinear(
            torch.nn.Linear(d, d, device=device),
            lr.DoRAConfig(r=r, alpha=2 * r, dropout=dropout, dropout_correction="dropped"), rng=0)
    for m in tl.values():
        m.train()
        with torch.no_grad():
            m.B.normal_(0, 0.01)
    x = torch.randn(N, d, device=device, requires_grad=True)  # x̄ is needed inside a network
    dy = torch.randn(N, d, device=device)

    def tstep(m):
        def fn():
            x.grad = None
            m(x).backward(dy)
            m.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        return fn

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # as for NumPy: one thread, both sides alike, less noise
    try:
        t = time_interleaved({k: tstep(v) for k, v in tl.items()}, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    name = "dora_vs_lora_step_torch" + ("_dropout" if dropout else "")
    for impl, res in t.items():
        row = {"name": name, "impl": impl, "ratio_to": None if impl == "lora" else "lora",
               "shape": shape + (f", dropout={dropout}" if dropout else "")
               + (f", {device}, 1 thread" if device == "cpu" else f", {device}"), **res,
               "flops": step_flops(impl, N, d, r, dropout)}
        if impl == "dora":
            row["goal"] = 1.25 if dropout else 1.2
        rows.append(row)
    return rows
