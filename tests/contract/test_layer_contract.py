"""The method contract, for every registered layer method x backend, from ``SPEC.example()``:
gradients, the dense view, the merge life cycle, state errors, what trains, failed constructors.

A new method gets all of these by declaring a ``SPEC`` (``tests/contract/contract_build.py``
builds its example); known failures are strict xfails listed in ``KNOWN_GAPS`` there."""

from __future__ import annotations

import numpy as np
import pytest
from contract_build import (
    ALL_BACKENDS,
    LAYER_METHODS,
    MERGEABLE_METHODS,
    NUMPY_BACKENDS,
    TOL,
    TORCH_BACKENDS,
    TORCH_FAMILY,
    UNMERGEABLE_METHODS,
    assert_same_bits,
    build,
    known_gap,
    to_np,
    torch,
)
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.gradcheck import gradcheck
from lowrank_ref.nn.module import StateError

METHODS = pytest.mark.parametrize("method", LAYER_METHODS)
MERGEABLE = pytest.mark.parametrize("method", MERGEABLE_METHODS)  # SPEC.mergeable: the merge tests
LEAD = (2, 3)  # x is (2, 3, in): a batch of sequences


def _x(case, seed=7, lead=LEAD):
    return np.random.default_rng(seed).standard_normal(lead + (case.in_features,))


def _dy(case, seed=8, lead=LEAD):
    return np.random.default_rng(seed).standard_normal(lead + (case.out_features,))


def _tol(dtype: str, scale: float = 1.0):
    rtol, atol = TOL[dtype]
    return rtol, atol * scale


# --- the example itself ----------------------------------------------------------------------
@METHODS
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_example_is_away_from_init(method, backend):
    """Every adapter tensor is non-zero and ``ΔW ≠ 0``: the merge tests below cannot pass because
    the update is zero, nor a gradient test because a factor sits at zero."""
    case = build(method, backend)
    state = case.adapter_state()
    assert state, f"{method}: adapter_state() is empty"
    for n, v in state.items():
        assert np.all(v != 0), f"{method}: adapter tensor {n} has zero entries"
    if not case.spec.mergeable:
        assert not np.allclose(case.forward(_x(case)), case.base_forward(_x(case))), f"{method}: a no-op"
        return
    dW = to_np(case.layer.delta_weight())
    assert dW.shape == (case.out_features, case.in_features)
    assert np.max(np.abs(dW)) > 1e-2, f"{method}: ΔW is (nearly) zero"


# --- gradients -------------------------------------------------------------------------------
@METHODS
def test_gradcheck_every_trainable_tensor_and_x(method):
    """float64 central differences, every entry: the hand-written backward of every trainable
    tensor and of the input. The checked tensors are exactly the adapter's."""
    case = build(method, "numpy", dtype="float64")
    report = gradcheck(case.layer, _x(case))
    names = {r.name for r in report.results}
    assert names == set(case.trained_parameters()) | {"input"}, names
    report.raise_if_failed()


# --- the dense view --------------------------------------------------------------------------
@MERGEABLE
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_factorised_forward_equals_the_dense_delta_weight(method, backend):
    """``forward(x) = x (W0 + ΔW)ᵀ + b`` with the dense ``delta_weight()``, and ``merged_weight()``
    is ``W0 + ΔW``. ``W0``/``b`` are the base as the layer computes with it (read from the base's
    own forward, so a quantised base counts as its dequantised weight); a method whose merge also
    changes the bias exposes ``merged_bias()``."""
    case = build(method, backend, dtype="float64")
    x = _x(case)
    W0, b0 = case.base_weight()
    dW = to_np(case.layer.delta_weight())
    b = to_np(case.layer.merged_bias()) if hasattr(case.layer, "merged_bias") else b0
    dense = x @ (W0 + dW).T + b
    assert_close(case.forward(x), dense, f"{method} factorised vs dense", *_tol("float64", 10))
    Wm = to_np(case.layer.merged_weight())
    assert_close(Wm, W0 + dW, f"{method} merged_weight vs W0 + ΔW", *_tol(str(Wm.dtype)))


