r"""Chapter 09's two costs: adapter latency at inference, and S²-Attn against full attention.

``adapter_latency_b{1,32}`` (torch on the CPU and NumPy, one thread each): one forward pass (no
gradients) of a GPT over a batch of 1 or 32 sequences of ``T`` tokens. ``merged_lora`` is the
reference: LoRA on ``q`` and ``v`` merged into the weights, which costs exactly the base model.
``lora_unmerged`` keeps the two thin matmuls per layer; ``houlsby`` is the Houlsby adapter model
(bottleneck ``m`` after ``attn.o`` and ``mlp.proj``, as the ``adapter`` compare row): it cannot be
merged, so its extra layers run in every step. The seeds' claim: adapters add latency, worse at
small batch.

``s2_attn_fwd_bwd_T{T}`` (NumPy with the hand-written backward, and torch autograd): one forward and
backward of one attention layer at four times the shipped model's context (``T = 128``) and at a
longer one, full causal attention (the reference) against LongLoRA's S²-Attn (four groups).
No goals: these rows measure claims, they are not targets. The times are CPU time of this
process (``time.process_time``; every row runs on one thread): on a shared machine, wall time
mostly measures the other jobs.
"""

from __future__ import annotations

import time

import numpy as np

from bench.run import single_thread, time_interleaved, time_numpy_steps, time_torch_steps

FULL = {"gpt": {"vocab_size": 256, "block_size": 32, "n_layer": 4, "n_head": 4, "d_model": 128},
        "T": 32, "batches": (1, 32), "m": 8, "r": 8, "repeats": 15,
        # a forward at batch 1 takes ~2 ms: many more rounds, so that the median resists a busy machine
        "latency_repeats": {1: 301, 32: 41},
        "attn": ({"T": 128, "B": 8, "d": 64, "H": 4, "repeats": 61}, {"T": 1024, "B": 1, "d": 64, "H": 4, "repeats": 15})}
QUICK = {"gpt": {"vocab_size": 16, "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 16},
         "T": 16, "batches": (1, 2), "m": 2, "r": 2, "repeats": 1, "latency_repeats": {},
         "attn": ({"T": 16, "B": 2, "d": 8, "H": 2},)}


def _models(size: dict, backend: str):
    import lowrank_ref as lr
    from lowrank_ref.inject import inject

    cfg = lr.nn.GPTConfig(**size["gpt"])
    out = {}
    for impl in ("merged_lora", "lora_unmerged", "houlsby"):
        m = lr.nn.GPT(cfg, rng=np.random.default_rng(0))
        if backend == "torch":
            from lowrank_gpu.nn.gpt import from_numpy

            m = from_numpy(m)
        if impl == "houlsby":
            inject(m, lr.HoulsbyConfig(bottleneck=size["m"], init="paper"), targets=("o", "proj"), rng=0)
        else:
            inject(m, lr.LoRAConfig(r=size["r"], alpha=2 * size["r"], init="kaiming"), targets=("q", "v"), rng=0)
            for layer in lr.inject.adapter_layers(m).values():  # B away from zero, so merging is real work
                layer.B.data = layer.B.data + 0.01 if backend == "torch" else (layer.B.data + 0.01).astype(np.float32)
                if impl == "merged_lora":
                    layer.merge()
        out[impl] = m.eval()
    return out


def _latency_rows(size: dict) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for backend in ("torch", "numpy"):
        if backend == "torch":
            try:
                import torch
            except ImportError:
                rows.append({"name": "adapter_latency_b1", "impl": "houlsby", "seconds": None, "ratio_to": None,
                             "skipped": "torch is not installed"})
                continue
        models = _models(size, backend)
        for B in size["batches"]:
            idx = rng.integers(0, size["gpt"]["vocab_size"], (B, size["T"]))
            if backend == "torch":
                idx_t = torch.from_numpy(idx)

                def fwd(m, idx_t=idx_t):
                    def fn():
                        with torch.inference_mode():
                            m(idx_t)
                    return fn
            else:
                def fwd(m, idx=idx):
                    def fn():
                        m.forward(idx)
                        for _, mod in m.named_modules():
                            mod._cache = None
                    return fn
            with single_thread():
                res = time_interleaved({k: fwd(m) for k, m in models.items()},
                                       repeats=size["latency_repeats"].get(B, size["repeats"]), warmup=1,
                                       clock=time.process_time)
            if backend == "torch":
                with torch.inference_mode():
                    outs = {k: m(idx_t).numpy() for k, m in models.items()}
            else:
                outs = {k: m.forward(idx) for k, m in models.items()}
            merge_diff = float(np.abs(outs["merged_lora"] - outs["lora_unmerged"]).max())
            g = size["gpt"]
            shape = (f"GPT d={g['d_model']} L={g['n_layer']}, batch {B}x{size['T']}, forward only, "
                     f"LoRA r={size['r']} on q, v; Houlsby m={size['m']} after o and proj; float32, "
                     f"{backend}{' CPU' if backend == 'torch' else ''}, one thread")
            for impl, t in res.items():
                rows.append({"name": f"adapter_latency_b{B}_{backend}", "impl": impl, "batch": B,
                             "ratio_to": None if impl == "merged_lora" else "merged_lora", "shape": shape,
                             "max_abs_diff_merged_vs_unmerged": merge_diff, "clock": "process_time", **t})
    return rows


def _attention_rows(size: dict) -> list[dict]:
    import lowrank_ref.nn as nn
    from lowrank_ref.nn.attention import ShiftedSparseAttention

    rows = []
    for a in size["attn"]:
        T, B, d, H = a["T"], a["B"], a["d"], a["H"]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, T, d)).astype(np.float32)
        dy = rng.standard_normal((B, T, d)).astype(np.float32)
        layers = {"full": nn.CausalSelfAttention(d, H, rng=np.random.default_rng(1)),
                  "s2": ShiftedSparseAttention(d, H, rng=np.random.default_rng(1))}

        with single_thread():
            res = time_numpy_steps(layers, x, dy, repeats=a.get("repeats", size["repeats"]), warmup=1,
                                   clock=time.process_time)
        shape = f"one attention layer, B={B}, T={T}, d={d}, {H} heads, S²: 4 groups of {T // 4}, float32"
        for impl, t in res.items():
            rows.append({"name": f"s2_attn_fwd_bwd_T{T}_numpy", "impl": impl, "ratio_to": None if impl == "full" else "full",
                         "shape": shape + ", NumPy, one thread", "clock": "process_time", **t})
        try:
            import torch

            import lowrank_gpu.nn.gpt as tg
        except ImportError:
            continue
        tl = {"full": tg.CausalSelfAttention(d, H), "s2": tg.ShiftedSparseAttention(d, H)}
        res = time_torch_steps(tl, torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy),
                               a.get("repeats", size["repeats"]), clock=time.process_time)
        for impl, t in res.items():
            rows.append({"name": f"s2_attn_fwd_bwd_T{T}_torch", "impl": impl, "ratio_to": None if impl == "full" else "full",
                         "shape": shape + ", torch CPU, one thread", "clock": "process_time", **t})
    return rows


def run(quick: bool) -> list[dict]:
    size = QUICK if quick else FULL
    return _latency_rows(size) + _attention_rows(size)


if __name__ == "__main__":  # a quick look without the runner
    for row in run(quick=True):
        print(row)
