"""LoHa's own math: both routes (dense ΔW, and the factorised face-splitting route) gradchecked in
float64 with and without a rank-dropout mask, and equal to each other and to the formula; the
face-splitting identity; the Hadamard rank bound (Hypothesis: rank ≤ r², reached generically;
a rank-2r LoRA of the same parameter count stays ≤ 2r); PEFT's init (A2 = 0) and what the first
gradient moves; rank_dropout's rows and module_dropout's skips, the all-rows-dropped guard; the
cost rule for the route; NumPy ≈ torch; PEFT's LoHa layer as an oracle and PEFT folders both ways
in both backends; bad configs. The generic life cycle is the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters import LoHaLinear
from lowrank_ref.adapters.loha import SPEC, face_split, loha_backward, loha_forward, loha_route
from lowrank_ref.gradcheck import check_gradients, gradcheck

ROUTES = ["dense", "factorised"]
NAMES = ("A1", "A2", "B1", "B2")


def make_layer(rng, out=5, inn=4, r=2, alpha=3.0, bias=True, route="auto", dtype=np.float64, **kw):
    """A LoHa layer moved away from its init (A2 = 0 there), so ΔW is not zero."""
    W = rng.standard_normal((out, inn)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    layer = LoHaLinear(lr.nn.Linear.from_arrays(W, b), lr.LoHaConfig(r=r, alpha=alpha, route=route, **kw), rng=rng)
    for n in NAMES:
        p = getattr(layer, n)
        p.data = rng.standard_normal(p.shape).astype(dtype)
    return layer, W, b


def dense_formula(layer):
    """s (B1 A1) ⊙ (B2 A2), written out entry by entry (not through the package's code)."""
    A1, A2, B1, B2 = (getattr(layer, n).data for n in NAMES)
    out, inn = B1.shape[0], A1.shape[1]
    D = np.empty((out, inn))
    for i in range(out):
        for j in range(inn):
            D[i, j] = (B1[i] @ A1[:, j]) * (B2[i] @ A2[:, j])
    return layer.scaling * D


# --- the math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_every_factor_and_x_float64(route, bias):
    rng = np.random.default_rng(1)
    layer, _, _ = make_layer(rng, out=5, inn=6, r=3, bias=bias, route=route)
    report = gradcheck(layer, rng.standard_normal((2, 3, 6)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", *NAMES}


@pytest.mark.parametrize("route", ROUTES)
def test_pure_functions_with_a_row_mask_gradcheck_and_match_the_formula(route):
    rng = np.random.default_rng(2)
    out, inn, r = 5, 4, 2
    params = {"W": rng.standard_normal((out, inn)), "b": rng.standard_normal(out),
              **{n: rng.standard_normal((r, inn) if n[0] == "A" else (out, r)) for n in NAMES}}
    cfg = lr.LoHaConfig(r=r, alpha=5.0, route=route)
    keep = np.array([1, 0, 1, 1, 0.0])
    x, w = rng.standard_normal((3, inn)), rng.standard_normal((3, out))
    y, cache = loha_forward(x, params, cfg, row_mask=keep)
    assert cache.route == route
    dx, grads = loha_backward(w, cache)
    assert grads["W"] is None and grads["b"] is None  # frozen: no gradient, not a zero
    arrays = {"x": x, **{n: params[n] for n in NAMES}}
    report = check_gradients(lambda: float(np.sum(loha_forward(x, params, cfg, row_mask=keep)[0] * w)),
                             arrays, {"x": dx, **{n: grads[n] for n in NAMES}})
    assert report.ok, str(report)
    s = 5.0 / r
    D = s * (params["B1"] @ params["A1"]) * (params["B2"] @ params["A2"])
    m = keep / keep.mean()  # rows of ΔW kept, rescaled by the mask's mean (PEFT LoHa)
    assert_close(y, x @ (params["W"] + m[:, None] * D).T + params["b"], "y vs W0 + diag(m) ΔW")


def test_the_two_routes_agree_on_outputs_and_every_gradient():
    rng = np.random.default_rng(3)
    layers = {}
    for route in ROUTES:
        layers[route], _, _ = make_layer(np.random.default_rng(4), out=7, inn=9, r=3, route=route)
    x, dy = rng.standard_normal((2, 4, 9)), rng.standard_normal((2, 4, 7))
    ys = {k: (v.forward(x), v.backward(dy)) for k, v in layers.items()}
    assert_close(ys["factorised"][0], ys["dense"][0], "y factorised vs dense")
    assert_close(ys["factorised"][1], ys["dense"][1], "x̄ factorised vs dense")
    for n in NAMES:
        assert_close(getattr(layers["factorised"], n).grad, getattr(layers["dense"], n).grad, f"{n}̄ routes")
    assert_close(layers["dense"].delta_weight(), dense_formula(layers["dense"]), "ΔW vs entry-wise formula")


@settings(max_examples=20, deadline=None)
@given(out=st.integers(1, 7), inn=st.integers(1, 7), r=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_face_splitting_identity(out, inn, r, seed):
    rng = np.random.default_rng(seed)
    A1, A2 = rng.standard_normal((r, inn)), rng.standard_normal((r, inn))
    B1, B2 = rng.standard_normal((out, r)), rng.standard_normal((out, r))
    KA, KB = face_split(A1, A2, B1, B2)
    assert KA.shape == (r * r, inn) and KB.shape == (out, r * r)
    np.testing.assert_allclose(KA[:, 0], np.kron(A1[:, 0], A2[:, 0]))  # a column of A1 ∗ A2
    np.testing.assert_allclose(KB[0], np.kron(B1[0], B2[0]))  # a row of B1 • B2
    assert_close(KB @ KA, (B1 @ A1) * (B2 @ A2), "(B1•B2)(A1∗A2) vs (B1A1)⊙(B2A2)")


# --- the rank bound ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 24), inn=st.integers(1, 24), r=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_hadamard_rank_is_at_most_r_squared_and_reached_generically(out, inn, r, seed):
    rng = np.random.default_rng(seed)
    B1, B2 = rng.standard_normal((out, r)), rng.standard_normal((out, r))
    A1, A2 = rng.standard_normal((r, inn)), rng.standard_normal((r, inn))
    D = (B1 @ A1) * (B2 @ A2)
    rank = np.linalg.matrix_rank(D)
    assert rank <= r * r
    assert rank == min(r * r, out, inn)  # Gaussian factors: the bound is reached (with probability 1)
    # the same parameter count as a rank-2r LoRA, 2 r (in + out), whose rank stays ≤ 2r
    lora = rng.standard_normal((out, 2 * r)) @ rng.standard_normal((2 * r, inn))
    assert np.linalg.matrix_rank(lora) == min(2 * r, out, inn)
    layer = LoHaLinear(lr.nn.Linear.from_arrays(np.zeros((out, inn))), lr.LoHaConfig(r=r))
    assert layer.num_trainable_parameters() == 2 * r * (inn + out) == lora_params(2 * r, inn, out)
    if r >= 3 and min(out, inn) > 2 * r:
        assert rank > 2 * r  # beyond any LoRA of that budget


def lora_params(r, inn, out):
    return r * (inn + out)


def test_rank_bound_is_tight_only_with_independent_factors():
    """Equal factors, (BA) ⊙ (BA), have rank ≤ r(r+1)/2 (symmetric tensors): the r² bound needs two
    distinct products, which is why LoHa trains two."""
    rng = np.random.default_rng(5)
    B, A = rng.standard_normal((30, 4)), rng.standard_normal((4, 30))
    assert np.linalg.matrix_rank((B @ A) * (B @ A)) == 4 * 5 // 2


# --- init --------------------------------------------------------------------------------------
def test_peft_init_a2_is_zero_identity_at_start_and_the_first_gradient_moves_only_a2():
    rng = np.random.default_rng(6)
    W, b = rng.standard_normal((64, 48)), rng.standard_normal(64)
    layer = LoHaLinear(lr.nn.Linear.from_arrays(W, b), lr.LoHaConfig(r=4, alpha=8), rng=rng)
    np.testing.assert_array_equal(layer.A2.data, 0)
    for n, bound in (("B1", 1 / 2), ("B2", 1 / 2), ("A1", 1 / np.sqrt(48))):  # U(±1/√fan_in)
        v = getattr(layer, n).data
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, n
    np.testing.assert_array_equal(layer.delta_weight(), 0)
    x = rng.standard_normal((3, 48))
    assert_close(layer.forward(x), x @ W.T + b, "LoHa at init vs base")
    layer.backward(rng.standard_normal((3, 64)))
    for n in ("A1", "B1", "B2"):  # their gradients carry the factor B2 A2 = 0
        np.testing.assert_array_equal(getattr(layer, n).grad, 0, err_msg=n)
    assert np.abs(layer.A2.grad).max() > 0  # Ā2 = s B2ᵀ (Ḡ ⊙ B1 A1) ≠ 0: it trains


# --- rank_dropout and module_dropout --------------------------------------------------------------
def test_rank_dropout_drops_rows_of_delta_w_rescaled_and_only_while_training():
    rng = np.random.default_rng(7)
    layer, W, b = make_layer(rng, out=8, inn=5, r=2, rank_dropout=0.5)
    x = rng.standard_normal((4, 5))
    D = layer.delta_weight()
    layer.eval()
    assert_close(layer.forward(x), x @ (W + D).T + b, "eval: no dropout")
    layer.train()
    seen_partial = False
    for _ in range(10):
        state = layer.rng.bit_generator.state
        y = layer.forward(x)
        layer._cache = None
        layer.rng.bit_generator.state = state  # redraw the same mask here
        keep = (layer.rng.random(8) > 0.5).astype(float)
        if 0 < keep.sum() < 8:
            seen_partial = True
            m = keep / keep.mean()
            assert_close(y, x @ (W + m[:, None] * D).T + b, "training: W0 + diag(m) ΔW")
            dropped = keep == 0
            assert_close(y[:, dropped], (x @ W.T + b)[:, dropped], "dropped rows are the base's")
    assert seen_partial


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_row_dropped_switches_the_branch_off_instead_of_nan(backend):
    rng = np.random.default_rng(8)
    layer, W, b = make_layer(rng, out=1, inn=3, r=1, rank_dropout=0.99)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), layer.config, backend="torch", rng=0)
        x = torch.from_numpy(rng.standard_normal((2, 3))).requires_grad_(True)
        y = tl(x)  # almost surely all dropped with one row and p = 0.99
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert_close(y, x.detach().numpy() @ W.T + b, "torch: all dropped is the base")
        return
    x = rng.standard_normal((2, 3))
    ys = []
    for _ in range(5):
        layer.zero_grad()
        ys.append(layer.forward(x))
        layer.backward(np.ones((2, 1)))
        assert all(np.isfinite(getattr(layer, n).grad).all() for n in NAMES)
    assert any(np.array_equal(y, x @ W.T + b) for y in ys)
    assert all(np.isfinite(y).all() for y in ys)
    with pytest.raises(ValueError, match="row_mask drops every row"):
        loha_forward(x, {"W": W, "b": b, **{n: getattr(layer, n).data for n in NAMES}}, layer.config,
                     row_mask=np.zeros(1))
    with pytest.raises(ValueError, match=r"row_mask must have shape \(1,\)"):
        loha_forward(x, {"W": W, "b": b, **{n: getattr(layer, n).data for n in NAMES}}, layer.config,
                     row_mask=np.ones(3))


def test_module_dropout_skips_the_whole_branch_sometimes_and_never_in_eval():
    rng = np.random.default_rng(9)
    layer, W, b = make_layer(rng, out=4, inn=3, r=2, module_dropout=0.5)
    x = rng.standard_normal((2, 3))
    base, full = x @ W.T + b, x @ (W + layer.delta_weight()).T + b
    outs = []
    for _ in range(30):
        y = layer.forward(x)
        layer.backward(np.ones((2, 4)))
        outs.append("base" if np.array_equal(y, base) else "full" if np.allclose(y, full) else "other")
    assert set(outs) == {"base", "full"}
    layer.eval()
    assert all(np.allclose(layer.forward(x), full) for _ in range(10))


# --- the route ---------------------------------------------------------------------------------
def test_route_rule_factorised_for_small_r_dense_for_large():
    assert loha_route(8192, 1024, 1024, 4) == "factorised"
    assert loha_route(8192, 1024, 1024, 16) == "factorised"
    assert loha_route(8192, 1024, 1024, 32) == "dense"  # r² = 1024 > in·out/(in+out) = 512
    # the break-even for many rows: r² ≈ in·out/(in + out)
    assert loha_route(10**6, 1024, 1024, 22) == "factorised" and loha_route(10**6, 1024, 1024, 23) == "dense"
    assert loha_route(1, 64, 64, 4) == "factorised"
    assert loha_route(64, 8, 8, 3) == "dense"  # r² = 9 > in·out/(in+out) = 4
    # few rows: building ΔW (8 r·in·out) is the dense route's main cost, so factorised wins again
    assert loha_route(4, 8, 8, 3) == "factorised"
    layer, _, _ = make_layer(np.random.default_rng(10), out=8, inn=8, r=3)
    layer.forward(np.ones((64, 8)))
    assert layer._cache.route == "dense"
    layer2, _, _ = make_layer(np.random.default_rng(10), out=64, inn=64, r=2)
    layer2.forward(np.ones((4, 64)))
    assert layer2._cache.route == "factorised"


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lr.LoHaConfig(r=0)
    with pytest.raises(TypeError, match="r must be a positive integer"):
        lr.LoHaConfig(r=2.5)
    with pytest.raises(ValueError, match=r"rank_dropout must be in \[0, 1\)"):
        lr.LoHaConfig(rank_dropout=1.0)
    with pytest.raises(ValueError, match=r"module_dropout must be in \[0, 1\)"):
        lr.LoHaConfig(module_dropout=-0.1)
    with pytest.raises(ValueError, match="route must be one of"):
        lr.LoHaConfig(route="kron")
    with pytest.raises(TypeError, match="route must be a string"):
        lr.LoHaConfig(route=1)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        lr.LoHaConfig(alpha="8")
    assert lr.LoHaConfig().scaling == 2.0 and lr.LoHaConfig(r=8, alpha=4).scaling == 0.5  # α/r, not α
    assert lr.LoHaConfig().replace(r=3) == lr.LoHaConfig(r=3)
    with pytest.raises(TypeError, match="config must be a LoHaConfig"):
        LoHaLinear(lr.nn.Linear.from_arrays(np.ones((2, 2))), lr.LoRAConfig())


# --- NumPy vs torch ----------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def torch_twin(layer):
    base = layer.base
    tl = lr.adapt(lr.nn.Linear.from_arrays(base.weight.data, None if base.bias is None else base.bias.data),
                  layer.config, backend="torch")
    tl.load_adapter_state(layer.adapter_state())
    return tl


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 6), inn=st.integers(1, 6), r=st.integers(1, 3), route=st.sampled_from(ROUTES),
       lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), bias=st.booleans(),
       dtype=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numpy_and_torch_agree(out, inn, r, route, lead, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    layer, _, _ = make_layer(rng, out, inn, r=r, bias=bias, route=route, dtype=np.dtype(dtype))
    tl = torch_twin(layer)
    rtol, atol = TOL[dtype]
    x = rng.standard_normal(lead + (inn,)).astype(dtype)
    dy = rng.standard_normal(lead + (out,)).astype(dtype)
    y, dx = layer.forward(x), layer.backward(dy)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tl(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    assert_close(y, yt, "y: numpy vs torch", rtol, 10 * atol)
    assert_close(dx, xt.grad, "x̄: numpy vs torch", rtol, 10 * atol)
    for n in NAMES:
        assert_close(getattr(layer, n).grad, getattr(tl, n).grad, f"{n}̄: numpy vs torch", 10 * rtol, 100 * atol)
    # both form ΔW in float64 and round once; the sums over r may differ in order (BLAS vs torch)
    assert_close(layer.merged_weight(), tl.merged_weight(), "merged W: numpy vs torch", rtol, 10 * atol)


def test_torch_init_is_peft_s_and_module_dropout_skips():
    W = np.random.default_rng(11).standard_normal((16, 9))
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, None), lr.LoHaConfig(r=4, module_dropout=0.5), backend="torch", rng=1)
    assert torch.equal(tl.A2, torch.zeros(4, 9))
    assert float(tl.B1.detach().abs().max()) <= 0.5 and float(tl.A1.detach().abs().max()) <= 1 / 3
    with torch.no_grad():
        tl.A2.copy_(torch.ones(4, 9))
    x = torch.ones(2, 9, dtype=torch.float64)
    base = x @ torch.from_numpy(W).T
    hits = {bool(torch.equal(tl(x), base)) for _ in range(30)}
    assert hits == {True, False}
    tl.eval()
    assert not any(torch.equal(tl(x), base) for _ in range(10))


