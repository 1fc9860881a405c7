"""LoRA in bfloat16: the torch layer against the NumPy float64 reference, the exact unmerge over
1000 cycles, and the drift of the naive unmerge (subtracting s·B·A) that chapter 01 §5 contrasts
it with.

float32 (forward, dx, dA, dB) is covered by ``test_lora.py::test_numpy_matches_torch_float32``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import LoRALinear
from lowrank_ref.experiments.lora_experiments import naive_unmerge_drift

BF16_U = 2.0**-8  # bf16 unit roundoff: 8 significant bits, rounding to nearest (|fl(v) - v| <= u |v|)
# Agreement bound for bf16 vs the float64 reference, relative to the scale of the output
# (max |reference|): every bf16 product rounds its result (u relative) and the inputs of the
# second product (h = x Aᵀ, h̄ = s ȳ B) are already rounded, so a few u. Measured over
# 40 seeds x the 3 shapes below (120 cases): max 5.2e-3 (forward), 7.4e-3 (dx), 6.7e-3 (dA),
# 6.1e-3 (dB), i.e. <= 1.9 u. The bound, 4 u = 1.6e-2, is about half of TOL["bfloat16"] (3e-2
# relative + 3e-2 absolute) and twice the worst case measured.
BF16_BOUND = 4 * BF16_U
assert BF16_BOUND <= TOL["bfloat16"][0]

SHAPES = [  # (out, in, r, rslora)
    (32, 48, 4, False),
    (96, 256, 8, True),  # in = 256: long dot products
    (7, 5, 3, False),
]


def _bf16_exact(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bf16 and back to float64: values that both sides hold exactly."""
    return torch.from_numpy(a).to(torch.bfloat16).double().numpy()


def _case(seed, out, inn, r, rslora):
    rng = np.random.default_rng(seed)
    W = _bf16_exact(rng.standard_normal((out, inn)) / np.sqrt(inn))
    b = _bf16_exact(0.1 * rng.standard_normal(out))
    A = _bf16_exact(rng.uniform(-1, 1, (r, inn)) / np.sqrt(inn))
    B = _bf16_exact(0.5 * rng.standard_normal((out, r)))  # non-zero: the LoRA branch counts
    x = _bf16_exact(rng.standard_normal((2, 5, inn)))
    dy = _bf16_exact(rng.standard_normal((2, 5, out)))
    cfg = lr.LoRAConfig(r=r, alpha=2.0 * r, rslora=rslora)
    return W, b, A, B, x, dy, cfg


def _numpy_ref(W, b, A, B, x, dy, cfg):
    layer = LoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=0)
    layer.A.data, layer.B.data = A.copy(), B.copy()
    y = layer.forward(x)
    dx = layer.backward(dy)
    return {"forward": y, "dx": dx, "dA": layer.A.grad, "dB": layer.B.grad}


def _torch_bf16(W, b, A, B, x, dy, cfg):
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0).to(torch.bfloat16)
    with torch.no_grad():
        tl.A.copy_(torch.from_numpy(A))
        tl.B.copy_(torch.from_numpy(B))
    xt = torch.from_numpy(x).to(torch.bfloat16).requires_grad_(True)
    y = tl(xt)
    (y * torch.from_numpy(dy).to(torch.bfloat16)).sum().backward()
    out = {"forward": y, "dx": xt.grad, "dA": tl.A.grad, "dB": tl.B.grad}
    for name, t in out.items():
        assert t.dtype == torch.bfloat16, f"{name} is {t.dtype}, not bf16: the bf16 path did not run"
    assert tl.base.weight.grad is None
    return {k: v.detach().double().numpy() for k, v in out.items()}


def _scaled_err(mine: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(mine - ref).max() / np.abs(ref).max())


# --- 1a: bf16 torch vs the float64 reference ---------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("out, inn, r, rslora", SHAPES)
def test_bf16_torch_matches_float64_numpy(seed, out, inn, r, rslora):
    case = _case(seed, out, inn, r, rslora)
    ref = _numpy_ref(*case)
    got = _torch_bf16(*case)
    for name in ("forward", "dx", "dA", "dB"):
        scale = float(np.abs(ref[name]).max())
        assert scale > 0, f"{name} is zero: nothing to compare"
        # elementwise, "mine vs theirs", with the absolute bound set by the output's scale
        assert_close(got[name], ref[name], f"bf16 {name}", rtol=0.0, atol=BF16_BOUND * scale)


def test_bf16_check_is_tight_enough_to_catch_a_wrong_scaling():
    """The bound above rejects a reference whose only error is the scaling rule (α/r instead of
    α/√r at r = 4: s off by 2), so the comparison can fail."""
    W, b, A, B, x, dy, cfg = _case(0, 32, 48, 4, True)
    got = _torch_bf16(W, b, A, B, x, dy, cfg)
    wrong = _numpy_ref(W, b, A, B, x, dy, lr.LoRAConfig(r=4, alpha=cfg.alpha, rslora=False))
    for name in ("forward", "dx", "dA", "dB"):
        assert _scaled_err(got[name], wrong[name]) > BF16_BOUND, name


