"""HyperLoRA's own math (the contract tests do the lone layer's life cycle at a fixed condition):
ΔW = 0 for every task at init, per-row conditions equal per-condition runs row by row, the
hand-written backward through the heads and the MLP with mixed conditions (gradcheck and torch
autograd), the shared hypernetwork in a model (one copy, summed gradients, saved once), generate
once and merge, and the bad inputs (the same kind of error in both backends)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import HyperLoRALinear
from lowrank_ref.adapters.hyperlora import HyperLoRAConfig, hyper_generate
from lowrank_ref.gradcheck import gradcheck
from lowrank_ref.inject import inject
from lowrank_ref.io import load_adapter, save_adapter
from lowrank_ref.nn.gpt import GPT, GPTConfig

CFG = HyperLoRAConfig(r=2, alpha=4, n_tasks=3, task_dim=3, module_dim=2, layer_dim=2, hidden=4)
GPT_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8)
IDX = np.random.default_rng(5).integers(0, 13, (3, 6))
COND = np.array([2, 0, 2])


def _layer(seed=0, condition=None, cfg=CFG):
    rng = np.random.default_rng(seed)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((5, 6)), rng.standard_normal(5))
    layer = HyperLoRALinear(base, cfg, rng=seed + 1, condition=condition)
    layer.astype(np.float64)
    return layer


def _move(layer_or_model, seed=3):
    """Every trained tensor (the layer's heads and the shared hypernetwork) away from its init."""
    rng = np.random.default_rng(seed)
    for p in layer_or_model.trainable_parameters().values():
        p.data = p.data + 0.5 * rng.standard_normal(p.data.shape)


def _gpt(backend="numpy"):
    model = GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64)
    if backend == "torch":
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, CFG, targets=("q", "v"), rng=np.random.default_rng(1))
    return model


def test_every_task_starts_at_zero_update_with_lora_init():
    layer = _layer()
    A0 = layer.h_A.data.reshape(CFG.r, 6)
    bound = 1 / np.sqrt(6)  # LoRA's Kaiming-uniform A: U(±1/√in)
    assert np.all(np.abs(A0) <= bound) and np.abs(A0).max() > bound / 4
    for c in range(CFG.n_tasks):
        A, B = layer.generate(c)
        np.testing.assert_array_equal(A, A0)  # the heads' weights are zero: A(c) = h_A for every c
        np.testing.assert_array_equal(B, 0)
        np.testing.assert_array_equal(layer.delta_weight(c), 0)
    # and a model at init computes exactly what the base model does, for any condition
    base = GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64).forward(IDX)
    np.testing.assert_array_equal(_gpt().forward(IDX, cond=COND), base)


def test_the_generator_is_the_formula():
    # the hypernetwork written out for one condition, as in the module docstring
    layer = _layer()
    _move(layer)
    sh = layer.lowrank_shared.hyperlora
    for c in range(CFG.n_tasks):
        z = np.concatenate([sh.T.data[c], sh.M_layer.data, layer.e.data])
        p = sh.W1.data @ z + sh.b1.data
        g = p / (1 + np.exp(-p))
        A = (layer.H_A.data @ g + layer.h_A.data).reshape(CFG.r, 6)
        B = (layer.H_B.data @ g + layer.h_B.data).reshape(5, CFG.r)
        got_A, got_B = layer.generate(c)
        assert_close(got_A, A, "A(c)")
        assert_close(got_B, B, "B(c)")
        assert_close(layer.delta_weight(c), CFG.scaling * B @ A, "ΔW(c)")
    assert not np.allclose(layer.delta_weight(0), layer.delta_weight(1))  # the task matters


def test_per_row_conditions_equal_each_condition_alone():
    layer = _layer()
    _move(layer)
    x = np.random.default_rng(4).standard_normal((3, 4, 6))
    layer.condition = COND
    y = layer.forward(x)
    for row, c in enumerate(COND):
        layer.condition = int(c)
        assert_close(y[row], layer.forward(x[row]), f"row {row}")
        W = layer.w0() + layer.delta_weight(int(c))
        assert_close(y[row], x[row] @ W.T + layer.base.bias.data, f"row {row} dense")