# --- PEFT (peft.tuners.loha) as an oracle ------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is not installed (an oracle only, not a dependency)")


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Linear(7, 5)
        self.proj = torch.nn.Linear(5, 7)

    def forward(self, x):
        return self.proj(self.k(x))


def test_peft_loha_layer_matches_ours_float64():
    rng = np.random.default_rng(12)
    model = Two().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
    W, b = model.k.weight.detach().numpy().copy(), model.k.bias.detach().numpy().copy()
    # s = 4.5/3 = 1.5 is exact in float32: PEFT passes s as torch.tensor(s), a float32 scalar (below)
    pm = peft.get_peft_model(model, peft.LoHaConfig(r=3, alpha=4.5, target_modules=["k"]))
    pl = pm.base_model.model.k
    # PEFT's init: hada_w2_b (our A2) is the zero factor; the others are not
    assert torch.equal(pl.hada_w2_b["default"], torch.zeros(3, 7, dtype=torch.float64))
    assert all(float(getattr(pl, k)["default"].detach().abs().max()) > 0 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a"))
    cfg = lr.LoHaConfig(r=3, alpha=4.5)
    state = {n: rng.standard_normal(s) for n, s in SPEC.shapes(cfg, 7, 5).items()}
    with torch.no_grad():
        for n, key in SPEC.peft.tensors.items():
            getattr(pl, key)["default"].copy_(torch.from_numpy(state[n]))
    x, dy = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 5))
    xt = torch.from_numpy(x).requires_grad_(True)
    y_peft = pl(xt)
    (y_peft * torch.from_numpy(dy)).sum().backward()
    rtol, atol = TOL["float64"]
    for route in ROUTES:
        c = cfg.replace(route=route)
        layer = LoHaLinear(lr.nn.Linear.from_arrays(W, b), c)
        layer.load_adapter_state(state)
        tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), c, backend="torch")
        tl.load_adapter_state(state)
        y_np, dx_np = layer.forward(x), layer.backward(dy)
        xt2 = torch.from_numpy(x).requires_grad_(True)
        y_t = tl(xt2)
        (y_t * torch.from_numpy(dy)).sum().backward()
        for mine, name in ((y_np, "y numpy"), (y_t, "y torch")):
            assert_close(mine, y_peft, f"{route} {name} vs peft", rtol, 10 * atol)
        for mine, name in ((dx_np, "x̄ numpy"), (xt2.grad, "x̄ torch")):
            assert_close(mine, xt.grad, f"{route} {name} vs peft", rtol, 10 * atol)
        for n, key in SPEC.peft.tensors.items():
            theirs = getattr(pl, key)["default"].grad
            assert_close(getattr(layer, n).grad, theirs, f"{route} {n}̄ numpy vs peft {key}", 1e-9, 1e-11)
            assert_close(getattr(tl, n).grad, theirs, f"{route} {n}̄ torch vs peft {key}", 1e-9, 1e-11)
        assert_close(layer.delta_weight(), pl.get_delta_weight("default"), "ΔW vs peft", rtol, atol)
    with torch.no_grad():
        pl.merge()
    assert_close(layer.merged_weight(), pl.base_layer.weight, "merged W vs peft", rtol, atol)