# --- 1b: the project's unmerge restores W0's bits ----------------------------------------------
def test_bf16_1000_merge_unmerge_cycles_restore_W0_bit_for_bit():
    W, b, A, B, x, _, cfg = _case(1, 16, 24, 4, False)  # small: 1000 cycles of bf16 CPU matmuls
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0).to(torch.bfloat16)
    with torch.no_grad():
        tl.A.copy_(torch.from_numpy(A))
        tl.B.copy_(torch.from_numpy(B))
    W0 = tl.base.weight.detach().clone()
    assert W0.dtype == torch.bfloat16
    xt = torch.from_numpy(x).to(torch.bfloat16)
    with torch.no_grad():
        y_unmerged = tl(xt).double()
    tl.merge()
    # the merged weight is W0 + s B A up to bf16 rounding: at most two roundings to nearest
    # (ΔW = s B A is formed in bf16, then W0 + ΔW is summed in float64 and rounded), each within
    # u = 2^-9 of the value it rounds
    exact = W + cfg.scaling * (B @ A)
    err = np.abs(tl.base.weight.detach().double().numpy() - exact)
    assert np.all(err <= BF16_U * (np.abs(exact) + np.abs(cfg.scaling * (B @ A))) * (1 + BF16_U))
    assert not torch.equal(tl.base.weight, W0)  # ΔW is not zero: the merge did something
    with torch.no_grad():
        y_merged = tl(xt).double()
    scale = float(y_unmerged.abs().max())
    assert float((y_merged - y_unmerged).abs().max()) <= BF16_BOUND * scale
    tl.unmerge()
    for _ in range(999):
        tl.merge()
        tl.unmerge()
    assert torch.equal(tl.base.weight, W0)  # bit for bit, after 1000 cycles
    assert tl.base.weight.dtype == torch.bfloat16


def test_bf16_merged_weight_is_the_correctly_rounded_sum():
    """ΔW = s B A is formed in float64 from the bf16 factors and added to W0 in float64, then
    rounded once into bf16 (forming ΔW in bf16 first rounded ~29% of the entries differently)."""
    W, b, A, B, _, _, cfg = _case(1, 64, 64, 8, False)
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0).to(torch.bfloat16)
    with torch.no_grad():
        tl.A.copy_(torch.from_numpy(A))
        tl.B.copy_(torch.from_numpy(B))
    tl.merge()
    assert torch.equal(tl.base.weight, torch.from_numpy(W + cfg.scaling * (B @ A)).to(torch.bfloat16))


# --- 1c: the naive unmerge (W <- W + sBA; W <- W - sBA) ----------------------------------------
DRIFT = dict(shape=(64, 64), r=8, alpha=16.0, b_std=0.1)


def _by_cycle(rows):
    return {row["cycle"]: row for row in rows}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_naive_unmerge_drifts_and_grows_with_float32_adapters_on_a_bf16_base(seed):
    """PEFT's layout for a bf16 model (``get_peft_model`` keeps the adapters in float32): merge adds
    the float32 ΔW to the bf16 weight (one rounding of W0 + ΔW), unmerge subtracts bf16(ΔW). The
    difference ΔW - bf16(ΔW) is left in W every cycle with the same sign, so the error adds up:
    it must be non-zero after one cycle and many times larger after 1000."""
    d = _by_cycle(naive_unmerge_drift(1000, "bfloat16", adapter_dtype="float32", seed=seed, **DRIFT))
    assert d[1]["max_abs"] > 0
    assert d[1000]["max_abs"] > 10 * d[1]["max_abs"]
    assert d[10]["max_abs"] <= d[100]["max_abs"] <= d[1000]["max_abs"]
    assert d[1000]["rel"] > 1e-2  # a percent of the largest weight, not a rounding error


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_naive_unmerge_with_bf16_adapters_errs_once_and_then_stays(seed):
    """Adding and subtracting the *same* bf16 ΔW: cycle 1 maps w to w1 = bf16(bf16(w + ΔW) - ΔW),
    an error of about an ulp. It does not grow: w1 is the bf16 number nearest y - ΔW (y = bf16(w + ΔW)),
    so w1 + ΔW lies within half an ulp of w1 from y and, where ulp(w1) <= ulp(y) (the usual case),
    rounds back to y, so every later cycle gives w1 again; for these seeds no entry moves after
    cycle 1. The naive unmerge is still wrong (W0 is not restored), but by one rounding, not a drift."""
    d = _by_cycle(naive_unmerge_drift(1000, "bfloat16", seed=seed, **DRIFT))
    assert d[1]["max_abs"] > 0 and d[1]["changed"] > 0.01
    assert d[1]["max_abs"] <= 2.0**-6  # two half-ulp roundings of numbers below 4 in size (ulp <= 2^-6)
    assert d[1000]["max_abs"] == d[1]["max_abs"] and d[1000]["changed"] == d[1]["changed"]


@pytest.mark.parametrize("adapter_dtype", [None, "float32"])
def test_naive_unmerge_in_float64_is_at_rounding_level(adapter_dtype):
    """Same cycles in float64 (float64 or float32 adapters): the error is float64 rounding
    (u = 1.1e-16 relative), not a drift: below 1e-15 of the largest weight after 1000 cycles."""
    d = _by_cycle(naive_unmerge_drift(1000, "float64", adapter_dtype=adapter_dtype, seed=0, **DRIFT))
    assert d[1000]["rel"] < 1e-15


def test_naive_unmerge_drift_rows_and_checkpoints():
    rows = naive_unmerge_drift(30, "float32", seed=0, checkpoints=(1, 10, 100), **DRIFT)
    assert [r["cycle"] for r in rows] == [1, 10]  # checkpoints past `cycles` are dropped
    assert set(rows[0]) == {"cycle", "max_abs", "rel", "changed"}
