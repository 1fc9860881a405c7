"""MTL-LoRA's own math: per-row tasks in one batch (each row as its task's dense ``W0 + ΔW_t``),
the backward with mixed tasks (gradcheck, and torch autograd of the formula written per row with a
gather), the mixing softmax and its temperature, ΔW_t = 0 at init, the per-task merge, a GPT with
``cond=``, and the bad inputs (task out of range, no condition, τ ≤ 0) in both backends. The
generic life cycle (cycles, state errors, save/load, NumPy ≈ torch) is the contract tests'."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import MultiTaskLoRALinear
from lowrank_ref.adapters.multitask_lora import (
    mixing_weights,
    multitask_lora_backward,
    multitask_lora_forward,
    task_rows,
)
from lowrank_ref.gradcheck import check_gradients, gradcheck

CFG = lr.MultiTaskLoRAConfig(r=3, alpha=6.0, n_tasks=4, n_up=3, temperature=0.7)


def make_layer(seed=0, cfg=CFG, backend="numpy", out=5, inn=6):
    """A layer away from its init (B ≠ 0, Λ ≠ I): every task's ΔW_t differs."""
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((out, inn)), rng.standard_normal(out)
    layer = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend=backend, rng=seed)
    state = {n: np.asarray(v) + 0.5 * rng.standard_normal(v.shape)
             for n, v in ((n, v.detach().numpy() if hasattr(v, "detach") else v)
                          for n, v in layer.adapter_state().items())}
    layer.load_adapter_state(state)
    return layer, W, b, state


def dense_delta(state, t, cfg=CFG):
    """ΔW_t written out from the paper's formula, independently of the package."""
    e = np.exp(state["w"][t] / cfg.temperature)
    pi = e / e.sum()
    Bt = sum(pi[i] * state["B"][i] for i in range(cfg.n_up))
    return cfg.scaling * Bt @ state["Lambda"][t] @ state["A"]


def test_each_row_is_its_tasks_dense_layer():
    layer, W, b, state = make_layer()
    x = np.random.default_rng(1).standard_normal((4, 3, 6))  # (B, T, in)
    cond = np.array([2, 0, 3, 2])
    layer.condition = cond
    y = layer.forward(x)
    for row, t in enumerate(cond):
        want = x[row] @ (W + dense_delta(state, t)).T + b
        assert_close(y[row], want, f"row {row} (task {t}) vs W0 + ΔW_t")
    # and the per-task updates really differ, so the test above could not pass with one ΔW
    assert np.abs(dense_delta(state, 0) - dense_delta(state, 2)).max() > 1e-2


def test_at_init_every_task_starts_at_the_base():
    base = lr.nn.Linear.from_arrays(np.random.default_rng(0).standard_normal((5, 6)), np.zeros(5))
    layer = MultiTaskLoRALinear(base, CFG, rng=0)
    np.testing.assert_array_equal(layer.B.data, 0)
    np.testing.assert_array_equal(layer.Lambda.data, np.tile(np.eye(3), (4, 1, 1)))
    assert np.all(np.abs(layer.A.data) <= 1 / np.sqrt(6)) and np.all(np.abs(layer.w.data) <= 1 / np.sqrt(3))
    for t in range(CFG.n_tasks):
        np.testing.assert_array_equal(layer.delta_weight(task=t), 0)
    x = np.random.default_rng(2).standard_normal((2, 6))
    layer.condition = np.array([0, 3])
    np.testing.assert_array_equal(layer.forward(x), base.forward(x))


def test_gradcheck_with_mixed_tasks_every_tensor_and_x():
    layer, *_ = make_layer(seed=3)
    layer.condition = np.array([1, 3, 1])  # tasks 0 and 2 absent: their Λ_t, w_t get exact zeros
    x = np.random.default_rng(4).standard_normal((3, 2, 6))
    report = gradcheck(layer, x)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "A", "Lambda", "B", "w"}
    layer.zero_grad()
    layer.forward(x)
    layer.backward(np.ones((3, 2, 5)))
    for t in (0, 2):
        np.testing.assert_array_equal(layer.Lambda.grad[t], 0)
        np.testing.assert_array_equal(layer.w.grad[t], 0)
    assert np.abs(layer.Lambda.grad[1]).max() > 0 and np.abs(layer.w.grad[3]).max() > 0


