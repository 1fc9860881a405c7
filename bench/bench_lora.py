r"""LoRA benchmarks: the layer, a small-GPT training step, and merged inference.

Rows (see :mod:`bench.run` for the contract); NumPy and torch each run on one thread:

``lora_layer_fwd_bwd``
    One LoRA layer, forward + backward (input gradient included, as inside a network):
    1024 -> 1024, r = 8, 8192 tokens, float32. ``numpy`` (the reference,
    :func:`lowrank_ref.adapters.lora.lora_forward` / ``lora_backward`` through ``LoRALinear``),
    ``torch`` (this project's ``lowrank_gpu.adapters.LoRALinear``, CPU), and ``peft`` (PEFT's
    ``lora.Linear``, when PEFT is installed). All three hold the same weights; the row records the
    largest difference of their outputs from NumPy's. Goals: numpy <= 0.70x torch, torch <= 0.95x peft.
``gpt_lora_train_step``
    One training step of a small GPT with LoRA on ``q`` and ``v`` (r = 8): forward, cross-entropy,
    backward, AdamW. NumPy vs torch, the same weights and batch. Goal: numpy <= 0.90x torch.
``lora_layer_infer_<backend>`` and ``gpt_infer_<backend>``
    Inference (no gradient) of the plain base vs the same thing with LoRA merged into it (goal:
    <= 1.03x base) and unmerged (the latency merging removes; no goal).

Every row carries its ``flops`` (:func:`lora_layer_flops`, :func:`gpt_step_flops`), so the table
shows the GFLOP/s reached and its fraction of the machine's GEMM peak.
"""

from __future__ import annotations

import numpy as np

from bench.run import single_thread, time_interleaved
from lowrank_ref.inject import adapter_layers, inject

FULL = {"d": 1024, "r": 8, "tokens": 8192, "repeats": 15, "warmup": 2,
        "gpt": {"vocab_size": 512, "block_size": 128, "n_layer": 4, "n_head": 4, "d_model": 256},
        "gpt_batch": 16, "gpt_repeats": 15}
QUICK = {"d": 32, "r": 4, "tokens": 64, "repeats": 1, "warmup": 1,
         "gpt": {"vocab_size": 32, "block_size": 8, "n_layer": 1, "n_head": 2, "d_model": 16},
         "gpt_batch": 2, "gpt_repeats": 1}



def _torch_infer(mod, tx):
    """A zero-argument call of ``mod(tx)`` without autograd, for ``time_interleaved``."""
    import torch

    def f():
        with torch.inference_mode():
            return mod(tx)
    return f

def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _peft():
    try:
        import logging

        logging.getLogger("peft").setLevel(logging.ERROR)
        import peft
    except Exception:  # not installed, or installed without a working transformers
        return None
    return peft


def _lora_layers(size: dict, rng):
    """The same LoRA layer (non-zero B) in NumPy and, if torch is here, in torch."""
    import lowrank_ref as lr

    d, r = size["d"], size["r"]
    W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    b = (0.1 * rng.standard_normal(d)).astype(np.float32)
    cfg = lr.LoRAConfig(r=r, alpha=2 * r)
    layer = lr.adapters.LoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=rng)
    layer.B.data = (0.01 * rng.standard_normal(layer.B.shape)).astype(np.float32)  # as if trained
    tlayer = None
    torch = _torch()
    if torch is not None:
        tlayer = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0)
        with torch.no_grad():
            tlayer.A.copy_(torch.from_numpy(layer.A.data))
            tlayer.B.copy_(torch.from_numpy(layer.B.data))
    return W, b, cfg, layer, tlayer


def _peft_layer(W, b, cfg, A, B):
    """PEFT's LoRA ``Linear`` around a ``torch.nn.Linear`` holding ``W, b``, with ``A, B`` loaded."""
    torch, peft = _torch(), _peft()
    from torch import nn

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(W.shape[1], W.shape[0])

        def forward(self, x):
            return self.lin(x)

    model = One()
    with torch.no_grad():
        model.lin.weight.copy_(torch.from_numpy(W))
        model.lin.bias.copy_(torch.from_numpy(b))
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=["lin"])
    pmodel = peft.get_peft_model(model, pcfg)
    lin = pmodel.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.from_numpy(A))  # lora_A.weight (r, in) = A
        lin.lora_B["default"].weight.copy_(torch.from_numpy(B))  # lora_B.weight (out, r) = B
    return lin


