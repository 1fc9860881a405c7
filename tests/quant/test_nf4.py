"""NF4 and friends: the tables against published values, block-wise quantisation's invariants,
packing, double quantisation, bad input, and byte-compatibility with bitsandbytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import norm

import lowrank_ref as lr
from lowrank_ref.quant import tables

# The NF4 levels as published: QLoRA (Dettmers et al. 2023, arXiv:2305.14314) Appendix E, and
# bitsandbytes' hard-coded NF4 table. An independent oracle: typed in, not computed here.
NF4_PUBLISHED = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)


def bnb():
    return pytest.importorskip("bitsandbytes.functional",
                               reason="bitsandbytes is not installed (pip install bitsandbytes)")


# --- the tables -----------------------------------------------------------------------------
def test_nf4_table_equals_the_published_levels_bit_for_bit():
    t = lr.quant.nf4_table()
    assert t.dtype == np.float32 and t.shape == (16,)
    np.testing.assert_array_equal(t, NF4_PUBLISHED)


def test_nf4_table_properties():
    t = lr.quant.nf4_table()
    assert np.all(np.diff(t) > 0), "strictly increasing"
    assert t[0] == -1.0 and t[-1] == 1.0
    assert np.count_nonzero(t == 0.0) == 1 and t[7] == 0.0
    assert np.sum(t < 0) == 7 and np.sum(t > 0) == 8, "asymmetric: 7 negative, 8 positive"


def test_rounding_in_float64_would_miss_the_table():
    """The docstring's claim: the float32 linspace matters; float64 throughout is off by an ulp."""
    off = tables.NF4_OFFSET
    pos = norm.ppf(np.linspace(off, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(off, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([neg, [0.0], pos]))
    naive = (v / v.max()).astype(np.float32)
    assert np.count_nonzero(naive != NF4_PUBLISHED) == 10
    assert np.max(np.abs(naive - NF4_PUBLISHED)) < 2e-7


def test_nf4_levels_are_normal_quantiles():
    """Each positive level is Q(p)/Q(δ) at evenly spaced p from δ to 1/2 (8 steps)."""
    t = lr.quant.nf4_table().astype(np.float64)
    p = np.linspace(tables.NF4_OFFSET, 0.5, 9)[:-1]
    np.testing.assert_allclose(np.sort(t[t > 0])[::-1], norm.ppf(p) / norm.ppf(tables.NF4_OFFSET), rtol=1e-6)


def test_offset_explanation():
    assert abs(tables.nf4_offset_explained() - tables.NF4_OFFSET) < 1e-7


def test_paper_eq4_literally_has_an_infinite_end():
    q = lr.quant.nf4_paper_eq4()
    assert q.shape == (16,) and q[0] == -np.inf and np.all(np.isfinite(q[1:]))
    assert q[8] == 0.0  # exact: Q(8/17) = -Q(9/17)
    # the split is the opposite of NF4's (7 negative, 8 positive): 8 below zero, 7 above
    assert np.sum(q < 0) == 8 and np.sum(q > 0) == 7


def test_fp4_table():
    t = lr.quant.fp4_table()
    mags = np.array([0, 0.0625, 2, 3, 4, 6, 8, 12]) / 12.0  # 1 sign, 2 exponent, 1 mantissa bits
    np.testing.assert_allclose(np.unique(np.abs(t)), mags, rtol=1e-7)
    assert t.shape == (16,) and t.max() == 1.0 and t.min() == -1.0


def test_dynamic_map_structure():
    d = lr.quant.dynamic_map(signed=True)
    assert d.shape == (256,) and np.all(np.diff(d) >= 0)
    assert d[-1] == 1.0 and d[0] == pytest.approx(-0.99296875) and np.count_nonzero(d == 0) == 1
    u = lr.quant.dynamic_map(signed=False)
    assert u.min() == 0.0 and u.max() == 1.0 and np.count_nonzero(u == 0) == 1
    # smallest non-zero magnitude: 10^-6 times the midpoint of linspace(0.1, 1, 2): 0.55e-6
    assert np.min(np.abs(d[d != 0])) == pytest.approx(0.55e-6, rel=1e-5)


def test_tables_equal_bitsandbytes():
    F = bnb()
    np.testing.assert_array_equal(lr.quant.nf4_table(), F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(lr.quant.fp4_codebook(), F.get_4bit_type("fp4", device="cpu").numpy())
    for signed in (True, False):
        np.testing.assert_array_equal(lr.quant.dynamic_map(signed), F.create_dynamic_map(signed=signed).numpy())


# --- block-wise quantisation ----------------------------------------------------------------
sizes = st.integers(1, 700)
block_sizes = st.sampled_from([2, 8, 32, 64, 256])


@given(n=sizes, bs=block_sizes, seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_roundtrip_error_bounded_by_half_the_widest_gap(n, bs, seed, scale):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    q = lr.quant.quantize_nf4(x, blocksize=bs)
    xh = q.dequantize()
    assert xh.shape == x.shape and xh.dtype == np.float32
    a = np.repeat(q.absmax, bs)[:n].astype(np.float64)
    half_gap = 0.5 * np.max(np.diff(lr.quant.nf4_table().astype(np.float64)))
    err = np.abs(xh.astype(np.float64) - x)
    assert np.all(err <= half_gap * a * (1 + 1e-6) + 1e-30)
    # each block's absmax is its largest magnitude, and that value is reproduced exactly
    blocks = np.pad(np.abs(x), (0, -n % bs)).reshape(-1, bs)
    np.testing.assert_array_equal(q.absmax, blocks.max(axis=1))


@given(n=sizes, seed=st.integers(0, 2**31 - 1))
def test_codes_are_the_nearest_level(n, seed):
    """Brute force: no other level is strictly nearer than the chosen one (in float64)."""
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    q = lr.quant.quantize_nf4(x, blocksize=64)
    u = x.astype(np.float64) / np.repeat(q.absmax, 64)[:n]
    t = lr.quant.nf4_table().astype(np.float64)
    d = np.abs(u[:, None] - t[None, :])
    chosen = d[np.arange(n), q.codes()]
    assert np.all(chosen <= d.min(axis=1) + 1e-6)


def test_value_on_a_midpoint_goes_to_the_lower_level():
    t = lr.quant.nf4_table()
    mids = ((t[:-1] + t[1:]) / np.float32(2)).astype(np.float32)
    x = np.concatenate([[1.0], mids]).astype(np.float32)  # absmax 1: u = x exactly
    codes = lr.quant.quantize_nf4(x, blocksize=16).codes()
    np.testing.assert_array_equal(codes[1:], np.arange(15))
    assert codes[0] == 15


@given(absmax=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31 - 1), bs=block_sizes)
def test_quantising_table_times_absmax_is_exact(absmax, seed, bs):
    rng = np.random.default_rng(seed)
    t = lr.quant.nf4_table()
    codes = rng.integers(0, 16, size=3 * bs)
    codes[::bs] = 15  # every block holds +absmax, so its scale is absmax
    x = (t[codes] * np.float32(absmax)).astype(np.float32)
    q = lr.quant.quantize_nf4(x, blocksize=bs)
    np.testing.assert_array_equal(q.codes(), codes)
    np.testing.assert_array_equal(q.dequantize(), x)


@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_unpack_exact(codes):
    c = np.array(codes, dtype=np.uint8)
    p = lr.quant.pack_nibbles(c)
    assert p.dtype == np.uint8 and p.size == (c.size + 1) // 2
    assert p[0] >> 4 == c[0], "first element in the high nibble"
    np.testing.assert_array_equal(lr.quant.unpack_nibbles(p, c.size), c)


def test_packed_layout_by_hand():
    t = lr.quant.nf4_table()
    x = t[[15, 0, 7, 8, 3]].astype(np.float32)  # absmax 1 in one block of 6 (odd count)
    q = lr.quant.quantize_nf4(x, blocksize=6)
    # the odd count is padded with the value 0.0, whose NF4 code is 7 (as bitsandbytes pads)
    np.testing.assert_array_equal(q.packed, np.array([0xF0, 0x78, 0x37], dtype=np.uint8))


def test_shapes_dtypes_and_bits():
    x = np.random.default_rng(0).standard_normal((40, 33))  # float64 input, 1320 values
    q = lr.quant.quantize_nf4(x, blocksize=64)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (660,)
    assert q.absmax.dtype == np.float32 and q.absmax.shape == (21,)
    assert q.dequantize().shape == (40, 33)
    assert q.nbytes == 660 + 21 * 4
    assert q.bits_per_param == pytest.approx(8 * (660 + 84) / 1320)


def test_all_zero_block():
    x = np.zeros(128, np.float32)
    x[64:] = np.linspace(-1, 1, 64)
    q = lr.quant.quantize_nf4(x, blocksize=64)
    assert q.absmax[0] == 0
    np.testing.assert_array_equal(q.dequantize()[:64], 0.0)


def test_bits_per_param_match_the_paper_on_4096x4096():
    """QLoRA §3: 32/64 = 0.5 bits of scale per parameter, 8/64 + 32/(64·256) = 0.127 with DQ."""
    x = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32) * 0.02
    assert lr.quant.quantize_nf4(x, 64).bits_per_param == 4.5
    q = lr.quant.quantize_nf4(x, 64, double_quant=True)
    assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)
    assert round(q.bits_per_param, 3) == 4.127


@given(n=st.integers(1, 5000), seed=st.integers(0, 2**31 - 1))
def test_double_quantised_absmax_error_bounded(n, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * np.random.default_rng(seed).uniform(0.01, 10)).astype(np.float32)
    plain = lr.quant.quantize_nf4(x, 16)
    dq = lr.quant.quantize_nf4(x, 16, double_quant=True)
    np.testing.assert_array_equal(dq.packed, plain.packed)  # the codes do not change
    a, ah = plain.absmax.astype(np.float64), dq.absmax.astype(np.float64)
    d = lr.quant.dynamic_map(signed=True).astype(np.float64)
    half_gap = 0.5 * np.max(np.diff(d))  # the widest gap of the dynamic map (near ±1)
    a2 = np.repeat(dq.absmax2.astype(np.float64), 256)[: a.size]
    assert np.all(np.abs(ah - a) <= half_gap * a2 * (1 + 1e-5) + 1e-6 * a.max())
    assert dq.qabsmax.dtype == np.uint8 and dq.absmax2.dtype == np.float32
    assert dq.offset == pytest.approx(a.mean(), rel=1e-6)
    # absmax2 from its definition, computed here: the block absmax values by hand (max |x| per
    # block of 16), centred on their mean, then max |a - offset| per block of 256
    a_hand = np.abs(np.pad(x, (0, -n % 16))).reshape(-1, 16).max(axis=1)  # float32
    off = np.float32(a_hand.astype(np.float64).mean())
    centred = np.abs(a_hand - off)
    expect = np.pad(centred, (0, -centred.size % 256)).reshape(-1, 256).max(axis=1)
    np.testing.assert_array_equal(dq.absmax2, expect)


def test_rebuild_from_arrays_and_bad_sizes():
    x = np.random.default_rng(1).standard_normal((10, 30)).astype(np.float32)
    for dq in (False, True):
        q = lr.quant.quantize_nf4(x, 64, double_quant=dq)
        r = lr.quant.NF4Tensor.from_arrays(q.arrays(), (10, 30), 64)
        np.testing.assert_array_equal(r.dequantize(), q.dequantize())
    arrs = lr.quant.quantize_nf4(x, 64).arrays()
    with pytest.raises(ValueError, match="packed has 150 entries.*needs 75"):
        lr.quant.NF4Tensor.from_arrays(arrs, (10, 15), 64)
    with pytest.raises(ValueError, match="absmax has 5 entries"):
        lr.quant.NF4Tensor.from_arrays(arrs, (10, 30), 32)
    with pytest.raises(ValueError, match="must hold 'absmax'"):
        lr.quant.NF4Tensor.from_arrays({"packed": arrs["packed"]}, (10, 30), 64)
    with pytest.raises(TypeError, match="absmax must be float32"):
        lr.quant.NF4Tensor.from_arrays({**arrs, "absmax": arrs["absmax"].astype(np.float64)}, (10, 30), 64)
    dqa = lr.quant.quantize_nf4(x, 64, double_quant=True).arrays()
    with pytest.raises(ValueError, match="absmax2 has 2 entries"):
        lr.quant.NF4Tensor.from_arrays({**dqa, "absmax2": np.ones(2, np.float32)}, (10, 30), 64)


@pytest.mark.parametrize("bad,exc,msg", [
    (np.array([1.0, np.nan]), ValueError, "finite"),
    (np.array([1.0, np.inf, 2.0]), ValueError, "finite"),
    (np.array([1e300, 1.0]), ValueError, "x must be finite in float32.*exceed float32's range"),
    (np.array([-4e38, 1.0]), ValueError, "x must be finite in float32"),
    (np.zeros((0, 4)), ValueError, "empty"),
    (np.arange(6), TypeError, "real floating"),
    (np.ones(4, dtype=np.complex64), TypeError, "complex"),
    (np.ones(4, dtype=bool), TypeError, "real floating"),
])
def test_bad_input(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        lr.quant.quantize_nf4(bad)


@pytest.mark.parametrize("bs,exc", [(0, ValueError), (-64, ValueError), (63, ValueError),
                                    (64.0, TypeError), (True, TypeError), ("64", TypeError)])
def test_bad_blocksize(bs, exc):
    with pytest.raises(exc, match="blocksize must be a positive even integer"):
        lr.quant.quantize_nf4(np.ones(8, np.float32), blocksize=bs)


# --- bitsandbytes byte-compatibility --------------------------------------------------------
def edge_blocks(quant_type: str, bs: int) -> np.ndarray:
    """Whole blocks that each start with 1.0 (so absmax = 1 and u = x exactly), holding every
    float32 midpoint between neighbouring levels and the floats one ulp below and above each:
    the values where a tie rule or an off-by-one threshold would show."""
    table = lr.quant.nf4_table() if quant_type == "nf4" else lr.quant.fp4_table()
    m = ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32)  # the decision points
    vals = np.concatenate([m, np.nextafter(m, np.float32(-np.inf)), np.nextafter(m, np.float32(np.inf))])
    per = bs - 1
    blocks = []
    for k in range(0, vals.size, per):
        chunk = vals[k: k + per]
        blocks.append(np.concatenate([[1.0], chunk, np.full(per - chunk.size, 0.5)]))
    return np.concatenate(blocks).astype(np.float32)


@pytest.mark.parametrize("n,bs", [(4096, 64), (999, 64), (777, 32), (70000, 128), (64 * 257 + 3, 64)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_same_bytes_as_bitsandbytes(n, bs, quant_type):
    """Random data (partial last blocks, odd counts) after blocks of exact midpoints and their
    ±1-ulp neighbours: the same bytes, scales and floats as bitsandbytes."""
    F = bnb()
    import torch

    x = (np.random.default_rng(n).standard_normal(n) * 0.7).astype(np.float32)
    x = np.concatenate([edge_blocks(quant_type, bs), x])
    q = lr.quant.quantize_4bit(x, bs, quant_type=quant_type)
    p, state = F.quantize_4bit(torch.from_numpy(x), blocksize=bs, quant_type=quant_type)
    np.testing.assert_array_equal(q.packed, p.numpy().reshape(-1))
    np.testing.assert_array_equal(q.absmax, state.absmax.numpy())
    np.testing.assert_array_equal(q.dequantize(), F.dequantize_4bit(p, state).numpy().reshape(-1))


def test_double_quant_against_bitsandbytes():
    """Same 4-bit bytes; the 8-bit absmax codes agree except where bitsandbytes' CPU kernel takes
    the farther neighbour (ours is never farther from the true centred absmax)."""
    F = bnb()
    import torch

    x = (np.random.default_rng(3).standard_normal(64 * 4000) * 0.3).astype(np.float32)
    q = lr.quant.quantize_nf4(x, 64, double_quant=True)
    p, state = F.quantize_4bit(torch.from_numpy(x), blocksize=64, quant_type="nf4", compress_statistics=True)
    np.testing.assert_array_equal(q.packed, p.numpy().reshape(-1))
    assert float(q.offset) == pytest.approx(float(state.offset), rel=1e-6)
    plain = lr.quant.quantize_nf4(x, 64).absmax.astype(np.float64)
    ours = q.absmax.astype(np.float64)
    theirs = F.dequantize_blockwise(state.absmax, state.state2).numpy().astype(np.float64) + float(state.offset)
    assert np.mean(q.qabsmax != state.absmax.numpy()) < 0.01
    assert np.all(np.abs(ours - plain) <= np.abs(theirs - plain) + 1e-6)


def test_chapter_numbers_for_the_table():
    """Chapter 03 quotes: the widest gap is at the negative end (0.304); Q(δ) ≈ 1.848."""
    gaps = np.diff(lr.quant.nf4_table().astype(np.float64))
    assert np.argmax(gaps) == 0 and gaps[0] == pytest.approx(0.3038, abs=1e-4)
    assert norm.ppf(tables.NF4_OFFSET) == pytest.approx(1.848, abs=1e-3)


def test_file_round_trip_and_tampered_files(tmp_path):
    from safetensors.numpy import save_file

    x = np.random.default_rng(2).standard_normal((20, 50)).astype(np.float32)
    for dq in (False, True):
        q = lr.quant.quantize_nf4(x, 64, double_quant=dq)
        r = lr.quant.NF4Tensor.load(q.save(tmp_path / f"w{dq}.safetensors"))
        assert r.shape == (20, 50) and r.double_quant == dq
        np.testing.assert_array_equal(r.dequantize(), q.dequantize())
    q = lr.quant.quantize_nf4(x, 64)
    arrays = q.arrays()
    meta = {"format": "lowrank_ref.NF4Tensor", "shape": "[20, 51]", "blocksize": "64", "quant_type": "nf4"}
    save_file(arrays, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="packed has 500 entries.*needs 510"):
        lr.quant.NF4Tensor.load(tmp_path / "bad.safetensors")
    save_file({**arrays, "absmax": arrays["absmax"][:-1].copy()}, str(tmp_path / "bad2.safetensors"),
              metadata={**meta, "shape": "[20, 50]"})
    with pytest.raises(ValueError, match="absmax has 15 entries"):
        lr.quant.NF4Tensor.load(tmp_path / "bad2.safetensors")
    save_file(arrays, str(tmp_path / "bad3.safetensors"))
    with pytest.raises(ValueError, match="not an NF4Tensor file"):
        lr.quant.NF4Tensor.load(tmp_path / "bad3.safetensors")


def test_non_contiguous_input_and_constant_tensor():
    W = np.random.default_rng(5).standard_normal((30, 40)).astype(np.float32)
    a, b = lr.quant.quantize_nf4(W.T, 64), lr.quant.quantize_nf4(np.ascontiguousarray(W.T), 64)
    np.testing.assert_array_equal(a.packed, b.packed)
    assert a.dequantize().shape == (40, 30)
    # every absmax equal: the centred absmax values are all 0, and double quantisation is exact
    c = lr.quant.quantize_nf4(np.full(1000, -0.5, np.float32), 64, double_quant=True)
    np.testing.assert_array_equal(c.dequantize(), np.full(1000, -0.5, np.float32))


def test_largest_float32_is_accepted_and_a_scalar_keeps_its_shape():
    """Just inside float32's range is fine (no false alarm from the cast check); a 0-d input
    dequantises to shape (), not (1,)."""
    big = np.array([np.finfo(np.float32).max, 1.0], dtype=np.float64)
    q = lr.quant.quantize_nf4(big, blocksize=2)
    assert np.all(np.isfinite(q.dequantize())) and q.dequantize()[0] == np.finfo(np.float32).max
    for x in (np.float32(3), np.array(-2.5), 0.75):
        q = lr.quant.quantize_nf4(x)
        assert q.shape == () and q.dequantize().shape == ()
        assert q.dequantize() == np.float32(x)  # a single value is its own absmax: ±1 · a, exact
        assert lr.quant.NF4Tensor.from_arrays(q.arrays(), (), 64).dequantize().shape == ()
