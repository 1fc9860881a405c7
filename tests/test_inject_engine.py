"""The injection engine: per-layer overrides of any field the SPEC allows, one engine for both
backends, and the two source rules (gpu/ imports no private lowrank_ref name; inject and api
name no method)."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref import registry
from lowrank_ref.adapters.lora import LoRAConfig
from lowrank_ref.inject import adapter_layers, build_adapters, inject, layer_configs
from lowrank_ref.nn import Linear, Module
from lowrank_ref.registry import Example, MethodSpec

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["numpy", "torch"]


class Net(Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        for n in ("q", "k", "v"):
            setattr(self, n, Linear(4, 4, rng=rng, dtype=np.float64))
        self.fc = Linear(4, 6, rng=rng, dtype=np.float64)


def _net(backend):
    net = Net()
    if backend == "numpy":
        return net
    from lowrank_gpu.nn.convert import as_torch_linear

    t = torch.nn.Module()
    for n in ("q", "k", "v", "fc"):
        setattr(t, n, as_torch_linear(getattr(net, n)))
    return t


def _snapshot(model):
    if isinstance(model, torch.nn.Module):
        return dict(model.named_modules()), {n: p.requires_grad for n, p in model.named_parameters()}
    return dict(model.named_modules()), {n: p.trainable for n, p in model.parameters().items()}


# --- overrides -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_overrides_r_is_what_ranks_says(backend):
    a, b = _net(backend), _net(backend)
    ra = inject(a, LoRAConfig(r=2, alpha=4), targets="all", ranks={"q": 3, "fc": 1}, alphas={"k": 8.0}, rng=0)
    rb = inject(b, LoRAConfig(r=2, alpha=4), targets="all",
                overrides={"r": {"q": 3, "fc": np.int64(1)}, "alpha": {"k": 8}}, rng=0)
    assert ra.configs == rb.configs
    assert rb.configs["q"].r == 3 and type(rb.configs["fc"].r) is int and rb.configs["k"].alpha == 8.0
    assert tuple(b.get_submodule("fc").A.shape) == (1, 4)
    assert rb.configs["v"] == LoRAConfig(r=2, alpha=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs, err, words", [
    (dict(overrides={"dropout": {"q": 0.1}}), ValueError,
     r"overrides\['dropout'\]: 'dropout' is not a per-layer field of LoRAConfig; per-layer overrides may change: r, alpha"),
    (dict(overrides={"r": {"q": 3}}, ranks={"k": 2}), ValueError, r"ranks and overrides\['r'\] both set"),
    (dict(overrides={"r": {"q": 0}}), ValueError, r"overrides\['r'\]\['q'\] must be a positive integer, got 0"),
    (dict(overrides={"alpha": {"q": "big"}}), TypeError, r"overrides\['alpha'\]\['q'\] must be a real number"),
    (dict(overrides={"alpha": {"nope": 1.0}}), ValueError, r"overrides\['alpha'\] pattern 'nope' matches no linear layer"),
    (dict(overrides={"r": [("q", 3)]}), TypeError, r"overrides\['r'\] must be a dict"),
    (dict(overrides=[("r", {"q": 3})]), TypeError, "overrides must be a dict"),
    (dict(overrides={3: {"q": 3}}), TypeError, "overrides keys must be config field names"),
])
def test_bad_overrides_name_the_entry_and_change_nothing(backend, kwargs, err, words):
    model = _net(backend)
    before = _snapshot(model)
    with pytest.raises(err, match=words):
        inject(model, LoRAConfig(r=2), targets=("q", "k"), **kwargs)
    assert _snapshot(model) == before


def test_whole_model_modes_take_no_overrides():
    with pytest.raises(ValueError, match=r"whole-model mode: per-layer overrides \(overrides\['r'\]\)"):
        inject(Net(), method="bitfit", overrides={"r": {"q": 2}})


@dataclass(frozen=True)
class DropLoRAConfig(LoRAConfig):
    """A LoRA config of its own, for a test method whose SPEC lets overrides change dropout too."""


DROP_SPEC = MethodSpec(
    name="droplora_test", config=DropLoRAConfig,
    numpy="lowrank_ref.adapters.lora:LoRALinear", torch="lowrank_gpu.adapters.lora:LoRALinear",
    overridable=("r", "alpha", "dropout"), example=lambda: Example(6, 5, DropLoRAConfig(r=2)),
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_field_the_spec_names_can_be_overridden(backend):
    with registry.register_for_tests(DROP_SPEC):
        model = _net(backend)
        res = inject(model, DropLoRAConfig(r=2), targets="all", overrides={"dropout": {"k": 0.25, "fc": 0.5}}, rng=0)
    assert res.method == "droplora_test"
    assert [res.configs[n].dropout for n in ("q", "k", "v", "fc")] == [0.0, 0.25, 0.0, 0.5]
    with pytest.raises(ValueError, match=r"dropout'\]\['k'\] must be in \[0, 1\)"):
        layer_configs(DropLoRAConfig(r=2), ["k"], overrides={"dropout": {"k": 1.0}})


# --- one engine ------------------------------------------------------------------------------
def test_the_numpy_entry_points_forward_torch_models():
    model = _net("torch")
    res = inject(model, LoRAConfig(r=2), targets=("q", "v"), rng=0)
    from lowrank_gpu.adapters import LoRALinear as TorchLoRA

    assert sorted(adapter_layers(model)) == ["q", "v"]
    assert all(isinstance(m, TorchLoRA) for m in adapter_layers(model).values())
    assert res.trainable_params == 2 * 2 * (4 + 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_adapters_takes_a_spec_or_a_bare_class(backend):
    spec = registry.get_method("lora")
    cls = spec.layer_class(backend)
    model = _net(backend)
    snap = build_adapters(model, {"q": (spec, LoRAConfig(r=2)), "fc": (cls, LoRAConfig(r=3))}, rng=0)
    assert isinstance(model.get_submodule("q"), cls) and model.get_submodule("fc").config.r == 3
    snap.restore()
    assert adapter_layers(model) == {}
    with pytest.raises(TypeError, match=r"plan\['q'\] must be \(MethodSpec or adapter class, config\)"):
        build_adapters(model, {"q": ("lora", LoRAConfig())})
    with pytest.raises(ValueError, match=r"layer 'nope' matches no linear layer; the linear layers are: q, k, v, fc"):
        build_adapters(model, {"nope": (spec, LoRAConfig())})


def test_both_backends_inject_alike():
    results = {}
    for backend in BACKENDS:
        model = _net(backend)
        res = inject(model, lr.DoRAConfig(r=2, alpha=3), targets=("q", "fc"), ranks={"fc": 1}, rng=0)
        results[backend] = (res.method, res.replaced, res.trainable_params, res.total_params, res.configs)
    assert results["numpy"] == results["torch"]


# --- source rules ----------------------------------------------------------------------------
def _private_imports(path: Path) -> list[str]:
    """``from lowrank_ref... import _x``, an import of a private lowrank_ref module, or ``m._x``
    on a name bound to a lowrank_ref module (``from lowrank_ref.quant import blockwise as ref``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowrank_ref":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
                modules.add(a.asname or a.name)  # may be a module; its private attributes count too
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lowrank_ref":
                    if any(part.startswith("_") for part in a.name.split(".")):
                        found.append(f"{path.name}:{node.lineno} import {a.name}")
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_gpu_imports_no_private_name_of_lowrank_ref():
    files = sorted((ROOT / "gpu").rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in _private_imports(f)]
    assert found == [], "gpu/ reaches into lowrank_ref's private names: " + "; ".join(found)


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lowrank_ref.inject import _as_rng, select_targets\n"
                   "import lowrank_ref.quant.blockwise as bw\nbw._helper()\n"
                   "from lowrank_ref import train\ntrain._resolve_backend\n")
    assert len(_private_imports(bad)) == 3