def lora_layer_flops(N: int, d_in: int, d_out: int, r: int, backward: bool = True) -> float:
    """Floating-point operations of one LoRA layer call (a multiply-add counts 2).

    Forward: the base ``x W0ᵀ`` (``2 N d_in d_out``) and the branch ``(x Aᵀ) Bᵀ``
    (``2 N r (d_in + d_out)``). Backward with ``W0`` frozen: ``ȳ W0`` (``2 N d_in d_out``; no ``W̄``)
    and four thin products for ``B̄``, ``h̄``, ``Ā`` and the branch's ``x̄`` (``4 N r (d_in + d_out)``)."""
    fwd = 2 * N * d_in * d_out + 2 * N * r * (d_in + d_out)
    return float(fwd + (2 * N * d_in * d_out + 4 * N * r * (d_in + d_out) if backward else 0))


def gpt_step_flops(cfg, B: int, r: int, n_adapted: int = 2, backward: bool = True) -> float:
    """Floating-point operations of one GPT call on ``B × T`` tokens, LoRA rank ``r`` on ``n_adapted``
    of the four attention projections, the base frozen (so the backward computes no ``W̄``).

    Per layer, forward: four ``C × C`` projections and the MLP's two ``C × 4C`` products
    (``2 N (4 C² + 2·mlp C²)``), the scores ``Q Kᵀ`` and ``P V`` (``2 · 2 B T² C``, the masked half
    included, as both backends compute it), and the adapters; then the head (``2 N C V``). The
    backward repeats every product once for ``x̄`` and the attention core's twice (``Q̄, K̄, V̄, P̄``),
    plus the adapters' own gradients. Elementwise work (LayerNorm, GELU, softmax) is not counted."""
    C, T, V = cfg.d_model, cfg.block_size, cfg.vocab_size
    N = B * T
    proj = 2 * N * (4 * C * C + 2 * cfg.mlp_ratio * C * C)
    attn = 2 * 2 * B * T * T * C
    lora = 2 * N * r * 2 * C * n_adapted
    fwd = cfg.n_layer * (proj + attn + lora) + 2 * N * C * V
    if not backward:
        return float(fwd)
    bwd = cfg.n_layer * (proj + 2 * attn + 2 * lora) + 2 * N * C * V
    return float(fwd + bwd)


def bench_layer(size: dict, rng) -> list[dict]:
    """(a) forward + backward of one LoRA layer: numpy vs torch vs peft."""
    d, r, N = size["d"], size["r"], size["tokens"]
    W, b, cfg, layer, tlayer = _lora_layers(size, rng)
    x = rng.standard_normal((N, d)).astype(np.float32)
    dy = rng.standard_normal((N, d)).astype(np.float32)
    name, shape = "lora_layer_fwd_bwd", f"{d}->{d}, r={r}, {N} tokens, float32"

    def np_step():
        layer.zero_grad()
        layer.forward(x)
        return layer.backward(dy)

    fns = {"numpy": np_step}
    skipped = {}
    diffs = {}
    y_np = layer.forward(x)
    layer.backward(dy)
    torch = _torch()
    if torch is None:
        skipped["torch"] = "torch is not installed"
    else:
        tx = torch.from_numpy(x.copy()).requires_grad_(True)
        tdy = torch.from_numpy(dy)

        def torch_step(mod):
            def step():
                for p in mod.parameters():
                    p.grad = None
                tx.grad = None
                mod(tx).backward(tdy)
            return step

        fns["torch"] = torch_step(tlayer)
        with torch.no_grad():
            diffs["torch"] = float(np.max(np.abs(tlayer(tx).numpy() - y_np)))
        if _peft() is None:
            skipped["peft"] = "PEFT is not installed (pip install peft)"
        else:
            plin = _peft_layer(W, b, cfg, layer.A.data, layer.B.data)
            fns["peft"] = torch_step(plin)
            with torch.no_grad():
                diffs["peft"] = float(np.max(np.abs(plin(tx).numpy() - y_np)))
    res = time_interleaved(fns, repeats=size["repeats"], warmup=size["warmup"])
    ratio_to = {"numpy": "torch", "torch": "peft", "peft": None}
    goal = {"numpy": 0.70, "torch": 0.95, "peft": None}
    rows = []
    for impl in ("numpy", "torch", "peft"):
        ref = ratio_to[impl] if ratio_to[impl] in fns else None
        row = {"name": name, "impl": impl, "ratio_to": ref, "shape": shape}
        if impl in res:
            row.update(res[impl], flops=lora_layer_flops(N, d, d, r))
            row["goal"] = goal[impl] if ref is not None else None
            if impl in diffs:
                row["max_abs_diff_vs_numpy"] = diffs[impl]
        else:
            row.update(seconds=None, skipped=skipped[impl])
        rows.append(row)
    return rows


