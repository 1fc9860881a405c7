"""Tied-LoRA's own math (the contract tests do the lone layer's life cycle and NumPy≈torch): the
gradient into a tied tensor is the sum over its layers, ties per projection type, the grid's
corners (LoRA, VeRA), what trains, ΔW = 0 at init, parameter counts, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import LoRALinear, TiedLoRALinear
from lowrank_ref.adapters.tied_lora import GRID, zero_tensor
from lowrank_ref.gradcheck import gradcheck
from lowrank_ref.inject import inject, set_trainable, shared_modules
from lowrank_ref.io import load_adapter, save_adapter
from lowrank_ref.nn.gpt import GPT, GPTConfig

GPT_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8)
IDX = np.random.default_rng(5).integers(0, 13, (2, 7))
D = GPT_CFG.d_model


def _gpt():
    return GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64)


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, TiedLoRALinear)}


def _move(model, seed=3):
    """Every adapter tensor, trained or frozen, tied or not, away from its init."""
    rng = np.random.default_rng(seed)

    def jitter(a):
        return a + 0.5 * rng.standard_normal(a.shape)

    for layer in _layers(model).values():
        layer.load_adapter_state({n: jitter(v) for n, v in layer.adapter_state().items()})
    for st in shared_modules(model).values():
        st.load_adapter_state({n: jitter(v) for n, v in st.adapter_state().items()})


def test_the_gradient_into_a_tied_tensor_is_the_sum_over_its_layers():
    model = _gpt()
    inject(model, lr.TiedLoRAConfig(r=2), targets=("q", "fc"), rng=1)
    _move(model)
    names = [n for n in model.trainable_parameters()
             if n.startswith("lowrank_shared") or n.startswith("blocks.1.attn.q.")]
    assert "lowrank_shared.tied_lora.A_q" in names and "lowrank_shared.tied_lora.B_fc" in names
    report = gradcheck(model, IDX, params=names, check_input=False)
    assert report.ok, str(report)
    # the same adapters untied (each q layer with its own copy of A_q, B_q): the tied gradient
    # is the sum of the copies' gradients
    st = shared_modules(model)["tied_lora"]
    untied = _gpt()
    inject(untied, lr.TiedLoRAConfig(r=2, tie_A=False, tie_B=False, tie_seed=0), targets=("q", "fc"), rng=1)
    for n, layer in _layers(untied).items():
        kind = n.rsplit(".", 1)[-1]
        tied = _layers(model)[n]
        layer.load_adapter_state({"A": getattr(st, f"A_{kind}").data, "B": getattr(st, f"B_{kind}").data,
                                  "u": tied.array("u"), "v": tied.array("v")})
    w = np.random.default_rng(8).standard_normal(model.forward(IDX).shape)
    for m in (model, untied):
        m.zero_grad()
        assert_close(m.forward(IDX), model.forward(IDX), "same function", *TOL["float64"])
        m.backward(w)
    qs = [layer for n, layer in _layers(untied).items() if n.endswith(".q")]
    assert len(qs) == GPT_CFG.n_layer
    assert_close(st.A_q.grad, sum(layer.A.grad for layer in qs), "Ā_q = Σ_ℓ Ā_ℓ", *TOL["float64"])
    assert_close(st.B_q.grad, sum(layer.B.grad for layer in qs), "B̄_q = Σ_ℓ B̄_ℓ", *TOL["float64"])


def test_tied_per_projection_type_one_object_per_group():
    model = _gpt()
    inject(model, lr.TiedLoRAConfig(r=3), targets=("q", "v", "fc"), rng=1)
    st = shared_modules(model)["tied_lora"]
    assert sorted(st.parameters()) == ["A_fc", "A_q", "A_v", "B_fc", "B_q", "B_v"]
    layers = _layers(model)
    for n, layer in layers.items():
        kind = n.rsplit(".", 1)[-1]
        assert layer.tensor("A") is getattr(st, f"A_{kind}") and layer.tensor("B") is getattr(st, f"B_{kind}")
    # counted once: the tied pairs + u, v per layer
    want = sum(3 * (i + o) for o, i in ((D, D), (D, D), (4 * D, D))) + sum(3 + m.out_features for m in layers.values())
    assert sum(p.size for p in model.trainable_parameters().values()) == want


def test_tying_layers_of_different_shapes_is_a_clear_error():
    model = _gpt()
    before = {n: p.trainable for n, p in model.parameters().items()}
    with pytest.raises(ValueError, match="different shapes.*fc.*out=32, in=8"):
        inject(model, lr.TiedLoRAConfig(r=2, tie="all"), targets=("q", "fc"))
    assert not _layers(model) and not shared_modules(model)  # nothing half-built
    assert {n: p.trainable for n, p in model.parameters().items()} == before
    inject(model, lr.TiedLoRAConfig(r=2, tie="all"), targets=("q", "v"))  # one shape: one pair
    assert sorted(shared_modules(model)["tied_lora"].parameters()) == ["A_all", "B_all"]


@pytest.mark.parametrize("name", list(GRID))
def test_every_grid_point_starts_at_the_base_and_trains_what_it_says(name):
    cfg = GRID[name].replace(r=2)
    model = _gpt()
    base = model.forward(IDX)
    res = inject(model, cfg, targets=("q", "v"), rng=2)
    assert_close(model.forward(IDX), base, f"{cfg.label}: ΔW = 0 at init", 0, 0)
    trained = set(model.trainable_parameters())
    set_trainable(model, "adapters")  # frozen tensors are not parameters: nothing more turns on
    assert set(model.trainable_parameters()) == trained
    for n in "ABuv":
        held = [t for t in trained if t.endswith(f".{n}") or t.endswith(f".{n}_q")]
        assert bool(held) == cfg.trains(n), (cfg.label, n, held)
    assert res.trainable_params == sum(p.size for p in model.trainable_parameters().values())
    # and the zero factor gets a gradient: one step moves the output
    out = model.forward(IDX)
    model.backward(np.ones_like(out))
    z = zero_tensor(cfg)
    grads = [p.grad for t, p in model.trainable_parameters().items() if t.endswith(f".{z}") or t.endswith(f".{z}_q")]
    assert grads and all(g is not None and np.abs(g).max() > 0 for g in grads)


def test_the_lora_corner_is_lora_and_the_vera_corner_trains_r_plus_out():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((5, 6))
    t = TiedLoRALinear(lr.nn.Linear.from_arrays(W), GRID["lora"].replace(r=3), rng=1)
    lo = LoRALinear(lr.nn.Linear.from_arrays(W), lr.LoRAConfig(r=3, alpha=3.0), rng=1)  # s = 1
    A, B = rng.standard_normal((3, 6)), rng.standard_normal((5, 3))
    t.load_adapter_state({"A": A, "B": B, "u": np.ones(3), "v": np.ones(5)})
    lo.load_adapter_state({"A": A, "B": B})
    x = rng.standard_normal((4, 6))
    assert_close(t.forward(x), lo.forward(x), "LoRA corner vs LoRA", *TOL["float64"])
    assert set(t.adapter_parameters()) == {"A", "B"}
    model = _gpt()
    res = inject(model, GRID["vera"].replace(r=4), targets=("q", "v"))
    assert res.trainable_params == 2 * GPT_CFG.n_layer * (4 + D)
    assert shared_modules(model)["tied_lora"].parameters() == {}  # A, B frozen: arrays, not parameters


def test_frozen_random_tensors_are_stored_and_reload_in_another_seed(tmp_path):
    cfg = lr.TiedLoRAConfig(r=2, tie_A=False, train_A=False, tie_B=True, train_B=False)  # A per layer, random, frozen
    model = _gpt()
    inject(model, cfg, targets=("q", "v"), rng=1)
    _move(model)
    want = model.forward(IDX)
    path = save_adapter(model, tmp_path / "t.safetensors")
    fresh = _gpt()
    load_adapter(fresh, path)  # a fresh model draws other untied A's from its rng: the file's win
    assert_close(fresh.forward(IDX), want, "reload", *TOL["float64"])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="nothing would train"):
        lr.TiedLoRAConfig(train_A=False, train_B=False, train_u=False, train_v=False)
    with pytest.raises(ValueError, match="tie must be one of"):
        lr.TiedLoRAConfig(tie="layer")
    with pytest.raises(TypeError, match="train_u"):
        lr.TiedLoRAConfig(train_u=1)
    with pytest.raises(ValueError, match="r must be the same"):
        from lowrank_ref.adapters.tied_lora import build_shared

        build_shared({"a.q": lr.TiedLoRAConfig(r=2), "a.v": lr.TiedLoRAConfig(r=3)}, {"a.q": (4, 4), "a.v": (4, 4)})
    assert lr.TiedLoRAConfig().label == "tie AB, train ABuv"
    assert GRID["lora"].label == "tie none, train AB"
    assert GRID["vera"].label == "tie AB, train uv"


torch = pytest.importorskip("torch")


def test_numpy_and_torch_agree_on_a_model_with_tied_tensors():
    from lowrank_gpu.nn.gpt import from_numpy

    cfg = lr.TiedLoRAConfig(r=2, tie_B=False)
    ours = _gpt()
    inject(ours, cfg, targets=("q", "fc"), rng=1)
    _move(ours)
    theirs = from_numpy(_gpt())
    inject(theirs, cfg, targets=("q", "fc"), rng=1)
    tl = {n: m for n, m in theirs.named_modules() if type(m).__name__ == "TiedLoRALinear"}
    for n, layer in _layers(ours).items():
        tl[n].load_adapter_state(layer.adapter_state())
    shared_modules(theirs)["tied_lora"].load_adapter_state(
        {k: torch.as_tensor(v) for k, v in shared_modules(ours)["tied_lora"].adapter_state().items()})
    w = np.random.default_rng(9).standard_normal(ours.forward(IDX).shape)
    y = ours.forward(IDX)
    ours.backward(w)
    yt = theirs(torch.tensor(IDX))
    (yt * torch.from_numpy(w)).sum().backward()
    assert_close(yt, y, "logits", *TOL["float64"])
    st, stt = shared_modules(ours)["tied_lora"], shared_modules(theirs)["tied_lora"]
    assert_close(stt.A_q.grad, st.A_q.grad, "tied A_q gradient", *TOL["float64"])
    assert_close(tl["blocks.0.attn.q"].B.grad, _layers(ours)["blocks.0.attn.q"].B.grad, "B grad", *TOL["float64"])
