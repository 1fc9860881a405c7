"""The chapter 03 measurements that back claims: paging traffic in the chapter's setting, the
uniform-quantisation errors, and LoRA vs QLoRA memory on the built-in model."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.experiments import qlora_experiments as qx


# --- paging: equal-sized parameters swept in a fixed order ----------------------------------
def test_paging_moves_every_state_page_every_step_once_the_states_do_not_fit():
    """The chapter's claim, restricted to its setting (8 parameters of 64×64, the same order each
    step). LRU on a cyclic sweep evicts the pages needed soonest: in the steady state each update
    finds the k pages the device is short of missing from its own states (k = state pages -
    frames), capped at its own 2·4 pages. So once the device is short by at least one
    parameter's states (device ≤ 7/8 of the states), each step pages the whole state in and out;
    with room for all, only the first touch moves anything."""
    steps, page = 3, 4096
    n_params, rows, cols = 8, 64, 64
    pp = 2 * -(-rows * cols * 4 // page)  # pages per parameter: two float32 moments of 4 pages
    n_pages = n_params * pp  # 64
    state = n_pages * page  # 256 KiB
    frames = range(pp, n_pages + 1)  # the smallest device holds one parameter's states
    out = qx.paged_traffic(device_fractions=[f / n_pages for f in frames], steps=steps,
                           shapes=((rows, cols),) * n_params)
    for f, r in zip(frames, out):
        k = n_pages - f  # pages short
        assert r["state_bytes"] == state and r["device_bytes"] == f * page
        per_step_in = n_params * min(k, pp) * page
        assert r["bytes_in"] == state + (steps - 1) * per_step_in, f  # first touch, then the faults
        assert r["bytes_out"] == r["bytes_in"] - f * page, f  # every page in evicts one once full
        assert r["per_step_after_first"] == 2 * per_step_in, f
        if k >= pp:  # short by a whole parameter or more: the chapter's "everything, every step"
            assert r["bytes_in"] == steps * state and r["per_step_after_first"] == 2 * state, f
        if k == 0:
            assert r["bytes_in"] == state and r["bytes_out"] == 0 and r["per_step_after_first"] == 0


def test_paging_with_mixed_sizes_moves_less():
    """Why the claim is restricted: with mixed sizes (tests/quant/test_optim_memory.py's 46 pages,
    40 frames) only 12 of the 46 pages move each step, not all of them."""
    from lowrank_ref.nn import Parameter

    rng = np.random.default_rng(0)
    ps = {f"p{i}": Parameter(rng.standard_normal(s).astype(np.float32))
          for i, s in enumerate(((64, 80), (300,), (16, 8)))}
    opt = lr.optim.PagedAdamW(ps, page_bytes=1024, device_bytes=40 * 1024)
    moved = []
    for _ in range(3):
        before = opt.bytes_in
        for p in ps.values():
            p.grad = np.ones_like(p.data)
        opt.step()
        moved.append((opt.bytes_in - before) // 1024)
    assert opt.n_pages == 46 and moved == [46, 12, 12]


def test_paged_traffic_needs_two_steps():
    with pytest.raises(ValueError, match="steps"):
        qx.paged_traffic(steps=1)


# --- uniform quantisation, measured ----------------------------------------------------------
def test_uniform_errors_within_half_a_step_and_near_the_uniform_noise_model():
    rng = np.random.default_rng(3)
    weights = {"a": (rng.standard_normal((32, 48)) * 0.05).astype(np.float32),
               "b": (rng.standard_normal((16, 64)) * 0.2 + 0.01).astype(np.float32)}
    n = 1 << 15
    rows = qx.uniform_errors(weights, gaussian_n=n, seed=5)
    assert {(r["data"], r["scheme"]) for r in rows} == {
        (d, s) for d in ("built-in GPT linear weights", "Gaussian N(0, 1)")
        for s in ("int8 absmax", "int8 affine", "int4 affine")}
    for r in rows:
        assert 0 < r["worst_over_half_step"] <= 1 + 1e-6, r  # |x̂ - x| ≤ S/2 (uniform.py)
    by = {(r["data"], r["scheme"]): r for r in rows}
    # Gaussian data, one scale per tensor: rounding error ≈ uniform on ±S/2, so rmse ≈ S/√12,
    # with S from the data's own range (computed here)
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32).astype(np.float64)
    steps = {"int8 absmax": np.abs(x).max() / 127, "int8 affine": (x.max() - x.min()) / 255,
             "int4 affine": (x.max() - x.min()) / 15}
    for scheme, S in steps.items():
        assert by[("Gaussian N(0, 1)", scheme)]["rmse"] == pytest.approx(S / np.sqrt(12), rel=0.03), scheme
    for data in ("built-in GPT linear weights", "Gaussian N(0, 1)"):
        assert by[(data, "int4 affine")]["rel_error"] > 10 * by[(data, "int8 affine")]["rel_error"]


# --- LoRA vs QLoRA memory on the built-in model ----------------------------------------------
def _nf4_dq_bytes(n: int, bs: int = 64) -> int:
    nb = -(-n // bs)
    return (n + 1) // 2 + nb + 4 * -(-nb // 256) + 4  # codes, qabsmax, absmax2, offset


def test_qlora_holds_fewer_bytes_and_peaks_lower_than_lora():
    """The chapter's §7 claim: with every linear layer of the blocks adapted, QLoRA holds the
    bases in NF4 instead of float32, and its training-step peak is lower too."""
    from lowrank_ref.models import load_pretrained

    rows = {r["method"]: r for r in qx.lora_vs_qlora_memory(steps=2)}
    lora, qlora = rows["lora"], rows["qlora"]
    assert lora["trainable"] == qlora["trainable"] > 0
    assert lora["base_model_bytes"] == qlora["base_model_bytes"]
    c = load_pretrained(progress=False).config
    d, h = c.d_model, c.mlp_ratio * c.d_model
    shapes = [(d, d)] * 4 + [(h, d), (d, h)]  # q, k, v, o, fc, proj in each block
    saving = c.n_layer * sum(4 * o * i - _nf4_dq_bytes(o * i) for o, i in shapes)
    held = lora["model_bytes"] - qlora["model_bytes"]
    assert held == pytest.approx(saving, rel=0.01), (held, saving)
    peak = lora["peak_step_bytes"] - qlora["peak_step_bytes"]
    # lower by most of the weights' saving (a transiently dequantised weight may be live at the peak)
    assert peak > 0.5 * saving, (peak, saving)
