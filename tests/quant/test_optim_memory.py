"""8-bit Adam and the paged AdamW: same steps as float Adam (to the quantisation error, or exactly),
state memory counted from the arrays, page traffic counted by hand."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.nn import Parameter


def params(seed=0, shapes=((64, 80), (300,), (16, 8))):
    rng = np.random.default_rng(seed)
    return {f"p{i}": Parameter(rng.standard_normal(s).astype(np.float32)) for i, s in enumerate(shapes)}


def run(opt_cls, steps=10, seed=0, **kw):
    ps = params(seed)
    opt = opt_cls(ps, lr=1e-2, **kw)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        for p in ps.values():
            p.grad = (rng.standard_normal(p.shape) * 0.1 + 0.05 * p.data).astype(np.float32)
        opt.step()
        opt.zero_grad()
    return ps, opt


def test_adam8bit_follows_adam_closely_and_stores_a_quarter():
    ref, ref_opt = run(lr.optim.Adam)
    ps, opt = run(lr.optim.Adam8bit, min_8bit_size=0)
    for name in ref:
        d = np.abs(ps[name].data - ref[name].data).max()
        moved = np.abs(ref[name].data - params()[name].data).max()
        assert 0 < d < 0.05 * moved, (name, d, moved)  # quantised (not equal), yet close
    st = opt.state["p0"]
    assert st["exp_avg_q"].dtype == np.uint8 and st["exp_avg_absmax"].shape == (20,)  # 5120 / 256
    n = sum(p.size for p in ps.values())
    blocks = sum(-(-p.size // 256) for p in ps.values())
    assert opt.state_bytes() == 2 * n + 2 * 4 * blocks
    assert ref_opt.state_bytes() == 8 * n
    assert ref_opt.state_bytes() / opt.state_bytes() > 3.8


def test_adam8bit_small_tensors_stay_float32_and_equal_adam():
    ref, _ = run(lr.optim.Adam, steps=3)
    ps, opt = run(lr.optim.Adam8bit, steps=3, min_8bit_size=10**9)
    for name in ref:
        np.testing.assert_array_equal(ps[name].data, ref[name].data)
    assert "exp_avg" in opt.state["p0"]


def test_adam8bit_state_decodes_near_float_state():
    ref, ref_opt = run(lr.optim.Adam, steps=4)
    ps, opt = run(lr.optim.Adam8bit, steps=4, min_8bit_size=0)
    m = opt.dequantized_state("p0")["exp_avg"]
    m_ref = ref_opt.state["p0"]["exp_avg"]
    assert np.abs(m - m_ref).max() < 0.05 * np.abs(m_ref).max()


def test_paged_adamw_equals_adamw_bit_for_bit_and_counts_traffic():
    ref, _ = run(lr.optim.AdamW, steps=5)
    ps, opt = run(lr.optim.PagedAdamW, steps=5, page_bytes=1024)
    for name in ref:
        np.testing.assert_array_equal(ps[name].data, ref[name].data)
    # pages per state: 5120 -> 20, 300 -> 2 (of 256 floats), 128 -> 1; two states each
    pages = 2 * (20 + 2 + 1)
    assert opt.n_pages == pages
    t = opt.traffic()
    assert t["bytes_in"] == pages * 1024 and t["bytes_out"] == 0 and t["faults"] == pages


def test_paged_small_device_moves_every_step():
    steps = 4
    ref, _ = run(lr.optim.AdamW, steps=steps)
    ps, opt = run(lr.optim.PagedAdamW, steps=steps, page_bytes=1024, device_bytes=40 * 1024)
    for name in ref:
        np.testing.assert_array_equal(ps[name].data, ref[name].data)
    # 40 frames of 256 floats; p0 needs 40 pages, p1 4, p2 2 (both states).
    # Step 1: p0 faults 40 in; p1 4 in, evicting 4 of p0; p2 2 in, evicting 2 of p0 (46 in, 6 out).
    # Each later step: p0 brings back its 6 missing pages, evicting p1's and p2's (6 in, 6 out);
    # then p1 (4 in, 4 out) and p2 (2 in, 2 out) evict p0 pages again: 12 in, 12 out.
    t = opt.traffic()
    assert t["bytes_in"] == (46 + 12 * (steps - 1)) * 1024
    assert t["bytes_out"] == (6 + 12 * (steps - 1)) * 1024
    assert t["evictions"] == t["bytes_out"] // 1024
    np.testing.assert_array_equal(opt.read_state("p0", "exp_avg").shape, (64, 80))


def test_paged_bad_device():
    with pytest.raises(ValueError, match="largest parameter"):
        lr.optim.PagedAdamW(params(), page_bytes=1024, device_bytes=10 * 1024)
    with pytest.raises(ValueError, match="page_bytes"):
        lr.optim.PagedAdamW(params(), page_bytes=6)


def test_sgd_vs_adam_state_memory_as_rank_grows():
    """The seed's question: SGD (no momentum) keeps no state, momentum one copy, Adam two, all
    proportional to the trainable count r·(in+out) per layer."""
    from lowrank_ref.quant.memory import optimizer_state_by_rank

    rows = optimizer_state_by_rank(ranks=(1, 4, 16), d_in=32, d_out=48, n_layers=2)
    for row in rows:
        n = row["trainable"]
        assert n == 2 * row["r"] * (32 + 48)
        assert row["sgd"] == 0 and row["sgd_momentum"] == 4 * n and row["adam"] == 8 * n
        assert row["adam8bit"] < row["adam"] / 3.5


def test_the_papers_headline_memory_claims_from_first_principles():
    """QLoRA: 4.127 bits/param; 65B fine-tuned in under 48 GB; over 780 GB for 16-bit full
    fine-tuning. Parameter count by hand from LLaMA-65B's shapes."""
    from lowrank_ref.quant import memory

    assert memory.bits_per_param(64, False) == 4.5
    assert round(memory.bits_per_param(64, True), 3) == 4.127
    m = memory.llama_memory()
    d, L, f, V = 8192, 80, 22016, 32000
    assert m["params"] == L * (4 * d * d + 3 * d * f) + 2 * V * d + (2 * L + 1) * d
    assert m["lora_params"] == L * 64 * (4 * 2 * d + 3 * (d + f))
    assert 40e9 < m["total"] < 48e9
    assert memory.full_finetune_bytes(m["params"]) > 780e9


def test_adam8bit_saves_3_94x_on_whole_blocks():
    """adam8bit.py's figure: 2 bytes per value + 2·4 bytes of scales per 256 values against 8
    bytes: 8 / (2 + 8/256) = 3.938 (not 3.97), on a tensor of whole 256-value blocks."""
    from lowrank_ref.nn import Parameter

    ps = {"w": Parameter(np.ones((256, 64), np.float32))}
    for cls, kw in ((lr.optim.Adam, {}), (lr.optim.Adam8bit, {"min_8bit_size": 0})):
        ps["w"].grad = np.full((256, 64), 0.1, np.float32)
        opt = cls(ps, lr=1e-3, **kw)
        opt.step()
        if cls is lr.optim.Adam:
            full = opt.state_bytes()
        else:
            eight = opt.state_bytes()
    assert full == 8 * 256 * 64
    assert full / eight == pytest.approx(8 / (2 + 8 / 256), rel=1e-12)
    assert round(full / eight, 2) == 3.94
