"""QDoRA: a DoRA adapter on a 4-bit (NF4) base, with no code of its own.

The life-cycle base takes a ``QuantizedLinear`` as ``base`` and every method reads ``W0`` through
one accessor, so ``DoRALinear(QuantizedLinear.from_linear(base, ...), DoRAConfig(...))`` must be
DoRA on ``W̃0 = dequant(NF4(W0))``: the same forward and gradients as DoRA on a float layer
holding ``W̃0``, float64 gradcheck of ``A``, ``B``, ``m`` and ``x``, merge = unmerged, and nothing
of ``W0`` kept but its 4-bit storage."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close

import lowrank_ref as lr

OUT, IN, R, BS = 6, 32, 3, 16


def make(seed=0, bias=True, detach_norm=True, dq=True):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((OUT, IN)) * 0.3).astype(np.float32)
    b = rng.standard_normal(OUT).astype(np.float32) if bias else None
    qbase = lr.quant.QuantizedLinear.from_linear(lr.nn.Linear.from_arrays(W, b), BS, dq)
    layer = lr.adapters.DoRALinear(qbase, lr.DoRAConfig(r=R, alpha=2.0 * R, detach_norm=detach_norm), rng=seed)
    layer.B.data = (rng.standard_normal(layer.B.shape) * 0.3).astype(np.float32)  # non-zero B
    layer.m.data = layer.m.data * (1 + 0.1 * rng.standard_normal(OUT)).astype(np.float32)  # m ≠ ‖V‖
    return layer, W, b


def float_twin(layer, b):
    """DoRA on a float Linear that holds W̃0 (the dequantised weight), with the same A, B, m."""
    W0t = layer.base.dequantized_weight(np.float32)
    twin = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W0t, b), layer.config, rng=0)
    twin.A.data, twin.B.data, twin.m.data = layer.A.data.copy(), layer.B.data.copy(), layer.m.data.copy()
    return twin


def test_qdora_is_dora_on_the_dequantised_weight():
    layer, _, b = make()
    assert layer.quantized and isinstance(layer.base, lr.quant.QuantizedLinear)
    twin = float_twin(layer, b)
    x = np.random.default_rng(1).standard_normal((2, 5, IN)).astype(np.float32)
    assert_close(layer.forward(x), twin.forward(x), "y", *TOL["float32"])
    dy = np.random.default_rng(2).standard_normal((2, 5, OUT)).astype(np.float32)
    assert_close(layer.backward(dy), twin.backward(dy), "dx", *TOL["float32"])
    for n in ("A", "B", "m"):
        assert_close(getattr(layer, n).grad, getattr(twin, n).grad, f"{n}.grad", *TOL["float32"])
    # at init (B = 0, m = ‖W̃0_j‖) QDoRA is the quantised base itself
    fresh = lr.adapters.DoRALinear(layer.base, lr.DoRAConfig(r=R), rng=0)
    assert_close(fresh.forward(x), x @ layer.base.dequantized_weight().T + b, "identity at init", *TOL["float32"])


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_A_B_m_and_x_in_float64(bias):
    layer, _, _ = make(seed=3, bias=bias, detach_norm=False)  # the exact gradient, through the norm too
    layer.astype(np.float64)
    assert layer.weight_dtype == np.float64 and layer.w0().dtype == np.float64
    x = np.random.default_rng(4).standard_normal((2, 3, IN))
    report = lr.gradcheck(layer, x)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"A", "B", "m", "input"}


def test_merge_equals_unmerged_and_keeps_the_4bit_storage_bit_for_bit():
    layer, _, _ = make(seed=5)
    before = {k: v.copy() for k, v in layer.base.qweight.arrays().items()}
    x = np.random.default_rng(6).standard_normal((7, IN)).astype(np.float32)
    y = layer.forward(x)
    for _ in range(3):
        layer.merge()
        assert layer.merged and layer._merged_W.shape == (OUT, IN)
        assert_close(layer.forward(x), y, "merged y", *TOL["float32"])
        layer.unmerge()
        assert not layer.merged and layer._merged_W is None
    for k, v in layer.base.qweight.arrays().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(layer.forward(x), y)
    # the merged weight is diag(m/n) (W̃0 + s B A), built from the dequantised base
    W0t = layer.base.dequantized_weight(np.float64)
    V = W0t + layer.scaling * (layer.B.data.astype(np.float64) @ layer.A.data.astype(np.float64))
    expect = (layer.m.data[:, None] / np.linalg.norm(V, axis=1, keepdims=True)) * V
    assert_close(layer.merged_weight(), expect, "W'", *TOL["float32"])


def test_nothing_of_W0_is_kept_but_its_4bit_storage():
    layer, W, _ = make(seed=7)
    x = np.random.default_rng(8).standard_normal((4, IN)).astype(np.float32)
    layer.forward(x)  # also between forward and backward: the cache holds the 4-bit tensor
    holders = [p.data for p in layer.parameters().values()]
    for _, m in layer.named_modules():
        holders += [v for v in vars(m).values() if isinstance(v, np.ndarray)]
        cache = m._cache if isinstance(m._cache, tuple) else ()
        holders += [v for v in cache if isinstance(v, np.ndarray)]
        holders += [v for v in vars(m).get("_w0_sq_cache", ()) if isinstance(v, np.ndarray)]
    assert not any(h.shape == W.shape for h in holders), "a float (out, in) array is kept"
    assert any(v is layer.base.qweight for v in layer._cache), "the cache holds the 4-bit tensor"
    layer.backward(np.ones((4, OUT), np.float32))


def test_training_changes_only_the_adapter():
    layer, _, _ = make(seed=9)
    before = {k: v.copy() for k, v in layer.base.qweight.arrays().items()}
    bias = layer.base.bias.data.copy()
    assert set(layer.trainable_parameters()) == {"A", "B", "m"}
    opt = lr.optim.AdamW(layer.trainable_parameters(), lr=1e-2)
    x = np.random.default_rng(10).standard_normal((4, IN)).astype(np.float32)
    m0 = layer.m.data.copy()
    for _ in range(3):
        layer.backward(2 * layer.forward(x))
        opt.step()
        opt.zero_grad()
    assert not np.array_equal(layer.m.data, m0)
    for k, v in layer.base.qweight.arrays().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(layer.base.bias.data, bias)


def test_requantising_a_merged_qdora_layer_is_measured_like_qlora():
    from lowrank_ref.adapters.qlora import merge_requant_error, requantize_merged

    layer, _, _ = make(seed=11)
    q = requantize_merged(layer)
    assert q.bits_per_param == layer.base.qweight.bits_per_param and q.shape == (OUT, IN)
    err = merge_requant_error(layer)
    assert err["output_err_merged"] < 1e-6 < err["output_err_requant"]
    with pytest.raises(TypeError, match="4-bit base"):
        requantize_merged(lr.adapters.LoRALinear(lr.nn.Linear(IN, OUT), lr.LoRAConfig(r=2)))


# --- the torch twin -------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def torch_pair(seed=0):
    import lowrank_gpu as lg

    nl, W, b = make(seed=seed)
    lin = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
        lin.bias.copy_(torch.from_numpy(b))
    tl = lg.adapters.DoRALinear(lg.quant.QuantizedLinear.from_linear(lin, BS, True), nl.config, rng=seed)
    with torch.no_grad():
        for n in ("A", "B", "m"):
            getattr(tl, n).copy_(torch.from_numpy(getattr(nl, n).data))
    return nl, tl


def test_torch_qdora_matches_numpy_and_keeps_its_storage():
    nl, tl = torch_pair(12)
    for k, v in nl.base.qweight.arrays().items():  # the same 4-bit bytes
        np.testing.assert_array_equal(v, tl.base.qweight.arrays()[k].numpy())
    x = np.random.default_rng(13).standard_normal((3, IN)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    y, yt = nl.forward(x), tl(xt)
    assert_close(y, yt, "y", *TOL["float32"])
    dy = np.random.default_rng(14).standard_normal(y.shape).astype(np.float32)
    dx = nl.backward(dy)
    yt.backward(torch.from_numpy(dy))
    assert_close(dx, xt.grad, "dx", *TOL["float32"])
    for n in ("A", "B", "m"):
        assert_close(getattr(nl, n).grad, getattr(tl, n).grad, f"{n}.grad", *TOL["float32"])
    before = {k: v.clone() for k, v in tl.base.qweight.arrays().items()}
    tl.merge()
    nl.merge()
    with torch.no_grad():
        assert_close(tl(torch.from_numpy(x)), nl.forward(x), "merged y", *TOL["float32"])
    tl.unmerge()
    for k, v in tl.base.qweight.arrays().items():
        assert torch.equal(v, before[k]), k
    assert not any(t.shape == (OUT, IN) and t.is_floating_point() for t in tl.buffers())


def test_torch_qdora_gradcheck_in_float64():
    import lowrank_gpu as lg

    g = torch.Generator().manual_seed(15)
    lin = torch.nn.Linear(16, 4)  # small: every entry of x, A, B, m is perturbed
    cfg = lr.DoRAConfig(r=2, alpha=4.0, detach_norm=False)  # the exact gradient, through the norm too
    tl = lg.adapters.DoRALinear(lg.quant.QuantizedLinear.from_linear(lin, BS, True), cfg, rng=0).to(torch.float64)
    with torch.no_grad():
        tl.B.copy_(torch.randn(tl.B.shape, generator=g, dtype=torch.float64) * 0.3)  # non-zero B
        tl.m.mul_(1 + 0.1 * torch.randn(tl.m.shape, generator=g, dtype=torch.float64))
    assert tl.w0().dtype == torch.float64
    x = torch.randn(2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    # A, B, m are the layer's own parameters: gradcheck perturbs them in place
    assert torch.autograd.gradcheck(lambda x, A, B, m: tl(x), (x, tl.A, tl.B, tl.m))
