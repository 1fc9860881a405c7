"""SPEC.shared: state built once per model at inject time, attached once, handed to every layer,
counted once, trained by every layer's gradient, saved once per file; NumPy and torch.

No shipped method has shared state yet (VeRA and Tied-LoRA will), so the method here is a test
one, ``sharedb_method`` (LoRA whose ``B`` all layers share), registered only for these tests."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, requires_cuda
from sharedb_method import SPEC, SharedBConfig

import lowrank_ref as lr
from lowrank_ref import registry
from lowrank_ref.inject import (
    SHARED_ATTR,
    adapter_layers,
    build_adapters,
    check_shared_state,
    inject,
    set_trainable,
    shared_modules,
)
from lowrank_ref.io import load_adapter, save_adapter
from lowrank_ref.nn import GPT, GPTConfig, Linear, Module
from lowrank_ref.registry import SpecError

torch = pytest.importorskip("torch")

TESTS = Path(__file__).resolve().parent
KEY = f"{SHARED_ATTR}.{SPEC.name}.B"  # the one parameter name of the shared B
D, R = 4, 2


@pytest.fixture
def sharedb():
    with registry.register_for_tests(SPEC) as (spec,):
        yield spec


class Net(Module):
    """Three linear layers of two output widths: q (4 -> 4), v (4 -> 4), fc (4 -> 8)."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.q = Linear(D, D, rng=rng, dtype=np.float64)
        self.v = Linear(D, D, rng=rng, dtype=np.float64)
        self.fc = Linear(D, 2 * D, rng=rng, dtype=np.float64)

    def forward(self, x):
        return self.q.forward(x), self.v.forward(x), self.fc.forward(x)


class TorchNet(torch.nn.Module):
    def __init__(self, np_net: Net):
        super().__init__()
        for n in ("q", "v", "fc"):  # the NumPy twin's weights, copied
            setattr(self, n, _torch_linear(getattr(np_net, n)))

    def forward(self, x):
        return self.q(x), self.v(x), self.fc(x)


def _torch_linear(np_lin):
    from lowrank_gpu.nn.convert import as_torch_linear

    return as_torch_linear(np_lin)


def _net(backend, seed=0):
    net = Net(seed)
    return net if backend == "numpy" else TorchNet(net)


def _params(model):
    if isinstance(model, torch.nn.Module):
        return dict(model.named_parameters())
    return model.parameters()


def _trainable(model):
    if isinstance(model, torch.nn.Module):
        return {n for n, p in model.named_parameters() if p.requires_grad}
    return set(model.trainable_parameters())


def _shared_B(model):
    return shared_modules(model)[SPEC.name].B


BACKENDS = ["numpy", "torch"]


# --- the registry hook -----------------------------------------------------------------------
def test_register_for_tests_is_undone_and_checks_like_discovery():
    assert SPEC.name not in registry.method_names()
    with registry.register_for_tests(SPEC):
        assert registry.get_method(SPEC.name).config is SharedBConfig
        assert registry.method_for_config(SharedBConfig()).name == SPEC.name
    assert SPEC.name not in registry.method_names()
    with pytest.raises(TypeError, match="no method takes a config of type SharedBConfig"):
        registry.method_for_config(SharedBConfig())
    before = dict(registry.methods())
    with pytest.raises(SpecError, match="'lora' is already claimed"):
        with registry.register_for_tests(dataclasses.replace(SPEC, name="lora")):
            pass
    with pytest.raises(SpecError, match="names nothing importable"):
        with registry.register_for_tests(dataclasses.replace(SPEC, numpy="sharedb_method:Nope")):
            pass
    assert registry.methods() == before


# --- one object, attached once, counted once ---------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_shared_tensor_across_layers_listed_and_counted_once(sharedb, backend):
    model = _net(backend)
    total_before = sum(int(np.prod(p.shape)) for p in _params(model).values())
    res = inject(model, SharedBConfig(r=R), targets=("q", "v", "fc"), rng=0)
    B = _shared_B(model)
    layers = adapter_layers(model)
    assert sorted(layers) == ["fc", "q", "v"]
    assert all(layer.shared.B is B for layer in layers.values())  # one object, not copies
    assert tuple(B.shape) == (2 * D, R)  # out_max from the chosen layers' shapes: fc's 8 rows
    # each parameter once, under the model's lowrank_shared; the layers do not list B again
    assert [n for n, p in _params(model).items() if p is B] == [KEY]
    assert _trainable(model) == {"q.A", "v.A", "fc.A", KEY}
    by_hand = 3 * R * D + 2 * D * R  # three A (r, in) and one B (out_max, r)
    assert res.trainable_params == by_hand
    assert res.total_params == total_before + by_hand
    assert res.shared == [f"{SHARED_ATTR}.{SPEC.name}"] and res.shared[0] in str(res)
    assert set_trainable(model, "none") == 0
    assert set_trainable(model, "adapters") == by_hand
    assert _trainable(model) == {"q.A", "v.A", "fc.A", KEY}


