"""VeRA's own math (the contract tests do the life cycle, NumPy≈torch and save/load): the
backward, the shared sliced projections, what trains, the parameter count, bad input, and PEFT's
VeRA as an oracle (folders in both directions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TOL, assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import VeRALinear
from lowrank_ref.adapters.vera import (
    build_shared,
    lora_param_count,
    vera_backward,
    vera_forward,
    vera_param_count,
)
from lowrank_ref.gradcheck import check_gradients, gradcheck
from lowrank_ref.inject import SharedRef, inject, set_trainable, shared_modules
from lowrank_ref.io import load_adapter, load_peft, save_adapter, save_peft
from lowrank_ref.nn.gpt import GPT, GPTConfig

GPT_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8)
IDX = np.random.default_rng(5).integers(0, 13, (2, 7))


def _gpt():
    return GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64)


def _move(model_or_layers, seed=3):
    """d and b away from their init (b = 0 would make ΔW zero)."""
    rng = np.random.default_rng(seed)
    for layer in model_or_layers:
        layer.d.data = rng.uniform(0.5, 1.5, layer.d.shape) * rng.choice([-1, 1], layer.d.shape)
        layer.b.data = rng.uniform(0.5, 1.5, layer.b.shape) * rng.choice([-1, 1], layer.b.shape)


def _vera_layers(model):
    return [m for _, m in model.named_modules() if isinstance(m, VeRALinear)]


# --- the math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_d_b_and_x_float64(bias):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((5, 4))
    layer = VeRALinear(lr.nn.Linear.from_arrays(W, rng.standard_normal(5) if bias else None), lr.VeRAConfig(r=3))
    _move([layer])
    report = gradcheck(layer, rng.standard_normal((2, 3, 4)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "d", "b"}  # the projections are not parameters


def test_pure_functions_all_four_gradients_and_the_diag_formula():
    rng = np.random.default_rng(2)
    p = {"W": rng.standard_normal((3, 5)), "bias": rng.standard_normal(3), "A": rng.standard_normal((4, 5)),
         "B": rng.standard_normal((3, 4)), "d": rng.standard_normal(4), "b": rng.standard_normal(3)}
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((6, 3))
    y, cache = vera_forward(x, p)
    dx, g = vera_backward(w, cache, need_AB=True)
    assert g["W"] is None and g["bias"] is None
    report = check_gradients(lambda: float(np.sum(vera_forward(x, p)[0] * w)),
                             {"x": x, **{k: p[k] for k in "ABdb"}}, {"x": dx, **{k: g[k] for k in "ABdb"}})
    assert report.ok, str(report)
    dW = np.diag(p["b"]) @ p["B"] @ np.diag(p["d"]) @ p["A"]  # ΔW = diag(b) B diag(d) A
    assert_close(y, x @ (p["W"] + dW).T + p["bias"], "y vs diag formula")
    _, g2 = vera_backward(w, cache)
    assert g2["A"] is None and g2["B"] is None  # VeRA does not pay for the frozen projections' gradients


def test_folded_forward_and_backward_equal_the_plain_form():
    """b folded into B (no (N, out) temporary) gives the plain z = g Bᵀ formulas' numbers."""
    rng = np.random.default_rng(3)
    W, A, B = rng.standard_normal((7, 5)), rng.standard_normal((4, 5)), rng.standard_normal((7, 4))
    d, b, x, w = rng.standard_normal(4), rng.standard_normal(7), rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 7))
    y, cache = vera_forward(x, {"W": W, "bias": None, "A": A, "B": B, "d": d, "b": b})
    dx, g = vera_backward(w, cache, need_AB=True)
    x2, w2 = x.reshape(6, 5), w.reshape(6, 7)
    h = x2 @ A.T
    z = (h * d) @ B.T  # the plain form: z (N, out), then ⊙ b
    dz = w2 * b
    dg = dz @ B
    assert_close(y.reshape(6, 7), x2 @ W.T + z * b, "y vs plain")
    assert_close(g["b"], (w2 * z).sum(axis=0), "b̄ vs Σ ȳ ⊙ z")
    assert_close(g["d"], (dg * h).sum(axis=0), "d̄ vs plain")
    assert_close(g["B"], dz.T @ (h * d), "B̄ vs z̄ᵀ g")
    assert_close(g["A"], (dg * d).T @ x2, "Ā vs plain")
    assert_close(dx.reshape(6, 5), w2 @ W + (dg * d) @ A, "x̄ vs plain")


