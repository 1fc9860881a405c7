r"""The measurements behind chapter 03 (quantisation and QLoRA), one function per figure or table.

Every function returns plain data (arrays, lists of dicts); the notebook plots them.
"""

from __future__ import annotations

import time

import numpy as np

from lowrank_ref import quant
from lowrank_ref.quant.memory import bits_per_param

__all__ = ["model_linear_weights", "uniform_errors", "error_by_blocksize", "bits_breakdown", "paged_traffic",
           "lora_vs_qlora_memory", "merge_requant_table", "dequant_timing", "nf4_code_usage"]


def model_linear_weights(model=None) -> dict[str, np.ndarray]:
    """The weights of every ``Linear`` in the built-in pre-trained GPT (or ``model``), by name."""
    from lowrank_ref.nn.linear import Linear

    if model is None:
        from lowrank_ref.models import load_pretrained

        model = load_pretrained(progress=False)
    return {n: m.weight.data for n, m in model.named_modules() if isinstance(m, Linear)}


def uniform_errors(weights: dict[str, np.ndarray] | None = None, gaussian_n: int = 1 << 16,
                   seed: int = 0) -> list[dict]:
    r"""Uniform quantisation measured (chapter 03 §1): int8 absmax, affine int8 and affine int4,
    one scale (and zero point) per tensor, on the built-in model's linear weights and on
    Gaussian data.

    Each row: ``data``, ``scheme``, ``rel_error`` (:math:`\|\hat W - W\|_F / \|W\|_F` over all
    tensors together), ``rmse`` over all values, and ``worst_over_half_step``: the largest
    :math:`|\hat x - x| / (S/2)` of any value of any tensor (at most 1: the bound that
    :mod:`lowrank_ref.quant.uniform` derives; near 1 means the bound is reached).
    """
    from lowrank_ref.quant.uniform import quantize_absmax_int8, quantize_affine

    weights = model_linear_weights() if weights is None else weights
    gauss = {"x": np.random.default_rng(seed).standard_normal(gaussian_n).astype(np.float32)}
    schemes = {
        "int8 absmax": (lambda w: quant.absmax_int8_roundtrip(w), lambda w: quantize_absmax_int8(w)[1][0]),
        "int8 affine": (lambda w: quant.affine_roundtrip(w, 8), lambda w: quantize_affine(w, 8)[1][0]),
        "int4 affine": (lambda w: quant.affine_roundtrip(w, 4), lambda w: quantize_affine(w, 4)[1][0]),
    }
    rows = []
    for data, tensors in (("built-in GPT linear weights", weights), ("Gaussian N(0, 1)", gauss)):
        n_values = sum(w.size for w in tensors.values())
        for scheme, (roundtrip, step) in schemes.items():
            num = den = 0.0
            worst = 0.0
            for w in tensors.values():
                w64 = w.astype(np.float32).astype(np.float64)  # what the quantiser sees
                e = np.asarray(roundtrip(w), dtype=np.float64) - w64
                num += float(np.sum(e * e))
                den += float(np.sum(w64 * w64))
                worst = max(worst, float(np.max(np.abs(e))) / (float(step(w)) / 2))
            rows.append({"data": data, "scheme": scheme, "rel_error": float(np.sqrt(num / den)),
                         "rmse": float(np.sqrt(num / n_values)), "worst_over_half_step": worst})
    return rows


def nf4_code_usage(n: int = 1 << 22, blocksize: int = 64, seed: int = 0) -> dict:
    r"""How often each NF4 code is used on ``n`` draws of N(0, 1) after block-wise absmax.

    Returns ``{"share": (16,) fractions, "entropy_bits": float, "end_share_by_construction":
    1/blocksize}``: each block's largest magnitude is stored as exactly ±1 (an end code), so at
    least ``1/blocksize`` of all values sit on the two end codes.
    """
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    codes = quant.quantize_nf4(x, blocksize=blocksize).codes()
    share = np.bincount(codes, minlength=16) / codes.size
    nz = share[share > 0]
    return {"share": share, "entropy_bits": float(-(nz * np.log2(nz)).sum()),
            "end_share_by_construction": 1 / blocksize}


def _roundtrips(blocksize: int):
    return {
        "NF4": lambda w: quant.quantize_nf4(w, blocksize).dequantize(),
        "FP4": lambda w: quant.quantize_fp4(w, blocksize).dequantize(),
        "int4 (absmax)": lambda w: quant.absmax_int_roundtrip(w, 4, blocksize),
        "int4 (affine)": lambda w: quant.affine_roundtrip(w, 4, blocksize),
    }


def error_by_blocksize(weights: dict[str, np.ndarray], blocksizes=(16, 32, 64, 128, 256, 1024, None)) -> list[dict]:
    r"""Relative Frobenius error ``‖Ŵ - W‖ / ‖W‖`` over all given weights, per scheme and block size.

    ``None`` means one scale for the whole tensor (the 4-bit types need even block sizes, so
    ``None`` uses the tensor's size rounded up to even)."""
    rows = []
    for bs in blocksizes:
        for name in _roundtrips(64):
            num = den = 0.0
            for w in weights.values():
                b = bs if bs is not None else w.size + (w.size % 2)
                f = _roundtrips(b)[name]
                e = f(w).astype(np.float64) - w.astype(np.float64)
                num += float(np.sum(e * e))
                den += float(np.sum(w.astype(np.float64) ** 2))
            rows.append({"blocksize": bs, "scheme": name, "rel_error": float(np.sqrt(num / den))})
    return rows


