"""The C dequantisation kernel of lowrank_gpu.quant.native: every variant this CPU runs gives the
bits of the plain formula (and of the NumPy reference), its streaming and tail paths included; a
missing or failing compiler falls back to the pure PyTorch path with the same floats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_gpu.quant import native
from lowrank_gpu.quant import nf4 as tn

VARIANTS = {0: "plain C loop", 1: "AVX2", 2: "AVX-512"}


def _best():
    if native.library() is None:
        pytest.skip(f"the C kernel is not built here: {native.status()}")
    return native.library().lr_dequant4_variant(-1)


def _variant(v):
    best = _best()
    if v > best:
        pytest.skip(f"this CPU does not run the {VARIANTS[v]} variant (best here: {VARIANTS[best]})")
    return v


def _plain(packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, n: int, bs: int) -> np.ndarray:
    """x_j = t[c_j] · a_{j // bs}, c_{2k} = byte_k >> 4, c_{2k+1} = byte_k & 15, written out."""
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]
    return table[codes] * np.repeat(absmax, bs)[:n]


def _run(v, packed, absmax, table, n, bs, out=None, monkeypatch=None):
    monkeypatch.setenv("LOWRANK_REF_NATIVE_VARIANT", str(v))
    assert native.variant() == v
    out = torch.full((n,), np.nan, dtype=torch.float32) if out is None else out
    assert native.dequantize_4bit_into(torch.from_numpy(packed), torch.from_numpy(absmax),
                                       torch.from_numpy(table), out, n, bs)
    return out


@settings(max_examples=40, deadline=None)
@given(v=st.sampled_from([0, 1, 2]), n=st.integers(1, 1200), bs=st.sampled_from([2, 4, 6, 14, 16, 18, 64, 256]),
       qt=st.sampled_from(["nf4", "fp4", "int4"]), seed=st.integers(0, 2**16))
def test_every_variant_gives_the_bits_of_the_plain_formula(v, n, bs, qt, seed):
    """Odd lengths, partial last blocks, blocks shorter than one vector and not a multiple of 16."""
    v = _variant(v)
    x = (np.random.default_rng(seed).standard_normal(n) * 10.0 ** np.random.default_rng(seed).integers(-6, 6))
    q = lr.quant.quantize_4bit(x.astype(np.float32), bs, False, qt)
    with pytest.MonkeyPatch.context() as mp:
        got = _run(v, q.packed, q.absmax, q.table, n, bs, monkeypatch=mp).numpy()
    np.testing.assert_array_equal(got, _plain(q.packed, q.absmax, q.table, n, bs))
    np.testing.assert_array_equal(got, q.dequantize().reshape(-1))


@pytest.mark.parametrize("v", [1, 2])
@pytest.mark.parametrize("offset", [0, 1])
def test_large_outputs_streamed_or_not_the_same_bits(v, offset, monkeypatch):
    """A large output (>= 2^23 values: streaming stores where the output is 64-byte aligned;
    ``offset=1`` misaligns it, so plain stores) with a partial last block."""
    v = _variant(v)
    n, bs = (1 << 23) + 38, 64
    rng = np.random.default_rng(v)
    packed = rng.integers(0, 256, -(-n // 2), dtype=np.uint8)
    absmax = rng.random(-(-n // bs), dtype=np.float32)
    table = lr.quant.nf4_table()
    buf = tn._empty_cpu_aligned(n + 16)
    assert buf.data_ptr() % 64 == 0
    out = buf[offset: offset + n]
    got = _run(v, packed, absmax, table, n, bs, out=out, monkeypatch=monkeypatch).numpy()
    np.testing.assert_array_equal(got, _plain(packed, absmax, table, n, bs))


def test_tensor_dequantize_uses_the_kernel_and_equals_the_pure_path(monkeypatch):
    _best()
    x = np.random.default_rng(3).standard_normal((37, 66)).astype(np.float32)
    q = tn.quantize_nf4(torch.from_numpy(x), 64, double_quant=True)
    calls = []
    real = native.dequantize_4bit_into
    monkeypatch.setattr(native, "dequantize_4bit_into", lambda *a: calls.append(1) or real(*a))
    fast = q.dequantize()
    assert calls, "the CPU dequantisation did not go through the C kernel"
    pure = tn._dequantize_codes_cpu(q.packed, q.absmax, tn.table_tensor("nf4"), q.numel, 64).view(37, 66)
    assert torch.equal(fast, pure)
    np.testing.assert_array_equal(fast.numpy(), q.to_numpy().dequantize())


def test_bad_arguments(monkeypatch):
    _best()
    p, a, t = torch.zeros(4, dtype=torch.uint8), torch.ones(1), torch.zeros(16)
    with pytest.raises(TypeError, match="packed must be torch.uint8"):
        native.dequantize_4bit_into(p.int(), a, t, torch.empty(8), 8, 64)
    with pytest.raises(ValueError, match="out must be a contiguous CPU tensor with at least 8"):
        native.dequantize_4bit_into(p, a, t, torch.empty(7), 8, 64)
    with pytest.raises(ValueError, match="absmax must be"):
        native.dequantize_4bit_into(p, torch.ones(1), t, torch.empty(8), 8, 4)  # needs 2 scales


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A new load of the library (its cache in tmp_path); the loaded state restored afterwards."""
    saved = dict(native._STATE)
    native._STATE.clear()
    monkeypatch.setenv("LOWRANK_REF_CACHE", str(tmp_path))
    yield tmp_path
    native._STATE.clear()
    native._STATE.update(saved)


def test_disabled_or_no_compiler_falls_back_to_the_same_floats(fresh_state, monkeypatch):
    x = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    q = tn.quantize_nf4(torch.from_numpy(x), 16)
    monkeypatch.setenv("LOWRANK_REF_NATIVE", "0")
    assert native.library() is None and "LOWRANK_REF_NATIVE=0" in native.status()
    np.testing.assert_array_equal(q.dequantize().numpy(), q.to_numpy().dequantize())
    native._STATE.clear()
    monkeypatch.delenv("LOWRANK_REF_NATIVE")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert native.library() is None and "no C compiler" in native.status()
    assert not list(fresh_state.rglob("*.so"))


def test_a_failing_compiler_warns_and_falls_back(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exists, fails
    with pytest.warns(RuntimeWarning, match="C dequantisation kernel is not used"):
        assert native.library() is None
    x = np.random.default_rng(2).standard_normal(130).astype(np.float32)
    q = tn.quantize_nf4(torch.from_numpy(x), 64)
    np.testing.assert_array_equal(q.dequantize().numpy(), q.to_numpy().dequantize())
    assert not list(fresh_state.rglob("*.so")), "a failed build leaves no library behind"


def test_the_build_is_cached_and_keyed_by_the_source(fresh_state, monkeypatch, tmp_path):
    if native._compiler() is None:
        pytest.skip("no C compiler here")
    first = native._build(native._compiler())
    assert first.parent.stat().st_mode & 0o777 == 0o700
    mtime = first.stat().st_mtime_ns
    assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == mtime
    edited = tmp_path / "nf4_cpu.c"
    edited.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native._build(native._compiler()) != first
