"""IA³'s own math, both modes (output scaling ``l (out,)``, feed-forward input scaling ``l (in,)``):
gradcheck of l and x in float64; identity at init; merge scales the rows and the bias, or the
columns; PEFT's IA³ layer as an oracle (init, forward, l̄, x̄, merge, feedforward_modules rule,
tensor shapes); NumPy ≈ torch (Hypothesis); the compare row injects as data. The generic life-cycle
checks (state errors, cycles, save/load, bad inputs) are the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref.adapters import IA3Linear
from lowrank_ref.adapters.ia3 import SPEC, ia3_backward, ia3_forward
from lowrank_ref.gradcheck import check_gradients, gradcheck

MODES = [False, True]  # feedforward


def make_layer(rng, out=5, inn=4, bias=True, feedforward=False, dtype=np.float64):
    """An IA³ layer moved away from its init: l random around 1, so ΔW is not zero."""
    W = rng.standard_normal((out, inn)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype) if bias else None
    layer = IA3Linear(lr.nn.Linear.from_arrays(W, b), lr.IA3Config(feedforward=feedforward))
    layer.l.data = rng.uniform(0.3, 1.7, layer.l.shape).astype(dtype) * rng.choice([-1, 1], layer.l.shape)
    return layer, W, b


# --- the math ----------------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_l_and_x_float64(feedforward, bias):
    rng = np.random.default_rng(1)
    layer, _, _ = make_layer(rng, bias=bias, feedforward=feedforward)
    x = rng.standard_normal((2, 3, 4))
    report = gradcheck(layer, x, rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "l"}


@pytest.mark.parametrize("feedforward", MODES)
def test_pure_functions_gradients_and_frozen_base(feedforward):
    rng = np.random.default_rng(2)
    W, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    l = rng.standard_normal(5 if feedforward else 3)
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    cfg = lr.IA3Config(feedforward=feedforward)
    params = {"W": W, "b": b, "l": l}
    y, cache = ia3_forward(x, params, cfg)
    dx, grads = ia3_backward(w, cache)
    assert grads["W"] is None and grads["b"] is None  # frozen: no gradient, not a zero
    report = check_gradients(lambda: float(np.sum(ia3_forward(x, params, cfg)[0] * w)),
                             {"x": x, "l": l}, {"x": dx, "l": grads["l"]})
    assert report.ok, str(report)
    # the formula, written out with diag(l)
    want = (x @ np.diag(l)) @ W.T + b if feedforward else (x @ W.T + b) @ np.diag(l)
    assert_close(y, want, "y vs diag(l) formula")


@pytest.mark.parametrize("feedforward", MODES)
def test_identity_at_init(feedforward):
    rng = np.random.default_rng(3)
    W, b = rng.standard_normal((5, 4)), rng.standard_normal(5)
    layer = IA3Linear(lr.nn.Linear.from_arrays(W, b), lr.IA3Config(feedforward=feedforward))
    assert layer.l.shape == ((4,) if feedforward else (5,))
    np.testing.assert_array_equal(layer.l.data, np.ones(layer.l.shape))
    assert layer.num_trainable_parameters() == layer.l.size
    x = rng.standard_normal((3, 4))
    assert_close(layer.forward(x), x @ W.T + b, "IA³ at init vs base")
    np.testing.assert_array_equal(layer.delta_weight(), np.zeros_like(W))


@pytest.mark.parametrize("feedforward", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_merge_scales_rows_and_bias_or_columns(feedforward, bias):
    rng = np.random.default_rng(4)
    layer, W, b = make_layer(rng, bias=bias, feedforward=feedforward)
    l = layer.l.data.copy()
    Wm = W @ np.diag(l) if feedforward else np.diag(l) @ W  # columns, or rows
    np.testing.assert_array_equal(layer.merged_weight(), Wm)
    assert_close(W + layer.delta_weight(), Wm, "W0 + ΔW vs merged weight")
    x = rng.standard_normal((2, 3, 4))
    y = layer.forward(x)
    # the forward through the dense weights (bias included: output scaling scales it too)
    bm = layer.merged_bias()
    if bias:
        np.testing.assert_array_equal(bm, b if feedforward else l * b)
    else:
        assert bm is None
    assert_close(x @ Wm.T + (0 if bm is None else bm), y, "dense vs factorised forward")
    layer.merge()
    np.testing.assert_array_equal(layer.base.weight.data, Wm)
    if bias:
        np.testing.assert_array_equal(layer.base.bias.data, b if feedforward else l * b)
    assert_close(layer.forward(x), y, "merged vs unmerged forward")
    layer.unmerge()
    np.testing.assert_array_equal(layer.base.weight.data, W)
    if bias:
        np.testing.assert_array_equal(layer.base.bias.data, b)


@pytest.mark.parametrize("feedforward", MODES)
def test_float32_merge_cycles_restore_weight_and_bias_bit_for_bit(feedforward):
    rng = np.random.default_rng(5)
    layer, W, b = make_layer(rng, 7, 6, feedforward=feedforward, dtype=np.float32)
    W, b = W.copy(), b.copy()
    for _ in range(200):
        layer.merge()
        layer.unmerge()
    assert layer.base.weight.data.tobytes() == W.tobytes()
    assert layer.base.bias.data.tobytes() == b.tobytes()


def test_config_checks_its_field():
    with pytest.raises(TypeError, match="feedforward must be a bool"):
        lr.IA3Config(feedforward=1)
    assert lr.IA3Config(feedforward=np.bool_(True)).feedforward is True
    assert lr.IA3Config().replace(feedforward=True) == lr.IA3Config(feedforward=True)
    with pytest.raises(TypeError, match="config must be a IA3Config"):
        IA3Linear(lr.nn.Linear.from_arrays(np.ones((2, 2))), lr.LoRAConfig())


# --- NumPy vs torch ----------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def torch_twin(layer):
    base = layer.base
    tl = lr.adapt(lr.nn.Linear.from_arrays(base.weight.data, None if base.bias is None else base.bias.data),
                  layer.config, backend="torch")
    with torch.no_grad():
        tl.l.copy_(torch.from_numpy(layer.l.data))
    return tl


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 6), inn=st.integers(1, 6), lead=st.lists(st.integers(1, 3), max_size=2).map(tuple),
       feedforward=st.booleans(), bias=st.booleans(), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**16))
def test_numpy_and_torch_agree(out, inn, lead, feedforward, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    layer, _, _ = make_layer(rng, out, inn, bias=bias, feedforward=feedforward, dtype=np.dtype(dtype))
    tl = torch_twin(layer)
    rtol, atol = TOL[dtype]
    x = rng.standard_normal(lead + (inn,)).astype(dtype)
    dy = rng.standard_normal(lead + (out,)).astype(dtype)
    y = layer.forward(x)
    dx = layer.backward(dy)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tl(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    assert_close(y, yt, "y: numpy vs torch", rtol, atol)
    assert_close(dx, xt.grad, "x̄: numpy vs torch", rtol, atol)
    assert_close(layer.l.grad, tl.l.grad, "l̄: numpy vs torch", rtol, 10 * atol)
    assert_close(layer.delta_weight(), tl.delta_weight(), "ΔW: numpy vs torch", rtol, atol)
    np.testing.assert_array_equal(layer.merged_weight(), tl.merged_weight().numpy())  # float64, rounded once
    if bias:
        np.testing.assert_array_equal(layer.merged_bias(), tl.merged_bias().numpy())
    b0 = None if tl.base.bias is None else tl.base.bias.detach().clone()
    W0 = tl.base.weight.detach().clone()
    tl.merge()
    assert_close(tl(torch.from_numpy(x)), yt, "torch merged vs unmerged", 10 * rtol, 10 * atol)
    tl.unmerge()
    assert torch.equal(tl.base.weight, W0) and (b0 is None or torch.equal(tl.base.bias, b0))


# --- PEFT (peft.tuners.ia3) as an oracle -------------------------------------------------------
peft = pytest.importorskip("peft", reason="peft is not installed (an oracle only, not a dependency)")


class Two(torch.nn.Module):
    """A (7 -> 5) layer ``k`` and a (5 -> 7) layer ``proj``, so out ≠ in on both."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Linear(7, 5)
        self.proj = torch.nn.Linear(5, 7)

    def forward(self, x):
        return self.proj(self.k(x))


