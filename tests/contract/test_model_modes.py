"""The contract of the whole-model modes (``full``, ``bitfit``: a ``SPEC`` with ``model_fn``), for
every one registered, in both backends: ``inject`` applies it and reports what trains; three AdamW
steps (handed every parameter) change exactly the tensors it made trainable, and nothing else by a
bit; both backends train the same tensors. (Save and load: ``test_save_load.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
from contract_build import IDX, MODEL_METHODS, gpt_in, model_params, model_trainable, to_np, torch

import lowrank_ref as lr
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
    res = inject(model, method=method)
    trainable = model_trainable(model)
    assert res.method == method and res.replaced == []
    assert trainable, f"{method}: nothing trains"
    params = model_params(model)
    assert res.trainable_params == sum(int(np.prod(tuple(params[n].shape))) for n in trainable)
    # the same config class finds the same mode
    cfg = lr.registry.get_method(method).config()
    again = gpt_in(backend)
    assert inject(again, cfg).method == method and model_trainable(again) == trainable


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_both_backends_train_the_same_tensors(method):
    torch()
    sets = {}
    for backend in BACKENDS:
        model = gpt_in(backend)
        inject(model, method=method)
        sets[backend] = model_trainable(model)
    assert sets["numpy"] == sets["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_only_the_trainable_tensors_change_over_three_adamw_steps(method, backend):
    model = gpt_in(backend)
    inject(model, method=method)
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
