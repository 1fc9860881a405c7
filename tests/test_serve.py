"""lowrank_ref.serve.MultiLoRA: mixed-adapter batches equal each adapter's own model, row by row.

Three adapters over one tiny base, each trained-looking (non-zero factors): LoRA r=2 on q, v (our
file), rsLoRA r=5 on every layer but the head (a PEFT folder), DoRA r=3 on k and fc (our file).
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.inject import inject
from lowrank_ref.io import save_adapter, save_peft
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.nn.linear import Linear
from lowrank_ref.nn.module import StateError
from lowrank_ref.serve import bgmv, sgmv

torch = pytest.importorskip("torch")
from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402

V, T = 11, 6
ADAPTERS = {  # name: (config, targets, saved as a PEFT folder?)
    "lora": (lr.LoRAConfig(r=2, alpha=4), ("q", "v"), False),
    "rslora": (lr.LoRAConfig(r=5, alpha=3, rslora=True), "all", True),
    "dora": (lr.DoRAConfig(r=3, alpha=6), ("k", "fc"), False),
}
ROWS = ["lora", None, "dora", "rslora", "lora", "dora", "__base__"]


def _base(d_model=8, seed=0):
    cfg = GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, d_model=d_model)
    return GPT(cfg, rng=np.random.default_rng(seed), dtype=np.float64).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(1)
    base = _base()
    own, paths = {}, {}
    for name, (cfg, targets, peft) in ADAPTERS.items():
        m = copy.deepcopy(base)
        inject(m, cfg, targets=targets, rng=rng)
        for p in m.trainable_parameters().values():  # non-zero B, m away from ‖W0‖
            p.data = p.data + 0.3 * rng.standard_normal(p.data.shape)
        own[name] = m.eval()
        paths[name] = str(d / name) if peft else str(d / f"{name}.safetensors")
        (save_peft if peft else save_adapter)(m, paths[name])
    idx = rng.integers(0, V, (len(ROWS), T))
    return {"base": base, "own": own, "paths": paths, "idx": idx, "dir": d}


def _server(world, backend="numpy", kernel="bgmv"):
    base = copy.deepcopy(world["base"])
    if backend == "torch":
        base = from_numpy(base).eval()
    srv = lr.serve.MultiLoRA(base, kernel=kernel)
    for name in ADAPTERS:
        srv.add(name, world["paths"][name])
    return srv


def _run(srv, idx, rows, backend, **kw):
    x = torch.as_tensor(idx) if backend == "torch" else idx
    y = srv.forward(x, rows, **kw)
    return y.numpy() if backend == "torch" else y


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
def test_mixed_batch_equals_each_adapters_own_model_row_by_row(world, backend, kernel):
    srv = _server(world, backend, kernel)
    y = _run(srv, world["idx"], ROWS, backend)
    for i, name in enumerate(ROWS):
        own = world["base"] if name in (None, "__base__") else world["own"][name]
        ref = own.forward(world["idx"][i:i + 1])[0]
        np.testing.assert_allclose(y[i], ref, rtol=0, atol=1e-12, err_msg=f"row {i} ({name}), mine vs own model")
    for name in ADAPTERS:  # the adapters change the output: the test above can fail
        assert np.abs(world["own"][name].forward(world["idx"]) - world["base"].forward(world["idx"])).max() > 1e-3


def test_ranks_and_methods_as_loaded(world):
    srv = _server(world)
    assert set(srv.ranks("lora").values()) == {2} and sorted(srv.ranks("lora")) == ["blocks.0.attn.q", "blocks.0.attn.v"]
    assert set(srv.ranks("rslora").values()) == {5} and len(srv.ranks("rslora")) == 6  # q k v o fc proj
    assert set(srv.ranks("dora").values()) == {3}


def _dense_rows(x, W0, b, factors, slots):
    """The oracle: per row, the dense adapted weight g ⊙ (W0 + s B A), then x Wᵀ + b."""
    out = []
    for i, k in enumerate(slots):
        if k in factors:
            A, B, s, g = factors[k]
            W = g[:, None] * (W0 + s * B @ A)
        else:
            W = W0
        out.append(x[i] @ W.T + b)
    return np.stack(out)


def test_bgmv_and_sgmv_equal_the_dense_update_per_row():
    rng = np.random.default_rng(3)
    out, inp, ranks = 7, 5, {1: 2, 2: 4, 4: 1}  # slot 3 adapts nothing here, slot 0 is the base
    W0, b = rng.standard_normal((out, inp)), rng.standard_normal(out)
    factors = {k: (rng.standard_normal((r, inp)), rng.standard_normal((out, r)), 0.5 * k,
                   rng.uniform(0.5, 2, out)) for k, r in ranks.items()}
    K, R = 5, 4
    A_all, B_all, s, g = np.zeros((K, R, inp)), np.zeros((K, out, R)), np.zeros(K), np.ones((K, out))
    for k, (A, B, sk, gk) in factors.items():
        A_all[k, :A.shape[0]], B_all[k, :, :A.shape[0]], s[k], g[k] = A, B, sk, gk
    slots = np.array([2, 0, 4, 1, 3, 2, 1])
    x = rng.standard_normal((len(slots), 3, inp))
    ref = _dense_rows(x, W0, b, factors, slots)
    np.testing.assert_allclose(bgmv(x, W0, b, A_all, B_all, s, g, slots), ref, atol=1e-12)
    np.testing.assert_allclose(sgmv(x, W0, b, factors, slots), ref, atol=1e-12)
    from lowrank_gpu.serve import bgmv as tbgmv
    from lowrank_gpu.serve import sgmv as tsgmv

    t = torch.as_tensor
    ts = t(slots)
    np.testing.assert_allclose(tbgmv(t(x), t(W0), t(b), t(A_all), t(B_all), t(s), t(g), ts).numpy(), ref, atol=1e-12)
    lora_only = {k: (A, B, sk, np.ones(out)) for k, (A, B, sk, _) in factors.items()}  # g = 1: the fused path
    np.testing.assert_allclose(tbgmv(t(x), t(W0), t(b), t(A_all), t(B_all), t(s), t(np.ones((K, out))), ts,
                                     scaled=False).numpy(), _dense_rows(x, W0, b, lora_only, slots), atol=1e-12)
    tf = {k: (t(A), t(B), sk, t(gk)) for k, (A, B, sk, gk) in factors.items()}
    np.testing.assert_allclose(tsgmv(t(x), t(W0), t(b), tf, ts).numpy(), ref, atol=1e-12)


def test_dora_row_scale_gives_rows_of_length_m(world):
    srv = _server(world)
    layer = world["own"]["dora"].get_submodule("blocks.0.attn.k")
    f = srv._adapters["dora"]["blocks.0.attn.k"]
    W = f["g"][:, None] * (layer.base.weight.data + f["s"] * f["B"] @ f["A"])  # the served adapted weight
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), np.abs(layer.m.data), rtol=1e-12)  # ‖W′_j‖ = |m_j|
    assert np.abs(f["g"] - 1).max() > 1e-3  # m is not ‖W0 + sBA‖: g matters


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_merge_one_adapter_then_unmerge_bit_for_bit(world, backend):
    srv = _server(world, backend)
    idx = world["idx"]
    before = _run(srv, idx, ROWS, backend)
    W = srv.model.get_submodule("blocks.0.attn.k").base.weight
    W0 = np.array(W.detach().numpy() if backend == "torch" else W.data)
    srv.merge("dora")
    np.testing.assert_allclose(_run(srv, idx, ["dora"] * len(ROWS), backend), world["own"]["dora"].forward(idx),
                               atol=1e-12)
    with pytest.raises(StateError, match="merged"):
        _run(srv, idx, ROWS, backend)
    with pytest.raises(StateError, match="merged"):
        srv.merge("lora")
    srv.unmerge()
    W = srv.model.get_submodule("blocks.0.attn.k").base.weight
    assert np.array_equal(W.detach().numpy() if backend == "torch" else W.data, W0)
    np.testing.assert_array_equal(_run(srv, idx, ROWS, backend), before)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_remove_gives_the_plain_base_back(world, backend):
    srv = _server(world, backend)
    srv.remove("rslora")
    assert srv.names == ["lora", "dora"]
    assert "blocks.0.mlp.proj" not in srv._served  # only rslora adapted proj
    idx = world["idx"]
    y = _run(srv, idx, ["dora", "lora"] + [None] * (len(ROWS) - 2), backend)
    np.testing.assert_allclose(y[0], world["own"]["dora"].forward(idx[:1])[0], atol=1e-12)
    np.testing.assert_allclose(y[1], world["own"]["lora"].forward(idx[1:2])[0], atol=1e-12)
    srv.remove("lora")
    srv.remove("dora")
    plain = torch.nn.Linear if backend == "torch" else Linear
    assert all(type(m) is plain for n, m in srv.model.named_modules() if n.endswith(("q", "k", "v", "o", "fc", "proj")))
    np.testing.assert_allclose(_run(srv, idx, None, backend), world["base"].forward(idx), atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bad_input_is_refused_and_changes_nothing(world, backend, tmp_path):
    srv = _server(world, backend)
    idx = world["idx"]
    before = _run(srv, idx, ROWS, backend)
    with pytest.raises(ValueError, match="unknown adapter.*'fr'"):
        _run(srv, idx, ["fr"] + ROWS[1:], backend)
    with pytest.raises(ValueError, match="6 names for a batch of 7"):
        _run(srv, idx, ROWS[:-1], backend)
    with pytest.raises(TypeError, match="one adapter name"):
        _run(srv, idx, "lora", backend)
    with pytest.raises(TypeError, match="names"):
        _run(srv, idx, [3] * len(ROWS), backend)
    with pytest.raises(ValueError, match="unknown adapter"):
        srv.remove("fr")
    with pytest.raises(ValueError, match="already"):
        srv.add("lora", world["paths"]["lora"])
    # an adapter for another base: d_model 12 instead of 8
    other = _base(d_model=12)
    inject(other, lr.LoRAConfig(r=2, alpha=4), targets=("q",), rng=np.random.default_rng(0))
    save_adapter(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError):
        srv.add("other", tmp_path / "other.safetensors")
    # a method that is not served
    ia3 = copy.deepcopy(world["base"])
    inject(ia3, lr.IA3Config(), targets=("q",), rng=np.random.default_rng(0))
    save_adapter(ia3, tmp_path / "ia3.safetensors")
    with pytest.raises(ValueError, match="serves"):
        srv.add("ia3", tmp_path / "ia3.safetensors")
    assert srv.names == list(ADAPTERS)
    np.testing.assert_array_equal(_run(srv, idx, ROWS, backend), before)  # nothing half-changed
    srv.model.train()
    with pytest.raises(StateError, match="eval"):
        _run(srv, idx, ROWS, backend)


def test_a_model_with_adapters_is_refused(world):
    with pytest.raises(ValueError, match="no adapters"):
        lr.serve.MultiLoRA(world["own"]["lora"])
    with pytest.raises(TypeError, match="model"):
        lr.serve.MultiLoRA("model")
    with pytest.raises(ValueError, match="kernel"):
        lr.serve.MultiLoRA(copy.deepcopy(world["base"]), kernel="fast")


def test_adds_a_peft_folder_that_peft_wrote(world, tmp_path):
    """A folder saved by PEFT itself (PeftModel.save_pretrained) serves as our own copy of it does."""
    peft = pytest.importorskip("peft")
    tbase = from_numpy(copy.deepcopy(world["base"])).eval()
    plain = copy.deepcopy(tbase)
    pm = peft.get_peft_model(copy.deepcopy(tbase), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q", "fc"],
                                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft_fr")
    srv = lr.serve.MultiLoRA(tbase)
    srv.add("fr", tmp_path / "peft_fr")
    assert os.path.isdir(tmp_path / "peft_fr")
    idx = torch.as_tensor(world["idx"])
    y = srv.forward(idx, ["fr", None] * 3 + ["fr"])
    with torch.no_grad():
        ref = pm.eval()(idx)
    np.testing.assert_allclose(y[0::2].numpy(), ref[0::2].numpy(), atol=1e-12)
    with torch.no_grad():
        np.testing.assert_allclose(y[1::2].numpy(), plain(idx)[1::2].numpy(), atol=1e-12)
        assert np.abs(ref.numpy() - plain(idx).numpy()).max() > 1e-3  # the adapter matters