@pytest.mark.parametrize("feedforward", MODES)
def test_peft_ia3_layer_matches_ours_float64(feedforward):
    rng = np.random.default_rng(6)
    model = Two().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
    W, b = model.k.weight.detach().numpy().copy(), model.k.bias.detach().numpy().copy()
    pm = peft.get_peft_model(model, peft.IA3Config(target_modules=["k"], feedforward_modules=["k"] if feedforward else []))
    pl = pm.base_model.model.k
    pl_l = pl.ia3_l["default"]
    cfg = lr.IA3Config(feedforward=feedforward)
    assert tuple(pl_l.shape) == ((1, 7) if feedforward else (5, 1))  # PEFT's layout of the same vector
    np.testing.assert_array_equal(pl_l.detach().numpy(), np.ones(pl_l.shape))  # PEFT's init: ones too

    layer = IA3Linear(lr.nn.Linear.from_arrays(W, b), cfg)
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch")
    l = rng.uniform(0.3, 1.7, layer.l.shape)
    with torch.no_grad():
        pl_l.copy_(torch.from_numpy(SPEC.peft.to_peft_tensor("l", l, cfg)))
        tl.l.copy_(torch.from_numpy(l))
    layer.l.data = l.copy()
    x, dy = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 5))
    xt = torch.from_numpy(x).requires_grad_(True)
    y_peft = pl(xt)
    (y_peft * torch.from_numpy(dy)).sum().backward()
    y_np, dx_np = layer.forward(x), layer.backward(dy)
    xt2 = torch.from_numpy(x).requires_grad_(True)
    y_t = tl(xt2)
    (y_t * torch.from_numpy(dy)).sum().backward()
    rtol, atol = TOL["float64"]
    l_peft = SPEC.peft.from_peft_tensor("l", pl_l.grad.numpy(), cfg)
    for mine, name in ((y_np, "y numpy"), (y_t, "y torch")):
        assert_close(mine, y_peft, f"{name} vs peft", rtol, atol)
    for mine, name in ((dx_np, "x̄ numpy"), (xt2.grad, "x̄ torch")):
        assert_close(mine, xt.grad, f"{name} vs peft", rtol, atol)
    for mine, name in ((layer.l.grad, "l̄ numpy"), (tl.l.grad, "l̄ torch")):
        assert_close(mine, l_peft, f"{name} vs peft", 1e-9, 1e-11)
    # PEFT's merge multiplies W0 by its (out, 1) or (1, in) vector and, for output scaling, the bias
    with torch.no_grad():
        pl.merge()
    assert_close(layer.merged_weight(), pl.base_layer.weight, "merged W vs peft", rtol, atol)
    assert_close(layer.merged_bias(), pl.base_layer.bias, "merged b vs peft", rtol, atol)


