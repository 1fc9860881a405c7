"""The life-cycle base, written once per backend: the same bad input gives the same exception type
and the same message in NumPy and in torch, for every adapter and for a 4-bit base (QLoRA, QDoRA).

Covers: the base at construction (zero-size, 3-D, integer or complex weight, a bias of the wrong
length or dtype, NaN/inf), ``x`` (0-d, integer, bool, complex, wrong last axis), merging twice and
unmerging an unmerged layer, backward before forward and while merged (NumPy), training a merged
layer (torch), and a ``dy`` of the wrong shape (NumPy: a ``ValueError`` naming ``dy`` that leaves
the cache usable)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.nn.module import StateError

torch = pytest.importorskip("torch")
import lowrank_gpu as lg  # noqa: E402

OUT, IN = 4, 8


def _np_linear(W, b):
    base = lr.nn.Linear.from_arrays(np.ones((OUT, IN)), np.ones(OUT))
    base.weight.data = W  # edited after construction: what check_base must catch
    base.bias.data = b
    return base


def _torch_linear(W, b):
    base = torch.nn.Linear(IN, OUT)
    W, b = torch.from_numpy(np.asarray(W)), torch.from_numpy(np.asarray(b))
    base.weight = torch.nn.Parameter(W, requires_grad=W.is_floating_point() or W.is_complex())
    base.bias = torch.nn.Parameter(b, requires_grad=b.is_floating_point() or b.is_complex())
    return base


# each builder: (backend-specific Linear) -> adapter, with the same arguments in both backends
BUILD = {
    "numpy": {
        "lora": lambda base: lr.adapters.LoRALinear(base, lr.LoRAConfig(r=2), rng=0),
        "dora": lambda base: lr.adapters.DoRALinear(base, lr.DoRAConfig(r=2), rng=0),
        "qlora": lambda base: lr.quant.QLoRALinear(base, lr.LoRAConfig(r=2), blocksize=8, rng=0),
        "qdora": lambda base: lr.adapters.DoRALinear(lr.quant.QuantizedLinear.from_linear(base, 8, True),
                                                     lr.DoRAConfig(r=2), rng=0),
    },
    "torch": {
        "lora": lambda base: lg.adapters.LoRALinear(base, lr.LoRAConfig(r=2), rng=0),
        "dora": lambda base: lg.adapters.DoRALinear(base, lr.DoRAConfig(r=2), rng=0),
        "qlora": lambda base: lg.quant.QLoRALinear(base, lr.LoRAConfig(r=2), blocksize=8, rng=0),
        "qdora": lambda base: lg.adapters.DoRALinear(lg.quant.QuantizedLinear.from_linear(base, 8, True),
                                                     lr.DoRAConfig(r=2), rng=0),
    },
}
LINEAR = {"numpy": _np_linear, "torch": _torch_linear}
METHODS = sorted(BUILD["numpy"])


def _good_weights(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((OUT, IN)) * 0.5, rng.standard_normal(OUT)


def _pair(method, seed=0):
    """The same adapter in both backends, float64, with a non-zero B."""
    W, b = _good_weights(seed)
    n = BUILD["numpy"][method](_np_linear(W, b))
    t = BUILD["torch"][method](_torch_linear(W, b))
    B = np.random.default_rng(seed + 1).standard_normal(n.B.shape) * 0.3
    n.B.data = B.astype(n.B.data.dtype)
    with torch.no_grad():
        t.B.copy_(torch.from_numpy(B))
    return n, t


def _error(fn):
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return info.value


def _nan_at_0(shape, dtype=np.float64):
    a = np.ones(shape, dtype)
    a.flat[0] = np.nan
    return a


BAD_BASES = {
    "zero-size weight": (np.zeros((OUT, 0)), np.ones(OUT), ValueError, "base weight must be a non-empty 2-D array"),
    "3-D weight": (np.ones((OUT, IN, 2)), np.ones(OUT), ValueError, "base weight must be a non-empty 2-D array"),
    "integer weight": (np.ones((OUT, IN), np.int64), np.ones(OUT), TypeError, "base weight must be a floating array"),
    "complex weight": (np.ones((OUT, IN), np.complex128), np.ones(OUT), TypeError, "got dtype complex128"),
    "bias of the wrong length": (np.ones((OUT, IN)), np.ones(OUT + 1), ValueError, r"base bias must have shape \(4,\)"),
    "complex bias": (np.ones((OUT, IN)), np.ones(OUT, np.complex128), TypeError, "base bias must be a floating"),
    "NaN in the weight": (_nan_at_0((OUT, IN)), np.ones(OUT), ValueError, "base weight must be finite; it holds 1"),
    "inf in the bias": (np.ones((OUT, IN)), np.full(OUT, np.inf), ValueError, "base bias must be finite; it holds 4"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(BAD_BASES))
def test_a_bad_base_is_refused_at_construction_with_the_same_error(method, case):
    W, b, exc, words = BAD_BASES[case]
    errs = {be: _error(lambda be=be: BUILD[be][method](LINEAR[be](W, b))) for be in ("numpy", "torch")}
    for be, e in errs.items():
        assert type(e) is exc, f"{be}: {type(e).__name__}: {e}"
    assert str(errs["numpy"]) == str(errs["torch"])
    assert re.search(words, str(errs["numpy"])), str(errs["numpy"])


def test_a_base_of_the_wrong_type_is_a_type_error_in_both_backends():
    for make in (lr.adapters.LoRALinear, lg.adapters.LoRALinear):
        with pytest.raises(TypeError, match="base must be a"):
            make(np.ones((OUT, IN)), lr.LoRAConfig(r=2))
    with pytest.raises(TypeError, match="QuantizedLinear"):
        lg.adapters.DoRALinear(torch.nn.Conv1d(2, 2, 1), lr.DoRAConfig(r=2))


BAD_X = {
    "0-d": (lambda: np.asarray(1.0), ValueError, r"x must have last dimension 8 \(in_features\), got shape \(\)"),
    "wrong last axis": (lambda: np.ones((2, IN + 1)), ValueError, r"got shape \(2, 9\)"),
    "integer": (lambda: np.ones((2, IN), np.int64), TypeError, "x must be a floating array, got dtype int64"),
    "bool": (lambda: np.ones((2, IN), bool), TypeError, "got dtype bool"),
    "complex": (lambda: np.ones((2, IN), np.complex128), TypeError, "got dtype complex128"),
}


@pytest.mark.parametrize("method", METHODS + ["4-bit base"])
@pytest.mark.parametrize("case", sorted(BAD_X))
def test_a_bad_x_gives_the_same_error_in_both_backends(method, case):
    make_x, exc, words = BAD_X[case]
    if method == "4-bit base":
        W, b = _good_weights()
        n = lr.quant.QuantizedLinear.from_linear(_np_linear(W, b), 8)
        t = lg.quant.QuantizedLinear.from_linear(_torch_linear(W, b), 8)
    else:
        n, t = _pair(method)
    en = _error(lambda: n.forward(make_x()))
    et = _error(lambda: t(torch.from_numpy(make_x())))
    assert type(en) is type(et) is exc
    assert str(en) == str(et)
    assert re.search(words, str(en)), str(en)


@pytest.mark.parametrize("method", ["lora", "qdora"])
def test_an_x_that_is_not_an_array_of_floats_is_a_type_error_in_both_backends(method):
    n, t = _pair(method)
    with pytest.raises(TypeError, match="x must be a floating array"):
        n.forward("not an array")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        t("not an array")


@pytest.mark.parametrize("method", METHODS)
def test_merging_twice_and_unmerging_an_unmerged_layer(method):
    for layer in _pair(method):
        e1 = _error(layer.unmerge)
        layer.merge()
        e2 = _error(layer.merge)
        assert isinstance(e1, ValueError) and "is not merged" in str(e1)
        assert isinstance(e2, ValueError) and "already merged" in str(e2)
        layer.unmerge()
        assert not layer.merged
    n, t = _pair(method)
    assert str(_error(n.unmerge)) == str(_error(t.unmerge))
    n.merge()
    t.merge()
    assert str(_error(n.merge)) == str(_error(t.merge))


@pytest.mark.parametrize("method", METHODS)
def test_loading_adapter_weights_into_a_merged_layer_is_refused_alike(method):
    n, t = _pair(method)
    n.merge()
    t.merge()
    en = _error(lambda: n.load_adapter_state(n.adapter_state()))
    et = _error(lambda: t.load_adapter_state(t.adapter_state()))
    assert type(en) is type(et) is ValueError
    assert str(en) == str(et) and "unmerge() before loading" in str(en)


@pytest.mark.parametrize("method", METHODS)
def test_numpy_backward_before_forward_and_while_merged_are_state_errors(method):
    n, _ = _pair(method)
    x = np.random.default_rng(3).standard_normal((3, IN)).astype(n.A.data.dtype)
    with pytest.raises(StateError, match="before forward"):
        n.backward(np.ones((3, OUT)))
    n.merge()
    y = n.forward(x)
    with pytest.raises(StateError, match="merged"):
        n.backward(np.ones_like(y))
    assert issubclass(StateError, ValueError)


@pytest.mark.parametrize("method", METHODS)
def test_training_a_merged_torch_layer_is_the_same_state_error(method):
    n, t = _pair(method)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((3, IN))).to(t.A.dtype)
    y_unmerged = t(x).detach()
    t.merge()
    y = t(x)  # the merged forward itself works, in training mode too
    torch.testing.assert_close(y.detach(), y_unmerged, rtol=1e-4, atol=1e-5)
    with pytest.raises(StateError) as info:
        y.sum().backward()
    assert t.A.grad is None
    n.merge()
    n.forward(x.numpy())
    with pytest.raises(StateError) as info_np:
        n.backward(np.ones((3, OUT)))
    assert str(info.value) == str(info_np.value)  # same words in both backends


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_merged_torch_layer_still_serves_inference_and_input_gradients(method):
    _, t = _pair(method)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((3, IN))).to(t.A.dtype)
    t.merge()
    with torch.no_grad():
        y = t(x)
    assert not y.requires_grad
    t.requires_grad_(False)  # nothing of the adapter can train: the gradient to x flows
    xg = x.clone().requires_grad_()
    t(xg).sum().backward()
    W = t.merged_weight().to(x.dtype)
    torch.testing.assert_close(xg.grad, torch.ones(3, OUT, dtype=x.dtype) @ W)


@pytest.mark.parametrize("method", METHODS + ["4-bit base"])
def test_numpy_dy_of_the_wrong_shape_names_dy_and_keeps_the_cache(method):
    if method == "4-bit base":
        layer = lr.quant.QuantizedLinear.from_linear(_np_linear(*_good_weights()), 8)
    else:
        layer, _ = _pair(method)
    x = np.random.default_rng(5).standard_normal((2, 3, IN)).astype(np.float32)
    layer.forward(x)
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3, 4\)"):
        layer.backward(np.ones((2, 3, OUT + 1), np.float32))
    assert layer.backward(np.ones((2, 3, OUT), np.float32)).shape == x.shape  # the cache survived


def test_torch_dy_of_the_wrong_shape_is_refused_by_autograd_and_keeps_the_graph():
    """Torch layers have no ``backward`` of their own: autograd checks ``dy``'s shape (a
    ``RuntimeError``, before anything runs), and the graph is still usable afterwards."""
    _, t = _pair("qlora")
    x = torch.randn(2, 3, IN, dtype=t.A.dtype)
    y = t(x)
    with pytest.raises(RuntimeError, match="shape"):
        y.backward(torch.ones(2, 3, OUT + 1, dtype=y.dtype))
    y.backward(torch.ones_like(y))
    assert t.A.grad is not None


def test_a_bad_bias_for_a_4bit_base_is_refused_in_both_backends():
    q = lr.quant.quantize_nf4(np.ones((OUT, IN), np.float32), 8)
    tq = lg.quant.quantize_nf4(torch.ones(OUT, IN), 8)
    for bias, exc in ((np.ones(OUT + 1, np.float32), ValueError), (np.ones(OUT, np.complex64), TypeError),
                      (np.full(OUT, np.nan, np.float32), ValueError)):
        en = _error(lambda bias=bias: lr.quant.QuantizedLinear(q, bias))
        et = _error(lambda bias=bias: lg.quant.QuantizedLinear(tq, torch.from_numpy(bias)))
        assert type(en) is type(et) is exc
        assert str(en) == str(et)
    with pytest.raises(TypeError, match="Quant4Tensor"):
        lr.quant.QuantizedLinear(np.ones((OUT, IN)))
    with pytest.raises(TypeError, match="Quant4Tensor"):
        lg.quant.QuantizedLinear(torch.ones(OUT, IN))


def test_qlora_is_lora_over_a_quantised_base_in_both_backends():
    """QLoRA inherits LoRA's math and every life-cycle check; a quantised base can be given."""
    assert issubclass(lr.quant.QLoRALinear, lr.adapters.LoRALinear)
    assert issubclass(lg.quant.QLoRALinear, lg.adapters.LoRALinear)
    W, b = _good_weights()
    for lin, Q, QLoRA in ((_np_linear(W.astype(np.float32), b.astype(np.float32)), lr.quant.QuantizedLinear,
                           lr.quant.QLoRALinear),
                          (_torch_linear(W.astype(np.float32), b.astype(np.float32)), lg.quant.QuantizedLinear,
                           lg.quant.QLoRALinear)):
        qbase = Q.from_linear(lin, 8, True)
        layer = QLoRA(qbase, lr.LoRAConfig(r=2), blocksize=8, rng=0)
        assert layer.base is qbase and layer.quantized
        with pytest.raises(ValueError, match="blocksize=8; the config has blocksize=16"):
            QLoRA(qbase, lr.LoRAConfig(r=2), blocksize=16)
        with pytest.raises(ValueError, match="PiSSA"):  # LoRA itself refuses PiSSA on a 4-bit base
            (lr.adapters.LoRALinear if Q is lr.quant.QuantizedLinear else lg.adapters.LoRALinear)(
                qbase, lr.LoRAConfig(r=2, init="pissa"))


def test_the_quant_packages_import_nothing_from_the_adapters():
    import ast
    import pathlib

    root = pathlib.Path(lr.__file__).parent.parent
    for folder, banned in ((root / "lowrank_ref" / "quant", "lowrank_ref.adapters"),
                           (root / "gpu" / "quant", "lowrank_gpu.adapters")):
        files = sorted(folder.glob("*.py"))
        assert files, folder
        for f in files:
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.startswith(banned) for n in names), f"{f.name} imports {names}"
            assert "__getattr__" not in f.read_text() or f.name != "__init__.py", f
