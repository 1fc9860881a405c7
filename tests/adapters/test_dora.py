"""DoRA: the forward against an independent dense formula, both backward passes (gradcheck and
the paper's projection formula), the norm without ΔW, dropout, merge, zero rows, bad input, and
NumPy vs PyTorch agreement (Hypothesis)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import TOL, assert_close, fixed_mask, requires_cuda, to_np
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters.dora import dora_backward, dora_forward, dora_row_norm
from lowrank_ref.gradcheck import check_gradients, gradcheck


def make_layer(rng, out=5, inn=7, r=3, alpha=6.0, bias=True, dtype=np.float64, **cfg):
    """A DoRA layer moved away from its init: non-zero B, m different from the initial norms."""
    W = rng.standard_normal((out, inn)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=r, alpha=alpha, **cfg), rng=rng)
    layer.B.data = (0.5 * rng.standard_normal((out, r))).astype(dtype)
    layer.m.data = (layer.m.data * rng.uniform(0.5, 1.5, out)).astype(dtype)
    return layer, W, b


def dense_reference(x, W, b, A, B, m, s):
    """The paper's formula written directly: W' = m ⊙ V / ‖V‖ row-wise, y = x W'ᵀ + b."""
    V = W + s * B @ A
    Wp = (m / np.linalg.norm(V, axis=1))[:, None] * V
    y = x @ Wp.T
    return y if b is None else y + b


# -- config and construction ---------------------------------------------------------------
def test_config_validates():
    with pytest.raises(TypeError, match="detach_norm must be a bool"):
        lr.DoRAConfig(detach_norm=1)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lr.DoRAConfig(r=0)
    with pytest.raises(ValueError, match="init must be one of"):
        lr.DoRAConfig(init="pissa")
    assert lr.DoRAConfig(r=4, alpha=8).scaling == 2.0
    assert lr.DoRAConfig(r=4, alpha=8, rslora=True).scaling == 4.0
    assert lr.DoRAConfig().detach_norm is True


def test_constructor_rejects_wrong_config_and_base():
    base = lr.nn.Linear.from_arrays(np.ones((2, 3)))
    with pytest.raises(TypeError, match="config must be a DoRAConfig"):
        lr.adapters.DoRALinear(base, lr.LoRAConfig(r=1))
    with pytest.raises(TypeError, match="base must be a lowrank_ref.nn.Linear"):
        lr.adapters.DoRALinear(np.ones((2, 3)), lr.DoRAConfig(r=1))


def test_magnitude_starts_as_row_norms_over_the_input_axis(rng):
    W = rng.standard_normal((4, 9))  # out != in: a norm over the wrong axis has the wrong shape
    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=2), rng=rng)
    assert layer.m.data.shape == (4,)
    assert_close(layer.m.data, np.sqrt((W**2).sum(axis=1)), "m")
    assert set(layer.trainable_parameters()) == {"A", "B", "m"}
    assert not np.any(layer.B.data) and np.any(layer.A.data)


def test_gaussian_init(rng):
    """init="gaussian": A ~ N(0, 1/r²) (PEFT's reading of the LoRA paper), B = 0, in both backends."""
    W = rng.standard_normal((8, 400))
    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=4, init="gaussian"), rng=rng)
    assert not np.any(layer.B.data)
    assert abs(layer.A.data.std() - 1 / 4) < 0.02  # 1600 draws: the std's own error is ~0.0045
    kaiming = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=4), rng=rng)
    assert np.abs(kaiming.A.data).max() <= 1 / np.sqrt(400)  # U(±1/√in)
    t = lr.adapt(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=4, init="gaussian"), backend="torch", rng=0)
    assert abs(float(t.A.detach().std()) - 1 / 4) < 0.02 and not t.B.detach().any()


def test_identity_at_init(rng):
    W, b = rng.standard_normal((6, 5)), rng.standard_normal(6)
    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=2, alpha=4), rng=rng)
    x = rng.standard_normal((3, 5))
    assert_close(layer.forward(x), x @ W.T + b, "y at init")


# -- forward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_formula(rng, bias):
    layer, W, b = make_layer(rng, bias=bias)
    x = rng.standard_normal((2, 3, 7))
    y = layer.forward(x)
    ref = dense_reference(x, W, b, layer.A.data, layer.B.data, layer.m.data, layer.scaling)
    assert_close(y, ref, "y")
    # the factorised forward equals the forward through the dense delta_weight()
    dW = layer.delta_weight()
    assert_close(y, x @ (W + dW).T + (0 if b is None else b), "y via delta_weight")
    # the bias is not rescaled: it adds exactly once
    if bias:
        layer.m.data = np.zeros_like(layer.m.data)
        assert_close(layer.forward(x), np.broadcast_to(b, y.shape), "y with m = 0 is the bias")