def test_gradcheck_with_mixed_conditions_covers_heads_mlp_and_embeddings():
    layer = _layer()
    _move(layer)
    layer.condition = COND  # two distinct conditions, one twice: the per-condition sums
    report = gradcheck(layer, np.random.default_rng(4).standard_normal((3, 2, 6)))
    names = {r.name for r in report.results}
    assert {"H_A", "h_A", "H_B", "h_B", "e", "input", "lowrank_shared.hyperlora.T",
            "lowrank_shared.hyperlora.W1", "lowrank_shared.hyperlora.b1", "lowrank_shared.hyperlora.M_layer"} <= names
    report.raise_if_failed()
    # the row of T for the task that no row carries gets no gradient
    layer.zero_grad()
    layer.forward(np.ones((3, 2, 6)))
    layer.backward(np.ones((3, 2, 5)))
    T_grad = layer.lowrank_shared.hyperlora.T.grad
    assert np.all(T_grad[1] == 0) and np.any(T_grad[0] != 0) and np.any(T_grad[2] != 0)


def test_model_gradients_match_torch_autograd_with_mixed_conditions():
    torch = pytest.importorskip("torch")
    from lowrank_ref.nn.losses import cross_entropy

    m_np, m_t = _gpt(), _gpt("torch")
    _move(m_np)
    t_params = dict(m_t.named_parameters())
    with torch.no_grad():
        for n, p in m_np.trainable_parameters().items():
            t_params[n].copy_(torch.from_numpy(p.data))
    y = np.random.default_rng(6).integers(0, 13, IDX.shape)
    logits = m_np.forward(IDX, cond=COND)
    loss, dlogits = cross_entropy(logits, y)
    m_np.backward(dlogits)
    lt = m_t(torch.from_numpy(IDX), cond=torch.from_numpy(COND))
    assert_close(logits, lt, "logits")
    torch.nn.functional.cross_entropy(lt.reshape(-1, 13), torch.from_numpy(y).reshape(-1)).backward()
    trained = m_np.trainable_parameters()
    assert any(n.startswith("lowrank_shared.hyperlora.") for n in trained)
    assert {n for n, p in m_t.named_parameters() if p.requires_grad} == set(trained)
    for n, p in trained.items():
        assert_close(p.grad, t_params[n].grad, n, rtol=1e-9, atol=1e-12)


def test_one_shared_hypernetwork_per_model_saved_once(tmp_path):
    model = _gpt()
    layers = [m for _, m in model.named_modules() if isinstance(m, HyperLoRALinear)]
    assert len(layers) == 4 and len({id(m.shared.W1) for m in layers}) == 1
    assert {m.module_type for m in layers} == {"q", "v"}
    _move(model)
    path = tmp_path / "h.safetensors"
    save_adapter(model, path)
    from safetensors.numpy import load_file

    keys = list(load_file(path))
    assert sum(k.endswith("W1") for k in keys) == 1
    fresh = _gpt()
    load_adapter(fresh, path)
    np.testing.assert_array_equal(fresh.forward(IDX, cond=COND), model.forward(IDX, cond=COND))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_merge_for_one_condition_and_the_refusals(backend):
    if backend == "torch":
        torch = pytest.importorskip("torch")
    model = _gpt(backend)
    if backend == "numpy":
        _move(model)
        fwd = model.forward
    else:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))

        def fwd(idx, cond=None):
            with torch.no_grad():
                return model(torch.from_numpy(idx), cond=cond).numpy()
    layers = [m for _, m in model.named_modules() if getattr(m, "takes_condition", False)]
    assert len(layers) == 4
    same = np.full(3, 1)
    y1 = fwd(IDX, cond=same)
    with pytest.raises(ValueError, match="out of range"):
        fwd(IDX, cond=np.array([0, 3, 1]))
    with pytest.raises(ValueError, match="needs a condition"):
        fwd(IDX)  # a conditional model without cond
    with pytest.raises(ValueError, match="needs a condition"):
        layers[0].merge()  # the model's forward without cond left none on the layer
    for m in layers:
        m.merge(condition=1)
        assert m.merged and m.merged_condition == 1
    assert_close(fwd(IDX, cond=same), y1, "merged for task 1", rtol=1e-10, atol=1e-10)
    assert_close(fwd(IDX), y1, "merged, no cond", rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="merged for condition 1"):
        fwd(IDX, cond=COND)  # a mixed batch on merged layers
    for m in layers:
        m.unmerge()
    y_mixed = fwd(IDX, cond=COND)
    for row, c in enumerate(COND):
        assert_close(y_mixed[row], fwd(IDX[row : row + 1], cond=np.array([c]))[0], f"row {row}")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bad_conditions_are_the_same_errors_in_both_backends(backend):
    rng = np.random.default_rng(0)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((5, 6)), None)
    layer = lr.adapt(base, CFG, backend=backend, rng=1)
    x = rng.standard_normal((3, 6))
    if backend == "torch":
        import torch

        x = torch.from_numpy(x)
    run = layer.forward if backend == "numpy" else layer
    with pytest.raises(ValueError, match="needs a condition"):
        run(x)
    for bad, kind, msg in ((5, ValueError, "out of range"), (-1, ValueError, "out of range"),
                           (1.0, TypeError, "integer"), (True, TypeError, "integer"),
                           (np.array([0, 1]), ValueError, "one id per batch row"),
                           (np.array([0.0, 1.0, 2.0]), TypeError, "integer")):
        layer.condition = bad
        with pytest.raises(kind, match=msg):
            run(x)
    with pytest.raises(ValueError, match="out of range"):
        lr.adapt(base, CFG, backend=backend, rng=1, condition=3)
    layer.condition = np.array([0, 1, 1])
    with pytest.raises(ValueError, match="mixed batch"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(ValueError, match="dropout"):
        HyperLoRAConfig(dropout=0.1)
    with pytest.raises(ValueError, match="n_tasks"):
        HyperLoRAConfig(n_tasks=0)


def test_training_on_the_multitask_data_separates_the_tasks():
    from lowrank_ref.data import multitask_data
    from lowrank_ref.train import train

    mt = multitask_data(0)
    cfg = GPTConfig(vocab_size=mt.vocab_size, block_size=8, n_layer=1, n_head=2, d_model=8)
    model = GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)
    inject(model, HyperLoRAConfig(r=2, n_tasks=mt.n_tasks, hidden=4), targets=("q",), rng=1)
    T0 = model.lowrank_shared.hyperlora.T.data.copy()
    train(model, mt, 6, lr=1e-2, batch_size=8, rng=2, progress=False)
    layer = next(m for _, m in model.named_modules() if isinstance(m, HyperLoRALinear))
    dW = [layer.delta_weight(c) for c in range(mt.n_tasks)]
    assert np.abs(dW[0]).max() > 0 and not np.allclose(dW[0], dW[1])
    assert not np.array_equal(model.lowrank_shared.hyperlora.T.data, T0)  # the task embeddings learn