def test_backward_matches_torch_autograd_of_the_per_row_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    T, n, r, inn, out, N = 3, 2, 2, 4, 3, 7
    p = {"W": rng.standard_normal((out, inn)), "b": rng.standard_normal(out), "A": rng.standard_normal((r, inn)),
         "Lambda": rng.standard_normal((T, r, r)), "B": rng.standard_normal((n, out, r)),
         "w": rng.standard_normal((T, n))}
    cfg = lr.MultiTaskLoRAConfig(r=r, alpha=3.0, n_tasks=T, n_up=n, temperature=0.3)
    x, dy = rng.standard_normal((N, inn)), rng.standard_normal((N, out))
    rows = rng.integers(0, T, N)
    y, cache = multitask_lora_forward(x, p, rows, cfg)
    dx, grads = multitask_lora_backward(dy, cache)
    assert grads["W"] is None and grads["b"] is None  # frozen: no gradient, not a zero
    tp = {k: torch.tensor(v, requires_grad=k not in ("W", "b")) for k, v in p.items()}
    tx = torch.tensor(x, requires_grad=True)
    pi = torch.softmax(tp["w"] / cfg.temperature, dim=1)
    Bt = torch.einsum("ti,ior->tor", pi, tp["B"])
    idx = torch.from_numpy(rows)
    # per row, with a gather: Λ_{t_n} and B_{t_n} for every row n (another order than the package's)
    g = torch.einsum("nqr,nr->nq", tp["Lambda"][idx], tx @ tp["A"].T)
    ty = tx @ tp["W"].T + tp["b"] + cfg.scaling * torch.einsum("nor,nr->no", Bt[idx], g)
    (ty * torch.from_numpy(dy)).sum().backward()
    rtol, atol = TOL["float64"]
    assert_close(y, ty, "y", rtol, atol)
    assert_close(dx, tx.grad, "dx", rtol, atol)
    for k in ("A", "Lambda", "B", "w"):
        assert_close(grads[k], tp[k].grad, f"d{k}", rtol, atol)