def test_delta_weight_is_not_low_rank(rng):
    """DoRA's update diag(g−1) W0 + s diag(g) B A is full rank when m ≠ n: it is not a LoRA."""
    layer, W, _ = make_layer(rng, out=8, inn=8, r=1)
    assert np.linalg.matrix_rank(layer.delta_weight()) == 8


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_factored_norm_equals_dense_norm(rng, dtype):
    layer, W, _ = make_layer(rng, out=16, inn=12, r=4, dtype=dtype)
    s, A, B = layer.scaling, layer.A.data, layer.B.data
    n_f, W0At = dora_row_norm(W, A, B, s, method="factored")
    n_d, _ = dora_row_norm(W, A, B, s, method="dense")
    ref = np.linalg.norm(W.astype(np.float64) + s * B.astype(np.float64) @ A.astype(np.float64), axis=1)
    rtol = {np.float64: 1e-12, np.float32: 2e-6}[dtype]
    assert_close(n_f, ref, "factored n", rtol=rtol, atol=0)
    assert_close(n_d, ref, "dense n", rtol=rtol, atol=0)
    assert_close(W0At, W @ A.T, "W0 Aᵀ reused", rtol=rtol, atol=1e-6)


def test_factored_norm_survives_cancellation():
    """ΔW_j ≈ −W0_j: the expansion cancels; the dense fallback keeps the row norm accurate."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal((3, 20)).astype(np.float32)
    A = W[:1].copy()  # (1, in): row 0 of ΔW = s B_0 A can undo W0_0
    B = np.array([[-0.999], [0.3], [0.0]], dtype=np.float32)  # s = 1
    n, _ = dora_row_norm(W, A, B, 1.0, method="factored")
    n_dense, _ = dora_row_norm(W, A, B, 1.0, method="dense")
    ref = np.linalg.norm(W.astype(np.float64) + B.astype(np.float64) @ A.astype(np.float64), axis=1)
    # float32 cannot do better than the dense route here (V_0 = 0.001·W0_0 loses ~3 digits)
    assert_close(n, n_dense, "n with cancellation vs dense float32", rtol=1e-6, atol=0)
    assert_close(n, ref, "n with cancellation vs float64", rtol=1e-4, atol=0)
    # the bare expansion, without the fallback, is far off on that row
    w0_sq = (W * W).sum(1)
    raw = w0_sq + 2 * ((W @ A.T) * B).sum(1) + ((B @ (A @ A.T)) * B).sum(1)
    assert abs(np.sqrt(max(raw[0], 0)) - ref[0]) > 100 * abs(n[0] - ref[0])


def test_norm_cache_follows_the_base_weight(rng):
    layer, W, _ = make_layer(rng)
    n1 = layer.weight_norm()
    layer.base.weight.data = 2 * W  # a new array: the cache notices
    V = 2 * W + layer.scaling * layer.B.data @ layer.A.data
    assert_close(layer.weight_norm(), np.linalg.norm(V, axis=1), "n after replacing W0")
    layer.base.weight.data *= 0.5  # in place: documented to need clear_norm_cache()
    layer.clear_norm_cache()
    assert_close(layer.weight_norm(), n1, "n after in-place edit + clear")


# -- backward --------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_exact(rng, bias):
    layer, _, _ = make_layer(rng, bias=bias, detach_norm=False)
    gradcheck(layer, rng.standard_normal((2, 3, 7))).raise_if_failed()


def test_gradcheck_detached_with_the_norm_held_constant(rng):
    """With detach_norm=True the backward is the exact gradient of the forward in which n is a
    given constant; check it entry by entry that way."""
    layer, W, b = make_layer(rng, detach_norm=True)
    x = rng.standard_normal((4, 7))
    n0 = layer.weight_norm().copy()
    params = {"W": W, "b": b, "A": layer.A.data.copy(), "B": layer.B.data.copy(), "m": layer.m.data.copy(), "n": n0}
    w = rng.standard_normal((4, 5))
    _, cache = dora_forward(x, params, layer.config)
    dx, grads = dora_backward(w, cache)

    def loss():
        return float(np.sum(dora_forward(x, params, layer.config)[0] * w))

    arrays = {k: params[k] for k in ("A", "B", "m")} | {"input": x}
    check_gradients(loss, arrays, grads | {"input": dx}).raise_if_failed()
    # and the layer itself (which computes n) produces the same detached gradients
    layer.zero_grad()
    layer.forward(x)
    assert_close(layer.backward(w), dx, "x̄")
    for k in ("A", "B", "m"):
        assert_close(getattr(layer, k).grad, grads[k], f"{k}̄")


def test_exact_and_detached_match_the_papers_formulas(rng):
    r"""∇_V L = (m/n)(G − ⟨G, V̂⟩V̂) row-wise (exact), (m/n) G (detached), ∇_m L = ⟨G, V̂⟩;
    B̄ = s V̄ Aᵀ, Ā = s Bᵀ V̄. G = ȳᵀ x is the gradient w.r.t. the merged weight W'."""
    grads = {}
    for detach in (True, False):
        layer, W, _ = make_layer(np.random.default_rng(3), detach_norm=detach)
        x = np.random.default_rng(4).standard_normal((6, 7))
        dy = np.random.default_rng(5).standard_normal((6, 5))
        layer.forward(x)
        grads[detach] = {"x": layer.backward(dy)} | {k: getattr(layer, k).grad for k in ("A", "B", "m")}
    s, A, B, m = layer.scaling, layer.A.data, layer.B.data, layer.m.data
    V = W + s * B @ A
    n = np.linalg.norm(V, axis=1)
    Vhat = V / n[:, None]
    G = dy.T @ x  # (out, in)
    proj = np.sum(G * Vhat, axis=1)  # ⟨G_j, V̂_j⟩
    dV = {True: (m / n)[:, None] * G, False: (m / n)[:, None] * (G - proj[:, None] * Vhat)}
    for detach in (True, False):
        assert_close(grads[detach]["m"], proj, f"m̄ (detach={detach})")
        assert_close(grads[detach]["B"], s * dV[detach] @ A.T, f"B̄ (detach={detach})", rtol=1e-9)
        assert_close(grads[detach]["A"], s * B.T @ dV[detach], f"Ā (detach={detach})", rtol=1e-9)
    assert not np.allclose(grads[True]["A"], grads[False]["A"])  # the projection term is not zero here
    # x̄ does not go through n: x̄ = ȳ W', the same for both (W' = diag(m/n) V, written out here)
    Wp = (m / n)[:, None] * V
    for detach in (True, False):
        assert_close(grads[detach]["x"], dy @ Wp, f"x̄ (detach={detach})", rtol=1e-12)
    assert_close(grads[True]["x"], grads[False]["x"], "x̄ detached vs exact", rtol=0, atol=0)


