r"""LoKr and KronA against LoRA: one forward + backward of a single adapted ``d × d`` layer on ``N``
tokens (issue 8: 1024 -> 1024, 8192 tokens; goal LoKr ≤ 1.3× LoRA), NumPy and torch, plus PEFT's
LoKr layer (which builds the dense ΔW = s C ⊗ D every call) where PEFT is installed.

Configs at d = 1024: LoRA r = 8 (16,384 parameters); LoKr r = 4, f = -1 (C (32, 32) full,
D (32, 32) = B A at rank 4: 1,280 parameters, rank up to 128); KronA default sizes (A, B both
(32, 32): 2,048 parameters, rank up to 1,024). The Kronecker branches cost ``N·m·q·(n + p)``
multiply-adds (about ``N·65,536`` here) against LoRA's ``N·r·(in + out)`` (``N·16,384``): both are
small next to the base layer's ``N·d²``, so the ratio is mostly the reshapes' memory traffic.
"""

from __future__ import annotations

import numpy as np

import lowrank_ref as lr
from bench.run import time_numpy_steps, time_torch_steps


def _perturb(params, rng):
    for p in params:
        p.data = (0.05 * rng.standard_normal(p.shape)).astype(np.float32)


def run(quick: bool) -> list[dict]:
    from lowrank_ref.models import blas_threads

    with blas_threads(1):
        rows = _run_numpy(quick)
    return rows + _run_torch(quick)


def _sizes(quick):
    return ((128, 256, 3) if quick else (1024, 8192, 7))


def _run_numpy(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    d, N, repeats = _sizes(quick)
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    b = np.zeros(d, np.float32)
    layers = {
        "lora": lr.adapters.LoRALinear(lr.nn.Linear.from_arrays(W, b), lr.LoRAConfig(r=8, alpha=16), rng=rng),
        "lokr": lr.adapters.LoKrLinear(lr.nn.Linear.from_arrays(W, b), lr.LoKrConfig(r=4, alpha=8), rng=rng),
        "krona": lr.adapters.KronALinear(lr.nn.Linear.from_arrays(W, b), lr.KronAConfig(), rng=rng),
    }
    for layer in layers.values():
        _perturb(layer.trainable_parameters().values(), rng)
    x = rng.standard_normal((N, d)).astype(np.float32)
    dy = rng.standard_normal((N, d)).astype(np.float32)

    t = time_numpy_steps(layers, x, dy, repeats=repeats)
    rows = []
    for impl, res in t.items():
        row = {"name": "kronecker_vs_lora_step_numpy", "impl": impl, "ratio_to": None if impl == "lora" else "lora",
               "shape": f"N={N}, d_in=d_out={d}, float32, BLAS 1 thread",
               "trainable": layers[impl].num_trainable_parameters(), **res}
        if impl == "lokr":
            row["goal"] = 1.3
        rows.append(row)
    return rows


def _run_torch(quick: bool) -> list[dict]:
    try:
        import torch

        import lowrank_gpu as lg
    except ImportError:
        return [{"name": "kronecker_vs_lora_step_torch", "impl": "lokr", "seconds": None, "ratio_to": None,
                 "skipped": "torch is not installed"}]
    d, N, repeats = _sizes(quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    def base():
        return torch.nn.Linear(d, d, device=device)

    tl = {
        "lora": lg.adapters.LoRALinear(base(), lr.LoRAConfig(r=8, alpha=16), rng=0),
        "lokr": lg.adapters.LoKrLinear(base(), lr.LoKrConfig(r=4, alpha=8), rng=0),
        "krona": lg.adapters.KronALinear(base(), lr.KronAConfig(), rng=0),
    }
    try:
        import peft

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.k = base()

            def forward(self, x):
                return self.k(x)

        tl["peft_lokr"] = peft.get_peft_model(One(), peft.LoKrConfig(r=4, alpha=8, target_modules=["k"]))
    except ImportError:
        pass
    for m in tl.values():
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    x = torch.randn(N, d, device=device, requires_grad=True)
    dy = torch.randn(N, d, device=device)

    t = time_torch_steps(tl, x, dy, repeats, device)
    rows = []
    for impl, res in t.items():
        row = {"name": "kronecker_vs_lora_step_torch", "impl": impl, "ratio_to": None if impl == "lora" else "lora",
               "shape": f"N={N}, d_in=d_out={d}, float32, {device}" + (", 1 thread" if device == "cpu" else ""), **res}
        if impl == "lokr":
            row["goal"] = 1.3
        rows.append(row)
    if "peft_lokr" not in tl:
        rows.append({"name": "kronecker_vs_lora_step_torch", "impl": "peft_lokr", "seconds": None, "ratio_to": "lora",
                     "skipped": "peft is not installed"})
    return rows
