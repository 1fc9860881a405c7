"""Hypothesis strategies and the NumPy-vs-torch comparison shared by the nn tests."""

from __future__ import annotations

import numpy as np
import torch
from helpers import assert_close
from hypothesis import strategies as st

from lowrank_ref.gradcheck import perturb  # noqa: F401  (shared with the notebooks; lives in the package)

LAYOUTS = ("contiguous", "strided", "transposed")


@st.composite
def arrays(draw, shape, layout=None, scale=1.0):
    """A float64 array of ``shape`` whose memory layout is drawn: contiguous, a strided slice of a
    larger array, or the transpose of an array stored the other way round (not C-contiguous)."""
    layout = draw(st.sampled_from(LAYOUTS)) if layout is None else layout
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    if layout == "strided":
        big = rng.standard_normal(shape[:-1] + (2 * shape[-1],)) * scale
        a = big[..., ::2]
    elif layout == "transposed" and len(shape) >= 2:
        a = np.swapaxes(rng.standard_normal(shape[:-2] + (shape[-1], shape[-2])) * scale, -1, -2)
    else:
        a = rng.standard_normal(shape) * scale
    assert a.shape == shape
    return a




def copy_to_torch(np_module, t_module):
    """Copy parameters by name (names must match exactly), as float64."""
    t_module = t_module.double()  # first, so the copy keeps every float64 bit
    tp = dict(t_module.named_parameters())
    npp = np_module.parameters()
    assert set(tp) == set(npp), f"names differ: {sorted(set(tp) ^ set(npp))}"
    with torch.no_grad():
        for n, p in npp.items():
            tp[n].copy_(torch.from_numpy(np.ascontiguousarray(p.data)))
    return t_module


def compare_with_torch(np_module, t_module, x, dy, what="", input_grad=True):
    """Forward, input gradient and every parameter gradient: NumPy (hand-written) vs torch
    (autograd), in float64, with the tight tolerances of helpers.TOL['float64']."""
    copy_to_torch(np_module, t_module)
    y = np_module.forward(x)
    np_module.zero_grad()
    dx = np_module.backward(dy)
    if input_grad:
        xt = torch.tensor(np.array(x), dtype=torch.float64, requires_grad=True)
    else:
        xt = torch.from_numpy(np.array(x))
    yt = t_module(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(dy)))
    assert y.dtype == np.float64
    assert_close(y, yt, f"{what} forward", rtol=1e-10, atol=1e-12)
    if input_grad:
        assert_close(dx, xt.grad, f"{what} input gradient", rtol=1e-10, atol=1e-12)
    tp = dict(t_module.named_parameters())
    for n, p in np_module.parameters().items():
        assert p.grad is not None, f"{what}: {n} got no gradient"
        assert_close(p.grad, tp[n].grad, f"{what} grad of {n}", rtol=1e-9, atol=1e-12)
    return y, dx
