r"""LoHa's step, both routes, against LoRA at the same parameter count and against PEFT's LoHa.

A "step" is one forward and one backward of a single adapted ``d × d`` layer on ``N`` tokens (no
optimizer). LoHa at rank r has ``2 r (in + out)`` parameters, those of LoRA at rank ``2r``: that is
the LoRA row each LoHa row is divided by. The dense route builds ΔW (out, in) on every call, as
PEFT does; the factorised route never does (chapter 05, §1.3 counts both). PEFT's LoHa (torch only)
is timed on the same layer. Goals (issue 8): the factorised route at most 1.5× LoRA, and faster
than PEFT's LoHa.
"""

from __future__ import annotations

import numpy as np

import lowrank_ref as lr
from bench.run import time_numpy_steps, time_torch_steps


def _numpy_layers(d, r, rng):
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    b = np.zeros(d, np.float32)
    layers = {"lora_2r": lr.adapters.LoRALinear(lr.nn.Linear.from_arrays(W, b), lr.LoRAConfig(r=2 * r, alpha=4 * r), rng=rng)}
    for route in ("dense", "factorised"):
        layers[f"loha_{route}"] = lr.adapters.LoHaLinear(lr.nn.Linear.from_arrays(W, b),
                                                         lr.LoHaConfig(r=r, alpha=2 * r, route=route), rng=rng)
    for layer in layers.values():  # off the init's zero factor
        for p in layer.trainable_parameters().values():
            p.data = (0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return layers



def run(quick: bool) -> list[dict]:
    from lowrank_ref.models import blas_threads

    with blas_threads(1):
        rows = _run_numpy(quick)
    return rows + _run_torch(quick)


def _sizes(quick):
    return (128, 256, 3) if quick else (1024, 8192, 5)


def _run_numpy(quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    d, N, repeats = _sizes(quick)
    rows = []
    for r in (4, 8):
        layers = _numpy_layers(d, r, rng)
        x = rng.standard_normal((N, d)).astype(np.float32)
        dy = rng.standard_normal((N, d)).astype(np.float32)
        t = time_numpy_steps(layers, x, dy, repeats=repeats)
        for impl, res in t.items():
            row = {"name": f"loha_r{r}_vs_lora_{2 * r}_step_numpy", "impl": impl,
                   "ratio_to": None if impl == "lora_2r" else "lora_2r",
                   "shape": f"N={N}, d_in=d_out={d}, float32, BLAS 1 thread, {2 * r * 2 * d:,} params each", **res}
            if impl == "loha_factorised":
                row["goal"] = 1.5
            rows.append(row)
    return rows


def _run_torch(quick: bool) -> list[dict]:
    d, N, repeats = _sizes(quick)
    try:
        import torch

        import lowrank_gpu as lg
    except ImportError:
        return [{"name": "loha_step_torch", "impl": "loha_factorised", "seconds": None, "ratio_to": "lora_2r",
                 "skipped": "torch is not installed"}]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for r in (4, 8):
        torch.manual_seed(0)
        mods = {"lora_2r": lg.adapters.LoRALinear(torch.nn.Linear(d, d, device=device),
                                                  lr.LoRAConfig(r=2 * r, alpha=4 * r), rng=0)}
        for route in ("dense", "factorised"):
            mods[f"loha_{route}"] = lg.adapters.LoHaLinear(torch.nn.Linear(d, d, device=device),
                                                           lr.LoHaConfig(r=r, alpha=2 * r, route=route), rng=0)
        try:
            import peft

            class One(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.k = torch.nn.Linear(d, d, device=device)

                def forward(self, x):
                    return self.k(x)

            pm = peft.get_peft_model(One(), peft.LoHaConfig(r=r, alpha=2 * r, target_modules=["k"]))
            mods["peft_loha"] = pm.base_model.model.k
        except ImportError:
            rows.append({"name": f"loha_r{r}_vs_lora_{2 * r}_step_torch", "impl": "peft_loha", "seconds": None,
                         "ratio_to": "lora_2r", "skipped": "peft is not installed"})
        for m in mods.values():
            with torch.no_grad():
                for p in m.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.1)
        x = torch.randn(N, d, device=device, requires_grad=True)
        dy = torch.randn(N, d, device=device)

        t = time_torch_steps(mods, x, dy, repeats, device)
        for impl, res in t.items():
            row = {"name": f"loha_r{r}_vs_lora_{2 * r}_step_torch", "impl": impl,
                   "ratio_to": None if impl == "lora_2r" else "lora_2r",
                   "shape": f"N={N}, d_in=d_out={d}, float32, " + ("cpu, 1 thread" if device == "cpu" else device), **res}
            if impl == "loha_factorised":
                row["goal"] = 1.5
            rows.append(row)
        if "peft_loha" in t:  # the second goal: faster than PEFT's LoHa
            f, p = t["loha_factorised"], t["peft_loha"]
            rows.append({"name": f"loha_r{r}_factorised_vs_peft_step_torch", "impl": "peft_loha", "ratio_to": None,
                         "shape": rows[-1]["shape"], **p})
            rows.append({"name": f"loha_r{r}_factorised_vs_peft_step_torch", "impl": "loha_factorised",
                         "ratio_to": "peft_loha", "goal": 1.0, "shape": rows[-1]["shape"], **f})
    return rows
