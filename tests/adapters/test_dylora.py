"""DyLoRA's own math: at rank b it is the rank-b LoRA of its first b rows/columns with scale α/b
(Hypothesis); gradcheck at a rank below r, with zero gradients beyond it; the "frozen" mode trains
only the b-th rank, in both backends; the rank sampling of the hooks (b ~ U{1..r}, seeded, the
same draws in NumPy and torch, the layer back at its own rank after each step); bad ranks. The
generic life cycle (state errors, cycles, save/load, NumPy ≈ torch at full rank) is the contract's."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank_ref as lr
from lowrank_ref import data
from lowrank_ref.adapters import DyLoRALinear, LoRALinear
from lowrank_ref.adapters.dylora import DyLoRAHooks
from lowrank_ref.gradcheck import gradcheck
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.train import TrainingHooks, train


def make_layer(rng, r=4, out=5, inn=6, **cfg):
    W, b = rng.standard_normal((out, inn)), rng.standard_normal(out)
    layer = DyLoRALinear(lr.nn.Linear.from_arrays(W, b), lr.DyLoRAConfig(r=r, alpha=3.0, **cfg), rng=1)
    layer.A.data = rng.standard_normal(layer.A.shape)
    layer.B.data = rng.standard_normal(layer.B.shape)  # away from B = 0
    return layer, W, b


@settings(max_examples=8, deadline=None)
@given(r=st.integers(1, 5), data_=st.data(), rslora=st.booleans())
def test_at_rank_b_it_is_the_rank_b_lora_of_its_first_b_ranks(r, data_, rslora):
    b = data_.draw(st.integers(1, r))
    rng = np.random.default_rng(r * 10 + b)
    layer, W, b0 = make_layer(rng, r=r, rslora=rslora)
    layer.set_rank(b)
    lora = LoRALinear(lr.nn.Linear.from_arrays(W.copy(), b0.copy()),
                      lr.LoRAConfig(r=b, alpha=3.0, rslora=rslora), rng=0)
    lora.load_adapter_state({"A": layer.A.data[:b], "B": layer.B.data[:, :b]})
    x = rng.standard_normal((3, 6))
    assert_close(layer.forward(x), lora.forward(x), "DyLoRA at rank b vs rank-b LoRA")
    assert layer.scaling == pytest.approx(3.0 / (np.sqrt(b) if rslora else b))  # α/b, not α/r
    assert_close(layer.delta_weight(), lora.delta_weight(), "ΔW")
    # written out: ΔW = (α/b) B[:, :b] A[:b]
    s = 3.0 / (np.sqrt(b) if rslora else b)
    assert_close(layer.delta_weight(), s * sum(np.outer(layer.B.data[:, i], layer.A.data[i]) for i in range(b)), "ΔW sum")


@pytest.mark.parametrize("b", [1, 2, 4])
def test_gradcheck_below_full_rank_and_zero_gradients_beyond_b(b):
    rng = np.random.default_rng(b)
    layer, _, _ = make_layer(rng, r=4)
    layer.set_rank(b)
    report = gradcheck(layer, rng.standard_normal((2, 3, 6)), rng=rng)
    assert report.ok, str(report)  # the ranks beyond b have numerical gradient 0: checked too
    assert np.all(layer.A.grad[b:] == 0) and np.all(layer.B.grad[:, b:] == 0)
    assert np.abs(layer.A.grad[:b]).min(axis=1).all()  # the used ranks do get a gradient


def _grads(layer, x, w):
    layer.zero_grad()
    layer.forward(x)
    layer.backward(w)
    return layer.A.grad.copy(), layer.B.grad.copy()


def test_frozen_mode_trains_only_the_b_th_rank_in_both_backends():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    normal, W, b0 = make_layer(rng, r=4)
    frozen = DyLoRALinear(lr.nn.Linear.from_arrays(W, b0), lr.DyLoRAConfig(r=4, alpha=3.0, frozen=True))
    frozen.load_adapter_state(normal.adapter_state())
    x, w = rng.standard_normal((7, 6)), rng.standard_normal((7, 5))
    for layer in (normal, frozen):
        layer.set_rank(3)
    gA, gB = _grads(normal, x, w)
    fA, fB = _grads(frozen, x, w)
    assert np.all(fA[[0, 1, 3]] == 0) and np.all(fB[:, [0, 1, 3]] == 0)
    assert_close(fA[2], gA[2], "the b-th row of Ā is the true gradient")
    assert_close(fB[:, 2], gB[:, 2], "the b-th column of B̄")
    assert_close(frozen.forward(x), normal.forward(x), "frozen mode changes no output")
    # the torch twin detaches the same ranks
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b0), lr.DyLoRAConfig(r=4, alpha=3.0, frozen=True), backend="torch")
    tl.load_adapter_state(normal.adapter_state())
    tl.set_rank(3)
    (tl(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
    assert_close(tl.A.grad.numpy(), fA, "torch Ā, frozen")
    assert_close(tl.B.grad.numpy(), fB, "torch B̄, frozen")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_rank_outside_1_to_r_is_a_clear_error_and_changes_nothing(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    layer = lr.adapt(lr.nn.Linear.from_arrays(np.ones((3, 4)), None), lr.DyLoRAConfig(r=4), backend=backend)
    layer.set_rank(2)
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match=r"rank must be in 1\.\.r = 1\.\.4"):
            layer.set_rank(bad)
    for bad in (2.0, "2", True, None):
        with pytest.raises(TypeError, match="rank must be an integer"):
            layer.set_rank(bad)
    assert layer.rank == 2
    layer.merge()
    with pytest.raises(ValueError, match="while merged"):
        layer.set_rank(3)
    assert layer.rank == 2


def test_bad_config_values():
    with pytest.raises(TypeError, match="frozen"):
        lr.DyLoRAConfig(frozen=1)
    with pytest.raises(ValueError, match="seed"):
        lr.DyLoRAConfig(seed=-1)


# --- the rank sampling (the training hooks) --------------------------------------------------
def test_the_hooks_draw_b_uniformly_from_1_to_r_from_the_configs_seed():
    rng = np.random.default_rng(0)
    layers = {"a": make_layer(rng, r=4)[0], "b": make_layer(rng, r=2)[0]}
    hooks = DyLoRAHooks(None, layers)
    seen = {"a": [], "b": []}
    for step in range(400):
        hooks.before_step(step)
        for n, layer in layers.items():
            seen[n].append(layer.rank)
        hooks.after_step(step)
        assert layers["a"].rank == 4 and layers["b"].rank == 2  # back at their own rank
    u = np.random.default_rng(0).random(400)  # seed 0: the config's default
    assert seen["a"] == list(1 + np.floor(u * 4).astype(int))  # b = 1 + ⌊u r⌋
    assert sorted(set(seen["a"])) == [1, 2, 3, 4] and sorted(set(seen["b"])) == [1, 2]
    counts = np.bincount(seen["a"])[1:]
    assert counts.min() > 60  # about 100 each: uniform, not stuck


class RankSpy(TrainingHooks):
    """An extra hook: runs after the method's before_step, so it sees the sampled rank."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.ranks = layer, []

    def before_step(self, step):
        self.ranks.append(self.layer.rank)