# -- dropout ---------------------------------------------------------------------------------
def dropout_reference(x, mask, W, b, A, B, m, s, correction):
    """Both dropout forms written from their formulas (g from the dense V)."""
    g = m / np.linalg.norm(W + s * B @ A, axis=1)
    xd = x * mask
    low = s * (xd @ A.T @ B.T)
    if correction == "shared":  # y = g ⊙ (x W0ᵀ + s x̃ Aᵀ Bᵀ) + b
        return g * (x @ W.T + low) + b
    return x @ W.T + b + (g - 1) * (xd @ W.T) + g * low  # PEFT's: (g − 1) ⊙ x̃ W0ᵀ


def test_dropout_correction_config():
    assert lr.DoRAConfig().dropout_correction == "shared"  # the default
    assert lr.DoRAConfig(dropout_correction="dropped").dropout_correction == "dropped"
    with pytest.raises(ValueError, match="dropout_correction must be one of"):
        lr.DoRAConfig(dropout_correction="peft")
    with pytest.raises(TypeError, match="dropout_correction must be a str"):
        lr.DoRAConfig(dropout_correction=None)
    # files written before the field existed: trained with "dropped" when their dropout is not zero
    from lowrank_ref.config import config_from_dict, config_to_dict

    old = {k: v for k, v in config_to_dict(lr.DoRAConfig(r=2, dropout=0.1)).items() if k != "dropout_correction"}
    assert config_from_dict(old).dropout_correction == "dropped"
    assert config_from_dict({**old, "dropout": 0.0}).dropout_correction == "shared"  # the same function there
    for c in ("shared", "dropped"):  # a file that has the field keeps it
        cfg = lr.DoRAConfig(r=2, dropout=0.1, dropout_correction=c)
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_adapter_files_store_the_dropout_correction(rng, tmp_path):
    """The field is in the file; a file written before it existed (the field removed from its
    metadata here) reads as "dropped" when its dropout is not zero, so it loads only into a layer
    of that form (a clear config error otherwise)."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    from lowrank_ref.io import load_adapter, read_adapter_metadata, save_adapter

    def layer_with(c):
        return lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(np.ones((5, 7))),
                                      lr.DoRAConfig(r=3, dropout=0.2, dropout_correction=c), rng=0)

    for c in ("shared", "dropped"):
        path = save_adapter(layer_with(c), tmp_path / f"{c}.safetensors")
        (meta,) = read_adapter_metadata(path)["layers"].values()
        assert meta["config"]["dropout_correction"] == c
        load_adapter(layer_with(c), path)
    with safe_open(str(tmp_path / "dropped.safetensors"), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    layers = json.loads(header["layers"])
    for m in layers.values():
        del m["config"]["dropout_correction"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**header, "layers": json.dumps(layers)})
    load_adapter(layer_with("dropped"), tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match="config differs"):
        load_adapter(layer_with("shared"), tmp_path / "old.safetensors")


@pytest.mark.parametrize("correction", ["shared", "dropped"])
def test_dropout_forward_is_the_formula_and_gradchecks(rng, correction):
    layer, W, b = make_layer(rng, detach_norm=False, dropout_correction=correction)
    x = rng.standard_normal((4, 7))
    mask = (rng.random(x.shape) >= 0.3) / 0.7
    params = {"W": W, "b": b, "A": layer.A.data, "B": layer.B.data, "m": layer.m.data}
    y, cache = dora_forward(x, params, layer.config, mask=mask)
    s = layer.scaling
    assert_close(y, dropout_reference(x, mask, W, b, layer.A.data, layer.B.data, layer.m.data, s, correction),
                 f"y with dropout ({correction})")
    # affine in the mask, so E[y] (E[M] = 1) is the eval output
    y_one, _ = dora_forward(x, params, layer.config, mask=np.ones_like(x))
    y_anti, _ = dora_forward(x, params, layer.config, mask=2 - mask)
    assert_close((y + y_anti) / 2, y_one, "y at the mean mask")
    assert_close(y_one, dense_reference(x, W, b, layer.A.data, layer.B.data, layer.m.data, s), "eval")
    w = rng.standard_normal(y.shape)
    dx, grads = dora_backward(w, cache)

    def loss():
        return float(np.sum(dora_forward(x, params, layer.config, mask=mask)[0] * w))

    arrays = {"A": params["A"], "B": params["B"], "m": params["m"], "input": x}
    check_gradients(loss, arrays, grads | {"input": dx}).raise_if_failed()


@pytest.mark.parametrize("correction", ["shared", "dropped"])
def test_dropout_gradchecks_with_the_norm_held_constant(rng, correction):
    """detach_norm=True (the default) with dropout: the exact gradient of the forward with n given."""
    layer, W, b = make_layer(rng, dropout_correction=correction)
    x = rng.standard_normal((4, 7))
    mask = (rng.random(x.shape) >= 0.4) / 0.6
    params = {"W": W, "b": b, "A": layer.A.data.copy(), "B": layer.B.data.copy(), "m": layer.m.data.copy(),
              "n": layer.weight_norm().copy()}
    w = rng.standard_normal((4, 5))
    _, cache = dora_forward(x, params, layer.config, mask=mask)
    dx, grads = dora_backward(w, cache)

    def loss():
        return float(np.sum(dora_forward(x, params, layer.config, mask=mask)[0] * w))

    arrays = {k: params[k] for k in ("A", "B", "m")} | {"input": x}
    check_gradients(loss, arrays, grads | {"input": dx}).raise_if_failed()


def test_dropout_forms_are_the_same_function_without_dropout_and_in_eval(rng):
    """p = 0 in training, or any p in eval mode: x̃ = x, and the two forms give the same floats."""
    x = rng.standard_normal((3, 7))
    dy = rng.standard_normal((3, 5))
    for p, training in ((0.0, True), (0.5, False)):
        out = {}
        for c in ("shared", "dropped"):
            layer, _, _ = make_layer(np.random.default_rng(8), dropout=p, dropout_correction=c)
            layer.train(training)
            y = layer.forward(x)
            out[c] = (y, layer.backward(dy), *(getattr(layer, k).grad for k in ("A", "B", "m")))
        for a, b_ in zip(out["shared"], out["dropped"]):
            assert np.array_equal(a, b_), f"p={p}, training={training}"


def test_dropped_forms_mean_over_masks_is_the_shared_forms(rng):
    """y_dropped − y_shared = (g − 1) ⊙ (x̃ − x) W0ᵀ has mean 0 over the masks (E[M] = 1): over K
    masks the means of the two forms differ by (g − 1) ⊙ ((M̄ − 1) ⊙ x) W0ᵀ, whose standard
    deviation is known, σ_j² = (g_j − 1)² Σ_i W0_ji² x_i² p / ((1 − p) K): within 6σ, and far
    from the single-mask difference."""
    p, K = 0.3, 4000
    layer, W, b = make_layer(rng, out=5, inn=7)
    layer.m.data = 2.0 * layer.weight_norm()  # g = 2: the two forms differ by a whole x̃ W0ᵀ − x W0ᵀ
    x = rng.standard_normal((1, 7))
    params = {"W": W, "b": b, "A": layer.A.data, "B": layer.B.data, "m": layer.m.data}
    cfgs = {c: lr.DoRAConfig(r=3, alpha=6.0, dropout=p, dropout_correction=c) for c in ("shared", "dropped")}
    masks = (rng.random((K, 7)) >= p) / (1 - p)
    xs = np.repeat(x, K, axis=0)
    ys = {c: dora_forward(xs, params, cfg, mask=masks)[0] for c, cfg in cfgs.items()}
    diff = ys["dropped"].mean(axis=0) - ys["shared"].mean(axis=0)
    g = layer.m.data / layer.weight_norm()
    sigma = np.abs(g - 1) * np.sqrt((W**2 * x**2).sum(axis=1) * p / ((1 - p) * K))
    assert np.all(np.abs(diff) <= 6 * sigma), (diff, sigma)
    single = np.abs(ys["dropped"][0] - ys["shared"][0])
    assert single.max() > 10 * np.abs(diff).max()  # one mask: the forms differ; the mean: they agree
    # and both means are the eval output (the shared form's noise is the low-rank term alone)
    y_eval = dense_reference(x, W, b, layer.A.data, layer.B.data, layer.m.data, layer.scaling)[0]
    for c, y in ys.items():
        sd = y.std(axis=0) / np.sqrt(K)
        assert np.all(np.abs(y.mean(axis=0) - y_eval) <= 6 * sd + 1e-12), c


@pytest.mark.parametrize("correction", ["shared", "dropped"])
def test_layer_dropout_uses_its_rng_and_is_off_in_eval(rng, correction):
    layer, W, b = make_layer(rng, dropout=0.5, dropout_correction=correction)
    x = rng.standard_normal((3, 7))
    eval_y = layer.eval().forward(x)
    assert_close(eval_y, dense_reference(x, W, b, layer.A.data, layer.B.data, layer.m.data, layer.scaling), "eval")
    layer.train()
    layer.rng = np.random.default_rng(11)
    y = layer.forward(x)
    mask = (np.random.default_rng(11).random(x.shape) >= 0.5) / 0.5
    ref = dropout_reference(x, mask, W, b, layer.A.data, layer.B.data, layer.m.data, layer.scaling, correction)
    assert_close(y, ref, "train-mode y")
    assert not np.allclose(y, eval_y)


# -- merge -----------------------------------------------------------------------------------
def test_merge_unmerge(rng):
    layer, W, b = make_layer(rng)
    W0 = layer.base.weight.data
    x = rng.standard_normal((3, 7))
    y = layer.forward(x)
    for _ in range(3):
        layer.merge()
        assert layer.merged
        assert_close(layer.forward(x), y, "merged y", rtol=1e-12)
        # DoRA's row norms equal m
        assert_close(np.linalg.norm(layer.base.weight.data, axis=1), np.abs(layer.m.data), "‖W'_j‖", rtol=1e-12)
        assert_close(layer.delta_weight(), layer.base.weight.data - W0, "ΔW while merged", rtol=1e-12, atol=1e-14)
        with pytest.raises(ValueError, match="already merged"):
            layer.merge()
        with pytest.raises(RuntimeError, match="merged"):
            layer.backward(np.ones_like(y))
        layer.unmerge()
        assert layer.base.weight.data is W0 and np.array_equal(W0, W)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    assert_close(layer.forward(x), y, "y after unmerge", rtol=0, atol=0)


# -- zero-norm rows (the rule: g_j = 0, the row outputs its bias and gets no gradient) ------------
def test_zero_row_of_the_base_weight(rng):
    W = rng.standard_normal((4, 6))
    W[2] = 0
    b = rng.standard_normal(4)
    with pytest.warns(RuntimeWarning, match=r"rows \[2\] are all zero"):
        layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DoRAConfig(r=2), rng=rng)
    x = rng.standard_normal((3, 6))
    assert_close(layer.forward(x), x @ W.T + b, "identity at init with a zero row")
    layer.B.data = rng.standard_normal((4, 2))
    layer.B.data[2] = 0
    y = layer.forward(x)
    assert np.all(np.isfinite(y)) and np.allclose(y[:, 2], b[2])
    layer.backward(np.ones_like(y))
    assert layer.m.grad[2] == 0 and np.all(layer.B.grad[2] == 0)
    assert np.all(np.isfinite(layer.A.grad))
    layer.merge()
    assert np.all(layer.base.weight.data[2] == 0)


def test_row_that_cancels_exactly_follows_the_rule():
    W = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 1.0]])
    params = {"W": W, "b": np.array([0.25, -1.0]), "A": W[:1].copy(), "B": np.array([[-1.0], [1.0]]),
              "m": np.array([2.0, 3.0])}
    cfg = lr.DoRAConfig(r=1, alpha=1.0, detach_norm=False)  # s = 1: V_0 = W0_0 − W0_0 = 0
    x = np.array([[1.0, -2.0, 0.5]])
    y, cache = dora_forward(x, params, cfg)
    assert y[0, 0] == 0.25
    dx, g = dora_backward(np.ones_like(y), cache)
    assert g["m"][0] == 0 and np.all(np.isfinite(g["A"])) and np.all(np.isfinite(dx))


# -- bad input -------------------------------------------------------------------------------
def test_bad_input(rng):
    layer, _, _ = make_layer(rng)
    with pytest.raises(ValueError, match="last dimension 7"):
        layer.forward(np.ones((2, 6)))
    with pytest.raises(TypeError, match="floating"):
        layer.forward(np.ones((2, 7), dtype=np.int64))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 5)))


def test_loading_m_of_the_wrong_shape_changes_nothing(rng):
    layer, _, _ = make_layer(rng)
    state = layer.state_dict()
    bad = dict(state, m=np.ones(6), A=np.zeros_like(state["A"]))
    with pytest.raises(ValueError, match=r"state_dict\['m'\] has shape \(6,\), expected \(5,\)"):
        layer.load_state_dict(bad)
    for k, v in state.items():
        assert np.array_equal(layer.state_dict()[k], v), k


# -- the torch twin --------------------------------------------------------------------------
torch = pytest.importorskip("torch")
import lowrank_gpu as lg  # noqa: E402


def twin(layer, dtype=None, device="cpu"):
    """The torch DoRALinear holding the same numbers as the NumPy ``layer``."""
    t = lr.adapt(layer.base, layer.config, backend="torch")
    with torch.no_grad():
        for k in ("A", "B", "m"):
            getattr(t, k).copy_(torch.from_numpy(getattr(layer, k).data))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def test_same_public_surface():
    import inspect

    for name in ("DoRALinear",):
        a, b = getattr(lr.adapters, name), getattr(lg.adapters, name)
        assert list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters) == ["base", "config", "rng"]
    assert "DoRALinear" in lr.adapters.__all__ and "DoRALinear" in lg.adapters.__all__
    spec = lr.registry.get_method("dora")
    assert spec.config is lr.DoRAConfig and spec.peft.tensors["m"] == "lora_magnitude_vector"


@given(out=st.integers(1, 6), inn=st.integers(1, 6), r=st.integers(1, 4), lead=st.integers(1, 3),
       detach=st.booleans(), bias=st.booleans(), rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_numpy_and_torch_agree_float64(out, inn, r, lead, detach, bias, rslora, seed):
    rng = np.random.default_rng(seed)
    layer, _, _ = make_layer(rng, out=out, inn=inn, r=r, bias=bias, detach_norm=detach, rslora=rslora)
    t = twin(layer)
    x = rng.standard_normal((lead, 2, inn))
    dy = rng.standard_normal((lead, 2, out))
    y = layer.forward(x)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    rtol, atol = TOL["float64"]
    assert_close(y, yt, "y", rtol, atol)
    assert_close(dx, xt.grad, "x̄", rtol, atol)
    for k in ("A", "B", "m"):
        assert_close(getattr(layer, k).grad, getattr(t, k).grad, f"{k}̄", 1e-9, 1e-11)
    assert_close(layer.weight_norm(), t.weight_norm(), "n", rtol, atol)
    layer.merge()
    t.merge()
    assert_close(layer.base.weight.data, t.base.weight, "merged W'", rtol, atol)
    layer.unmerge()
    t.unmerge()
    assert_close(layer.base.weight.data, t.base.weight, "unmerged W0", 0, 0)


@pytest.mark.parametrize("detach", [True, False])
def test_a_few_adamw_steps_agree(rng, detach):
    layer, _, _ = make_layer(rng, out=6, inn=8, r=2, detach_norm=detach)
    t = twin(layer)
    opt = lr.optim.AdamW(layer.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    topt = torch.optim.AdamW([t.A, t.B, t.m], lr=1e-2, weight_decay=0.01)
    for _ in range(4):
        x = rng.standard_normal((5, 8))
        target = rng.standard_normal((5, 6))
        y = layer.forward(x)
        layer.backward(2 * (y - target) / y.size)
        opt.step()
        opt.zero_grad()
        yt = t(torch.from_numpy(x))
        ((yt - torch.from_numpy(target)) ** 2).mean().backward()
        topt.step()
        topt.zero_grad()
    for k in ("A", "B", "m"):
        assert_close(getattr(layer, k).data, getattr(t, k), k, 1e-9, 1e-11)


# Low precision against float64, normwise: max |mine − ref| / max |ref| per tensor. The weights and
# inputs are first rounded to the low-precision dtype, so both sides compute with the same numbers
# and only the arithmetic differs. Measured worst over 200 seeds of this setup (out 8, in 16, r 4,
# s B A about as large as W0, both detach settings): float32 4.5e-7 (y, x̄, Ā, B̄, m̄ all
# 2.5e-7–4.5e-7); bf16 1.7e-2 (B̄ with the exact gradient; the others 0.9e-2–1.4e-2). The
# tolerances leave a margin of 4× and 1.7×. A norm taken from W0 instead of W0 + sBA moves y by at
# least 0.117 and m̄ by at least 0.086 (normwise, same 200 seeds): over twice the bf16 tolerance.
LOW_TOL = {"float32": 2e-6, "bfloat16": 3e-2}


def _rel_err(mine, ref):
    mine = to_np(mine).astype(np.float64)
    return float(np.max(np.abs(mine - ref)) / np.max(np.abs(ref)))


def _rounded_layer(seed, dtype, detach):
    """A float64 NumPy layer whose weights are exactly representable in ``dtype``, with x and ȳ."""
    rng = np.random.default_rng(seed)
    layer, _, _ = make_layer(rng, out=8, inn=16, r=4, detach_norm=detach)
    layer.B.data *= 4  # s B A about as large as W0: a norm taken from W0 alone is clearly wrong

    def rd(a):
        return torch.from_numpy(a).to(getattr(torch, dtype)).double().numpy()

    layer.base.weight.data, layer.base.bias.data = rd(layer.base.weight.data), rd(layer.base.bias.data)
    for k in ("A", "B", "m"):
        getattr(layer, k).data = rd(getattr(layer, k).data)
    return layer, rd(rng.standard_normal((4, 16))), rd(rng.standard_normal((4, 8)))


def _wrong_norm_reference(layer, x, dy):
    """y and m̄ with the bug users of other libraries have hit: n = ‖W0‖ instead of ‖W0 + sBA‖."""
    W, b, A, B, m, s = (layer.base.weight.data, layer.base.bias.data, layer.A.data, layer.B.data,
                        layer.m.data, layer.scaling)
    n_wrong = np.linalg.norm(W, axis=1)
    z = x @ (W + s * B @ A).T
    return (m / n_wrong) * z + b, np.sum(dy * z, axis=0) / n_wrong


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_agrees_with_float64(dtype, detach, seed):
    """torch in float32 and bf16 against the float64 NumPy reference on the same weights: y, x̄,
    Ā, B̄, m̄ within LOW_TOL; a reference with the norm taken from W0 alone is far outside it."""
    layer, x, dy = _rounded_layer(seed, dtype, detach)
    tdt = getattr(torch, dtype)
    t = twin(layer, dtype=tdt)
    xt = torch.from_numpy(x).to(tdt).requires_grad_(True)
    yt = t(xt)
    yt.backward(torch.from_numpy(dy).to(tdt))
    y64 = layer.forward(x)
    dx64 = layer.backward(dy)
    tol = LOW_TOL[dtype]
    pairs = {"y": (yt, y64), "x̄": (xt.grad, dx64)} | {
        f"{k}̄": (getattr(t, k).grad, getattr(layer, k).grad) for k in ("A", "B", "m")}
    for name, (mine, ref) in pairs.items():
        assert mine.dtype == tdt, name
        err = _rel_err(mine, ref)
        assert err <= tol, f"{name} {dtype}: normwise error {err:.2e} > {tol:.0e}"
    # the same comparison catches a norm computed from W0 instead of W0 + sBA
    y_bad, dm_bad = _wrong_norm_reference(layer, x, dy)
    assert _rel_err(yt, y_bad) > 2 * tol and _rel_err(t.m.grad, dm_bad) > 2 * tol
    if dtype == "float32":  # and the NumPy reference itself in float32
        l32 = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(layer.base.weight.data.astype(np.float32),
                                                              layer.base.bias.data.astype(np.float32)),
                                     layer.config, rng=0)
        for k in ("A", "B", "m"):
            getattr(l32, k).data = getattr(layer, k).data.astype(np.float32)
        y32 = l32.forward(x.astype(np.float32))
        dx32 = l32.backward(dy.astype(np.float32))
        assert _rel_err(y32, y64) <= tol and _rel_err(dx32, dx64) <= tol
        for k in ("A", "B", "m"):
            assert _rel_err(getattr(l32, k).grad, getattr(layer, k).grad) <= tol, f"numpy float32 {k}̄"



@pytest.mark.parametrize("correction", ["shared", "dropped"])
def test_torch_dropout_is_the_formula(rng, correction):
    layer, W, b = make_layer(rng, dropout=0.4, dropout_correction=correction)
    t = twin(layer)
    x = torch.from_numpy(rng.standard_normal((64, 7)))
    torch.manual_seed(0)
    y = t(x)
    torch.manual_seed(0)
    xd = torch.nn.functional.dropout(x, 0.4, training=True)
    mask = (xd / x).numpy()  # the mask torch drew (x has no zeros)
    ref = dropout_reference(x.numpy(), mask, W, b, layer.A.data, layer.B.data, layer.m.data, layer.scaling,
                            correction)
    assert_close(y, ref, "torch train-mode y", 1e-9, 1e-12)
    t.eval()
    assert_close(t(x), layer.eval().forward(x.numpy()), "torch eval y", 1e-10, 1e-12)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("correction", ["shared", "dropped"])
def test_torch_autograd_matches_the_hand_backward_with_dropout(rng, correction, detach):
    """The same mask in both backends: torch autograd's x̄, Ā, B̄, m̄ are the NumPy hand-written ones."""
    layer, W, b = make_layer(rng, dropout=0.3, dropout_correction=correction, detach_norm=detach)
    t = twin(layer)
    x = rng.standard_normal((2, 6, 7))
    dy = rng.standard_normal((2, 6, 5))
    mask = (rng.random(x.shape) >= 0.3) / 0.7
    y, cache = dora_forward(x, layer._params_dict(), layer.config, mask=mask)
    dx, grads = dora_backward(dy, cache)
    t.train()
    t.dropout = fixed_mask(torch.from_numpy(mask.reshape(-1, 7)))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = t(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    assert_close(yt, y, f"y ({correction})", 1e-10, 1e-12)
    assert_close(xt.grad, dx, f"x̄ ({correction})", 1e-10, 1e-12)
    for k in ("A", "B", "m"):
        assert_close(getattr(t, k).grad, grads[k], f"{k}̄ ({correction}, detach={detach})", 1e-9, 1e-11)


@pytest.mark.parametrize("method", ["factored", "dense"])
@pytest.mark.parametrize("detach", [True, False])
def test_torch_zero_row_rule_and_warning(rng, detach, method):
    """Row 1 of W0 is zero and stays zero (B_1 = 0): g_1 = 0, and no NaN anywhere in the
    gradients, with the norm detached or not (d√n²/dn² is infinite at 0). Same numbers as NumPy."""
    W = rng.standard_normal((3, 4))
    W[1] = 0
    base = lr.nn.Linear.from_arrays(W, np.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = lr.adapters.DoRALinear(base, lr.DoRAConfig(r=2, detach_norm=detach), rng=rng)
    layer.B.data = rng.standard_normal((3, 2))
    layer.B.data[1] = 0
    layer.norm_method = method
    with pytest.warns(RuntimeWarning, match="all zero"):
        t = twin(layer)
    t.norm_method = method
    x = rng.standard_normal((2, 4))
    y = t(torch.from_numpy(x))
    y.sum().backward()
    assert torch.all(y[:, 1] == 1) and t.m.grad[1] == 0 and torch.all(t.B.grad[1] == 0)
    for k in ("A", "B", "m"):
        assert torch.isfinite(getattr(t, k).grad).all(), k
    assert_close(y, layer.forward(x), "y")
    layer.backward(np.ones((2, 3)))
    for k in ("A", "B", "m"):
        assert_close(getattr(t, k).grad, getattr(layer, k).grad, f"{k}̄", 1e-10, 1e-12)


@pytest.mark.parametrize("detach", [True, False])
def test_torch_row_that_cancels_exactly_follows_the_rule(detach):
    """The torch twin of test_row_that_cancels_exactly_follows_the_rule: V_0 = W0_0 − W0_0 = 0
    during training (not a zero row of W0), so y_0 is the bias and every gradient is finite; the
    live row's gradients equal NumPy's."""
    W = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 1.0]])
    b = np.array([0.25, -1.0])
    cfg = lr.DoRAConfig(r=1, alpha=1.0, detach_norm=detach)  # s = 1
    layer = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=0)
    layer.A.data, layer.B.data, layer.m.data = W[:1].copy(), np.array([[-1.0], [1.0]]), np.array([2.0, 3.0])
    t = twin(layer)
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    y = t(x)
    assert float(y.detach()[0, 0]) == 0.25
    y.backward(torch.ones_like(y))
    assert t.m.grad[0] == 0
    for name, g in (("A", t.A.grad), ("B", t.B.grad), ("m", t.m.grad), ("x", x.grad)):
        assert torch.isfinite(g).all(), name
    y_np = layer.forward(x.detach().numpy())
    dx_np = layer.backward(np.ones_like(y_np))
    assert_close(y, y_np, "y")
    assert_close(x.grad, dx_np, "x̄")
    for k in ("A", "B", "m"):
        assert_close(getattr(t, k).grad, getattr(layer, k).grad, f"{k}̄")