def _shift_adapter_tensors(case, by: float) -> dict:
    """Add ``by`` to every adapter tensor in place, behind the layer's back (no load, no checks);
    returns the original values for :func:`_restore_adapter_tensors`."""
    saved = {}
    for n, p in case.layer.adapter_parameters().items():
        if case.torch_family:
            saved[n] = p.detach().clone()
            with torch().no_grad():
                p.add_(by)
        else:
            saved[n] = p.data
            p.data = p.data + by
    return saved


def _restore_adapter_tensors(case, saved: dict) -> None:
    for n, p in case.layer.adapter_parameters().items():
        if case.torch_family:
            with torch().no_grad():
                p.copy_(saved[n])
        else:
            p.data = saved[n]


@MERGEABLE
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_merged_equals_unmerged_and_merge_is_explicit(method, backend):
    case = build(method, backend)
    x = _x(case)
    y = case.forward(x)
    assert not np.allclose(y, case.base_forward(x)), "the adapter does not change the output"
    case.layer.eval()
    assert not case.layer.merged  # eval() does not merge
    case.layer.merge()
    assert case.layer.merged
    y_merged = case.forward(x)
    assert_close(y_merged, y, f"{method} merged vs unmerged", *_tol(case.dtype, 10))
    # merged means folded: the forward no longer reads the adapter's tensors
    saved = _shift_adapter_tensors(case, 1.0)
    np.testing.assert_array_equal(case.forward(x), y_merged)
    _restore_adapter_tensors(case, saved)
    case.layer.unmerge()
    assert not case.layer.merged
    np.testing.assert_array_equal(case.forward(x), y)  # unmerged again: the same bits as before


@MERGEABLE
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_1000_merge_unmerge_cycles_restore_the_base_bit_for_bit(method, backend, dtype):
    case = build(method, backend, dtype=dtype)
    before = case.base_state()
    x = _x(case)
    y = case.forward(x)
    for _ in range(1000):
        case.layer.merge()
        case.layer.unmerge()
    assert_same_bits(case.base_state(), before)
    np.testing.assert_array_equal(case.forward(x), y)


@MERGEABLE
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_merging_twice_and_unmerging_an_unmerged_layer_are_errors(method, backend):
    case = build(method, backend)
    x = _x(case)
    y = case.forward(x)
    with pytest.raises(ValueError, match="not merged"):
        case.layer.unmerge()
    assert not case.layer.merged
    case.layer.merge()
    y_merged = case.forward(x)
    with pytest.raises(ValueError, match="already merged"):
        case.layer.merge()
    assert case.layer.merged  # the refused call changed nothing
    np.testing.assert_array_equal(case.forward(x), y_merged)
    case.layer.unmerge()
    np.testing.assert_array_equal(case.forward(x), y)