def test_peft_rounds_the_scale_to_float32_even_in_a_float64_model():
    """PEFT's LoHa builds ΔW with ``scale=torch.tensor(alpha / r)``: a float32 scalar, so in a
    float64 model an s like 5/3 is off by float32's rounding (~1e-8 relative); ours keeps s in
    float64. Measured against both readings of s."""
    model = Two().double()
    pm = peft.get_peft_model(model, peft.LoHaConfig(r=3, alpha=5, target_modules=["k"]))
    pl = pm.base_model.model.k
    rng = np.random.default_rng(14)
    state = {n: rng.standard_normal(s) for n, s in SPEC.shapes(lr.LoHaConfig(r=3), 7, 5).items()}
    with torch.no_grad():
        for n, key in SPEC.peft.tensors.items():
            getattr(pl, key)["default"].copy_(torch.from_numpy(state[n]))
    theirs = pl.get_delta_weight("default").detach().numpy()
    product = (state["B1"] @ state["A1"]) * (state["B2"] @ state["A2"])
    assert_close(theirs, float(np.float32(5 / 3)) * product, "peft ΔW vs float32 s", 1e-13, 1e-14)
    assert np.abs(theirs - (5 / 3) * product).max() > 1e-9  # not the float64 s


def test_peft_rank_dropout_divides_by_zero_when_every_row_is_dropped_ours_does_not():
    model = Two().double()
    pm = peft.get_peft_model(model, peft.LoHaConfig(r=2, alpha=2, rank_dropout=0.999, target_modules=["k"]))
    pl = pm.base_model.model.k
    with torch.no_grad():
        pl.hada_w2_b["default"].fill_(1.0)
    pl.train()
    torch.manual_seed(0)
    y = pl(torch.ones(1, 7, dtype=torch.float64))
    assert not torch.isfinite(y).all()  # 0/0 in PEFT's drop /= drop.mean()
    W = pl.base_layer.weight.detach().numpy()
    ours = LoHaLinear(lr.nn.Linear.from_arrays(W.copy(), None), lr.LoHaConfig(r=2, alpha=2, rank_dropout=0.999), rng=0)
    ours.A2.data[:] = 1.0
    assert np.isfinite(ours.forward(np.ones((1, 7)))).all()