def test_torch_constructor_rejects_wrong_config():
    base = torch.nn.Linear(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="config must be a DoRAConfig"):
        lg.adapters.DoRALinear(base, lr.LoRAConfig(r=1))


def test_torch_loading_m_of_the_wrong_shape_changes_nothing(rng):
    layer, _, _ = make_layer(rng)
    t = twin(layer)
    state = {k: v.detach().clone() for k, v in t.state_dict().items()}
    # the adapter-file path (lowrank_ref.io): checks every shape before copying anything
    with pytest.raises(ValueError, match=r"'m' has shape \(6,\), expected \(5,\)"):
        t.load_adapter_state(dict(layer.adapter_state(), A=np.zeros((3, 7)), m=np.ones(6)))
    # torch's own state_dict path
    with pytest.raises(RuntimeError, match="size mismatch for m"):
        t.load_state_dict(dict(state, m=torch.ones(6, dtype=torch.float64)))
    for k, v in state.items():
        assert torch.equal(t.state_dict()[k], v), k


@requires_cuda
def test_cuda_matches_numpy(rng):
    layer, _, _ = make_layer(rng, out=8, inn=16, r=4)
    t = twin(layer, dtype=torch.float32, device="cuda")
    x = torch.from_numpy(rng.standard_normal((4, 16))).float().double().numpy()  # exact in float32
    err = _rel_err(t(torch.from_numpy(x).float().cuda()), layer.forward(x))
    assert err <= LOW_TOL["float32"], f"cuda y: normwise error {err:.2e}"


