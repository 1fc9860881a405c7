"""LoRA's own checks: NumPy vs PyTorch (Hypothesis over ranks, scalings, float64 and float32),
gradcheck across configs, the method's invariants, dropout, scaling, init statistics, bad input.
The life cycle every method shares (merge, state errors, what trains, save/load) is in
tests/contract/."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close, requires_cuda
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters import LoRALinear
from lowrank_ref.adapters.lora import lora_backward, lora_forward
from lowrank_ref.gradcheck import check_gradients, gradcheck
from lowrank_ref.optim import AdamW


# --- builders and strategies -------------------------------------------------------------------
def make_layer(rng, out=5, inn=4, r=3, alpha=6.0, bias=True, dtype=np.float64, **cfg):
    """A LoRA layer moved away from its init: B random, so ΔW = s B A is not zero."""
    W = rng.standard_normal((out, inn)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    layer = LoRALinear(lr.nn.Linear.from_arrays(W, b), lr.LoRAConfig(r=r, alpha=alpha, **cfg), rng=rng)
    layer.B.data = rng.standard_normal((out, r)).astype(dtype)
    return layer, W, b


def torch_twin(layer):
    """The torch layer with the same W0, b, A, B (and config)."""
    base = layer.base
    tl = lr.adapt(lr.nn.Linear.from_arrays(base.weight.data, None if base.bias is None else base.bias.data),
                  layer.config, backend="torch", rng=0)
    with torch.no_grad():
        tl.A.copy_(torch.from_numpy(layer.A.data))
        tl.B.copy_(torch.from_numpy(layer.B.data))
    return tl


def with_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """The same values as ``x`` in a non-contiguous memory layout."""
    if layout == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        big[..., ::2] = x
        v = big[..., ::2]
    elif layout == "transposed" and x.ndim >= 2:
        v = np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)
    else:
        v = x
    np.testing.assert_array_equal(v, x)
    return v


cases = st.fixed_dictionaries({
    "out": st.integers(1, 6), "inn": st.integers(1, 6), "r": st.integers(1, 4),
    "lead": st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    "layout": st.sampled_from(["contiguous", "strided", "transposed"]),
    "rslora": st.booleans(), "bias": st.booleans(),
    "alpha": st.sampled_from([0.5, 1.0, 8.0]), "seed": st.integers(0, 2**16),
})


def _loss_grads(tl, x, dy):
    xt = torch.from_numpy(x).requires_grad_(True)
    y = tl(xt)
    (y * torch.from_numpy(dy)).sum().backward()
    return y, xt.grad


# --- NumPy vs PyTorch --------------------------------------------------------------------------
@given(c=cases)
def test_numpy_matches_torch_float64(c):
    rng = np.random.default_rng(c["seed"])
    layer, W, b = make_layer(rng, c["out"], c["inn"], c["r"], c["alpha"], c["bias"], rslora=c["rslora"])
    tl = torch_twin(layer)
    x = with_layout(rng.standard_normal(c["lead"] + (c["inn"],)), c["layout"])
    dy = rng.standard_normal(c["lead"] + (c["out"],))
    y = layer.forward(x)
    dx = layer.backward(dy)
    ty, tdx = _loss_grads(tl, x, dy)
    rtol, atol = TOL["float64"]
    assert_close(y, ty, "forward", rtol, atol)
    assert_close(dx, tdx, "dx", rtol, atol)
    assert_close(layer.A.grad, tl.A.grad, "dA", rtol, atol)
    assert_close(layer.B.grad, tl.B.grad, "dB", rtol, atol)
    assert tl.base.weight.grad is None and layer.base.weight.grad is None
    # merge / unmerge agree too
    layer.merge()
    tl.merge()
    assert_close(layer.base.weight.data, tl.base.weight, "merged weight", rtol, atol)
    assert_close(layer.forward(x), tl(torch.from_numpy(x)), "merged forward", rtol, atol)
    layer.unmerge()
    tl.unmerge()
    np.testing.assert_array_equal(layer.base.weight.data, W)
    assert torch.equal(tl.base.weight, torch.from_numpy(W))


@given(c=cases)
def test_numpy_matches_torch_float32(c):
    rng = np.random.default_rng(c["seed"])
    layer, _, _ = make_layer(rng, c["out"], c["inn"], c["r"], c["alpha"], c["bias"], dtype=np.float32,
                             rslora=c["rslora"])
    tl = torch_twin(layer)
    assert tl.A.dtype == torch.float32
    x = with_layout(rng.standard_normal(c["lead"] + (c["inn"],)).astype(np.float32), c["layout"])
    dy = rng.standard_normal(c["lead"] + (c["out"],)).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(dy)
    ty, tdx = _loss_grads(tl, x, dy)
    assert y.dtype == dx.dtype == layer.A.grad.dtype == np.float32
    # scale the absolute tolerance by the size of the terms summed
    scale = 1 + c["alpha"] * max(c["inn"], c["out"], c["r"])
    rtol, atol = TOL["float32"]
    assert_close(y, ty, "forward f32", rtol, atol * scale)
    assert_close(dx, tdx, "dx f32", rtol, atol * scale)
    assert_close(layer.A.grad, tl.A.grad, "dA f32", rtol, atol * scale)
    assert_close(layer.B.grad, tl.B.grad, "dB f32", rtol, atol * scale)


@given(seed=st.integers(0, 2**16), out=st.integers(1, 6), inn=st.integers(1, 6), r=st.integers(1, 4),
       rslora=st.booleans(), wd=st.sampled_from([0.0, 0.1]))
def test_three_adamw_steps_match_torch(seed, out, inn, r, rslora, wd):
    rng = np.random.default_rng(seed)
    layer, W, b = make_layer(rng, out, inn, r, 2.0, rslora=rslora)
    tl = torch_twin(layer)
    opt = AdamW(layer.trainable_parameters(), lr=0.05, weight_decay=wd)
    topt = torch.optim.AdamW([tl.A, tl.B], lr=0.05, weight_decay=wd)
    assert set(layer.trainable_parameters()) == {"A", "B"}
    for step in range(3):
        x = rng.standard_normal((3, inn))
        dy = rng.standard_normal((3, out))
        layer.forward(x)
        layer.backward(dy)
        _loss_grads(tl, x, dy)
        opt.step()
        topt.step()
        opt.zero_grad()
        topt.zero_grad()
        assert_close(layer.A.data, tl.A, f"A after step {step + 1}", *TOL["float64"])
        assert_close(layer.B.data, tl.B, f"B after step {step + 1}", *TOL["float64"])
    np.testing.assert_array_equal(layer.base.weight.data, W)  # the base never moved
    np.testing.assert_array_equal(layer.base.bias.data, b)


# --- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_gradcheck_A_B_x(rng, bias, rslora, lead):
    layer, _, _ = make_layer(rng, 3, 4, 2, 3.0, bias, rslora=rslora)
    x = rng.standard_normal(lead + (4,))
    report = gradcheck(layer, x)
    assert {r.name for r in report.results} == {"A", "B", "input"}
    report.raise_if_failed()


def test_pure_backward_with_a_dropout_mask_passes_gradcheck(rng):
    """lora_backward with a fixed mask M (dropout's training path), every entry checked."""
    W, A, B = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal((3, 2))
    x = rng.standard_normal((5, 4))
    mask = (rng.random(x.shape) >= 0.4) / 0.6
    cfg = lr.LoRAConfig(r=2, alpha=3.0)
    w = rng.standard_normal((5, 3))
    params = {"W": W, "b": None, "A": A, "B": B}

    def loss():
        return float(np.sum(lora_forward(x, params, cfg, mask)[0] * w))

    y, cache = lora_forward(x, params, cfg, mask)
    dx, grads = lora_backward(w, cache)
    assert grads["W"] is None and grads["b"] is None
    check_gradients(loss, {"A": A, "B": B, "x": x}, {"A": grads["A"], "B": grads["B"], "x": dx}).raise_if_failed()


def test_gradcheck_catches_a_wrong_gradient(rng):
    """The check above can fail: a backward missing the scaling s is reported."""
    layer, _, _ = make_layer(rng, 3, 4, 2, alpha=3.0)  # s = 1.5
    orig = layer._backward

    def wrong(dy):
        dx = orig(dy)
        layer.B.grad = layer.B.grad / layer.scaling
        return dx

    layer._backward = wrong
    assert not gradcheck(layer, rng.standard_normal((2, 4))).ok


# --- invariants --------------------------------------------------------------------------------
def test_zero_B_gives_the_base_output(rng):
    """The only test with B = 0: at init the adapted layer *is* the base layer."""
    W, b = rng.standard_normal((5, 4)), rng.standard_normal(5)
    layer = LoRALinear(lr.nn.Linear.from_arrays(W, b), lr.LoRAConfig(r=3, alpha=16), rng=rng)
    assert not np.any(layer.B.data) and np.any(layer.A.data)
    x = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(layer.forward(x), x @ W.T + b)
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), lr.LoRAConfig(r=3, alpha=16), backend="torch", rng=0)
    assert not tl.B.any()
    assert_close(tl(torch.from_numpy(x)), x @ W.T + b, "torch at init")