def test_projections_are_peft_s_kaiming_uniform_from_the_seed_a_first():
    cfg = lr.VeRAConfig(r=64, projection_seed=11)
    st = build_shared({"q": cfg, "fc": cfg}, {"q": (8, 8), "fc": (32, 8), "proj": (8, 32)}, None)
    A, B = st.A, st.B
    assert A.shape == (64, 32) and B.shape == (32, 64)  # (r, in_max), (out_max, r)
    assert np.abs(A).max() <= math.sqrt(6 / 32) and np.abs(A).max() > 0.9 * math.sqrt(6 / 32)
    assert np.abs(B).max() <= math.sqrt(6 / 64) and np.abs(B).max() > 0.9 * math.sqrt(6 / 64)
    rng = np.random.default_rng(11)  # A is drawn first, then B, from one generator
    np.testing.assert_allclose(A, rng.uniform(-math.sqrt(6 / 32), math.sqrt(6 / 32), (64, 32)), rtol=0, atol=1e-15)
    np.testing.assert_allclose(B, rng.uniform(-math.sqrt(6 / 64), math.sqrt(6 / 64), (32, 64)), rtol=0, atol=1e-15)


def test_one_pair_of_projections_sliced_per_layer_and_frozen():
    model = _gpt()
    res = inject(model, lr.VeRAConfig(r=6), targets=("q", "fc", "proj"))
    (st,) = shared_modules(model).values()
    A, B = st.A, st.B
    assert A.shape == (6, 4 * GPT_CFG.d_model) and B.shape == (4 * GPT_CFG.d_model, 6)
    layers = _vera_layers(model)
    for layer in layers:
        As, Bs = layer.projections()
        assert np.shares_memory(As, A) and np.shares_memory(Bs, B)  # slices of the one pair, not copies
        np.testing.assert_array_equal(As, A[:, : layer.in_features])
        np.testing.assert_array_equal(Bs, B[: layer.out_features, :])
    # trainable: d and b per layer, nothing else, whatever set_trainable is asked
    assert res.trainable_params == sum(6 + m.out_features for m in layers)
    assert set_trainable(model, "adapters") == res.trainable_params
    assert all(n.endswith((".d", ".b")) for n in model.trainable_parameters())
    _move(layers)
    A0, B0 = A.copy(), B.copy()
    for _ in range(2):  # a few plain SGD steps on what is trainable
        out = model.forward(IDX)
        model.backward(np.ones_like(out))
        for p in model.trainable_parameters().values():
            p.data = p.data - 1e-2 * p.grad
            p.grad = None
    np.testing.assert_array_equal(st.A, A0)
    np.testing.assert_array_equal(st.B, B0)


def test_parameter_count_r_plus_out_against_lora_and_the_paper_s_table():
    # the paper's Table (RoBERTa-base: 12 layers, q and v, d = 768): VeRA 18.4K/18.8K/24.5K,
    # LoRA 36.8K/589.8K/9437.1K at r = 1/16/256 (the table truncates to 0.1K)
    def k(n):
        return math.floor(n / 100) / 10

    for r, vera_k, lora_k in ((1, 18.4, 36.8), (16, 18.8, 589.8), (256, 24.5, 9437.1)):
        assert k(24 * vera_param_count(r, 768, 768)) == vera_k
        assert k(24 * lora_param_count(r, 768, 768)) == lora_k
    # measured on the built-in shapes: what inject trains is the count, over ranks up to 256
    for r in (1, 8, 64, 256):
        m_vera, m_lora = _gpt(), _gpt()
        v = inject(m_vera, lr.VeRAConfig(r=r), targets=("q", "v")).trainable_params
        lo = inject(m_lora, lr.LoRAConfig(r=r), targets=("q", "v")).trainable_params
        n = 2 * GPT_CFG.n_layer
        assert v == n * (r + GPT_CFG.d_model)
        assert lo == n * r * 2 * GPT_CFG.d_model


def test_rank_of_delta_w_is_min_r_in_out():
    rng = np.random.default_rng(4)
    layer = VeRALinear(lr.nn.Linear.from_arrays(rng.standard_normal((12, 10))), lr.VeRAConfig(r=256))
    _move([layer])
    assert np.linalg.matrix_rank(layer.delta_weight()) == 10
    small = VeRALinear(lr.nn.Linear.from_arrays(rng.standard_normal((12, 10))), lr.VeRAConfig(r=3))
    _move([small])
    assert np.linalg.matrix_rank(small.delta_weight()) == 3


def test_save_load_without_projections_redraws_them_from_the_seed(tmp_path):
    model = _gpt()
    inject(model, lr.VeRAConfig(r=5, save_projection=False, projection_seed=9), targets=("q", "v"))
    _move(_vera_layers(model))
    want = model.forward(IDX)
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = _gpt()
    load_adapter(fresh, path)
    assert_close(fresh.forward(IDX), want, "reload from seed", *TOL["float64"])


