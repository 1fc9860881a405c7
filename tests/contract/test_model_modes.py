"""The contract of the whole-model modes (``full``, ``bitfit``, prompt and prefix tuning: a ``SPEC``
with ``model_fn``), for every one registered, in both backends, each with its ``SPEC.example()``
config where it has one: ``inject`` applies it and reports what trains; three AdamW steps (handed
every parameter) change exactly the tensors it made trainable, and nothing else by a bit; both
backends train the same tensors; the NumPy model's hand-written backward passes the float64
gradcheck for every trainable tensor; NumPy and torch agree on the logits and every trainable
gradient; a mode that is not mergeable (``SPEC.mergeable=False``) refuses ``merge()`` on each
module it added, with the reason, and changes nothing. (Save and load: ``test_save_load.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
from contract_build import (
    IDX,
    MODEL_METHODS,
    gpt_in,
    mode_config,
    model_params,
    model_trainable,
    perturb_trainable,
    to_np,
    torch,
)
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref import registry
from lowrank_ref.gradcheck import gradcheck
from lowrank_ref.inject import inject

BACKENDS = ("numpy", "torch")


def _loss_backward(model):
    """Next-token cross-entropy on IDX, backward into the parameters' gradients."""
    if hasattr(model, "named_parameters"):
        tc = torch()
        logits = model(tc.from_numpy(IDX[:, :-1]))
        tc.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       tc.from_numpy(IDX[:, 1:]).reshape(-1)).backward()
        return
    _, dlogits = model.loss(IDX[:, :-1], IDX[:, 1:])
    model.backward(dlogits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_inject_applies_the_mode_and_reports_what_trains(method, backend):
    if backend == "torch":
        torch()
    model = gpt_in(backend)
    res = inject(model, mode_config(method), method=method)
    trainable = model_trainable(model)
    assert res.method == method and res.replaced == []
    assert trainable, f"{method}: nothing trains"
    params = model_params(model)
    assert res.trainable_params == sum(int(np.prod(tuple(params[n].shape))) for n in trainable)
    # the same config class finds the same mode
    cfg = mode_config(method) or lr.registry.get_method(method).config()
    again = gpt_in(backend)
    assert inject(again, cfg).method == method and model_trainable(again) == trainable


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_both_backends_train_the_same_tensors(method):
    torch()
    sets = {}
    for backend in BACKENDS:
        model = gpt_in(backend)
        inject(model, mode_config(method), method=method)
        sets[backend] = model_trainable(model)
    assert sets["numpy"] == sets["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_only_the_trainable_tensors_change_over_three_adamw_steps(method, backend):
    model = gpt_in(backend)
    inject(model, mode_config(method), method=method)
    trainable = model_trainable(model)
    params = model_params(model)
    before = {n: to_np(p if backend == "torch" else p.data) for n, p in params.items()}
    if backend == "torch":
        opt = torch().optim.AdamW(list(params.values()), lr=0.01)
    else:
        opt = lr.optim.AdamW(params, lr=0.01)  # handed every parameter: the frozen must stay put
    for _ in range(3):
        _loss_backward(model)
        got_grad = {n for n, p in params.items() if p.grad is not None}
        assert got_grad == trainable, f"gradients on {sorted(got_grad ^ trainable)}"
        opt.step()
        opt.zero_grad()
    for n, p in params.items():
        now = to_np(p if backend == "torch" else p.data)
        if n in trainable:
            assert not np.array_equal(now, before[n]), f"{method}: trainable {n} did not change"
        else:
            np.testing.assert_array_equal(now, before[n], err_msg=f"{method}: frozen {n} changed")


def _perturbed_pair(method):
    """The mode in a NumPy and a torch GPT (the same base weights), its trainable tensors moved
    off their init in NumPy and copied into torch by name."""
    np_model = gpt_in("numpy")
    inject(np_model, mode_config(method), method=method, rng=1)
    perturb_trainable(np_model, np.random.default_rng(7), scale=0.3)
    t_model = gpt_in("torch")
    inject(t_model, mode_config(method), method=method, rng=2)
    tc = torch()
    trained = {n: p.data for n, p in np_model.trainable_parameters().items()}
    t_model.load_state_dict({n: tc.from_numpy(v.copy()) for n, v in trained.items()}, strict=False)
    return np_model, t_model, sorted(trained)


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_the_numpy_backward_passes_gradcheck_for_every_trainable_tensor(method):
    model = gpt_in("numpy")
    inject(model, mode_config(method), method=method, rng=1)
    perturb_trainable(model, np.random.default_rng(7), scale=0.3)
    gradcheck(model, IDX).raise_if_failed()


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_numpy_and_torch_agree_on_logits_and_every_trainable_gradient(method):
    np_model, t_model, names = _perturbed_pair(method)
    w = np.random.default_rng(8).standard_normal((*IDX.shape, np_model.config.vocab_size))
    y = np_model.forward(IDX)
    np_model.zero_grad()
    np_model.backward(w)
    tc = torch()
    yt = t_model(tc.from_numpy(IDX))
    (yt * tc.from_numpy(w)).sum().backward()
    assert_close(to_np(yt), y, f"{method} logits")
    tparams = dict(t_model.named_parameters())
    assert names == sorted(n for n, p in tparams.items() if p.requires_grad)
    for n in names:
        assert_close(to_np(tparams[n].grad), np_model.parameters()[n].grad, f"{method} grad {n}")


def _added_modules(model):
    """The modules a mode added: those that declare ``MERGEABLE`` (the GPT's own do not)."""
    mods = model.named_modules()
    return {n: m for n, m in mods if getattr(type(m), "MERGEABLE", None) is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [m for m in MODEL_METHODS if not registry.get_method(m).mergeable])
def test_a_mode_that_is_not_mergeable_refuses_merge_with_the_reason_and_changes_nothing(method, backend):
    model = gpt_in(backend)
    inject(model, mode_config(method), method=method, rng=1)
    added = _added_modules(model)
    assert added, f"{method}: SPEC.mergeable=False but it added no module that says MERGEABLE = False"
    x = IDX if backend == "numpy" else torch().from_numpy(IDX)
    before = to_np(model.forward(x) if backend == "numpy" else model(x))
    state = {n: to_np(p if backend == "torch" else p.data) for n, p in model_params(model).items()}
    for mod in added.values():
        assert type(mod).MERGEABLE is False
        with pytest.raises(ValueError, match="not mergeable") as e:
            mod.merge()
        assert type(mod).NOT_MERGEABLE_WHY and type(mod).NOT_MERGEABLE_WHY in str(e.value)
    after = to_np(model.forward(x) if backend == "numpy" else model(x))
    np.testing.assert_array_equal(after, before)
    for n, p in model_params(model).items():
        np.testing.assert_array_equal(to_np(p if backend == "torch" else p.data), state[n])