def bench_layer_inference(size: dict, rng) -> list[dict]:
    """(c) one layer, inference: base vs LoRA merged vs LoRA unmerged, per backend."""
    d, N = size["d"], size["tokens"]
    W, b, cfg, layer, tlayer = _lora_layers(size, rng)
    x = rng.standard_normal((N, d)).astype(np.float32)
    shape = f"{d}->{d}, r={size['r']}, {N} tokens, float32"
    rows = []

    import lowrank_ref as lr

    base = lr.nn.Linear.from_arrays(W, b)
    merged = lr.adapters.LoRALinear(lr.nn.Linear.from_arrays(W, b), cfg)
    merged.A.data, merged.B.data = layer.A.data.copy(), layer.B.data.copy()
    merged.merge()
    for m in (base, merged, layer):
        m.eval()
    res = time_interleaved({"base": lambda: base.forward(x), "merged": lambda: merged.forward(x),
                            "unmerged": lambda: layer.forward(x)}, repeats=size["repeats"], warmup=size["warmup"])
    flops = {"base": lora_layer_flops(N, d, d, 0, backward=False), "merged": lora_layer_flops(N, d, d, 0, backward=False),
             "unmerged": lora_layer_flops(N, d, d, size["r"], backward=False)}
    rows += _infer_rows("lora_layer_infer_numpy", res, shape, flops)

    torch = _torch()
    if torch is not None:
        tbase = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0).base
        tmerged = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0)
        with torch.no_grad():
            tmerged.A.copy_(tlayer.A)
            tmerged.B.copy_(tlayer.B)
        tmerged.merge()
        tx = torch.from_numpy(x)

        res = time_interleaved({"base": _torch_infer(tbase, tx), "merged": _torch_infer(tmerged, tx), "unmerged": _torch_infer(tlayer, tx)},
                               repeats=size["repeats"], warmup=size["warmup"])
        rows += _infer_rows("lora_layer_infer_torch", res, shape, flops)
    return rows


def _infer_rows(name: str, res: dict, shape: str, flops: dict) -> list[dict]:
    return [
        {"name": name, "impl": "base", "ratio_to": None, "shape": shape, **res["base"], "flops": flops["base"]},
        {"name": name, "impl": "merged", "ratio_to": "base", "goal": 1.03, "shape": shape, **res["merged"],
         "flops": flops["merged"]},
        {"name": name, "impl": "unmerged", "ratio_to": "base", "shape": shape, **res["unmerged"],
         "flops": flops["unmerged"], "note": "unmerged = the factorised forward, the latency that merge() removes"},
    ]


# -- the small GPT --------------------------------------------------------------------------
def _gpt(size: dict, rng):
    import lowrank_ref as lr
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    cfg = GPTConfig(**size["gpt"])
    model = GPT(cfg, rng=rng)
    B, T = size["gpt_batch"], cfg.block_size
    idx = rng.integers(0, cfg.vocab_size, (B, T + 1))
    return lr, model, cfg, idx[:, :-1], idx[:, 1:]


def _gpt_shape(cfg, B: int, r: int) -> str:
    return (f"GPT d={cfg.d_model}, {cfg.n_layer} layers, {cfg.n_head} heads, vocab {cfg.vocab_size}; "
            f"batch {B}x{cfg.block_size}; LoRA r={r} on q, v; float32")