@pytest.mark.parametrize("rslora", [True, False])
def test_factorised_forward_equals_dense_delta_weight(rng, rslora):
    layer, W, b = make_layer(rng, 6, 5, 3, 4.0, rslora=rslora)
    x = rng.standard_normal((4, 5))
    s = 4.0 / (np.sqrt(3) if rslora else 3)
    dW = layer.delta_weight()
    np.testing.assert_allclose(dW, s * layer.B.data @ layer.A.data, rtol=1e-13)
    assert np.linalg.matrix_rank(dW) <= 3
    assert_close(layer.forward(x), x @ (W + dW).T + b, "factorised vs dense", 1e-12, 1e-12)


def test_the_trainable_tensors_are_A_and_B_with_r_times_in_plus_out_scalars(rng):
    """LoRA's own count; that only these train and nothing else moves is a contract test
    (tests/contract/test_layer_contract.py)."""
    layer, _, _ = make_layer(rng)
    assert set(layer.trainable_parameters()) == {"A", "B"}
    assert layer.num_trainable_parameters() == 3 * (4 + 5)
    tl = torch_twin(layer)
    assert [n for n, p in tl.named_parameters() if p.requires_grad] == ["A", "B"]
    assert tl.num_trainable_parameters() == 3 * (4 + 5)


