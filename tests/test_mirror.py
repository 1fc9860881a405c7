"""The two backends expose the same surface: the same public adapter classes, constructor
parameters, and public methods/properties (with the same parameter names). Generic: every class
either ``__all__`` lists is checked, so a new method is covered the day it is exported. Classes
defined under ``quant`` (the 4-bit base, ``QuantizedLinear``) count as the package's own, and
``lowrank_ref.quant`` / ``lowrank_gpu.quant`` are compared the same way."""

from __future__ import annotations

import inspect

import pytest

import lowrank_gpu.adapters as gpu_adapters
import lowrank_gpu.quant as gpu_quant
import lowrank_ref.adapters as ref_adapters
import lowrank_ref.quant as ref_quant

NUMPY_ONLY = {"backward"}  # the hand-written backward; torch has autograd
TORCH_ONLY: set[str] = set()
# Reviewed, deliberate one-sided names: (class, name) -> why. Keep this list short.
KNOWN_DIFFERENCES = {
    ("DoRALinear", "clear_norm_cache"): "both cache the rows' ‖W0‖²; torch keys its cache on the weight's "
                                         "data_ptr and _version, so in-place edits invalidate it by "
                                         "themselves and there is nothing to clear by hand",
}
# Where each backend's own classes live: the adapters, and the quant modules (QuantizedLinear,
# alias NF4Linear, is defined in lowrank_ref.quant.linear / lowrank_gpu.quant.linear).
REF_PACKAGES = ("lowrank_ref.adapters", "lowrank_ref.quant")
GPU_PACKAGES = ("lowrank_gpu.adapters", "lowrank_gpu.quant")


def _classes(mod):
    """The layer classes a package exports (a helper class without ``forward``, such as AdaLoRA's
    RankAllocator, is not a layer)."""
    return {n: getattr(mod, n) for n in mod.__all__
            if inspect.isclass(getattr(mod, n)) and hasattr(getattr(mod, n), "forward")}


REF, GPU = _classes(ref_adapters), _classes(gpu_adapters)
PAIRS = sorted(set(REF) & set(GPU))