# --- PEFT folders, both directions, both backends ------------------------------------------------
@pytest.fixture(scope="module")
def gpt_parts():
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8)
    idx = np.random.default_rng(5).integers(0, 13, (2, 7))
    return (lambda: GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)), from_numpy, idx


def _run(model, idx):
    return model(torch.tensor(idx)) if isinstance(model, torch.nn.Module) else model.forward(idx)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_peft_loha_folder_loads_with_the_same_outputs_and_gradients_and_saves_back(tmp_path, gpt_parts, backend):
    from lowrank_ref.io import load_peft, peft_state_dict, save_peft

    np_gpt, from_numpy, idx = gpt_parts
    pm = peft.get_peft_model(from_numpy(np_gpt()), peft.LoHaConfig(
        r=2, alpha=3, target_modules=["q", "v", "fc"], rank_pattern={"fc": 3}, alpha_pattern={"v": 5}))
    rng = np.random.default_rng(13)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "hada_" in n:
                p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(p.shape)) * rng.choice([-1, 1], tuple(p.shape))))
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = np_gpt() if backend == "numpy" else from_numpy(np_gpt())
    info = load_peft(ours, tmp_path / "peft")
    assert info["method"] == "loha"
    assert {p: (c.r, c.alpha) for p, c in info["configs"].items() if p.endswith(("fc", "v"))} == {
        "blocks.0.mlp.fc": (3, 3.0), "blocks.1.mlp.fc": (3, 3.0), "blocks.0.attn.v": (2, 5.0),
        "blocks.1.attn.v": (2, 5.0)}
    theirs, mine = pm(torch.tensor(idx)), _run(ours, idx)
    rtol, atol = TOL["float64"]
    assert_close(mine, theirs, f"LoHa {backend}: ours vs peft", rtol, 10 * atol)
    up = np.random.default_rng(6).standard_normal((2, 7, 13))
    if backend == "numpy":
        ours.backward(up)
    else:
        (mine * torch.from_numpy(up)).sum().backward()
    (theirs * torch.from_numpy(up)).sum().backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if "hada_" in n}
    grads = peft_state_dict(ours, grads=True)
    assert set(grads) == set(peft_grads) and len(grads) == 6 * 4
    for k in grads:
        assert_close(grads[k], peft_grads[k], f"LoHa {backend}: d{k}", 1e-9, 1e-10)
    save_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(from_numpy(np_gpt()), str(tmp_path / "ours")).eval()
    assert_close(back(torch.tensor(idx)), mine, f"LoHa {backend}: PEFT loads save_peft", rtol, 10 * atol)
    assert back.peft_config["default"].peft_type == peft.PeftType.LOHA


def test_from_peft_refuses_bad_fields():
    with pytest.raises(ValueError, match="init_weights must be true or false"):
        SPEC.peft.from_peft({"init_weights": "yes"}, "q")
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        SPEC.peft.from_peft({"rank_dropout": 1.5}, "q")
    with pytest.raises(ValueError, match="r must be a positive integer"):
        SPEC.peft.from_peft({"r": 0}, "q")
    assert SPEC.peft.from_peft({}, "q") == lr.LoHaConfig(r=8, alpha=8)  # PEFT's defaults


# --- the compare row is data -------------------------------------------------------------------
def test_compare_row_has_the_lora_row_s_budget_and_scale():
    from lowrank_ref.adapters.lora import SPEC as LORA

    row, lora = SPEC.compare["loha"], LORA.compare["lora"]
    assert row.targets == lora.targets
    assert 2 * row.config.r == lora.config.r and row.config.scaling == lora.config.scaling
