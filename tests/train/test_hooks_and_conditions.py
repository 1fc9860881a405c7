"""The method contract's training hooks (SPEC.hooks) and the per-row condition through GPT.forward."""

from __future__ import annotations

import dataclasses

import hook_helpers
import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref import data, registry
from lowrank_ref.gradcheck import check_gradients
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.train import TrainingHooks, train, training_hooks


def tiny_gpt(dtype=np.float64, seed=0):
    cfg = GPTConfig(vocab_size=data.default_tokenizer().vocab_size, block_size=8, n_layer=2, n_head=2,
                    d_model=8, mlp_ratio=2)
    return GPT(cfg, rng=np.random.default_rng(seed), dtype=dtype)


@pytest.fixture(scope="module")
def tokens():
    return data.builtin_task(0).dialect_train


@pytest.fixture
def lora_with_hooks(monkeypatch):
    """The registry's "lora" SPEC with hooks declared, as a method with an allocator would."""
    spec = registry.get_method("lora")
    hooked = dataclasses.replace(spec, hooks=registry.PerBackend("hook_helpers:CountingHooks",
                                                                 "hook_helpers:TorchCountingHooks"))
    monkeypatch.setitem(registry._METHODS, "lora", hooked)
    monkeypatch.setitem(registry._BY_CONFIG, lr.LoRAConfig, hooked)
    hook_helpers.CALLS.clear()
    yield
    hook_helpers.CALLS.clear()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_methods_hooks_are_built_once_per_model_and_called_every_step(lora_with_hooks, tokens, backend):
    model = tiny_gpt()
    if backend == "torch":
        pytest.importorskip("torch")
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, lr.LoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=0)
    train(model, tokens, steps=3, lr=1e-3, batch_size=2, progress=False, rng=0)
    layers = ("blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v")
    calls = hook_helpers.CALLS
    assert [c for c in calls if c[1] == "init"] == [(backend, "init", -1, layers)]  # one object, all layers
    steps = [(c[1], c[2]) for c in calls if c[1] != "init"]
    assert steps == [(w, s) for s in range(3) for w in ("before_step", "after_step")]


def test_no_hooks_for_a_method_that_declares_none(tokens):
    model = tiny_gpt()
    inject(model, lr.LoRAConfig(r=2, alpha=4), targets="q", rng=0)
    assert training_hooks(model) == []


def test_extra_hooks_must_have_a_hook_method():
    with pytest.raises(TypeError, match="before_step, loss_terms or after_step"):
        training_hooks(tiny_gpt(), extra=[object()])


def test_the_hooks_loss_gradient_is_the_derivative_of_its_value():
    """Central differences of the value ``loss_terms`` returns, against the gradient it adds."""
    model = tiny_gpt()
    inject(model, lr.LoRAConfig(r=2, alpha=4), targets="q", rng=0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lr.adapters.LoRALinear)}
    for m in layers.values():
        m.B.data = np.random.default_rng(3).standard_normal(m.B.shape)
    hook = hook_helpers.L2Hooks(model, layers, lam=0.7)
    B = next(iter(layers.values())).B

    def f():
        for m in layers.values():
            m.B.grad = None
        return hook.loss_terms(0)

    f()
    analytic = B.grad.copy()
    res = check_gradients(f, {"B": B.data}, {"B": analytic})
    assert res.ok, res


def test_numpy_and_torch_loops_apply_loss_terms_alike(tokens):
    """The same regulariser through both loops: NumPy with its hand-derived gradient, torch with
    autograd; after three AdamW steps the adapters agree in float64 (and differ from no hook)."""
    pytest.importorskip("torch")
    from lowrank_gpu.inject import adapter_layers as t_layers
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_ref.inject import adapter_layers

    def build():
        np_model = tiny_gpt(seed=5)
        t_model = from_numpy(np_model)
        inject(np_model, lr.LoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=1)
        inject(t_model, lr.LoRAConfig(r=2, alpha=4), targets=("q", "v"), rng=1)
        import torch

        for (n, a), (_, b) in zip(adapter_layers(np_model).items(), t_layers(t_model).items()):
            a.B.data = np.random.default_rng(len(n)).normal(0, 0.3, a.B.shape)
            with torch.no_grad():
                b.A.copy_(torch.from_numpy(a.A.data))
                b.B.copy_(torch.from_numpy(a.B.data))
        return np_model, t_model

    kw = dict(steps=3, lr=1e-2, batch_size=2, progress=False, rng=4)
    np_model, t_model = build()
    r_np = train(np_model, tokens, hooks=[hook_helpers.L2Hooks(np_model, adapter_layers(np_model))], **kw)
    r_t = train(t_model, tokens, hooks=[hook_helpers.TorchL2Hooks(t_model, t_layers(t_model))], **kw)
    assert_close(np.array(r_np.losses), np.array(r_t.losses), "losses with the hook", rtol=1e-10, atol=1e-12)
    t_params = dict(t_model.named_parameters())
    for n, p in np_model.trainable_parameters().items():
        assert_close(p.data, t_params[n], n, rtol=1e-8, atol=1e-10)
    plain, _ = build()
    r_plain = train(plain, tokens, **kw)
    assert r_np.losses[0] > r_plain.losses[0] + 1e-3  # the term is in the reported loss
    assert not np.allclose(plain.parameters()["blocks.0.attn.q.B"].data,
                           np_model.parameters()["blocks.0.attn.q.B"].data)