def bits_breakdown(blocksizes=(32, 64, 128, 256)) -> list[dict]:
    """Bits per parameter split into codes, first-level scales, second-level scales (large tensor)."""
    rows = []
    for bs in blocksizes:
        rows.append({"blocksize": bs, "double_quant": False, "codes": 4.0, "scales": 32 / bs, "scales2": 0.0,
                     "total": bits_per_param(bs, False)})
        rows.append({"blocksize": bs, "double_quant": True, "codes": 4.0, "scales": 8 / bs,
                     "scales2": 32 / (bs * 256), "total": bits_per_param(bs, True)})
    return rows


def paged_traffic(device_fractions=(1.0, 0.95, 0.875, 0.75, 0.5, 0.25, 0.125), steps: int = 5, seed: int = 0,
                  shapes=((64, 64),) * 8) -> list[dict]:
    """Bytes moved by :class:`~lowrank_ref.optim.PagedAdamW` as the device shrinks.

    Each row: ``bytes_in`` / ``bytes_out`` over all ``steps``; ``first_step_bytes`` (in + out
    during step 1, which includes the first touch of every page); ``per_step_after_first``
    (in + out per step over steps 2..``steps``, the steady state: 0 when everything fits).
    The default is equal-sized parameters swept in a fixed order (the chapter's setting).
    """
    from lowrank_ref.nn import Parameter
    from lowrank_ref.optim import PagedAdamW

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (the steady state needs a second step), got {steps!r}")
    rows = []
    page = 4096
    total = sum(2 * -(-int(np.prod(s)) * 4 // page) for s in shapes) * page
    for frac in device_fractions:
        rng = np.random.default_rng(seed)
        ps = {f"p{i}": Parameter(rng.standard_normal(s).astype(np.float32)) for i, s in enumerate(shapes)}
        opt = PagedAdamW(ps, lr=1e-3, page_bytes=page, device_bytes=int(frac * total))
        first = 0
        for step in range(steps):
            for p in ps.values():
                p.grad = rng.standard_normal(p.shape).astype(np.float32)
            opt.step()
            opt.zero_grad()
            if step == 0:
                first = opt.bytes_in + opt.bytes_out
        t = opt.traffic()
        moved = t["bytes_in"] + t["bytes_out"]
        rows.append({"device_fraction": frac, "state_bytes": total, "device_bytes": t["device_bytes"],
                     "bytes_in": t["bytes_in"], "bytes_out": t["bytes_out"], "first_step_bytes": first,
                     "per_step_after_first": (moved - first) / (steps - 1)})
    return rows


def lora_vs_qlora_memory(steps: int = 3, targets="all", r: int = 8, seed: int = 0) -> list[dict]:
    """Measured on the built-in model: bytes the model holds and the peak of a training step
    (:mod:`tracemalloc`, as :func:`lowrank_ref.train.train` measures it), float32 LoRA vs QLoRA."""
    from lowrank_ref.config import LoRAConfig
    from lowrank_ref.data import builtin_task
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import model_bytes, train

    task = builtin_task(0)
    rows = []
    for method in ("lora", "qlora"):
        model = load_pretrained(progress=False)
        before = model_bytes(model)
        inject(model, LoRAConfig(r=r, alpha=2 * r), targets=targets, method=method, rng=seed)
        held = model_bytes(model)
        res = train(model, task.dialect_train, steps=steps, lr=1e-2, batch_size=8, rng=seed,
                    progress=False, measure_memory=True)
        rows.append({"method": method, "base_model_bytes": before, "model_bytes": held,
                     "peak_step_bytes": res.peak_memory_bytes,
                     "trainable": model.num_trainable_parameters()})
    return rows


def merge_requant_table(scales=(1e-3, 1e-2, 1e-1, 1.0), out: int = 256, inp: int = 256, r: int = 8,
                        seed: int = 0) -> list[dict]:
    """What re-quantising a merged QLoRA layer costs, as the update grows (``B ~ scale·N(0,1)``)."""
    from lowrank_ref.adapters.qlora import QLoRALinear, merge_requant_error
    from lowrank_ref.config import LoRAConfig
    from lowrank_ref.nn.linear import Linear

    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, inp)) * 0.02).astype(np.float32)
    rows = []
    for s in scales:
        layer = QLoRALinear(Linear.from_arrays(W), LoRAConfig(r=r, alpha=2 * r), rng=seed)
        layer.B.data = (rng.standard_normal(layer.B.shape) * s * 0.02).astype(np.float32)
        e = merge_requant_error(layer)
        w_norm = float(np.linalg.norm(W))
        rows.append({"B_scale": s, "delta_over_W": e["delta_norm"] / w_norm, **e})
    return rows


def dequant_timing(out: int = 1024, inp: int = 1024, n_tokens: int = 64, repeats: int = 5) -> dict:
    """Seconds (best of ``repeats``) for: dequantising an ``(out, in)`` NF4 weight, copying a
    float32 weight of that size (the floor), and a forward of LoRA vs QLoRA on ``n_tokens`` rows."""
    from lowrank_ref.adapters.lora import LoRALinear
    from lowrank_ref.adapters.qlora import QLoRALinear
    from lowrank_ref.config import LoRAConfig
    from lowrank_ref.nn.linear import Linear

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((out, inp)) * 0.02).astype(np.float32)
    q = quant.quantize_nf4(W, 64, double_quant=True)
    x = rng.standard_normal((n_tokens, inp)).astype(np.float32)
    lora = LoRALinear(Linear.from_arrays(W), LoRAConfig(r=8), rng=0)
    qlora = QLoRALinear(Linear.from_arrays(W), LoRAConfig(r=8), rng=0)
    buf = np.empty_like(W)

    def best(f):
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
        return min(t)

    return {"dequantize": best(q.dequantize), "copy": best(lambda: np.copyto(buf, W)),
            "lora_forward": best(lambda: lora.forward(x)), "qlora_forward": best(lambda: qlora.forward(x)),
            "shape": (out, inp), "n_tokens": n_tokens}