# -- adapter files ---------------------------------------------------------------------------
def test_an_adapter_state_with_m_of_the_wrong_shape_is_refused(rng):
    layer, _, _ = make_layer(rng, detach_norm=False)
    with pytest.raises(ValueError, match="'m' has shape"):
        layer.load_adapter_state(dict(layer.adapter_state(), m=np.ones(4)))


def test_int_seed_rng_gives_the_same_layer():
    W = np.random.default_rng(0).standard_normal((3, 4))
    a = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=2), rng=5)
    b = lr.adapters.DoRALinear(lr.nn.Linear.from_arrays(W), lr.DoRAConfig(r=2), rng=np.random.default_rng(5))
    assert np.array_equal(a.A.data, b.A.data)


def test_torch_norm_cache_follows_in_place_edits(rng):
    """The torch layer caches ‖W0_j‖² keyed on the weight's storage and version: an in-place edit
    of the frozen base weight is noticed without a clear_norm_cache() (which torch does not have)."""
    layer, W, _ = make_layer(rng)
    t = twin(layer)
    n1 = t.weight_norm().detach().clone()
    assert t._w0_sq() is t._w0_sq()  # cached: the same tensor while nothing changed
    with torch.no_grad():
        t.base.weight.mul_(2.0)  # in place: same storage, new _version
    V = 2 * W + layer.scaling * layer.B.data @ layer.A.data
    assert_close(t.weight_norm(), np.linalg.norm(V, axis=1), "n after an in-place edit")
    with torch.no_grad():
        t.base.weight.mul_(0.5)
    assert_close(t.weight_norm(), n1, "n after undoing it")
    assert not hasattr(t, "clear_norm_cache")