def test_a_deep_copy_shares_its_own_B():
    with registry.register_for_tests(SPEC):
        model = Net()
        inject(model, SharedBConfig(r=R), targets="all", rng=0)
        twin = copy.deepcopy(model)
    B, B2 = _shared_B(model), _shared_B(twin)
    assert B2 is not B and np.array_equal(B2.data, B.data)
    assert all(layer.shared.B is B2 for layer in adapter_layers(twin).values())


# --- every layer's gradient reaches the one B ------------------------------------------------
def _by_hand_dB(model, x, G, s):
    """Σ_ℓ s G_ℓᵀ (x A_ℓᵀ) into the first out_ℓ rows of B (the method's docstring)."""
    dB = np.zeros((2 * D, R))
    for name, g in zip(("q", "v", "fc"), G):
        A = np.asarray(_array(model.get_submodule(name).A))
        dB[: g.shape[-1]] += s * g.reshape(-1, g.shape[-1]).T @ (x.reshape(-1, D) @ A.T)
    return dB


def _array(p):
    return p.detach().numpy() if hasattr(p, "detach") else p.data


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_from_every_layer_accumulate_into_the_shared_B(sharedb, backend):
    model = _net(backend)
    cfg = SharedBConfig(r=R, alpha=3.0)
    inject(model, cfg, targets=("q", "v", "fc"), rng=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, D))
    G = [rng.standard_normal((3, D)), rng.standard_normal((3, D)), rng.standard_normal((3, 2 * D))]
    if backend == "numpy":
        outs = model.forward(x)
        for name, g in zip(("q", "v", "fc"), G):
            model.get_submodule(name).backward(g)
        grad = _shared_B(model).grad
    else:
        outs = model(torch.tensor(x))
        sum((o * torch.tensor(g)).sum() for o, g in zip(outs, G)).backward()
        grad = _shared_B(model).grad
    want = _by_hand_dB(model, x, G, cfg.scaling)
    one_layer = _by_hand_dB(model, x, [G[0], 0 * G[1], 0 * G[2]], cfg.scaling)
    assert not np.allclose(want, one_layer)  # the other layers' shares are not zero
    assert_close(grad, want, f"{backend} shared B.grad vs Σ over layers by hand", 1e-12, 1e-12)


def test_numpy_shared_gradient_matches_central_differences(sharedb):
    from lowrank_ref.gradcheck import numeric_gradient

    model = Net()
    inject(model, SharedBConfig(r=R), targets="all", rng=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, D))
    G = [rng.standard_normal(o.shape) for o in model.forward(x)]

    def loss():
        return sum(float(np.sum(o * g)) for o, g in zip(model.forward(x), G))

    B = _shared_B(model)
    numeric = numeric_gradient(loss, B.data)
    model.forward(x)
    for name, g in zip(("q", "v", "fc"), G):
        model.get_submodule(name).backward(g)
    assert_close(B.grad, numeric, "shared B.grad vs central differences", 1e-7, 1e-9)


def test_numpy_and_torch_agree_on_a_gpt(sharedb):
    from lowrank_gpu.nn.convert import to_torch
    from lowrank_gpu.nn.gpt import from_numpy

    npm = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, d_model=8),
              rng=np.random.default_rng(0), dtype=np.float64)
    tm = from_numpy(npm)
    kw = dict(targets=("q", "fc"), overrides={"alpha": {"blocks.1.*": 5.0}})
    r1 = inject(npm, SharedBConfig(r=R), rng=0, **kw)
    r2 = inject(tm, SharedBConfig(r=R), rng=0, **kw)
    assert r1.replaced == r2.replaced and (r1.trainable_params, r1.total_params) == (r2.trainable_params, r2.total_params)
    with torch.no_grad():  # the same values on both sides (each side drew its own init)
        for n, p in tm.named_parameters():
            if p.requires_grad:
                p.copy_(to_torch(npm.parameters()[n].data))
    assert _trainable(tm) == _trainable(npm)
    idx = np.random.default_rng(1).integers(0, 11, (2, 6))
    loss, dlogits = npm.loss(idx[:, :-1], idx[:, 1:])
    npm.backward(dlogits)
    logits = tm(torch.tensor(idx[:, :-1]))
    tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), torch.tensor(idx[:, 1:]).reshape(-1))
    tloss.backward()
    assert_close(tloss, loss, "loss torch vs numpy")
    for n, p in tm.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, npm.parameters()[n].grad, f"grad {n}: torch vs numpy", 1e-9, 1e-11)