def test_default_hooks_do_nothing():
    h = TrainingHooks()
    assert h.loss_terms(0) == 0.0 and h.before_step(0) is None and h.after_step(0) is None


# --- conditions ------------------------------------------------------------------------------
def _conditional_gpt(n_tasks=3):
    model = tiny_gpt()
    bias = hook_helpers.TaskBias(model.config.d_model, n_tasks, np.random.default_rng(2))
    model.blocks[0].attn_taskbias = bias  # a child module, so parameters() lists β
    original = model.blocks[0].forward
    original_bwd = model.blocks[0].backward

    def fwd(x, block=model.blocks[0]):
        return original(block.attn_taskbias.forward(x))

    def bwd(dy, block=model.blocks[0]):
        return block.attn_taskbias.backward(original_bwd(dy))

    model.blocks[0].forward, model.blocks[0].backward = fwd, bwd
    return model, bias


def test_gpt_forward_hands_each_row_its_condition():
    model, bias = _conditional_gpt()
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 5))
    same = model.forward(idx, cond=[1, 1, 1])
    mixed = model.forward(idx, cond=[1, 2, 1])
    np.testing.assert_array_equal(same[[0, 2]], mixed[[0, 2]])  # rows with condition 1 unchanged
    assert not np.allclose(same[1], mixed[1])
    assert bias.condition.tolist() == [1, 2, 1]


def test_the_condition_reaches_the_backward_pass():
    model, bias = _conditional_gpt()
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 5))
    tgt = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 5))
    cond = np.array([0, 2, 0])

    model.zero_grad()
    _, dlogits = model.loss(idx, tgt, cond=cond)
    model.backward(dlogits)
    assert np.all(bias.beta.grad[1] == 0)  # task 1 is in no row
    res = check_gradients(lambda: model.loss(idx, tgt, cond=cond)[0], {"beta": bias.beta.data},
                          {"beta": bias.beta.grad.copy()})
    assert res.ok, res


@pytest.mark.parametrize("cond, err, match", [
    ([0.5, 1.0, 2.0], TypeError, "cond must hold integers"),
    ([True, False, True], TypeError, "cond must hold integers"),
    ([0, 1], ValueError, r"cond must have shape \(3,\)"),
    ([[0, 1, 2]], ValueError, r"cond must have shape \(3,\)"),
    ([0, -1, 2], ValueError, "non-negative"),
])
def test_bad_conditions(cond, err, match):
    model, _ = _conditional_gpt()
    idx = np.zeros((3, 4), dtype=np.int64)
    with pytest.raises(err, match=match):
        model.forward(idx, cond=cond)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_condition_no_layer_takes_is_an_error(backend):
    model = tiny_gpt()
    idx = np.zeros((2, 4), dtype=np.int64)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from lowrank_gpu.nn.gpt import from_numpy

        model, idx = from_numpy(model), torch.from_numpy(idx)
    with pytest.raises(ValueError, match="no layer of the model takes a condition"):
        model.forward(idx, cond=[0, 1])
    model.forward(idx)  # no condition: as before


def test_torch_gpt_checks_conditions_like_numpy():
    torch = pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy

    model = from_numpy(tiny_gpt())
    idx = torch.zeros((3, 4), dtype=torch.long)
    with pytest.raises(TypeError, match="cond must hold integers"):
        model(idx, cond=torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cond must have shape \(3,\)"):
        model(idx, cond=torch.tensor([0, 1]))