# --- bad input ---------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    rng = np.random.default_rng(0)
    small = build_shared({"": lr.VeRAConfig(r=2)}, {"": (5, 6)}, None)
    big = lr.nn.Linear.from_arrays(rng.standard_normal((8, 6)))
    with pytest.raises(ValueError, match=r"larger than the shared projections.*out <= 5"):
        VeRALinear(big, lr.VeRAConfig(r=2), shared=SharedRef(small))
    assert big.weight.trainable  # nothing half-built: the base is as it was
    with pytest.raises(ValueError, match="rank 2"):
        VeRALinear(lr.nn.Linear.from_arrays(rng.standard_normal((5, 6))), lr.VeRAConfig(r=3), shared=SharedRef(small))
    with pytest.raises(ValueError, match="r must be the same"):
        build_shared({"a": lr.VeRAConfig(r=2), "b": lr.VeRAConfig(r=3)}, {"a": (4, 4), "b": (4, 4)}, None)
    with pytest.raises(TypeError, match="projection_seed"):
        lr.VeRAConfig(projection_seed=1.5)
    with pytest.raises(ValueError, match="d_initial"):
        lr.VeRAConfig(d_initial=float("nan"))
    with pytest.raises(TypeError, match="save_projection"):
        lr.VeRAConfig(save_projection="yes")


# --- PEFT (peft.tuners.vera) as an oracle --------------------------------------------------------
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="peft is not installed (an oracle only, not a dependency)")
from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402

TARGETS = ["q", "v", "fc"]  # fc is (4d, d): the projections are sliced differently per layer


def _peft_folder(tmp_path, save_projection=True):
    pm = peft.get_peft_model(from_numpy(_gpt()), peft.VeraConfig(r=4, target_modules=TARGETS,
                                                                  save_projection=save_projection))
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(p.shape)) * rng.choice([-1, 1], tuple(p.shape))))
    folder = tmp_path / "peft_vera"
    pm.save_pretrained(str(folder))
    return pm, folder


def _out(model):
    if isinstance(model, torch.nn.Module):
        return model(torch.tensor(IDX)).detach().numpy()
    return model.forward(IDX)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_peft_folder_with_projections_loads_with_the_same_outputs(tmp_path, backend):
    pm, folder = _peft_folder(tmp_path)
    ours = _gpt() if backend == "numpy" else from_numpy(_gpt())
    base = _out(ours)
    info = load_peft(ours, folder)
    assert info["method"] == "vera"
    theirs = pm(torch.tensor(IDX)).detach().numpy()
    assert np.abs(theirs - base).max() > 1e-3  # the adapters do something
    assert_close(_out(ours), theirs, f"{backend}: ours vs peft", *TOL["float64"])
    # the projections are PEFT's torch draw, not ours from the same seed
    st = shared_modules(ours)["vera"]
    np.testing.assert_array_equal(np.asarray(torch.as_tensor(st.A)), pm.base_model.vera_A["default"].numpy())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_save_peft_loads_in_peft_with_the_same_outputs(tmp_path, backend):
    ours = _gpt()
    inject(ours, lr.VeRAConfig(r=4, projection_seed=3), targets=TARGETS)
    _move(_vera_layers(ours))
    if backend == "torch":
        from lowrank_gpu.nn.gpt import from_numpy as fn

        tmodel = fn(_gpt())
        inject(tmodel, lr.VeRAConfig(r=4, projection_seed=3), targets=TARGETS)
        for mine, theirs in zip(_vera_layers(ours), [m for m in tmodel.modules() if type(m).__name__ == "VeRALinear"]):
            theirs.load_adapter_state({n: v for n, v in mine.adapter_state().items()})
        model = tmodel
    else:
        model = ours
    want = _out(model)
    folder = save_peft(model, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(from_numpy(_gpt()), str(folder))
    assert_close(pm(torch.tensor(IDX)).detach().numpy(), want, f"{backend}: PeftModel(save_peft) vs ours",
                 *TOL["float64"])


def test_peft_folder_without_projections_is_a_clear_error(tmp_path):
    _, folder = _peft_folder(tmp_path, save_projection=False)
    model = _gpt()
    with pytest.raises(ValueError, match="torch's CPU generator, which NumPy cannot"):
        load_peft(model, folder)
    assert not _vera_layers(model) and not shared_modules(model)  # nothing half-built
    ours = _gpt()
    inject(ours, lr.VeRAConfig(r=4, save_projection=False), targets=["q"])
    with pytest.raises(ValueError, match="save_projection=False cannot be saved as a PEFT folder"):
        save_peft(ours, tmp_path / "x")


def test_stored_projections_win_over_a_different_draw_at_load(tmp_path, monkeypatch):
    """save_projection=True: the file's projections are used, whatever the loading process would
    draw (here a draw that differs entirely: another seed's)."""
    import lowrank_ref.adapters.vera as vera

    model = _gpt()
    inject(model, lr.VeRAConfig(r=5), targets=("q", "fc"))
    _move(_vera_layers(model))
    want = model.forward(IDX)
    path = save_adapter(model, tmp_path / "v.safetensors")
    real = vera.vera_projections
    monkeypatch.setattr(vera, "vera_projections", lambda r, i, o, seed: real(r, i, o, seed + 1))
    fresh = _gpt()
    load_adapter(fresh, path)
    assert_close(fresh.forward(IDX), want, "stored projections", *TOL["float64"])
    other = _gpt()
    inject(other, lr.VeRAConfig(r=5), targets=("q", "fc"))  # without the file: the other draw
    assert not np.allclose(shared_modules(other)["vera"].A, shared_modules(model)["vera"].A)
