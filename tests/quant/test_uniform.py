"""Uniform quantisation: affine int-k and symmetric absmax int8, error bounds by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.quant.uniform import quantize_affine


@given(n=st.integers(2, 300), bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       bs=st.sampled_from([None, 2, 7, 64]), shift=st.floats(-3, 3))
def test_affine_error_within_half_a_step_everywhere(n, bits, seed, bs, shift):
    """|x̂ - x| ≤ S/2 for every value, the ends included (uniform.py derives it: the zero point's
    rounding moves the ends at most half a step past the codes, and the clip takes them back)."""
    x = np.random.default_rng(seed).standard_normal(n) + shift  # shifted: ranges not centred on 0
    xh = lr.quant.affine_roundtrip(x, bits, bs)
    q, S, Z = quantize_affine(x, bits, bs)
    assert q.max() <= 2**bits - 1 and q.min() >= 0
    s = np.repeat(S, n if bs is None else bs)[:n]
    err = np.abs(xh - x.astype(np.float32).astype(np.float64))
    assert np.all(err <= s / 2 * (1 + 1e-9) + 1e-12), float(np.max(err / s))


def test_affine_half_step_bound_is_reached_at_both_ends():
    """The bound is tight, at the ends. Range [-0.5, 2.5] in 2 bits: S = 3/3 = 1, and
    Z = round(0.5) = 0 (half to even), so x_min sits at v = -0.5 (clipped to code 0: x̂ = 0) and
    x_max at v = 2.5 (rounded to the even code 2: x̂ = 2). Both errors are exactly S/2."""
    x = np.array([-0.5, 1.0, 2.5])
    q, S, Z = quantize_affine(x, bits=2)
    assert S[0] == 1.0 and Z[0] == 0.0
    np.testing.assert_array_equal(q.reshape(-1), [0, 1, 2])
    np.testing.assert_array_equal(np.abs(lr.quant.affine_roundtrip(x, 2) - x), [0.5, 0.0, 0.5])


def test_affine_by_hand():
    x = np.array([-1.0, 0.0, 0.5, 2.0])  # range [-1, 2], 2 bits: S = 1, Z = 1
    q, S, Z = quantize_affine(x, bits=2)
    assert S[0] == 1.0 and Z[0] == 1.0
    np.testing.assert_array_equal(q.reshape(-1), [0, 1, 1, 3])  # round(0.5) = 0 (half to even)
    np.testing.assert_array_equal(lr.quant.affine_roundtrip(x, 2), [-1.0, 0.0, 0.0, 2.0])


@given(n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_absmax_int8(n, seed):
    x = np.random.default_rng(seed).standard_normal(n)
    q, S = lr.quant.quantize_absmax_int8(x)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    xh = lr.quant.absmax_int8_roundtrip(x)
    assert np.all(np.abs(xh - x.astype(np.float32)) <= S[0] / 2 * (1 + 1e-9))
    assert np.abs(q).max() == 127  # the largest magnitude uses the top code


def test_nf4_against_uniform_int4_on_normal_data():
    """With the same storage (4 bits + one absmax per block) NF4 beats symmetric int4 and FP4 on
    normal data. Affine int4 (two floats per block: scale and zero point) about ties with NF4."""
    x = np.random.default_rng(0).standard_normal(64 * 512).astype(np.float32)
    rmse = {
        "nf4": lr.quant.roundtrip_error(x, lr.quant.quantize_nf4(x, 64).dequantize())["rmse"],
        "fp4": lr.quant.roundtrip_error(x, lr.quant.quantize_fp4(x, 64).dequantize())["rmse"],
        "int4": lr.quant.roundtrip_error(x, lr.quant.absmax_int_roundtrip(x, 4, 64))["rmse"],
        "affine4": lr.quant.roundtrip_error(x, lr.quant.affine_roundtrip(x, 4, 64))["rmse"],
    }
    assert rmse["nf4"] < 0.9 * rmse["int4"] and rmse["nf4"] < rmse["fp4"], rmse
    assert abs(rmse["nf4"] - rmse["affine4"]) < 0.02 * rmse["nf4"], rmse


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        lr.quant.quantize_affine(np.ones(3), bits=bits)


def test_bad_input():
    with pytest.raises(ValueError, match="finite"):
        lr.quant.quantize_absmax_int8(np.array([np.nan]))
    with pytest.raises(TypeError):
        lr.quant.quantize_affine(np.arange(3))


def test_int4_in_the_4bit_machinery_is_uniform_absmax_int4():
    """quantize_4bit(quant_type="int4") (the lora_int4 base) equals round(7x/absmax)·absmax/7."""
    x = np.random.default_rng(1).standard_normal(64 * 40).astype(np.float32)
    q = lr.quant.quantize_4bit(x, 64, quant_type="int4")
    assert q.codes().max() <= 14  # code 15 (8/7) is never used
    np.testing.assert_allclose(q.dequantize(), lr.quant.absmax_int_roundtrip(x, 4, 64), rtol=1e-6, atol=1e-7)


def test_qlora_int4_layer_stores_int4():
    base = lr.nn.Linear.from_arrays(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    layer = lr.adapters.QLoRAInt4Linear(base, lr.LoRAConfig(r=2), double_quant=False, rng=0)
    assert layer.qweight.quant_type == "int4"
    np.testing.assert_allclose(layer.dequantized_weight(),
                               lr.quant.absmax_int_roundtrip(base.weight.data, 4, 64), rtol=1e-6, atol=1e-7)