# --- overrides -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_overrides_follow_the_spec(sharedb, backend):
    model = _net(backend)
    res = inject(model, SharedBConfig(r=R, alpha=2.0), targets="all", overrides={"alpha": {"fc": 6.0}}, rng=0)
    assert res.configs["fc"].alpha == 6.0 and res.configs["q"].alpha == 2.0
    for kwargs in (dict(overrides={"r": {"q": 3}}), dict(ranks={"q": 3})):
        with pytest.raises(ValueError, match=r"'r' is not a per-layer field of SharedBConfig.*may change: alpha"):
            inject(_net(backend), SharedBConfig(r=R), targets="all", **kwargs)


# --- rollback --------------------------------------------------------------------------------
def _state(model):
    mods = dict(model.named_modules())
    flags = {n: (p.requires_grad if hasattr(p, "requires_grad") else p.trainable) for n, p in _params(model).items()}
    return mods, flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_inject_leaves_no_shared_state_behind(sharedb, backend):
    model = _net(backend)
    W = model.fc.weight
    if backend == "numpy":
        W.data[0, 0] = np.nan  # the last target's base: the shared B and two layers are built first
    else:
        with torch.no_grad():
            W[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match="finite"):
        inject(model, SharedBConfig(r=R), targets=("q", "v", "fc"), rng=0)
    assert not hasattr(model, SHARED_ATTR) and shared_modules(model) == {}
    assert _state(model) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_inject_of_the_method_is_refused_and_changes_nothing(sharedb, backend):
    model = _net(backend)
    inject(model, SharedBConfig(r=R), targets="q", rng=0)
    B = _shared_B(model)
    before = _state(model)
    with pytest.raises(ValueError, match=r"already holds shared state for method 'sharedb_test'.*one call"):
        inject(model, SharedBConfig(r=R), targets="v", rng=0)
    assert _state(model) == before and _shared_B(model) is B


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshot_restore_after_success_removes_the_shared_state(sharedb, backend):
    model = _net(backend)
    before = _state(model)
    snap = build_adapters(model, {"q": (sharedb, SharedBConfig()), "fc": (sharedb, SharedBConfig())}, rng=0)
    assert tuple(_shared_B(model).shape) == (2 * D, 2)
    snap.restore()
    assert not hasattr(model, SHARED_ATTR) and _state(model) == before


# --- files: the shared B once, and a fresh process with another seed -------------------------
def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return list(f.keys()), f.metadata()


def test_save_then_load_in_a_fresh_process_with_another_seed(sharedb, tmp_path):
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, d_model=8),
                rng=np.random.default_rng(0), dtype=np.float64)
    inject(model, SharedBConfig(r=R, alpha=3.0), targets=("q", "v", "fc"), overrides={"alpha": {"fc": 1.5}}, rng=5)
    idx = np.random.default_rng(1).integers(0, 11, (2, 6))
    want = model.forward(idx)
    path = save_adapter(model, tmp_path / "shared.safetensors")
    keys, header = _keys(path)
    assert [k for k in keys if SHARED_ATTR in k] == [f"base_model.model.{KEY}"]  # once per file
    assert len(keys) == 1 + 6  # and one A per adapted layer
    assert json.loads(header["shared"])[SPEC.name]["tensors"]["B"]["shape"] == [4 * 8, R]  # fc: d_model -> 4 d_model
    np.save(tmp_path / "idx.npy", idx)
    code = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import numpy as np, torch