# --- dropout -----------------------------------------------------------------------------------
def _identity_lora(p, backend="numpy", n=4):
    """in = out = r = n, W0 random, A = B = I, s = 1: the LoRA branch is exactly dropout(x)."""
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((n, n)), rng.standard_normal(n)
    cfg = lr.LoRAConfig(r=n, alpha=float(n), dropout=p)
    layer = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend=backend, rng=1)
    if backend == "numpy":
        layer.A.data, layer.B.data = np.eye(n), np.eye(n)
    else:
        with torch.no_grad():
            layer.A.copy_(torch.eye(n, dtype=torch.float64))
            layer.B.copy_(torch.eye(n, dtype=torch.float64))
    return layer, W, b


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_dropout_hits_only_the_lora_branch_and_is_off_in_eval(backend):
    p = 0.5
    layer, W, b = _identity_lora(p, backend)
    x = np.random.default_rng(2).uniform(1.0, 2.0, (200, 4))  # no zeros in x
    run = (lambda v: layer.forward(v)) if backend == "numpy" else (lambda v: layer(torch.from_numpy(v)).detach().numpy())
    branch = run(x) - (x @ W.T + b)  # = x ⊙ M with M ∈ {0, 1/(1-p)}
    ratio = branch / x
    np.testing.assert_allclose(np.where(ratio < 0.5, 0.0, ratio), np.where(ratio < 0.5, 0.0, 1 / (1 - p)), atol=1e-9)
    dropped = np.mean(ratio < 0.5)
    assert 0.4 < dropped < 0.6  # 800 Bernoulli(0.5) draws: 10 standard deviations of room is 0.18
    layer.eval()
    np.testing.assert_allclose(run(x), x @ W.T + b + x, rtol=1e-12)  # eval: no mask
    layer.train()
    assert not np.allclose(run(x), x @ W.T + b + x)