def test_generate_takes_distinct_conditions_once():
    layer = _layer()
    _move(layer)
    A, B, cache = hyper_generate(np.array([0, 2]), {n: p.data for n, p in layer._hyper().items()}, 2, 6, 5)
    assert A.shape == (2, 2, 6) and B.shape == (2, 5, 2) and cache.z.shape == (2, CFG.z_dim)


def test_at_init_only_the_B_head_gets_a_gradient():
    # H_A = H_B = 0 gives ḡ = 0 (nothing reaches the trunk or the embeddings), and B = 0 gives Ā = 0
    layer = _layer(condition=1)
    x = np.random.default_rng(4).standard_normal((3, 6))
    layer.forward(x)
    layer.backward(np.random.default_rng(5).standard_normal((3, 5)))
    grads = {n: p.grad for n, p in layer.parameters().items()}
    nonzero = {n for n, g in grads.items() if g is not None and np.any(g != 0)}
    assert nonzero == {"H_B", "h_B"}


def test_training_on_mixed_tasks_agrees_across_backends_in_float64(tmp_path):
    pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_ref.data import multitask_data
    from lowrank_ref.train import train

    mt = multitask_data(0)
    cfg = GPTConfig(vocab_size=mt.vocab_size, block_size=8, n_layer=1, n_head=2, d_model=8)
    m_np = GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)
    m_t = from_numpy(m_np)
    inject(m_np, HyperLoRAConfig(r=2, n_tasks=mt.n_tasks, hidden=4), targets=("q", "v"), rng=1)
    save_adapter(m_np, tmp_path / "a.safetensors")
    load_adapter(m_t, tmp_path / "a.safetensors")  # the same hypernetwork and heads in torch
    kw = dict(steps=4, lr=1e-2, batch_size=6, warmup=1, progress=False, rng=3)
    r_np, r_t = train(m_np, mt, **kw), train(m_t, mt, **kw)
    assert_close(np.array(r_np.losses), np.array(r_t.losses), "losses", rtol=1e-9, atol=1e-12)
    t_params = dict(m_t.named_parameters())
    for n, p in m_np.trainable_parameters().items():
        assert_close(p.data, t_params[n], n, rtol=1e-7, atol=1e-9)


def test_a_default_condition_serves_forwards_without_cond():
    model = GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64)
    inject(model, CFG, targets=("q", "v"), rng=np.random.default_rng(1), condition=1)
    _move(model)
    layers = [m for _, m in model.named_modules() if isinstance(m, HyperLoRALinear)]
    assert {m.default_condition for m in layers} == {1}
    y_default = model.forward(IDX)  # no cond: every layer falls back to task 1
    np.testing.assert_array_equal(y_default, model.forward(IDX, cond=np.full(3, 1)))
    assert not np.allclose(y_default, model.forward(IDX, cond=np.full(3, 0)))  # cond still wins
