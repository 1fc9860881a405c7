r"""Serving many adapters: one batch whose rows name different LoRA adapters (CPU torch, one thread).

A small GPT (torch) with N LoRA adapters (r = 8 on every linear layer but the head, non-zero factors), made with
PEFT, saved with ``save_pretrained`` and added to a :class:`lowrank_ref.serve.MultiLoRA` from those
folders. One batch of ``batch`` rows, row ``i`` naming adapter ``i mod N``. Rows ``serve_mixed_N``:

``merged``
    The reference: the same batch through a single adapter merged into the base (all rows use
    it): the cost of the base model alone.
``bgmv``, ``sgmv``
    The mixed batch through ``MultiLoRA`` with the gather kernel and with rows grouped by adapter.
    Goal for ``bgmv`` at N = 32: within 1.3x ``merged``.
``merge_switch``
    One adapter at a time: for each adapter the batch names, merge it, run its rows, unmerge.
``row_loop``
    One forward call per row, each through its own adapter.
``peft``
    PEFT's mixed batch, ``model(idx, adapter_names=[...])``, the same adapters.

``serve_bgmv_vs_peft_N`` repeats the ``bgmv`` and ``peft`` times with ``bgmv``'s ratio to PEFT
(goal: below 1.0, faster). Every row records the largest difference of its output from ``bgmv``'s.
"""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np

from bench.run import single_thread, time_interleaved

FULL = {"gpt": {"vocab_size": 256, "block_size": 32, "n_layer": 4, "n_head": 4, "d_model": 128},
        "batch": 64, "r": 8, "n_adapters": (1, 8, 32, 64), "repeats": 5, "warmup": 1}
QUICK = {"gpt": {"vocab_size": 32, "block_size": 8, "n_layer": 1, "n_head": 2, "d_model": 16},
         "batch": 4, "r": 2, "n_adapters": (1, 3), "repeats": 1, "warmup": 0}


TARGETS = ["q", "k", "v", "o", "fc", "proj"]  # every linear layer but the head


def _libs():
    try:
        import torch
    except ImportError:
        return None, None
    try:
        import logging

        logging.getLogger("peft").setLevel(logging.ERROR)
        import peft
    except Exception:
        peft = None
    return torch, peft


def _world(size: dict, n: int, folder: str):
    """The base, PEFT's model with n adapters, and a MultiLoRA holding the same n adapters."""
    import torch

    import lowrank_ref as lr
    from lowrank_gpu.nn.gpt import GPT
    from lowrank_ref.nn.gpt import GPTConfig

    torch_mod, peft = _libs()
    torch.manual_seed(0)
    base = GPT(GPTConfig(**size["gpt"]), rng=0).eval()
    names = [f"a{k}" for k in range(n)]
    pm = None
    srv = lr.serve.MultiLoRA(copy.deepcopy(base))
    for k, name in enumerate(names):
        cfg = peft.LoraConfig(r=size["r"], lora_alpha=2 * size["r"], target_modules=TARGETS,
                              init_lora_weights=False)  # random A and B: as if trained
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        with torch.no_grad():
            for mod in pm.modules():
                if hasattr(mod, "lora_B") and name in mod.lora_B:
                    mod.lora_B[name].weight.mul_(0.05)
        pm.save_pretrained(f"{folder}/{k}", selected_adapters=[name])
        sub = f"{folder}/{k}" if os.path.exists(f"{folder}/{k}/adapter_config.json") else f"{folder}/{k}/{name}"
        srv.add(name, sub)  # PEFT writes a non-default adapter into a sub-folder named after it
    pm.eval()
    return base, pm, srv, names


def bench_mixed(size: dict, world, n: int) -> list[dict]:
    """The rows for a batch over the first ``n`` adapters of ``world`` (PEFT's mixed batch only
    visits the adapters a batch names, so the others it holds cost nothing)."""
    import torch

    B, T = size["batch"], size["gpt"]["block_size"]
    base, pm, full, all_names = world
    names = all_names[:n]
    srv = full.clone(names)
    idx = torch.randint(0, size["gpt"]["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    rows = [names[i % n] for i in range(B)]
    one = srv.clone([names[0]])
    one.merge(names[0])

    def merged():
        return one.forward(idx, [names[0]] * B)

    def mixed(kernel):
        return lambda: srv.forward(idx, rows, kernel=kernel)

    switch = srv.clone()
    groups = {a: torch.tensor([i for i, r in enumerate(rows) if r == a]) for a in dict.fromkeys(rows)}

    def merge_switch():
        out = torch.empty(B, T, size["gpt"]["vocab_size"])
        for a, ix in groups.items():
            switch.merge(a)
            out[ix] = switch.forward(idx[ix], [a] * len(ix))
            switch.unmerge()
        return out

    def row_loop():
        return torch.cat([srv.forward(idx[i:i + 1], [rows[i]]) for i in range(B)])

    def peft_mixed():
        with torch.inference_mode():
            return pm(idx, adapter_names=rows)

    fns = {"merged": merged, "bgmv": mixed("bgmv"), "sgmv": mixed("sgmv"), "merge_switch": merge_switch,
           "row_loop": row_loop, "peft": peft_mixed}
    ref = fns["bgmv"]()
    diffs = {k: float((f() - ref).abs().max()) for k, f in fns.items() if k != "merged"}
    res = time_interleaved(fns, repeats=size["repeats"], warmup=size["warmup"])
    name = f"serve_mixed_{n}"
    shape = (f"GPT d={size['gpt']['d_model']} L={size['gpt']['n_layer']}, batch {B}x{T}, {n} LoRA adapters "
             f"(r={size['r']}, every linear layer but the head), float32, one thread")
    out = []
    for impl in fns:
        row = {"name": name, "impl": impl, "ratio_to": None if impl == "merged" else "merged", "shape": shape,
               "n_adapters": n, **res[impl]}
        if impl in diffs:
            row["max_abs_diff_vs_bgmv"] = diffs[impl]
        if impl == "bgmv" and n == 32:
            row["goal"] = 1.3
        out.append(row)
    vs = f"serve_bgmv_vs_peft_{n}"
    out.append({"name": vs, "impl": "peft", "ratio_to": None, "shape": shape, "n_adapters": n, **res["peft"]})
    out.append({"name": vs, "impl": "bgmv", "ratio_to": "peft", "shape": shape, "n_adapters": n, "goal": 1.0,
                **res["bgmv"]})
    return out


def run(quick: bool) -> list[dict]:
    torch, peft = _libs()
    size = QUICK if quick else FULL
    if torch is None or peft is None:
        why = "torch is not installed" if torch is None else "PEFT is not installed (pip install peft)"
        return [{"name": f"serve_mixed_{n}", "impl": "bgmv", "ratio_to": None, "seconds": None, "skipped": why}
                for n in size["n_adapters"]]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        world = _world(size, max(size["n_adapters"]), folder)
    with single_thread():
        for n in size["n_adapters"]:
            rows += bench_mixed(size, world, n)
    return rows


if __name__ == "__main__":  # a quick look without the runner
    for row in run(quick=True):
        print(row)
    _ = np
