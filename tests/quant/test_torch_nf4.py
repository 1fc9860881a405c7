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


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.tensor([1.0, float("nan")]), ValueError, "finite"),
    (torch.tensor([1.0, float("inf")]), ValueError, "finite"),
    (torch.tensor([-float("inf"), 2.0], dtype=torch.float64), ValueError, "finite"),
    (torch.tensor([1e300, 1.0], dtype=torch.float64), ValueError, "finite in float32.*exceed float32's range"),
    (torch.zeros(0), ValueError, "empty"),
    (torch.arange(4), TypeError, "real floating"),
    (torch.ones(4, dtype=torch.complex64), TypeError, "real floating"),
    (torch.ones(4, dtype=torch.bool), TypeError, "real floating"),
    (np.ones(4, np.float32), TypeError, "torch.Tensor"),
])
def test_bad_input(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        tquantize(bad)


@pytest.mark.parametrize("bs,exc", [(0, ValueError), (-64, ValueError), (63, ValueError),
                                    (64.0, TypeError), (True, TypeError), ("64", TypeError)])
def test_bad_blocksize(bs, exc):
    with pytest.raises(exc, match="blocksize must be a positive even integer"):
        tquantize(torch.ones(8), blocksize=bs)


@pytest.mark.parametrize("dq", [1, 0, "yes", None, np.bool_(True)])
def test_double_quant_must_be_a_bool(dq):
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        tquantize(torch.ones(8), double_quant=dq)


def test_scalar_keeps_its_shape_in_both_backends():
    t = tquantize(torch.tensor(3.0))
    a = lr.quant.quantize_nf4(np.float32(3))
    assert t.shape == a.shape == () and t.dequantize().shape == () and a.dequantize().shape == ()
    assert float(t.dequantize()) == float(a.dequantize()) == 3.0


def test_mirror_names_match_the_reference():
    from lowrank_gpu import quant as gq

    np.testing.assert_array_equal(gq.nf4_table().numpy(), lr.quant.nf4_table())
    assert gq.NF4Tensor is TorchNF4Tensor
    x = np.random.default_rng(4).standard_normal(300).astype(np.float32)
    for fn, ref in ((gq.quantize_fp4, lr.quant.quantize_fp4), (gq.quantize_nf4, lr.quant.quantize_nf4)):
        b, a = fn(torch.from_numpy(x), 32), ref(x, 32)
        assert b.quant_type == a.quant_type
        np.testing.assert_array_equal(b.packed.numpy(), a.packed)


def test_bitsandbytes_failure_warns_and_falls_back(monkeypatch):
    """A broken bitsandbytes must not be hidden: the fallback says which exception it caught."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    from lowrank_gpu.quant import nf4 as tnf4

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(F, "dequantize_4bit", broken)
    q = tquantize(torch.randn(256), 64)
    with pytest.warns(RuntimeWarning, match="RuntimeError: no kernel image is available"):
        assert tnf4._bnb_dequantize(q, tnf4.table_tensor("nf4")) is None


@requires_cuda
def test_cuda_same_bytes():
    x = np.random.default_rng(0).standard_normal(64 * 100 + 5).astype(np.float32)
    a = lr.quant.quantize_nf4(x, 64, True)
    b = tquantize(torch.from_numpy(x).cuda(), 64, True)
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, b.arrays()[k].cpu().numpy(), err_msg=k)
    np.testing.assert_array_equal(a.dequantize(), b.dequantize().cpu().numpy())


@requires_cuda
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_cuda_bitsandbytes_path_is_used_and_equals_the_pure_one(qt):
    pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    import warnings

    from lowrank_gpu.quant import nf4 as tnf4

    x = torch.from_numpy(np.random.default_rng(1).standard_normal(64 * 300 + 6).astype(np.float32)).cuda()
    for dq in (False, True):
        q = tquantize(x, 64, dq, qt)
        table = tnf4.table_tensor(qt, x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning would fail here
            fast = tnf4._bnb_dequantize(q, table)
        assert fast is not None, "bitsandbytes' kernel was not used"
        pure = tnf4.dequantize_codes(q.packed, q.absmax, table, q.numel, q.blocksize)
        assert torch.equal(fast.float(), pure), f"{qt} dq={dq}: max diff {(fast.float() - pure).abs().max()}"


@given(n=st.integers(1, 700), bs=st.sampled_from([2, 6, 16, 64]), qt=st.sampled_from(["nf4", "fp4", "int4"]),
       chunk=st.sampled_from([4, 12, 64, 256]), seed=st.integers(0, 2**16))
def test_cpu_chunked_kernels_equal_the_whole_tensor_forms(n, bs, qt, chunk, seed):
    """The CPU kernels (chunks, the 8-byte pair table, counted comparisons) against the plain
    whole-tensor forms (bucketize, one pair gather) and the NumPy reference, across many chunks,
    odd lengths and block sizes that are not a multiple of 4."""
    import lowrank_gpu.quant.nf4 as tn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tn, "_CPU_CHUNK_VALUES", chunk)
        _check_cpu_kernels(tn, n, bs, qt, seed)


def _check_cpu_kernels(tn, n, bs, qt, seed):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    table = tn.table_tensor(qt)
    x = np.clip(x, -0.9, 0.9)
    x[::bs] = 1.0  # every block's absmax is 1, so u = x and the values below sit exactly on midpoints
    mids = tn.midpoints(np.sort(table.numpy()))
    on = np.flatnonzero(np.arange(n) % bs)[:15]
    x[on] = mids[: on.size]  # a value on a midpoint goes to the lower level
    t = torch.from_numpy(x)
    order = torch.argsort(table, stable=True)
    bounds = torch.from_numpy(tn.midpoints(table.numpy()[order.numpy()]))
    p_cpu, a_cpu = tn._quantize_cpu(t, bounds, order, bs, qt)
    p_any, a_any = tn._quantize_any(t, bounds, order, bs, qt)
    ref = lr.quant.quantize_4bit(x, bs, False, qt)
    np.testing.assert_array_equal(p_cpu.numpy(), p_any.numpy())
    np.testing.assert_array_equal(p_cpu.numpy(), ref.packed)
    np.testing.assert_array_equal(a_cpu.numpy(), a_any.numpy())
    got = tn._dequantize_codes_cpu(p_cpu, a_cpu, table, n, bs)
    vals = tn._pair_lut(table)[p_cpu.long()].reshape(-1)[:n]  # the plain decode, then the scales
    plain = (vals.view(-1) * a_cpu.repeat_interleave(bs)[:n])
    np.testing.assert_array_equal(got.numpy(), plain.numpy())
    np.testing.assert_array_equal(got.numpy(), ref.dequantize().reshape(-1))
