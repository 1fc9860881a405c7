"""The torch mirror of NF4 gives the same bytes and the same floats as the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import requires_cuda
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_gpu.quant import quantize_4bit as tquantize
from lowrank_gpu.quant.nf4 import TorchNF4Tensor


@given(n=st.integers(1, 3000), bs=st.sampled_from([2, 16, 64, 256]), dq=st.booleans(),
       qt=st.sampled_from(["nf4", "fp4", "int4"]), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e4))
def test_same_codes_and_floats_bit_for_bit(n, bs, dq, qt, seed, scale):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    a = lr.quant.quantize_4bit(x, bs, dq, qt)
    b = tquantize(torch.from_numpy(x), bs, dq, qt)
    assert set(a.arrays()) == set(b.arrays())
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k].numpy(), err_msg=k)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize().numpy())
    assert a.bits_per_param == b.bits_per_param


def test_numpy_round_trip_of_the_storage():
    x = np.random.default_rng(0).standard_normal((30, 20)).astype(np.float32)
    b = tquantize(torch.from_numpy(x), 64, True)
    a = b.to_numpy()
    np.testing.assert_array_equal(a.dequantize(), b.dequantize().numpy())
    c = TorchNF4Tensor.from_numpy(a)
    assert torch.equal(c.dequantize(), b.dequantize())


@pytest.mark.parametrize("bad,exc", [(torch.tensor([1.0, float("nan")]), ValueError),
                                     (torch.zeros(0), ValueError), (torch.arange(4), TypeError)])
def test_bad_input(bad, exc):
    with pytest.raises(exc):
        tquantize(bad)


@requires_cuda
def test_cuda_same_bytes():
    x = np.random.default_rng(0).standard_normal(64 * 100 + 5).astype(np.float32)
    a = lr.quant.quantize_nf4(x, 64, True)
    b = tquantize(torch.from_numpy(x).cuda(), 64, True)
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k].cpu().numpy(), err_msg=k)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize().cpu().numpy())
