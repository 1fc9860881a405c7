"""AdaLoRA's own math: the layer's backward and the regulariser's gradient (gradcheck, torch
autograd), the budget schedule by hand, the rank allocator step for step against PEFT's own
``RankAllocator``, PEFT folders in both directions and both backends (a layer pruned to rank 0
included), the training hooks (the loop cannot forget them; a manual loop that never runs the
allocator is warned at save), and the bad inputs. The generic life cycle is the contract tests'."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.adapters.adalora import (
    AdaLoRAConfig,
    AdaLoRALinear,
    AllocatorNotRunWarning,
    RankAllocator,
    adalora_backward,
    adalora_forward,
    budget_schedule,
    orth_reg,
)
from lowrank_ref.gradcheck import check_gradients, gradcheck
from lowrank_ref.inject import inject
from lowrank_ref.nn.gpt import GPT, GPTConfig


def make_layer(rng, out=5, inn=4, r=3, bias=True):
    W = rng.standard_normal((out, inn))
    b = rng.standard_normal(out) if bias else None
    layer = AdaLoRALinear(lr.nn.Linear.from_arrays(W, b), AdaLoRAConfig(init_r=r, target_r=1, alpha=5.0,
                                                                         total_step=10), rng=rng)
    layer.E.data = rng.standard_normal(r)  # away from E = 0, so every gradient is non-trivial
    return layer, W, b


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_P_E_Q_and_x_float64(bias):
    rng = np.random.default_rng(1)
    layer, _, _ = make_layer(rng, bias=bias)
    report = gradcheck(layer, rng.standard_normal((2, 3, 4)), rng=rng)
    assert report.ok, str(report)
    assert {r.name for r in report.results} == {"input", "P", "E", "Q"}


def test_pure_functions_match_the_dense_formula():
    rng = np.random.default_rng(2)
    W, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    P, E, Q = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal((4, 5))
    cfg = AdaLoRAConfig(init_r=4, target_r=2, alpha=6.0, total_step=10)
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((6, 3))
    params = {"W": W, "b": b, "P": P, "E": E, "Q": Q}
    y, cache = adalora_forward(x, params, cfg)
    assert_close(y, x @ (W + 1.5 * P @ np.diag(E) @ Q).T + b, "y vs x (W0 + (α/r0) P diag(E) Q)ᵀ + b")
    dx, grads = adalora_backward(w, cache)
    assert grads["W"] is None and grads["b"] is None
    report = check_gradients(lambda: float(np.sum(adalora_forward(x, params, cfg)[0] * w)),
                             {"x": x, "P": P, "E": E, "Q": Q}, {"x": dx, **{n: grads[n] for n in "PEQ"}})
    assert report.ok, str(report)


def test_init_is_the_base_and_the_scale_stays_alpha_over_init_r():
    rng = np.random.default_rng(3)
    base = lr.nn.Linear.from_arrays(rng.standard_normal((6, 8)), rng.standard_normal(6))
    layer = AdaLoRALinear(base, AdaLoRAConfig(init_r=4, target_r=2, alpha=8, total_step=10, r=2), rng=0)
    assert np.all(layer.E.data == 0) and layer.scaling == 2.0  # α / init_r, not α / r
    assert layer.P.shape == (6, 2) and layer.Q.shape == (2, 8)
    assert 0.01 < np.std(np.r_[layer.P.data.ravel(), layer.Q.data.ravel()]) < 0.03  # N(0, 0.02²)
    x = rng.standard_normal((3, 8))
    assert_close(layer.forward(x), base.forward(x), "AdaLoRA at init vs its base")


@pytest.mark.parametrize("squared", [False, True])
def test_orth_reg_gradient(squared):
    rng = np.random.default_rng(4)
    P, Q = rng.standard_normal((6, 3)), rng.standard_normal((3, 5))
    R, dP, dQ = orth_reg(P, Q, squared)
    I3 = np.eye(3)
    fro = np.linalg.norm
    want = fro(Q @ Q.T - I3) ** (2 if squared else 1) + fro(P.T @ P - I3) ** (2 if squared else 1)
    assert abs(R - want) < 1e-12
    report = check_gradients(lambda: orth_reg(P, Q, squared)[0], {"P": P, "Q": Q}, {"P": dP, "Q": dQ})
    assert report.ok, str(report)
    torch = pytest.importorskip("torch")
    from lowrank_gpu.adapters.adalora import orth_reg as torch_orth_reg

    tP, tQ = torch.tensor(P, requires_grad=True), torch.tensor(Q, requires_grad=True)
    tR = torch_orth_reg(tP, tQ, squared)
    tR.backward()
    assert_close(float(tR.detach()), R, "torch R")
    assert_close(tP.grad, dP, "P̄ vs autograd")
    assert_close(tQ.grad, dQ, "Q̄ vs autograd")


def test_budget_schedule_by_hand():
    cfg = AdaLoRAConfig(init_r=6, target_r=4, tinit=2, tfinal=3, deltaT=2, total_step=15)
    # b0 = 24, bT = 16 (4 layers); the decrease runs over steps 3..12 (span 15 − 3 − 2 = 10)
    assert budget_schedule(0, 24, 16, cfg) == (24, False)
    assert budget_schedule(2, 24, 16, cfg) == (24, False)  # warm-up includes step tinit
    assert budget_schedule(4, 24, 16, cfg) == (20, True)  # 8 · 0.8³ + 16 = 20.096
    assert budget_schedule(5, 24, 16, cfg) == (18, False)  # 8 · 0.7³ + 16 = 18.744; 5 % 2 ≠ 0
    assert budget_schedule(12, 24, 16, cfg) == (16, True)  # step T − tfinal: the target
    assert budget_schedule(13, 24, 16, cfg) == (16, True)  # final phase: the target, masking


# --- PEFT's own RankAllocator as the oracle ------------------------------------------------------
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="peft is not installed (an oracle only; the dev extra has it)")
from lowrank_gpu.adapters.adalora import RankAllocator as TorchRankAllocator  # noqa: E402
from lowrank_gpu.inject import adapter_layers as torch_adapter_layers  # noqa: E402
from lowrank_gpu.nn.gpt import from_numpy  # noqa: E402
from lowrank_ref.io import load_peft, save_peft  # noqa: E402

GPT_CFG = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=8)
IDX = np.random.default_rng(5).integers(0, 13, (2, 7))
LAYERS = ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]


def _np_gpt():
    return GPT(GPT_CFG, rng=np.random.default_rng(0), dtype=np.float64)


def _layers(model):
    return torch_adapter_layers(model) if isinstance(model, torch.nn.Module) else lr.inject.adapter_layers(model)


def _peft_model(**kw):
    cfg = peft.AdaLoraConfig(target_modules=["q", "v"], lora_alpha=6, lora_dropout=0.0, **kw)
    return peft.get_peft_model(from_numpy(_np_gpt()), cfg)


def _peft_params(pm, layer, name):  # name: lora_A / lora_B / lora_E
    mod = pm.base_model.model.get_submodule(layer)
    return getattr(mod, name)["default"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_allocator_matches_peft_step_for_step(backend):
    kw = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=14, beta1=0.8, beta2=0.7)
    pm = _peft_model(**kw)
    ours = _np_gpt() if backend == "numpy" else from_numpy(_np_gpt())
    inject(ours, AdaLoRAConfig(alpha=6, **kw), targets=("q", "v"), rng=0)
    layers = _layers(ours)
    alloc = RankAllocator(ours) if backend == "numpy" else TorchRankAllocator(ours)
    rng = np.random.default_rng(11)
    names = {"lora_A": "Q", "lora_B": "P", "lora_E": "E"}
    masked_steps = 0
    for step in range(15):
        # the same values and gradients in both (an optimizer step's worth of change each time)
        for lname in LAYERS:
            for pname, mine in names.items():
                tp = _peft_params(pm, lname, pname)
                val = rng.standard_normal(tuple(tp.shape)) * (0.1 if pname != "lora_E" else 1.0)
                if pname == "lora_E" and step > 0:  # keep the masked zeros, as training would move them only a bit
                    val = np.where(tp.detach().numpy() == 0, 1e-3 * val, val)
                grad = rng.standard_normal(tuple(tp.shape))
                with torch.no_grad():
                    tp.copy_(torch.from_numpy(val))
                tp.grad = torch.from_numpy(grad.copy())
                p = getattr(layers[lname], mine)
                v, g = val.reshape(p.shape), grad.reshape(p.shape)
                if backend == "numpy":
                    p.data, p.grad = v.copy(), g.copy()
                else:
                    with torch.no_grad():
                        p.copy_(torch.from_numpy(v))
                    p.grad = torch.from_numpy(g.copy())
        want_budget, want_mask = pm.base_model.rankallocator.budget_schedule(step)
        pm.base_model.update_and_allocate(step)
        budget, _ = alloc.update_and_mask(step)
        assert (budget, alloc.history[-1][2]) == (want_budget, want_mask or step == 11), step
        for lname in LAYERS:
            theirs = _peft_params(pm, lname, "lora_E").detach().numpy().reshape(-1)
            mine = np.asarray(layers[lname].E.detach() if backend == "torch" else layers[lname].E.data)
            assert np.array_equal(theirs == 0, mine == 0), (step, lname, theirs, mine)
            assert_close(mine, theirs, f"E of {lname} at step {step}")
        if step >= 4 and step % 2 == 0:
            masked_steps += 1
            pattern = pm.peft_config["default"].rank_pattern
            for lname in LAYERS:
                assert layers[lname].keep.tolist() == pattern[f"{lname}.lora_E.default"], (step, lname)
    assert masked_steps >= 4
    assert sum(alloc.ranks().values()) <= 8 and alloc.history[-1][1] == 8


PATTERN = {"blocks.0.attn.q": [True, False, True, True], "blocks.0.attn.v": [False, False, False, False],
           "blocks.1.attn.q": [True, True, True, True], "blocks.1.attn.v": [False, True, False, False]}


def _pruned_peft_folder(tmp_path):
    pm = _peft_model(init_r=4, target_r=2, total_step=10)
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(p.shape)) * rng.choice([-1, 1], tuple(p.shape))))
        for lname, keep in PATTERN.items():  # what the allocator leaves behind: E = 0 where pruned
            _peft_params(pm, lname, "lora_E")[~torch.tensor(keep)] = 0
    pm.peft_config["default"].rank_pattern = {f"{k}.lora_E.default": v for k, v in PATTERN.items()}
    out = pm.eval()(torch.tensor(IDX)).detach().numpy()
    pm.save_pretrained(str(tmp_path / "peft"))
    return out, tmp_path / "peft"


def _forward(model):
    if isinstance(model, torch.nn.Module):
        return model(torch.tensor(IDX)).detach().numpy()
    return model.forward(IDX)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_peft_folder_with_a_rank_0_layer_both_directions(tmp_path, backend):
    want, folder = _pruned_peft_folder(tmp_path)
    ours = _np_gpt() if backend == "numpy" else from_numpy(_np_gpt())
    info = load_peft(ours, folder)
    assert {p: c.rank for p, c in info["configs"].items()} == {k: sum(v) for k, v in PATTERN.items()}
    # PEFT divides by init_r + 1e-5, this package by init_r: a 2.5e-6 relative difference in ΔW
    assert_close(_forward(ours), want, f"{backend}: load_peft(PEFT folder) vs PEFT", 1e-5, 1e-6)
    out = save_peft(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(from_numpy(_np_gpt()), str(out)).eval()
    assert_close(loaded(torch.tensor(IDX)).detach().numpy(), want, f"{backend}: save_peft -> PEFT", 1e-5, 1e-6)
    # our own adapter file keeps the pattern too, rank 0 included
    path = lr.io.save_adapter(ours, tmp_path / "a.safetensors")
    again = _np_gpt() if backend == "torch" else from_numpy(_np_gpt())
    lr.io.load_adapter(again, path)
    assert_close(_forward(again), _forward(ours), "save_adapter -> load_adapter (other backend)")


def test_a_rank_pattern_that_does_not_fit_is_refused(tmp_path):
    import json

    _, folder = _pruned_peft_folder(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"]["blocks.0.attn.q.lora_E"] = [True, True]  # 2 entries, init_r is 4
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank_pattern"):
        load_peft(_np_gpt(), folder)
    cfg["rank_pattern"]["blocks.0.attn.q.lora_E"] = [True, True, True, True]  # 4 live, the tensors hold 3
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    model = _np_gpt()
    with pytest.raises(ValueError):
        load_peft(model, folder)
    assert not lr.inject.adapter_layers(model)  # nothing half-changed


# --- the hooks: the loop runs them; a manual loop is told --------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_train_runs_the_allocator_and_the_regulariser(backend):
    from lowrank_ref.train import train

    model = _np_gpt() if backend == "numpy" else from_numpy(_np_gpt())
    cfg = AdaLoRAConfig(init_r=4, target_r=2, alpha=8, tinit=1, tfinal=2, total_step=8)
    inject(model, cfg, targets=("q", "v"), rng=0)
    data = np.random.default_rng(0).integers(0, 13, 400)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AllocatorNotRunWarning)
        train(model, data, 8, lr=1e-2, batch_size=4, rng=0, progress=False)
        lr.io.save_adapter(model, _tmp_file())  # no AllocatorNotRunWarning: the loop ran it
    layers = _layers(model)
    ranks = [lay.config.rank for lay in layers.values()]
    assert sum(ranks) <= 2 * len(ranks) < 4 * len(ranks)  # pruned to the target budget
    # the loop's total_step is the config's: a longer run is refused when it passes it
    with pytest.raises(ValueError, match="total_step"):
        train(model, data, 10, lr=1e-2, batch_size=4, rng=0, progress=False)


def _tmp_file():
    import tempfile

    return tempfile.mkdtemp() + "/a.safetensors"


def test_a_manual_loop_without_the_allocator_is_warned_at_save():
    rng = np.random.default_rng(8)
    layer, _, _ = make_layer(rng)
    layer.forward(rng.standard_normal((2, 4)))
    layer.backward(rng.standard_normal((2, 5)))
    with pytest.warns(AllocatorNotRunWarning, match="allocator never ran"):
        lr.io.save_adapter(layer, _tmp_file())
    fresh, _, _ = make_layer(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AllocatorNotRunWarning)
        lr.io.save_adapter(fresh, _tmp_file())  # untrained: nothing to warn about


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(init_r=4, target_r=5), "target_r"),
    (dict(tinit=5, tfinal=5, total_step=10), "budgeting phase"),
    (dict(total_step=None), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=-3), "total_step"),
    (dict(deltaT=0), "deltaT"),
    (dict(beta1=0.0), "beta1"),
    (dict(beta2=1.0), "beta2"),
    (dict(beta1=1.5), "beta1"),
    (dict(orth_reg_weight=-1), "orth_reg_weight"),
    (dict(init_r=4, target_r=2, r=5), "r=5"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**kw)


def test_update_and_mask_past_total_step_is_refused_unchanged():
    rng = np.random.default_rng(9)
    layer, _, _ = make_layer(rng)
    alloc = RankAllocator({"l": layer})
    E = layer.E.data.copy()
    with pytest.raises(ValueError, match="total_step"):
        alloc.update_and_mask(11)
    with pytest.raises(TypeError, match="step"):
        alloc.update_and_mask(1.5)
    assert np.array_equal(layer.E.data, E) and not alloc.history
