"""QLoRALinear: gradients, the NF4-only storage, merging, NumPy vs torch, bad input."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close, requires_cuda
from hypothesis import given
from hypothesis import strategies as st

import lowrank_gpu as lg
import lowrank_ref as lr
from lowrank_ref.adapters.qlora import merge_requant_error, requantize_merged


def make(out=6, inp=40, r=3, bias=True, seed=0, bs=8, dq=True, alpha=6.0):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, inp)) * 0.2).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32) if bias else None
    base = lr.nn.Linear.from_arrays(W, b)
    layer = lr.quant.QLoRALinear(base, lr.LoRAConfig(r=r, alpha=alpha), blocksize=bs, double_quant=dq, rng=seed)
    layer.B.data = (rng.standard_normal(layer.B.shape) * 0.3).astype(np.float32)  # non-zero B
    return layer, W, b


def test_only_A_and_B_are_trainable_and_no_float_W0_is_held():
    layer, W, _ = make()
    assert set(layer.trainable_parameters()) == {"A", "B"}
    assert layer.num_trainable_parameters() == 3 * 40 + 6 * 3
    # no (out, in) float array anywhere in the layer: parameters or attributes
    for p in layer.parameters().values():
        assert p.shape != W.shape
    for _, m in layer.named_modules():
        for v in vars(m).values():
            assert not (isinstance(v, np.ndarray) and v.shape == W.shape)
    assert isinstance(layer.base, lr.quant.NF4Linear)


def test_the_given_linear_and_its_weight_are_freed():
    rng = np.random.default_rng(0)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((8, 64)).astype(np.float32))
    ref_w = weakref.ref(base.weight.data)
    ref_base = weakref.ref(base)
    layer = lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2), rng=0)
    del base
    gc.collect()
    assert ref_base() is None and ref_w() is None, "the layer must not keep the float base alive"
    assert layer.forward(np.ones((1, 64), np.float32)).shape == (1, 8)


def test_forward_equals_lora_on_the_dequantised_weight():
    layer, _, b = make()
    W0t = layer.dequantized_weight()
    lora = lr.adapters.LoRALinear(lr.nn.Linear.from_arrays(W0t, b), lr.LoRAConfig(r=3, alpha=6.0), rng=0)
    lora.A.data, lora.B.data = layer.A.data.copy(), layer.B.data.copy()
    x = np.random.default_rng(2).standard_normal((5, 40)).astype(np.float32)
    assert_close(layer.forward(x), lora.forward(x), "y", *TOL["float32"])
    dy = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
    assert_close(layer.backward(dy), lora.backward(dy), "dx", *TOL["float32"])
    assert_close(layer.A.grad, lora.A.grad, "A.grad", *TOL["float32"])
    # and the dense form: x (W̃0 + ΔW)ᵀ + b
    dense = x.astype(np.float64) @ (W0t.astype(np.float64) + layer.delta_weight()).T + b
    assert_close(layer.forward(x), dense, "dense", *TOL["float32"])


def test_zero_B_gives_the_quantised_base():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 16)).astype(np.float32)
    layer = lr.quant.QLoRALinear(lr.nn.Linear.from_arrays(W), lr.LoRAConfig(r=2), blocksize=16, rng=0)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    q = lr.quant.quantize_nf4(W, 16, double_quant=True)
    assert_close(layer.forward(x), x @ q.dequantize().T, "y", *TOL["float32"])


def test_merge_unmerge_and_requantisation():
    layer, _, _ = make(out=16, inp=64)
    before = {k: v.copy() for k, v in layer.qweight.arrays().items()}
    x = np.random.default_rng(4).standard_normal((7, 64)).astype(np.float32)
    y = layer.forward(x)
    layer.merge()
    assert layer.merged
    assert_close(layer.forward(x), y, "merged y", *TOL["float32"])
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.backward(np.ones_like(y))
    layer.unmerge()
    assert not layer.merged and layer.memory_bytes()["merged_float"] == 0
    for k, v in layer.qweight.arrays().items():
        np.testing.assert_array_equal(v, before[k])  # NF4 storage bit for bit
    np.testing.assert_array_equal(layer.forward(x), y)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    # re-quantising the merged weight is lossy; measured, not hidden
    err = merge_requant_error(layer)
    assert err["output_err_merged"] < 1e-6 < err["output_err_requant"]
    assert 0 < err["update_lost"]
    assert requantize_merged(layer).bits_per_param == layer.qweight.bits_per_param


def test_small_update_is_lost_by_requantising():
    """The pitfall: a ΔW below the NF4 step mostly vanishes when the merge is re-quantised."""
    layer, _, _ = make(out=32, inp=64, bs=64)
    layer.B.data *= 1e-3
    assert merge_requant_error(layer)["update_lost"] > 0.5


def test_bits_and_memory():
    layer, _, _ = make(out=64, inp=64, bs=64)
    mb = layer.memory_bytes()
    q = layer.qweight
    assert mb["base_nf4"] == q.nbytes == 2048 + 64 + 4 + 4
    assert mb["adapter"] == 4 * (3 * 64 + 64 * 3)


# --- dropout on the LoRA branch -------------------------------------------------------------
def test_gradcheck_with_a_fixed_dropout_mask():
    """qlora_forward/qlora_backward with a mask M: x̄ = ȳ W̃0 + (h̄ A) ⊙ M, Ā = h̄ᵀ (x ⊙ M)."""
    from lowrank_ref.adapters.qlora import qlora_backward, qlora_forward
    from lowrank_ref.gradcheck import check_gradients

    rng = np.random.default_rng(11)
    W = rng.standard_normal((5, 24)).astype(np.float32)
    q = lr.quant.quantize_nf4(W, 8, double_quant=True)
    b = rng.standard_normal(5)
    A, B = rng.standard_normal((3, 24)), rng.standard_normal((5, 3))
    x = rng.standard_normal((2, 4, 24))
    p = 0.4
    mask = (rng.random(x.shape) >= p) / (1 - p)  # inverted dropout, fixed
    assert 0 < np.count_nonzero(mask == 0) < mask.size
    s = 1.7
    w = rng.standard_normal((2, 4, 5))

    cfg = lr.LoRAConfig(r=3, alpha=3 * s)  # s = alpha / r

    def fwd(x, A, B, mask):
        return qlora_forward(x, {"W": q, "b": b, "A": A, "B": B}, cfg, mask)

    def loss():
        return float(np.sum(fwd(x, A, B, mask)[0] * w))

    _, cache = fwd(x, A, B, mask)
    dx, grads = qlora_backward(w, cache)
    report = check_gradients(loss, {"x": x, "A": A, "B": B}, {"x": dx, **grads})
    assert report.ok, str(report)
    # the mask matters: without it in the backward, x̄ would differ where M = 0
    _, cache0 = fwd(x, A, B, None)
    assert not np.allclose(qlora_backward(w, cache0)[0], dx)


def test_dropout_is_off_in_eval_mode():
    """Dropout while evaluating is a known pitfall: in eval mode a p > 0 layer equals the p = 0 one."""
    rng = np.random.default_rng(0)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((6, 32)).astype(np.float32), np.zeros(6, np.float32))
    drop = lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2, alpha=4, dropout=0.5), blocksize=16, rng=0)
    plain = lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2, alpha=4, dropout=0.0), blocksize=16, rng=0)
    B = rng.standard_normal(drop.B.shape).astype(np.float32)
    drop.B.data, plain.B.data = B.copy(), B.copy()
    np.testing.assert_array_equal(drop.A.data, plain.A.data)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    y_train = drop.forward(x)  # training mode: a mask is drawn
    assert not np.allclose(y_train, plain.forward(x))
    drop.eval()
    np.testing.assert_array_equal(drop.forward(x), plain.forward(x))
    np.testing.assert_array_equal(drop.forward(x), drop.forward(x))  # deterministic


def test_torch_dropout_is_off_in_eval_mode():
    base = torch.nn.Linear(32, 6)
    drop = lg.adapters.QLoRALinear(base, lr.LoRAConfig(r=2, alpha=4, dropout=0.5), blocksize=16, rng=0)
    plain = lg.adapters.QLoRALinear(base, lr.LoRAConfig(r=2, alpha=4, dropout=0.0), blocksize=16, rng=0)
    with torch.no_grad():
        B = torch.randn(drop.B.shape, generator=torch.Generator().manual_seed(1))
        drop.B.copy_(B)
        plain.B.copy_(B)
        assert torch.equal(drop.A, plain.A)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    assert not torch.allclose(drop(x), plain(x))  # training mode: dropout acts
    drop.eval()
    assert torch.equal(drop(x), plain(x))


def test_torch_merged_weight_moves_with_the_layer():
    """The merged float weight is a (non-persistent) buffer: .to() converts it with the layer."""
    _, tl = pair(0, 8, 64, 2, 64, True, True)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 64)))
    y = tl(x.float()).detach()
    tl.merge()
    tl.to(torch.float64)
    assert tl._merged_W.dtype == torch.float64 and tl.A.dtype == torch.float64
    assert "_merged_W" not in tl.state_dict()
    assert_close(tl(x).detach(), y, "merged y after .to(float64)", *TOL["float32"])
    tl.unmerge()
    assert tl._merged_W is None and not tl.merged


# --- NumPy vs torch -------------------------------------------------------------------------
def pair(seed, out, inp, r, bs, dq, bias):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, inp)) * 0.3).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32) if bias else None
    base = lr.nn.Linear.from_arrays(W, b)
    cfg = lr.LoRAConfig(r=r, alpha=2.0 * r)
    nl = lr.quant.QLoRALinear(base, cfg, blocksize=bs, double_quant=dq, rng=seed)
    tl = lg.adapters.QLoRALinear(lg.nn.as_torch_linear(base), cfg, blocksize=bs, double_quant=dq, rng=seed)
    A = rng.standard_normal((r, inp)).astype(np.float32) * 0.3
    B = rng.standard_normal((out, r)).astype(np.float32) * 0.3
    nl.A.data, nl.B.data = A.copy(), B.copy()
    with torch.no_grad():
        tl.A.copy_(torch.from_numpy(A))
        tl.B.copy_(torch.from_numpy(B))
    return nl, tl


@given(seed=st.integers(0, 2**31 - 1), out=st.integers(1, 9), inp=st.integers(1, 40), r=st.integers(1, 4),
       bs=st.sampled_from([2, 8, 64]), dq=st.booleans(), bias=st.booleans())
def test_numpy_and_torch_agree(seed, out, inp, r, bs, dq, bias):
    nl, tl = pair(seed, out, inp, r, bs, dq, bias)
    for k, v in nl.qweight.arrays().items():  # the same storage, bit for bit
        np.testing.assert_array_equal(v, tl.qweight.arrays()[k].cpu().numpy())
    np.testing.assert_array_equal(nl.dequantized_weight(), tl.dequantized_weight().numpy())
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((3, inp)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    y, yt = nl.forward(x), tl(xt)
    assert_close(y, yt, "y", *TOL["float32"])
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = nl.backward(dy)
    yt.backward(torch.from_numpy(dy))
    assert_close(dx, xt.grad, "dx", *TOL["float32"])
    assert_close(nl.A.grad, tl.A.grad, "A.grad", *TOL["float32"])
    assert_close(nl.B.grad, tl.B.grad, "B.grad", *TOL["float32"])
    nl.merge()
    tl.merge()
    assert_close(nl.forward(x), tl(torch.from_numpy(x)).detach(), "merged y", *TOL["float32"])


def test_torch_layer_keeps_its_bytes_under_bf16_and_matches():
    nl, tl = pair(0, 8, 64, 2, 64, True, True)
    before = {k: v.clone() for k, v in tl.qweight.arrays().items()}
    tl.to(torch.bfloat16)
    for k, v in tl.qweight.arrays().items():
        assert torch.equal(v, before[k]), k
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    y = tl(torch.from_numpy(x).bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), nl.forward(x), "bf16 y", *TOL["bfloat16"])


def test_torch_backward_saves_no_float_weight():
    """The custom matmul saves only the NF4 storage: no (out, in) float tensor is kept for backward."""
    _, tl = pair(0, 16, 64, 2, 64, True, False)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = tl(x)
    assert (16, 64) not in saved
    y.sum().backward()
    assert x.grad is not None and tl.A.grad is not None


def test_adapt_builds_qlora_in_both_backends():
    base = lr.nn.Linear.from_arrays(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    cfg = lr.LoRAConfig(r=2)
    a = lr.adapt(base, cfg, method="qlora", rng=0)
    b = lr.adapt(base, cfg, backend="torch", method="qlora", rng=0)
    assert type(a).__name__ == type(b).__name__ == "QLoRALinear"
    assert a.blocksize == 64 and a.double_quant and b.double_quant


@requires_cuda
def test_cuda_bf16_forward_matches_cpu():
    nl, tl = pair(0, 64, 128, 4, 64, True, True)
    tl = tl.to("cuda").to(torch.bfloat16)
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    y = tl(torch.from_numpy(x).cuda().bfloat16()).float().cpu()
    assert_close(y, nl.forward(x), "cuda bf16 y", *TOL["bfloat16"])
    np.testing.assert_array_equal(tl.dequantized_weight().cpu().numpy(), nl.dequantized_weight())


# --- bad input ------------------------------------------------------------------------------
def test_bad_input():
    base = lr.nn.Linear.from_arrays(np.ones((4, 8), np.float32))
    with pytest.raises(TypeError, match="LoRAConfig"):
        lr.quant.QLoRALinear(base, lr.DoRAConfig(r=2))
    with pytest.raises(ValueError, match="blocksize must be a positive even integer"):
        lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2), blocksize=7)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2), double_quant=1)
    with pytest.raises(TypeError, match="lowrank_ref.nn.Linear"):
        lr.quant.QLoRALinear(np.ones((4, 8)), lr.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="PiSSA"):
        lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2, init="pissa"))
    layer = lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2), rng=0)
    with pytest.raises(ValueError, match="last dimension 8"):
        layer.forward(np.ones((2, 5), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 4), np.float32))
    tbase = torch.nn.Linear(8, 4)
    with pytest.raises(ValueError, match="blocksize"):
        lg.adapters.QLoRALinear(tbase, lr.LoRAConfig(r=2), blocksize=0)


def test_a_few_adamw_steps_agree_with_torch():
    nl, tl = pair(3, 12, 64, 3, 64, True, True)
    opt_n = lr.optim.AdamW(nl.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    opt_t = torch.optim.AdamW([tl.A, tl.B], lr=1e-2, weight_decay=0.01)
    rng = np.random.default_rng(7)
    for _ in range(4):
        x = rng.standard_normal((5, 64)).astype(np.float32)
        y = nl.forward(x)
        nl.backward(2 * y)  # loss = sum(y²)
        opt_n.step()
        opt_n.zero_grad()
        yt = tl(torch.from_numpy(x))
        (yt * yt).sum().backward()
        opt_t.step()
        opt_t.zero_grad()
    assert_close(nl.A.data, tl.A, "A after 4 steps", *TOL["float32"])
    assert_close(nl.B.data, tl.B, "B after 4 steps", *TOL["float32"])