def test_dropout_backward_uses_the_forward_mask():
    layer, W, _ = _identity_lora(0.3)
    x = np.random.default_rng(3).uniform(1.0, 2.0, (50, 4))
    y = layer.forward(x)
    mask = (y - (x @ W.T + layer.base.bias.data)) / x  # M, recovered from the output
    dy = np.random.default_rng(4).standard_normal((50, 4))
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, dy @ W + dy * mask, rtol=1e-10, atol=1e-12)  # x̄ = ȳ W0 + ȳ ⊙ M


# --- scaling and init ----------------------------------------------------------------------------
def test_scaling_alpha_over_r_and_rslora(rng):
    W = rng.standard_normal((5, 4))
    x = rng.standard_normal((2, 4))
    outs = {}
    for rs in (False, True):
        layer = LoRALinear(lr.nn.Linear.from_arrays(W), lr.LoRAConfig(r=4, alpha=8, rslora=rs), rng=np.random.default_rng(0))
        layer.B.data = np.ones((5, 4))
        assert layer.scaling == (4.0 if rs else 2.0)  # 8/√4 vs 8/4
        assert lr.adapt(lr.nn.Linear.from_arrays(W), layer.config, backend="torch").scaling == layer.scaling
        outs[rs] = layer.forward(x) - x @ W.T
    np.testing.assert_allclose(outs[True], 2 * outs[False], rtol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_init_statistics(backend):
    inn, r = 400, 16
    W = np.zeros((3, inn))
    get = (lambda t: t.data) if backend == "numpy" else (lambda t: t.detach().numpy())
    k = lr.adapt(lr.nn.Linear.from_arrays(W), lr.LoRAConfig(r=r, init="kaiming"), backend=backend, rng=0)
    g = lr.adapt(lr.nn.Linear.from_arrays(W), lr.LoRAConfig(r=r, init="gaussian"), backend=backend, rng=0)
    A_k, A_g = get(k.A), get(g.A)
    assert not np.any(get(k.B)) and not np.any(get(g.B))  # B = 0 for both
    bound = 1 / np.sqrt(inn)
    n = A_k.size  # 6400 draws: the sample variance is within ±5% with overwhelming probability
    assert np.all(np.abs(A_k) <= bound) and np.abs(A_k).max() > 0.99 * bound
    assert np.var(A_k) == pytest.approx(bound**2 / 3, rel=0.05)  # U(-a, a): variance a²/3
    assert abs(np.mean(A_k)) < 4 * bound / np.sqrt(3 * n)
    assert np.std(A_g) == pytest.approx(1 / r, rel=0.05)  # N(0, 1/r²)
    assert np.abs(A_g).max() > bound  # unbounded tails, unlike the uniform


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"r": 0}, ValueError, "r must be a positive integer"),
    ({"r": -2}, ValueError, "r must be a positive integer"),
    ({"r": 2.5}, TypeError, "r must be a positive integer"),
    ({"r": True}, TypeError, "r must be a positive integer"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"alpha": float("nan")}, ValueError, "alpha must be finite and non-negative"),
    ({"alpha": -1.0}, ValueError, "alpha must be finite and non-negative"),
    ({"rslora": 1}, TypeError, "rslora must be a bool"),
    ({"init": "xavier"}, ValueError, "init must be one of"),
])
def test_bad_config(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        lr.LoRAConfig(**kwargs)


def test_bad_base_and_input(rng):
    with pytest.raises(ValueError, match="2-D"):
        lr.nn.Linear.from_arrays(np.ones(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        lr.nn.Linear.from_arrays(np.ones((2, 3)), np.ones(3))
    for bad in (np.nan, np.inf):
        W = np.ones((2, 3))
        base = lr.nn.Linear.from_arrays(W)
        base.weight.data[0, 1] = bad
        with pytest.raises(ValueError, match="base weight must be finite"):
            LoRALinear(base, lr.LoRAConfig(r=1))
        tbase = torch.nn.Linear(3, 2)
        with torch.no_grad():
            tbase.bias[0] = bad
        with pytest.raises(ValueError, match="base bias must be finite"):
            lr.adapt(tbase, lr.LoRAConfig(r=1), backend="torch")
    layer, _, _ = make_layer(rng)
    with pytest.raises(ValueError, match="last dimension 4"):
        layer.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="last dimension 4"):
        torch_twin(layer)(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        layer.forward(np.ones((2, 4), dtype=np.int64))
    with pytest.raises(RuntimeError, match="before forward"):
        make_layer(rng)[0].backward(np.ones((2, 5)))
    with pytest.raises(TypeError, match="base must be a lowrank_ref.nn.Linear"):
        LoRALinear(np.ones((2, 3)), lr.LoRAConfig(r=1))


def test_wrong_config_type_and_unknown_names(rng):
    base = lr.nn.Linear.from_arrays(rng.standard_normal((2, 3)))
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        LoRALinear(base, {"r": 2})
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        lr.adapters.LoRALinear(base, lr.DoRAConfig(r=1))
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        lr.adapt(base, lr.DoRAConfig(r=1), backend="torch", method="lora")
    with pytest.raises(ValueError, match="known backends: numpy, torch, cuda, cupy"):
        lr.adapt(base, lr.LoRAConfig(r=1), backend="jax")
    with pytest.raises(ValueError, match="known methods: .*lora"):
        lr.adapt(base, lr.LoRAConfig(r=1), method="lorra")
    with pytest.raises(TypeError, match="no method takes a config of type dict"):
        lr.adapt(base, {"r": 1})


# --- on the GPU (skipped, with the reason, where there is none) ---------------------------------
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float64, "float64"), (torch.float32, "float32")])
def test_cuda_layer_matches_numpy(dtype, tol):
    rng = np.random.default_rng(0)
    layer, _, _ = make_layer(rng, 6, 5, 3, 4.0)
    W, b = layer.base.weight.data, layer.base.bias.data
    tl = lr.adapt(lr.nn.Linear.from_arrays(W.astype(np.float64), b), layer.config, backend="cuda", rng=0).to(dtype)
    with torch.no_grad():
        tl.A.copy_(torch.from_numpy(layer.A.data))
        tl.B.copy_(torch.from_numpy(layer.B.data))
    assert tl.A.is_cuda and tl.base.weight.is_cuda
    x, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 6))
    y, dx = layer.forward(x), layer.backward(dy)
    xt = torch.tensor(x, dtype=dtype, device="cuda", requires_grad=True)
    yt = tl(xt)
    (yt * torch.tensor(dy, dtype=dtype, device="cuda")).sum().backward()
    rtol, atol = TOL[tol]
    atol = atol * 50 if tol == "float32" else atol
    assert_close(yt, y, "cuda forward", rtol, atol)
    assert_close(xt.grad, dx, "cuda dx", rtol, atol)
    assert_close(tl.A.grad, layer.A.grad, "cuda dA", rtol, atol)
    assert_close(tl.B.grad, layer.B.grad, "cuda dB", rtol, atol)
    W_t = tl.base.weight.detach().clone()
    for _ in range(100):
        tl.merge()
        tl.unmerge()
    assert torch.equal(tl.base.weight, W_t)