@pytest.mark.parametrize("method", UNMERGEABLE_METHODS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_non_mergeable_method_refuses_merge_and_stays_unchanged(method, backend):
    """``SPEC.mergeable = False``: ``merge()`` and every dense view (``delta_weight()``,
    ``merged_weight()``, ``merged_bias()``) are a ``ValueError`` that says why; the refused
    calls change nothing (not merged, the same base bits, the same output), and training goes on."""
    case = build(method, backend)
    x = _x(case)
    y, before = case.forward(x), case.base_state()
    for call in ("merge", "delta_weight", "merged_weight", "merged_bias"):
        with pytest.raises(ValueError, match="not mergeable: .+"):
            getattr(case.layer, call)()
    assert not case.layer.merged
    with pytest.raises(ValueError, match="not merged"):
        case.layer.unmerge()
    assert_same_bits(case.base_state(), before)
    np.testing.assert_array_equal(case.forward(x), y)
    _, _, grads = case.forward_backward(x, _dy(case))
    assert all(g is not None for g in grads.values())


# --- state errors ----------------------------------------------------------------------------
@MERGEABLE
@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_backward_while_merged_is_a_state_error(request, method, backend):
    known_gap(request, "backward_while_merged", method, backend)
    case = build(method, backend)
    case.layer.merge()
    case.layer.forward(case.native(_x(case)))
    with pytest.raises(StateError, match="merged"):
        case.layer.backward(case.native(_dy(case)))
    assert all(p.grad is None for p in case.layer.parameters().values())
    case.layer.unmerge()  # and the layer trains again once unmerged
    _, _, grads = case.forward_backward(_x(case), _dy(case))
    assert all(g is not None for g in grads.values())


@MERGEABLE
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_training_a_merged_torch_layer_is_a_state_error(request, method, backend):
    """torch has no ``backward`` of its own: training a merged layer (forward with gradients
    on, in train mode, then backward) is the error, of the same type as NumPy's."""
    known_gap(request, "merged_training", method, backend)
    case = build(method, backend)
    case.layer.train()
    case.layer.merge()
    with pytest.raises(StateError, match="merged"):
        case.layer(case.native(_x(case), requires_grad=True)).sum().backward()
    assert all(p.grad is None for p in case.layer.adapter_parameters().values())


@METHODS
@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_backward_before_forward_is_a_state_error(method, backend):
    case = build(method, backend)
    with pytest.raises(StateError, match="before forward"):
        case.layer.backward(case.native(_dy(case)))
    case.layer.forward(case.native(_x(case)))
    case.layer.backward(case.native(_dy(case)))
    with pytest.raises(StateError, match="before forward"):  # twice for one forward
        case.layer.backward(case.native(_dy(case)))


@METHODS
@pytest.mark.parametrize("bad", ["last_dim", "lead_dims"])
@pytest.mark.parametrize("backend", NUMPY_BACKENDS)
def test_dy_of_the_wrong_shape_is_named_and_leaves_the_cache_usable(request, method, backend, bad):
    known_gap(request, "wrong_shape_dy", method, backend)
    case = build(method, backend)
    x, dy = _x(case), _dy(case)
    _, dx_ref, grads_ref = case.forward_backward(x, dy)
    case.layer.zero_grad()
    wrong = np.ones(LEAD[:-1] + (LEAD[-1], case.out_features + 1)) if bad == "last_dim" \
        else np.ones(LEAD[::-1] + (case.out_features,))
    case.layer.forward(case.native(x))
    with pytest.raises(ValueError, match=rf"dy must have shape \(2, 3, {case.out_features}\)"):
        case.layer.backward(case.native(wrong))
    assert all(p.grad is None for p in case.layer.parameters().values())  # nothing accumulated
    dx = to_np(case.layer.backward(case.native(dy)))  # the cache survived the bad call
    np.testing.assert_array_equal(dx, dx_ref)
    for n, p in case.layer.adapter_parameters().items():
        np.testing.assert_array_equal(to_np(p.grad), grads_ref[n])


# --- what trains -----------------------------------------------------------------------------
@METHODS
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_only_the_adapter_tensors_change_over_three_adamw_steps(method, backend):
    """The optimizer is handed *every* parameter: the frozen ones must stay put, bit for bit."""
    case = build(method, backend)
    layer = case.layer
    trained = case.trained_parameters()
    adapter = set(trained)
    assert case.trainable_names() == adapter
    base0 = case.base_state()
    state0 = {n: to_np(p.data) for n, p in trained.items()}
    assert layer.num_trainable_parameters() == sum(int(np.prod(tuple(p.shape))) for p in trained.values())
    if case.backend in TORCH_FAMILY:
        opt = torch().optim.AdamW(layer.parameters(), lr=0.05)
        params = list(layer.parameters())
    else:
        opt = lr.optim.AdamW(layer.parameters(), lr=0.05)
    for step in range(3):
        x, dy = _x(case, seed=10 + step), _dy(case, seed=20 + step)
        _, _, grads = case.forward_backward(x, dy)
        assert all(g is not None and np.any(g != 0) for g in grads.values()), f"step {step}: a zero gradient"
        if case.backend in TORCH_FAMILY:
            assert all(p.grad is None for p in params if not p.requires_grad)
        else:
            assert all(p.grad is None for n, p in layer.parameters().items() if n not in adapter)
        opt.step()
        opt.zero_grad()
    assert_same_bits(case.base_state(), base0)
    state = {n: to_np(p.data) for n, p in trained.items()}
    for n in adapter:
        assert not np.array_equal(state[n], state0[n]), f"{method}: {n} did not change"


# --- failed construction ---------------------------------------------------------------------
def _native_base(case):
    """A fresh base of ``case``'s shape in the backend's own type (a Linear, a torch.nn.Linear)."""
    base = lr.nn.Linear.from_arrays(case.W.copy(), None if case.b is None else case.b.copy())
    if case.torch_family:
        import lowrank_gpu

        return lowrank_gpu.nn.as_torch_linear(base)
    return base


def _base_flags_and_bits(base, torch_family):
    if torch_family:
        return {n: (p.requires_grad, to_np(p)) for n, p in base.named_parameters()}
    return {n: (p.trainable, p.data, to_np(p.data)) for n, p in base.parameters().items()}


def _sabotaged(config):
    """A config of the example's class whose fields cannot be read: the constructor passes the
    type check, freezes the base, then fails as soon as the method reads a field (a failure late
    in the constructor, for any method, whatever its fields are)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config)}

    class Sabotaged(type(config)):
        def __getattribute__(self, name):
            if name in names:
                raise RuntimeError(f"sabotaged config: reading {name!r}")
            return object.__getattribute__(self, name)

        def __repr__(self):
            return "Sabotaged()"

    return object.__new__(Sabotaged)  # no __init__: nothing is read yet


FAILURES = {
    "unknown_keyword": lambda cls, base, ex: cls(base, ex.config, not_a_keyword=1, **ex.kwargs),
    "wrong_config_type": lambda cls, base, ex: cls(base, "r=4", **ex.kwargs),
    "bad_rng": lambda cls, base, ex: cls(base, ex.config, rng="not a generator", **ex.kwargs),
    "late_failure": lambda cls, base, ex: cls(base, _sabotaged(ex.config), **ex.kwargs),
}


@METHODS
@pytest.mark.parametrize("how", list(FAILURES))
@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b.values[0] in ("numpy", "torch")])
def test_a_failed_construction_leaves_the_base_untouched(method, backend, how):
    case = build(method, backend)
    spec, ex = case.spec, case.spec.example()
    cls = spec.layer_class(backend)
    base = _native_base(case)
    before = _base_flags_and_bits(base, case.torch_family)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        FAILURES[how](cls, base, ex)
    after = _base_flags_and_bits(base, case.torch_family)
    assert sorted(after) == sorted(before)
    for n in before:
        assert after[n][0] == before[n][0], f"{n}: trainable flag changed by a failed constructor"
        np.testing.assert_array_equal(after[n][-1], before[n][-1])
        if not case.torch_family:
            assert after[n][1] is before[n][1], f"{n}: the base's array was replaced"
    # and the base still builds a working layer
    layer = cls(base, ex.config, **ex.kwargs)
    assert layer.in_features == case.in_features


# --- the contract's own bookkeeping ----------------------------------------------------------
def test_every_registered_method_is_covered_and_every_known_gap_is_current():
    """The parametrisation comes from the registry, and no KNOWN_GAPS entry can outlive its
    method or name a test that does not exist (a strict xfail that never runs would rot)."""
    from contract_build import GAP_TESTS, KNOWN_GAPS, MODEL_METHODS

    from lowrank_ref import registry

    assert sorted(LAYER_METHODS + MODEL_METHODS) == sorted(registry.method_names())
    assert LAYER_METHODS, "no layer method registered"
    for test, method, backend in KNOWN_GAPS:
        assert test in GAP_TESTS, f"KNOWN_GAPS names an unknown test {test!r}"
        assert method in LAYER_METHODS, f"KNOWN_GAPS names {method!r}, not a registered layer method"
        assert backend in ("numpy", "torch", "cuda", "cupy"), backend


def test_spec_mergeable_must_agree_with_the_layer_class():
    """``SPEC.mergeable`` and the layer class's ``MERGEABLE`` say one thing: discovery refuses a
    SPEC that contradicts its class, and a non-bool flag."""
    import dataclasses

    from lowrank_ref import registry

    spec = registry.get_method(MERGEABLE_METHODS[0])
    with pytest.raises(registry.SpecError, match="contradicts"):
        registry.check_spec(dataclasses.replace(spec, mergeable=False))
    with pytest.raises(registry.SpecError, match="mergeable of .* must be a bool"):
        registry.check_spec(dataclasses.replace(spec, mergeable="no"))
    for name in UNMERGEABLE_METHODS:
        with pytest.raises(registry.SpecError, match="contradicts"):
            registry.check_spec(dataclasses.replace(registry.get_method(name), mergeable=True))