from lowrank_ref import registry
from lowrank_ref.inject import adapter_layers, shared_modules
from lowrank_ref.io import load_adapter
from lowrank_ref.nn import GPT, GPTConfig
from lowrank_gpu.nn.gpt import from_numpy
from sharedb_method import SPEC
np.random.seed(99); torch.manual_seed(99)
with registry.register_for_tests(SPEC):
    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, d_model=8),
                rng=np.random.default_rng(0), dtype=np.float64)
    tmodel = from_numpy(model)
    load_adapter(model, {str(path)!r})
    load_adapter(tmodel, {str(path)!r})
    for m in (model, tmodel):
        B = shared_modules(m)[SPEC.name].B
        assert all(layer.shared.B is B for layer in adapter_layers(m).values())
    idx = np.load({str(tmp_path / "idx.npy")!r})
    np.savez({str(tmp_path / "out.npz")!r}, numpy=model.forward(idx), torch=tmodel(torch.tensor(idx)).detach().numpy())
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)
    out = np.load(tmp_path / "out.npz")
    assert_close(out["numpy"], want, "numpy logits after load in a fresh process")
    assert_close(out["torch"], want, "torch logits after load in a fresh process", 1e-10, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lone_layer_from_adapt_holds_its_shared_state(sharedb, backend, tmp_path):
    rng = np.random.default_rng(0)
    base = Linear.from_arrays(rng.standard_normal((5, 6)), rng.standard_normal(5))
    layer = lr.adapt(base, SharedBConfig(r=R), backend=backend, rng=1)
    B = _shared_B(layer)
    assert layer.shared.B is B and tuple(B.shape) == (5, R)
    assert [n for n, p in _params(layer).items() if p is B] == [KEY]
    x = rng.standard_normal((3, 6))
    y = layer(torch.tensor(x)) if backend == "torch" else layer.forward(x)
    save_adapter(layer, tmp_path / "one.safetensors")
    other = lr.adapt(Linear.from_arrays(base.weight.data, base.bias.data), SharedBConfig(r=R), backend=backend, rng=7)
    load_adapter(other, tmp_path / "one.safetensors")
    y2 = other(torch.tensor(x)) if backend == "torch" else other.forward(x)
    assert_close(y2, y, "lone layer after load")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_state_that_does_not_fit_is_refused(sharedb, backend, tmp_path):
    model = _net(backend)
    inject(model, SharedBConfig(r=R), targets="all", rng=0)
    with pytest.raises(ValueError, match=r"file holds it for methods \[\], the model for \['sharedb_test'\]"):
        check_shared_state(model, {})
    with pytest.raises(ValueError, match=r"shape \(3, 2\) in the file, the model's is \(8, 2\)"):
        check_shared_state(model, {SPEC.name: {"B": np.zeros((3, 2))}})
    with pytest.raises(ValueError, match=r"the file holds \['C'\], the model needs \['B'\]"):
        check_shared_state(model, {SPEC.name: {"C": np.zeros((8, 2))}})
    # a file saved without the shared B (another model's) does not load into this one
    plain = _net(backend)
    inject(plain, lr.LoRAConfig(r=R), targets="all", rng=0)
    save_adapter(plain, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="method"):
        load_adapter(model, tmp_path / "lora.safetensors")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_layers_inside_the_shared_state_are_not_targets(sharedb, backend):
    model = _net(backend)
    inject(model, SharedBConfig(r=R), targets="q", rng=0)
    hyper = Linear(2, 2) if backend == "numpy" else torch.nn.Linear(2, 2)  # as a hypernetwork would hold
    shared_modules(model)[SPEC.name].hyper = hyper
    res = inject(model, lr.LoRAConfig(r=1), targets="all", rng=0)
    assert res.replaced == ["v", "fc"]


def test_the_shared_state_takes_the_base_dtype(sharedb):
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=2, d_model=8),
                rng=np.random.default_rng(0), dtype=np.float32)
    inject(model, SharedBConfig(r=R), targets=("q", "v"), rng=0)
    assert _shared_B(model).data.dtype == np.float32


@requires_cuda
def test_torch_shared_state_follows_the_base_onto_the_gpu(sharedb):
    model = _net("torch").to("cuda")
    inject(model, SharedBConfig(r=R), targets="all", rng=0)
    B = _shared_B(model)
    assert B.device.type == "cuda" and all(layer.A.device.type == "cuda" for layer in adapter_layers(model).values())
    x = torch.randn(3, D, dtype=torch.float64, device="cuda")
    sum(o.sum() for o in model(x)).backward()
    assert B.grad is not None and B.grad.device.type == "cuda"
