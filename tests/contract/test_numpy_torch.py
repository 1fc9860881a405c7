"""The contract across backends, for every registered layer method: NumPy ≈ torch in float64 on the
forward, the input gradient, every adapter gradient and the merge (Hypothesis over shapes and
memory layouts, the torch layer given the NumPy layer's tensors by math name); and the same bad
input gives the same kind of error in both."""

from __future__ import annotations

import numpy as np
import pytest
from contract_build import (
    LAYER_METHODS,
    TOL,
    build,
    known_gap,
    to_np,
    torch,
    torch_twin,
    with_layout,
)
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

METHODS = pytest.mark.parametrize("method", LAYER_METHODS)

cases = st.fixed_dictionaries({
    "scale": st.tuples(st.integers(1, 2), st.integers(1, 2)),  # (out, in) multiples of the example's
    "lead": st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    "layout": st.sampled_from(["contiguous", "strided", "transposed"]),
    "seed": st.integers(0, 2**16),
})


@METHODS
@settings(max_examples=6)
@given(c=cases)
def test_numpy_matches_torch_float64(method, c):
    torch()
    case = build(method, "numpy", seed=c["seed"], dtype="float64", scale=c["scale"])
    twin = torch_twin(case)
    rng = np.random.default_rng(c["seed"] + 1)
    x = with_layout(rng.standard_normal(c["lead"] + (case.in_features,)), c["layout"])
    dy = rng.standard_normal(c["lead"] + (case.out_features,))
    y, dx, grads = case.forward_backward(x, dy)
    ty, tdx, tgrads = twin.forward_backward(x, dy)
    rtol, atol = TOL["float64"]
    assert_close(y, ty, f"{method} forward", rtol, atol)
    assert_close(dx, tdx, f"{method} dx", rtol, atol)
    assert sorted(grads) == sorted(tgrads), f"adapter tensors: numpy {sorted(grads)} vs torch {sorted(tgrads)}"
    for n in grads:
        assert_close(grads[n], tgrads[n], f"{method} d{n}", rtol, atol)
    if not case.spec.mergeable:
        return  # no dense view, no merge (the contract checks that both refuse)
    # the dense view and the merge agree too
    assert_close(to_np(case.layer.delta_weight()), to_np(twin.layer.delta_weight()), f"{method} ΔW", rtol, atol)
    case.layer.merge()
    twin.layer.merge()
    assert_close(case.forward(x), twin.forward(x), f"{method} merged forward", rtol, atol)
    case.layer.unmerge()
    twin.layer.unmerge()
    assert_close(case.forward(x), y, f"{method} unmerged again", 0, 0)


# --- the same bad input, the same error ------------------------------------------------------
def _bad(kind, case):
    """(what to call, the expected type, a pattern the message must match) for one bad input."""
    inn, out = case.in_features, case.out_features
    if kind == "x_last_dim":
        return (lambda: _call(case, np.ones((2, inn + 1)))), ValueError, r"\bx\b.*last dimension"
    if kind == "0d":
        return (lambda: _call(case, np.float64(1.0))), ValueError, r"\bx\b"
    if kind == "int":
        return (lambda: _call(case, np.ones((2, inn), dtype=np.int64))), TypeError, r"\bx\b.*floating"
    if kind == "dy":
        # RuntimeError: torch's autograd checks the gradient's shape before any layer code runs;
        # NumPy's ShapeError is a ValueError and a RuntimeError (lowrank_ref.nn.linear.ShapeError)
        return (lambda: _call(case, np.ones((2, inn)), np.ones((2, out + 1)))), RuntimeError, r"\bdy\b|shape"
    raise AssertionError(kind)


def _call(case, x, dy=None):
    """Forward on ``x`` as given (no casting: an integer or 0-d ``x`` reaches the layer as it is),
    then backward with ``dy`` if given."""
    if case.torch_family:
        tc = torch()
        xt = tc.from_numpy(np.asarray(x)) if np.ndim(x) else tc.tensor(float(x), dtype=tc.float64)
        y = case.layer(xt)
        if dy is not None:
            y.backward(tc.from_numpy(dy).to(y.dtype))
        return y
    y = case.layer.forward(x if np.ndim(x) else np.float64(x))
    if dy is not None:
        case.layer.backward(dy.astype(y.dtype))
    return y


@METHODS
@pytest.mark.parametrize("kind", ["x_last_dim", "0d", "int", "dy"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_same_bad_input_gives_the_same_error_in_both_backends(request, method, kind, backend):
    known_gap(request, f"bad_input_{kind}", method, backend)
    if backend == "torch":
        torch()
    case = build(method, backend, dtype="float64")
    call, exc, words = _bad(kind, case)
    with pytest.raises(Exception) as info:  # noqa: B017 (the type is what is checked, below)
        call()
    assert isinstance(info.value, exc), (f"{method} {backend}: {kind} gave {type(info.value).__name__}: "
                                         f"{info.value}; expected {exc.__name__}")
    assert info.match(words)