def test_mixing_weights_and_the_temperature():
    w = np.array([[0.3, -1.0, 0.2], [2.0, 2.0, -3.0]])
    pi = mixing_weights(w, 1.0)
    assert_close(pi.sum(axis=1), np.ones(2), "rows of π sum to 1")
    assert_close(pi[0], np.exp(w[0]) / np.exp(w[0]).sum(), "softmax")
    cold = mixing_weights(w, 1e-3)  # τ → 0: the arg-max, which the reference's τ = 0 only reaches as NaN
    assert_close(cold[0], np.array([1.0, 0.0, 0.0]), "cold row 0", 0, 1e-12)
    assert_close(cold[1], np.array([0.5, 0.5, 0.0]), "a tie splits", 0, 1e-12)
    assert np.all(np.isfinite(mixing_weights(np.array([[800.0, -800.0]]), 0.01)))  # no overflow
    for bad in (0, 0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            lr.MultiTaskLoRAConfig(temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        lr.MultiTaskLoRAConfig(temperature="0.1")
    # the reference code's default (B_scale = 0.0) is what these guard against: written out, NaN
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.array([[1.0, 0.0]]) / 0.0
        assert np.isnan(np.exp(z - z.max()) / np.exp(z - z.max()).sum()).any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_merge_is_per_task_and_the_merged_layer_serves_that_task_only(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    layer, W, b, state = make_layer(seed=6, backend=backend)
    x = np.random.default_rng(7).standard_normal((3, 6))
    as_x = (lambda a: a) if backend == "numpy" else (lambda a: __import__("torch").from_numpy(a))
    out = (lambda y: y) if backend == "numpy" else (lambda y: y.detach().numpy())
    layer.condition = np.array([2, 2, 2])
    y2 = out(layer.forward(as_x(x)))
    layer.condition = np.array([0, 2, 1])
    with pytest.raises(ValueError, match=r"names tasks \[0, 1, 2\].*pass task=t"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(ValueError, match="task 4 is out of range"):
        layer.merge(task=4)
    assert not layer.merged and layer.merged_task is None
    layer.merge(task=2)
    assert layer.merged and layer.merged_task == 2
    assert_close(np.asarray(out(layer.base.weight.data) if backend == "numpy" else out(layer.base.weight)),
                 W + dense_delta(state, 2), "merged weight = W0 + ΔW_2", 1e-10, 1e-12)
    with pytest.raises(ValueError, match=r"merged for task 2; the batch names tasks \[0, 1\]"):
        layer.forward(as_x(x))
    layer.condition = np.array([2, 2, 2])
    assert_close(out(layer.forward(as_x(x))), y2, "merged for task 2 = unmerged on task 2", 1e-10, 1e-12)
    layer.condition = None  # a merged layer is a plain layer for its task: no condition needed
    assert_close(out(layer.forward(as_x(x))), y2, "merged, no condition", 1e-10, 1e-12)
    layer.unmerge()
    assert layer.merged_task is None
    layer.condition = 2  # one integer: every row
    assert_close(out(layer.forward(as_x(x))), y2, "unmerged again", 0, 0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bad_conditions_are_clear_errors_in_both_backends(backend):
    if backend == "torch":
        torch = pytest.importorskip("torch")
    layer, *_ = make_layer(seed=8, backend=backend)
    x = np.random.default_rng(9).standard_normal((2, 3, 6))
    xin = x if backend == "numpy" else torch.from_numpy(x)
    before = {n: np.array(v.detach().numpy() if hasattr(v, "detach") else v) for n, v in layer.adapter_state().items()}
    cases = [
        (None, ValueError, "needs a condition"),
        (np.array([0, 4]), ValueError, "task id 4 is out of range: this layer has n_tasks=4"),
        (7, ValueError, "task id 7 is out of range"),
        (np.array([0, 1, 2]), ValueError, r"one per batch row \(shape \(2,\)"),
        (np.array([0.0, 1.0]), TypeError, "integer task ids"),
        (np.array([True, False]), TypeError, "integer task ids"),
    ]
    for cond, exc, words in cases:
        layer.condition = cond
        with pytest.raises(exc, match=words):
            layer.forward(xin)
    for n, v in layer.adapter_state().items():  # nothing changed
        np.testing.assert_array_equal(np.asarray(v.detach().numpy() if hasattr(v, "detach") else v), before[n])
    layer.condition = np.array([1, 3])
    layer.forward(xin)  # and the layer still works


def test_task_rows_repeat_each_batch_rows_task_over_its_positions():
    np.testing.assert_array_equal(task_rows(np.array([3, 1]), (2, 3), 4), [3, 3, 3, 1, 1, 1])
    np.testing.assert_array_equal(task_rows(2, (2, 2), 4), [2, 2, 2, 2])
    np.testing.assert_array_equal(task_rows(0, (), 4), [0])


def test_pure_functions_gradcheck_the_mixing_logits_alone():
    """w reaches y only through π = softmax(w/τ): its gradient, checked on its own at a small τ."""
    rng = np.random.default_rng(10)
    cfg = lr.MultiTaskLoRAConfig(r=2, alpha=2.0, n_tasks=2, n_up=4, temperature=0.2)
    p = {"W": rng.standard_normal((3, 4)), "b": None, "A": rng.standard_normal((2, 4)),
         "Lambda": rng.standard_normal((2, 2, 2)), "B": rng.standard_normal((4, 3, 2)), "w": rng.standard_normal((2, 4))}
    x, dy, rows = rng.standard_normal((5, 4)), rng.standard_normal((5, 3)), np.array([0, 1, 1, 0, 1])
    _, cache = multitask_lora_forward(x, p, rows, cfg)
    _, grads = multitask_lora_backward(dy, cache)
    report = check_gradients(lambda: float(np.sum(multitask_lora_forward(x, p, rows, cfg)[0] * dy)),
                             {"w": p["w"]}, {"w": grads["w"]})
    assert report.ok, str(report)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_gpt_with_mtl_lora_reads_the_task_of_each_row_from_cond(backend):
    from lowrank_ref.inject import inject
    from lowrank_ref.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, d_model=8),
                rng=np.random.default_rng(0), dtype=np.float64)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    inject(model, lr.MultiTaskLoRAConfig(r=2, alpha=4.0, n_tasks=3, n_up=2), targets=("q", "v"), rng=0)
    rng = np.random.default_rng(1)
    for _, layer in model.named_modules():
        if getattr(layer, "takes_condition", False):  # the MTL-LoRA layers of either backend
            state = {n: (v.detach().numpy() if hasattr(v, "detach") else v) for n, v in layer.adapter_state().items()}
            layer.load_adapter_state({n: v + rng.standard_normal(v.shape) for n, v in state.items()})
    idx = rng.integers(0, 11, (3, 6))
    run = (lambda i, c: model.forward(i, cond=c)) if backend == "numpy" else \
        (lambda i, c: model(torch.from_numpy(i), cond=c).detach().numpy())
    mixed = run(idx, np.array([2, 0, 1]))
    for row, t in enumerate([2, 0, 1]):
        alone = run(idx[row:row + 1], np.array([t]))
        assert_close(mixed[row], alone[0], f"row {row}: mixed batch vs alone", 1e-10, 1e-12)
    other = run(idx, np.array([0, 0, 0]))
    assert not np.allclose(other[0], mixed[0]), "the task does not change the output"
    with pytest.raises(ValueError, match="needs a condition"):
        run(idx, None)
    with pytest.raises(ValueError, match="out of range"):
        run(idx, np.array([0, 3, 1]))


def test_the_compare_row_trains_on_the_multitask_data():
    from lowrank_ref.data import multitask_data
    from lowrank_ref.experiments.compare import MULTITASK_COLUMNS, VARIANTS, run_compare

    assert VARIANTS["multitask_lora"].task == "multitask"
    mt = multitask_data(0)
    assert VARIANTS["multitask_lora"].config.n_tasks == mt.n_tasks
    (row,) = run_compare("multitask_lora", steps=4, batch_size=4, eval_windows=8, progress=False, verbose=False)
    assert set(MULTITASK_COLUMNS) <= set(row) and set(row["per_task"]) == set(mt.tasks)
    assert 0 < row["retained_after"] < 1  # the base text, read under each task's condition


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_default_condition_serves_a_forward_that_brings_none(backend):
    """What ``lowrank-ref train`` relies on (one data stream is one task: task 0): a layer whose
    ``default_condition`` is set runs without ``cond``, as that task; a given condition wins."""
    if backend == "torch":
        torch = pytest.importorskip("torch")
    layer, *_ = make_layer(seed=11, backend=backend)
    x = np.random.default_rng(12).standard_normal((2, 6))
    xin = x if backend == "numpy" else torch.from_numpy(x)
    out = (lambda y: y) if backend == "numpy" else (lambda y: y.detach().numpy())
    layer.condition = 3
    y3 = out(layer.forward(xin))
    layer.condition = None
    layer.default_condition = 3
    assert_close(out(layer.forward(xin)), y3, "default_condition 3 = condition 3", 0, 0)
    layer.condition = np.array([1, 1])
    assert not np.allclose(out(layer.forward(xin)), y3)