def test_peft_unmerge_drifts_ours_does_not():
    """PEFT unmerges by dividing by l + 1e-8 (and warns); in float32 the cycles do not return W0's
    bits. Ours puts the kept bits back."""
    import warnings

    rng = np.random.default_rng(7)
    model = Two()
    pm = peft.get_peft_model(model, peft.IA3Config(target_modules=["k"], feedforward_modules=[]))
    pl = pm.base_model.model.k
    l = rng.uniform(0.3, 1.7, (5, 1)).astype(np.float32)
    with torch.no_grad():
        pl.ia3_l["default"].copy_(torch.from_numpy(l))
    W0 = pl.base_layer.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unmerge result can be inaccurate for (IA)^3."
        for _ in range(20):
            pl.merge()
            pl.unmerge()
    assert not torch.equal(pl.base_layer.weight, W0)
    layer = IA3Linear(lr.nn.Linear.from_arrays(W0.numpy().copy(), None), lr.IA3Config())
    layer.l.data = l.reshape(-1).copy()
    for _ in range(20):
        layer.merge()
        layer.unmerge()
    assert layer.base.weight.data.tobytes() == W0.numpy().tobytes()


def test_feedforward_modules_rule_is_peft_s():
    """Which layers PEFT gives input scaling, for a list (``endswith``) and a regex (full match),
    against our reading of the same adapter_config.json fields."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList()
            for _ in range(2):
                blk = torch.nn.Module()
                blk.k, blk.v, blk.proj, blk.c_proj = (torch.nn.Linear(4, 4) for _ in range(4))
                self.blocks.append(blk)

    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("k", "v", "proj", "c_proj")]
    for ff in (["proj"], ["blocks.1.proj"], [], r"blocks\.0\.(k|c_proj)", r".*proj"):
        # targets as a regex: PEFT checks a feedforward list against a target list only by name
        pm = peft.get_peft_model(Net(), peft.IA3Config(target_modules=r".*\.(k|v|proj|c_proj)",
                                                       feedforward_modules=ff))
        theirs = {n: pm.base_model.model.get_submodule(n).is_feedforward for n in names}
        ours = {n: SPEC.peft.from_peft({"feedforward_modules": ff}, n).feedforward for n in names}
        assert ours == theirs, ff
    assert SPEC.peft.from_peft({"feedforward_modules": ["proj"]}, "blocks.0.c_proj").feedforward  # endswith
    with pytest.raises(ValueError, match="no feedforward_modules"):
        SPEC.peft.from_peft({"target_modules": ["k"]}, "k")
    with pytest.raises(ValueError, match="feedforward_modules must be a string or a list"):
        SPEC.peft.from_peft({"feedforward_modules": 3}, "k")


def test_to_peft_is_a_config_peft_accepts_with_the_same_modes():
    configs = {"blocks.0.k": lr.IA3Config(), "blocks.0.proj": lr.IA3Config(feedforward=True),
               "blocks.1.proj": lr.IA3Config(feedforward=True)}
    fields = SPEC.peft.to_peft(configs)
    assert fields == {"feedforward_modules": ["blocks.0.proj", "blocks.1.proj"]}
    assert set(fields) <= set(SPEC.peft.options)
    pc = peft.IA3Config(target_modules=sorted(configs), **fields)  # PEFT checks ff ⊆ targets here
    for path, cfg in configs.items():
        assert SPEC.peft.from_peft({"feedforward_modules": list(pc.feedforward_modules)}, path) == cfg
    with pytest.raises(ValueError, match=r"ia3_l for a feed-forward layer is \(1, in\)"):
        SPEC.peft.from_peft_tensor("l", np.ones((4, 1)), lr.IA3Config(feedforward=True))
    with pytest.raises(ValueError, match=r"non-feed-forward layer is \(out, 1\)"):
        SPEC.peft.from_peft_tensor("l", np.ones(4), lr.IA3Config())


# --- the compare row is data -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_compare_row_injects_keys_values_and_feedforward_input(backend):
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained

    row = SPEC.compare["ia3"]
    model = load_pretrained(backend=backend, progress=False)
    res = inject(model, row.config, targets=row.targets, method="ia3", **row.kwargs)
    c = model.config
    d, h = c.d_model, c.mlp_ratio * c.d_model
    want = {}
    for i in range(c.n_layer):
        want |= {f"blocks.{i}.attn.k": (False, d), f"blocks.{i}.attn.v": (False, d),
                 f"blocks.{i}.mlp.proj": (True, h)}  # proj's input is the MLP's hidden activation
    got = {n: (cfg.feedforward, int(model.get_submodule(n).l.shape[0])) for n, cfg in res.configs.items()}
    assert got == want
    assert res.trainable_params == c.n_layer * (2 * d + h)
