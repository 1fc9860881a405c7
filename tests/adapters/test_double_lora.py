"""The "double LoRA" reading of DoRA: two low-rank updates B1 A1 + B2 A2 are one LoRA of rank
≤ r1 + r2 ([B1 B2][A1; A2]), forward, gradients and optimizer steps alike; DoRA is not that."""

from __future__ import annotations

import numpy as np
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.experiments.dora_experiments import DoubleLoRALinear
from lowrank_ref.gradcheck import gradcheck


@given(out=st.integers(1, 9), inn=st.integers(1, 9), r1=st.integers(1, 4), r2=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_two_low_rank_updates_are_one_of_rank_at_most_r1_plus_r2(out, inn, r1, r2, seed):
    rng = np.random.default_rng(seed)
    B1, A1 = rng.standard_normal((out, r1)), rng.standard_normal((r1, inn))
    B2, A2 = rng.standard_normal((out, r2)), rng.standard_normal((r2, inn))
    stacked = np.hstack([B1, B2]) @ np.vstack([A1, A2])  # [B1 B2] [A1; A2]
    assert_close(stacked, B1 @ A1 + B2 @ A2, "[B1 B2][A1; A2]")
    # rank ≤ r1 + r2, and generically equal to min(out, in, r1 + r2): the bound is attained
    assert np.linalg.matrix_rank(stacked) == min(out, inn, r1 + r2)


def make_double(rng, r1=2, r2=3, alpha1=4.0, alpha2=6.0, out=5, inn=6):
    base = lr.nn.Linear.from_arrays(rng.standard_normal((out, inn)), rng.standard_normal(out))
    layer = DoubleLoRALinear(base, lr.LoRAConfig(r=r1, alpha=alpha1), lr.LoRAConfig(r=r2, alpha=alpha2), rng=rng)
    layer.B1.data = rng.standard_normal((out, r1))
    layer.B2.data = rng.standard_normal((out, r2))
    return layer


def test_double_lora_gradcheck_and_dense_forward(rng):
    layer = make_double(rng)
    gradcheck(layer, rng.standard_normal((2, 3, 6))).raise_if_failed()
    x = rng.standard_normal((4, 6))
    W = layer.base.weight.data
    assert_close(layer.forward(x), x @ (W + layer.delta_weight()).T + layer.base.bias.data, "y via ΔW")


def test_as_lora_same_outputs_and_stacked_gradients(rng):
    layer = make_double(rng, alpha1=4.0, alpha2=6.0)  # s1 = s2 = 2: the factors stack as they are
    single = layer.as_lora()
    assert single.r == 5 and single.scaling == 2.0
    assert_close(single.B.data, np.hstack([layer.B1.data, layer.B2.data]), "B = [B1 B2]")
    x = rng.standard_normal((3, 6))
    dy = rng.standard_normal((3, 5))
    assert_close(single.forward(x), layer.forward(x), "y")
    assert_close(single.backward(dy), layer.backward(dy), "x̄")
    assert_close(single.A.grad, np.vstack([layer.A1.grad, layer.A2.grad]), "Ā = [Ā1; Ā2]")
    assert_close(single.B.grad, np.hstack([layer.B1.grad, layer.B2.grad]), "B̄ = [B̄1 B̄2]")


def test_different_scalings_still_one_lora(rng):
    layer = make_double(rng, alpha1=1.0, alpha2=9.0)
    single = layer.as_lora(alpha=3.0)
    x = rng.standard_normal((3, 6))
    assert_close(single.forward(x), layer.forward(x), "y")
    assert_close(single.delta_weight(), layer.delta_weight(), "ΔW")


def test_adamw_trains_them_identically(rng):
    """Equal scalings: the stacked gradients make every element-wise optimizer step the same."""
    layer = make_double(rng, alpha1=2.0, alpha2=3.0)  # s1 = s2 = 1
    single = layer.as_lora()
    B1_start = layer.B1.data.copy()
    opt_d = lr.optim.AdamW(layer.trainable_parameters(), lr=0.05, weight_decay=0.1)
    opt_s = lr.optim.AdamW(single.trainable_parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(5):
        x = rng.standard_normal((4, 6))
        target = rng.standard_normal((4, 5))
        for m, opt in ((layer, opt_d), (single, opt_s)):
            y = m.forward(x)
            m.backward(y - target)
            opt.step()
            opt.zero_grad()
    assert_close(single.delta_weight(), layer.delta_weight(), "ΔW after 5 AdamW steps", rtol=1e-9, atol=1e-12)
    assert not np.allclose(layer.B1.data, B1_start)  # it trained


def test_dora_is_not_a_double_lora(rng):
    """DoRA's update is diag(g − 1) W0 + s diag(g) B A: full rank once m ≠ n, not rank ≤ 2r."""
    W = rng.standard_normal((8, 8))
    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=1, alpha=1), rng=rng)
    layer.B.data = rng.standard_normal((8, 1))
    layer.m.data = layer.m.data * rng.uniform(0.8, 1.2, 8)
    assert np.linalg.matrix_rank(layer.delta_weight()) == 8 > 2 * layer.r


def test_magnitude_direction_measures(rng):
    """ΔM sees only length changes, ΔD only turns (the paper's §3 measures, row-wise)."""
    from lowrank_ref.experiments.dora_experiments import magnitude_direction

    W0 = rng.standard_normal((6, 4))
    dM, dD = magnitude_direction(W0, 1.5 * W0)
    assert np.isclose(dM, 0.5 * np.linalg.norm(W0, axis=1).mean()) and abs(dD) < 1e-12
    Q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    dM, dD = magnitude_direction(W0, W0 @ Q)  # every row turned, no row longer or shorter
    cos = np.sum(W0 * (W0 @ Q), axis=1) / np.linalg.norm(W0, axis=1) ** 2
    assert abs(dM) < 1e-12 and np.isclose(dD, np.mean(1 - cos)) and dD > 0.01