def _own_public_names(cls, package) -> set[str]:
    """Public names defined by the classes of ``package`` (a module prefix, or a tuple of them) in
    ``cls``'s MRO (not by the framework base, ``lowrank_ref.nn.Module`` or ``torch.nn.Module``)."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith(package):
            names |= {n for n in vars(klass) if not n.startswith("_")}
    return names


def _kind(obj) -> str:
    if isinstance(obj, property):
        return "property"
    if callable(obj):
        return "method"
    return "attribute"


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_same_public_names_in_all():
    assert sorted(ref_adapters.__all__) == sorted(gpu_adapters.__all__), (
        f"only in lowrank_ref.adapters: {sorted(set(ref_adapters.__all__) - set(gpu_adapters.__all__))}; "
        f"only in lowrank_gpu.adapters: {sorted(set(gpu_adapters.__all__) - set(ref_adapters.__all__))}")
    assert sorted(REF) == sorted(GPU)
    assert "LoRALinear" in PAIRS


@pytest.mark.parametrize("name", PAIRS)
def test_same_constructor_parameters(name):
    ref, gpu = _params(REF[name].__init__), _params(GPU[name].__init__)
    assert ref == gpu, f"{name}.__init__: numpy {ref} vs torch {gpu}"


@pytest.mark.parametrize("name", PAIRS)
def test_same_public_methods_and_properties(name):
    ref_cls, gpu_cls = REF[name], GPU[name]
    allowed = {n for (c, n) in KNOWN_DIFFERENCES if c == name}
    names = (_own_public_names(ref_cls, REF_PACKAGES) - NUMPY_ONLY) | \
            (_own_public_names(gpu_cls, GPU_PACKAGES) - TORCH_ONLY)
    names -= allowed
    missing_ref = sorted(n for n in names if not hasattr(ref_cls, n))
    missing_gpu = sorted(n for n in names if not hasattr(gpu_cls, n))
    assert not missing_ref and not missing_gpu, (
        f"{name}: missing in numpy {missing_ref}, missing in torch {missing_gpu}")
    for n in sorted(names):
        a, b = inspect.getattr_static(ref_cls, n), inspect.getattr_static(gpu_cls, n)
        assert _kind(a) == _kind(b), f"{name}.{n}: numpy {_kind(a)} vs torch {_kind(b)}"
        if _kind(a) == "method" and inspect.isfunction(a) and inspect.isfunction(b):
            assert _params(a) == _params(b), f"{name}.{n}(): numpy {_params(a)} vs torch {_params(b)}"


def test_the_core_surface_is_there():
    """The names DESIGN.md promises on every adapter layer, in both backends (the modules that
    whole-model modes add, a prompt or a prefix encoder, are not layers: they promise ``forward``
    and a ``merge`` that refuses, checked by tests/contract/test_model_modes.py)."""
    from lowrank_ref.adapters.base import AdapterLinear

    core = {"forward", "delta_weight", "merge", "unmerge", "merged", "scaling", "merged_weight",
            "num_trainable_parameters", "adapter_parameters", "adapter_state", "load_adapter_state",
            "in_features", "out_features"}
    for name in [n for n in PAIRS if issubclass(REF[n], AdapterLinear)]:
        for cls in (REF[name], GPU[name]):
            assert not core - set(dir(cls)), f"{cls.__module__}.{name} lacks {sorted(core - set(dir(cls)))}"
    assert hasattr(REF["LoRALinear"], "backward")


def test_known_differences_are_still_real():
    """An allowance that no longer applies must be removed (the list cannot rot)."""
    for (cls_name, n) in KNOWN_DIFFERENCES:
        if cls_name in PAIRS:
            assert hasattr(REF[cls_name], n) != hasattr(GPU[cls_name], n), (cls_name, n)


def test_the_collector_sees_names_a_subclass_adds():
    class Extra(REF["LoRALinear"]):
        def only_here(self):
            pass

    assert "only_here" in _own_public_names(Extra, __name__)
    assert "merge" in _own_public_names(REF["LoRALinear"], "lowrank_ref.adapters")
    assert "backward" in _own_public_names(REF["LoRALinear"], "lowrank_ref.adapters")
    assert not hasattr(GPU["LoRALinear"], "only_here")


def test_quant_classes_are_collected_as_own():
    """QLoRALinear is an adapter (LoRA over a 4-bit base); its own names must be compared, and
    the 4-bit base it stands on is defined in the quant modules of each backend."""
    for cls, pkgs in ((REF["QLoRALinear"], REF_PACKAGES), (GPU["QLoRALinear"], GPU_PACKAGES)):
        assert cls.__module__.split(".")[1] == "adapters", cls.__module__
        own = _own_public_names(cls, pkgs)
        assert {"memory_bytes", "dequantized_weight", "blocksize", "double_quant"} <= own, cls
    for q in (ref_quant.QuantizedLinear, gpu_quant.QuantizedLinear):
        assert q.__module__.split(".")[1] == "quant", q.__module__
        assert {"from_linear", "dequantized_weight", "forward"} <= _own_public_names(q, ("lowrank_ref.quant",
                                                                                       "lowrank_gpu.quant"))


# DESIGN.md's quant surface: "the mirror: same names"
QUANT_NAMES = ("Quant4Tensor", "NF4Tensor", "quantize_nf4", "quantize_fp4", "quantize_4bit", "nf4_table",
               "QuantizedLinear", "NF4Linear")


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_quant_names_in_both_backends(name):
    assert name in ref_quant.__all__ and hasattr(ref_quant, name), f"lowrank_ref.quant lacks {name}"
    assert name in gpu_quant.__all__ and hasattr(gpu_quant, name), f"lowrank_gpu.quant lacks {name}"


def test_the_qlora_layer_is_named_under_quant_in_both_backends():
    """DESIGN.md's ``lr.quant.QLoRALinear``: the adapter itself, named there by the package."""
    assert ref_quant.QLoRALinear is ref_adapters.QLoRALinear
    assert gpu_quant.QLoRALinear is gpu_adapters.QLoRALinear
    assert ref_quant.NF4Tensor is ref_quant.Quant4Tensor and ref_quant.NF4Linear is ref_quant.QuantizedLinear
    assert gpu_quant.NF4Tensor is gpu_quant.Quant4Tensor and gpu_quant.NF4Linear is gpu_quant.QuantizedLinear


@pytest.mark.parametrize("name", ["quantize_nf4", "quantize_fp4", "quantize_4bit"])
def test_quant_functions_take_the_same_parameters(name):
    ref, gpu = _params(getattr(ref_quant, name)), _params(getattr(gpu_quant, name))
    assert ref == gpu, f"{name}: numpy {ref} vs torch {gpu}"


@pytest.mark.parametrize("name", ["QLoRALinear", "QuantizedLinear"])
def test_quant_layers_take_the_same_constructor_parameters(name):
    ref, gpu = getattr(ref_quant, name), getattr(gpu_quant, name)
    assert _params(ref.__init__) == _params(gpu.__init__)
    if name == "QuantizedLinear":
        assert _params(ref.from_linear) == _params(gpu.from_linear)