def tiny_gpt():
    cfg = GPTConfig(vocab_size=data.default_tokenizer().vocab_size, block_size=8, n_layer=1, n_head=2,
                    d_model=8, mlp_ratio=2)
    return GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_training_samples_the_rank_each_step_the_same_in_both_backends(backend):
    model = tiny_gpt()
    if backend == "torch":
        pytest.importorskip("torch")
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, lr.DyLoRAConfig(r=4, alpha=4, seed=3), targets=("q",), rng=0)
    layer = model.blocks[0].attn.q
    spy = RankSpy(layer)
    train(model, data.builtin_task(0).dialect_train, steps=12, lr=1e-3, batch_size=2, progress=False, rng=0,
          hooks=[spy])
    u = np.random.default_rng(3).random(12)
    assert spy.ranks == list(1 + np.floor(u * 4).astype(int))
    assert layer.rank == 4  # evaluation is at the layer's own rank, not the last draw


@pytest.mark.parametrize("frozen", [False, True])
def test_numpy_matches_torch_below_full_rank_float64(frozen):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    layer, W, b0 = make_layer(rng, r=5)
    cfg = lr.DyLoRAConfig(r=5, alpha=3.0, frozen=frozen)
    npl = DyLoRALinear(lr.nn.Linear.from_arrays(W, b0), cfg)
    tl = lr.adapt(lr.nn.Linear.from_arrays(W, b0), cfg, backend="torch")
    npl.load_adapter_state(layer.adapter_state())
    tl.load_adapter_state(layer.adapter_state())
    x, w = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 5))
    for b in (2, 4):
        npl.set_rank(b)
        tl.set_rank(b)
        gA, gB = _grads(npl, x, w)
        tl.zero_grad(set_to_none=True)
        xt = torch.from_numpy(x).requires_grad_(True)
        y = tl(xt)
        (y * torch.from_numpy(w)).sum().backward()
        assert_close(y.detach().numpy(), npl.forward(x), f"y at b={b}")
        npl._cache = None
        assert_close(tl.A.grad.numpy(), gA, f"Ā at b={b}")
        assert_close(tl.B.grad.numpy(), gB, f"B̄ at b={b}")
        assert_close(tl.merged_weight().numpy(), npl.merged_weight(), f"merged W at b={b}")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_to_lora_exports_the_rank_b_lora_with_identical_outputs(backend):
    rng = np.random.default_rng(11)
    layer, W, b0 = make_layer(rng, r=4)
    x = rng.standard_normal((3, 6))
    if backend == "torch":
        torch = pytest.importorskip("torch")
        tl = lr.adapt(lr.nn.Linear.from_arrays(W, b0), layer.config, backend="torch")
        tl.load_adapter_state(layer.adapter_state())
        tl.set_rank(3)
        lora = tl.to_lora()
        with torch.no_grad():
            mine, want = lora(torch.from_numpy(x)).numpy(), tl(torch.from_numpy(x)).numpy()
        with pytest.raises(ValueError, match="rank must be in"):
            tl.to_lora(5)
    else:
        layer.set_rank(3)
        lora = layer.to_lora()
        mine, want = lora.forward(x), layer.forward(x)
        with pytest.raises(ValueError, match="rank must be in"):
            layer.to_lora(0)
    assert lora.r == 3 and lora.scaling == pytest.approx(3.0 / 3)
    assert_close(mine, want, "to_lora() vs DyLoRA at rank 3")