def _code_words(path: Path) -> list[tuple[int, str]]:
    """Identifiers and non-docstring string constants of a file (its code, not its prose)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.append((n.lineno, n.value))
        elif isinstance(n, ast.Name):
            out.append((n.lineno, n.id))
        elif isinstance(n, ast.Attribute):
            out.append((n.lineno, n.attr))
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            out.append((n.lineno, n.name))
        elif isinstance(n, ast.alias):
            out.append((n.lineno, n.asname or n.name))
    return out


@pytest.mark.parametrize("rel", ["lowrank_ref/inject.py", "gpu/inject.py", "lowrank_ref/api.py"])
def test_inject_and_adapt_name_no_method(rel):
    words = set(registry.method_names()) | {s.config.__name__ for s in registry.methods().values()}
    assert {"lora", "bitfit", "LoRAConfig"} <= words
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, sorted(words))) + r")(?![A-Za-z0-9])", re.I)
    hits = [f"{rel}:{line} {text!r}" for line, text in _code_words(ROOT / rel) if pattern.search(text)]
    assert hits == [], "a method named in code that should read the SPEC: " + "; ".join(hits)


def test_numpy_modules_keep_their_order_when_a_layer_is_swapped():
    model = Net()
    order = [n for n, _ in model.named_modules()]
    snap = build_adapters(model, {"q": (registry.get_method("lora"), LoRAConfig(r=2))}, rng=0)
    assert [n for n, _ in model.named_modules() if not n.startswith("q.")] == order  # q stays first
    snap.restore()
    assert [n for n, _ in model.named_modules()] == order
    assert list(model.parameters())[:2] == ["q.weight", "q.bias"]