def bench_gpt_step(size: dict, rng) -> list[dict]:
    """(b) one LoRA training step of the small GPT: numpy vs torch."""
    lr, model, cfg, x, y = _gpt(size, rng)
    r = size["r"]
    lcfg = lr.LoRAConfig(r=r, alpha=2 * r)
    torch = _torch()
    tmodel = None
    if torch is not None:
        import lowrank_gpu as lg

        tmodel = lg.nn.gpt.from_numpy(model)
    inject(model, lcfg, targets=("q", "v"), rng=0)
    opt = lr.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    shape = _gpt_shape(cfg, x.shape[0], r)

    def np_step():
        _, dlogits = model.loss(x, y)
        model.backward(dlogits)
        opt.step()
        opt.zero_grad()

    fns = {"numpy": np_step}
    if tmodel is not None:
        import torch.nn.functional as F

        inject(tmodel, lcfg, targets=("q", "v"), rng=0)
        topt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=1e-3)
        tmodel.train()
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def torch_step():
            logits = tmodel(tx)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty.reshape(-1))
            loss.backward()
            topt.step()
            topt.zero_grad(set_to_none=True)

        fns["torch"] = torch_step
    res = time_interleaved(fns, repeats=size["gpt_repeats"], warmup=size["warmup"])
    flops = gpt_step_flops(cfg, x.shape[0], r)
    rows = [{"name": "gpt_lora_train_step", "impl": "numpy", "shape": shape, **res["numpy"], "flops": flops,
             "ratio_to": "torch" if "torch" in res else None}]
    if "torch" in res:
        rows[0]["goal"] = 0.90
        rows.append({"name": "gpt_lora_train_step", "impl": "torch", "ratio_to": None, "shape": shape,
                     **res["torch"], "flops": flops})
    return rows


def bench_gpt_inference(size: dict, rng) -> list[dict]:
    """(c) the whole small GPT, inference: base vs LoRA (q, v) merged vs unmerged, per backend."""
    lr, base, cfg, x, _ = _gpt(size, rng)
    r = size["r"]
    lcfg = lr.LoRAConfig(r=r, alpha=2 * r)
    shape = _gpt_shape(cfg, x.shape[0], r)

    def adapted(m):
        inject(m, lcfg, targets=("q", "v"), rng=0)
        for layer in adapter_layers(m).values():  # non-zero B, as after training
            layer.B.data = (0.01 * rng.standard_normal(layer.B.shape)).astype(layer.B.data.dtype)
        return m

    import copy

    unmerged = adapted(copy.deepcopy(base))
    merged = copy.deepcopy(unmerged)
    for layer in adapter_layers(merged).values():
        layer.merge()
    for m in (base, merged, unmerged):
        m.eval()
    res = time_interleaved({"base": lambda: base.forward(x), "merged": lambda: merged.forward(x),
                            "unmerged": lambda: unmerged.forward(x)}, repeats=size["gpt_repeats"], warmup=size["warmup"])
    flops = {"base": gpt_step_flops(cfg, x.shape[0], 0, 0, backward=False),
             "merged": gpt_step_flops(cfg, x.shape[0], 0, 0, backward=False),
             "unmerged": gpt_step_flops(cfg, x.shape[0], r, backward=False)}
    rows = _infer_rows("gpt_infer_numpy", res, shape, flops)

    torch = _torch()
    if torch is not None:
        import lowrank_gpu as lg

        tbase = lg.nn.gpt.from_numpy(base)
        tunmerged = lg.nn.gpt.from_numpy(base)
        inject(tunmerged, lcfg, targets=("q", "v"), rng=0)
        tmerged = lg.nn.gpt.from_numpy(base)
        inject(tmerged, lcfg, targets=("q", "v"), rng=0)
        np_layers = adapter_layers(unmerged)
        with torch.no_grad():
            for tm in (tunmerged, tmerged):
                for n, mod in tm.named_modules():
                    if n in np_layers:
                        mod.A.copy_(torch.from_numpy(np_layers[n].A.data))
                        mod.B.copy_(torch.from_numpy(np_layers[n].B.data))
        for n, mod in tmerged.named_modules():
            if n in np_layers:
                mod.merge()
        tx = torch.from_numpy(x)
        for m in (tbase, tmerged, tunmerged):
            m.eval()

        res = time_interleaved({"base": _torch_infer(tbase, tx), "merged": _torch_infer(tmerged, tx), "unmerged": _torch_infer(tunmerged, tx)},
                               repeats=size["gpt_repeats"], warmup=size["warmup"])
        rows += _infer_rows("gpt_infer_torch", res, shape, flops)
    return rows


def run(quick: bool) -> list[dict]:
    """Every row, NumPy and torch each on one thread (see :func:`bench.run.single_thread`)."""
    size = QUICK if quick else FULL
    rng = np.random.default_rng(0)
    with single_thread():
        rows = (bench_layer(size, rng) + bench_layer_inference(size, rng)
                + bench_gpt_step(size, rng) + bench_gpt_inference(size, rng))
    for r in rows:
        r["threads"] = 1
        if "shape" in r:
            r["shape"] += ", 1 thread"
    return rows


if __name__ == "__main__":
    from bench.run import add_ratios, machine_info, render_markdown

    print(render_markdown(add_ratios(run(quick=False)), machine_info(False)))
