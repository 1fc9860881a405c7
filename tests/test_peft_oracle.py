"""PEFT and transformers as independent oracles for LoRA (float64).

* PEFT's ``lora.Linear`` (through ``get_peft_model`` on a tiny module with layers ``q`` and ``v``),
  given our ``A`` and ``B``, computes our forward and our gradients of ``A``, ``B`` and ``x``
  (both scaling rules: ``alpha/r`` and rsLoRA's ``alpha/sqrt(r)``).
* A tiny Hugging Face BERT built locally from a config (no download): our ``inject`` on
  ``query``/``value`` gives the un-adapted outputs at ``B = 0``, other outputs with a non-zero
  ``B``, and the outputs of PEFT's ``get_peft_model`` holding the same ``A``, ``B``.
* Our adapter file (``lowrank_ref.io.save_adapter``) has the keys, shapes and dtypes of PEFT's own
  ``adapter_model.safetensors`` and loads into the PEFT model, which then gives our outputs.

peft and transformers are not dependencies of the project: every test asks for them through
``pytest.importorskip``, so they are skipped, with the reason, where they are not installed.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import TOL, assert_close

import lowrank_ref as lr
from lowrank_ref.adapters import LoRALinear
from lowrank_ref.io import read_adapter_metadata, save_adapter

R, ALPHA = 4, 6.0  # r = 4: alpha/r = 1.5 and alpha/sqrt(r) = 3.0 differ
RTOL, ATOL = TOL["float64"]


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="peft is not installed (an oracle only, not a dependency)")


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed (an oracle only)")


# --- a: one layer, PEFT vs our NumPy and torch layers -------------------------------------------
class Tiny(torch.nn.Module):
    """Two linear layers named as PEFT's examples name them; each sees the same input."""

    def __init__(self, inn=5, out_q=6, out_v=3):
        super().__init__()
        self.q = torch.nn.Linear(inn, out_q)
        self.v = torch.nn.Linear(inn, out_v)

    def forward(self, x):
        return self.q(x), self.v(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_linear_matches_our_layers_forward_and_gradients(peft, rslora):
    rng = np.random.default_rng(0)
    tiny = Tiny().double()
    with torch.no_grad():
        for p in tiny.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
    pm = peft.get_peft_model(copy.deepcopy(tiny), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, use_rslora=rslora, lora_dropout=0.0, target_modules=["q", "v"]))
    cfg = lr.LoRAConfig(r=R, alpha=ALPHA, rslora=rslora)
    x = rng.standard_normal((2, 3, 5))
    xt = torch.from_numpy(x).requires_grad_(True)
    ys = pm(xt)
    dys = {}
    for name, y in zip("qv", ys):
        dys[name] = rng.standard_normal(tuple(y.shape))
    loss_grads_x = np.zeros_like(x)
    ours = {}
    for name in "qv":
        lin = getattr(tiny, name)
        W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        A = rng.standard_normal((R, W.shape[1]))
        B = rng.standard_normal((W.shape[0], R))  # non-zero B
        pl = pm.base_model.model.get_submodule(name)
        assert pl.scaling["default"] == pytest.approx(cfg.scaling)  # PEFT's scaling rule is ours
        with torch.no_grad():
            pl.lora_A["default"].weight.copy_(torch.from_numpy(A))
            pl.lora_B["default"].weight.copy_(torch.from_numpy(B))
        layer = LoRALinear(lr.nn.Linear.from_arrays(W, b), cfg, rng=0)  # our NumPy layer
        layer.A.data, layer.B.data = A.copy(), B.copy()
        y_np = layer.forward(x)
        loss_grads_x += layer.backward(dys[name])
        tl = lr.adapt(lr.nn.Linear.from_arrays(W, b), cfg, backend="torch", rng=0)  # our torch layer
        with torch.no_grad():
            tl.A.copy_(torch.from_numpy(A))
            tl.B.copy_(torch.from_numpy(B))
        xt2 = torch.from_numpy(x).requires_grad_(True)
        y_t = tl(xt2)
        (y_t * torch.from_numpy(dys[name])).sum().backward()
        ours[name] = (layer, tl, y_np, y_t, xt2.grad)
    ys = pm(xt)  # forward again, now with our A and B
    sum((y * torch.from_numpy(dys[n])).sum() for n, y in zip("qv", ys)).backward()
    for name, y in zip("qv", ys):
        layer, tl, y_np, y_t, _ = ours[name]
        pl = pm.base_model.model.get_submodule(name)
        assert_close(y_np, y, f"{name} forward: numpy vs peft", RTOL, ATOL)
        assert_close(y_t, y, f"{name} forward: torch vs peft", RTOL, ATOL)
        for ours_grad, t_grad, peft_grad, what in (
                (layer.A.grad, tl.A.grad, pl.lora_A["default"].weight.grad, "dA"),
                (layer.B.grad, tl.B.grad, pl.lora_B["default"].weight.grad, "dB")):
            assert_close(ours_grad, peft_grad, f"{name} {what}: numpy vs peft", RTOL, ATOL)
            assert_close(t_grad, peft_grad, f"{name} {what}: torch vs peft", RTOL, ATOL)
        assert pl.base_layer.weight.grad is None  # frozen in PEFT as in ours
    assert_close(loss_grads_x, xt.grad, "dx (q and v): numpy vs peft", RTOL, ATOL)
    assert_close(ours["q"][4] + ours["v"][4], xt.grad, "dx (q and v): torch vs peft", RTOL, ATOL)


# --- b, c: a tiny Hugging Face BERT -------------------------------------------------------------
def _bert(transformers):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(cfg).double().eval()  # eval: no dropout anywhere


IDS = torch.from_numpy(np.random.default_rng(1).integers(0, 50, (2, 7)))
TARGETS = ["query", "value"]


def _run(model):
    out = model(input_ids=IDS)
    return out.last_hidden_state, out.pooler_output


def _ours(base, rslora):
    from lowrank_gpu.inject import inject

    model = copy.deepcopy(base)
    res = inject(model, lr.LoRAConfig(r=R, alpha=ALPHA, rslora=rslora), targets=tuple(TARGETS), rng=0)
    assert res.replaced == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]
    return model, res


def _randomise(model, res, seed=2):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for n in res.replaced:
            layer = model.get_submodule(n)
            layer.A.copy_(torch.from_numpy(rng.standard_normal(tuple(layer.A.shape))))
            layer.B.copy_(torch.from_numpy(rng.standard_normal(tuple(layer.B.shape))))


def _peft_model(peft, base, rslora):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, use_rslora=rslora, lora_dropout=0.0, target_modules=TARGETS))


@pytest.mark.parametrize("rslora", [False, True])
def test_inject_into_hf_bert_matches_peft(peft, transformers, rslora):
    base = _bert(transformers)
    ref = _run(base)
    model, res = _ours(base, rslora)
    for n in res.replaced:
        assert not model.get_submodule(n).B.any()  # the init: B = 0
    for mine, theirs in zip(_run(model), ref):  # B = 0: exactly the un-adapted model (adds s·h·0)
        assert torch.equal(mine, theirs)
    _randomise(model, res)
    ours = _run(model)
    for mine, theirs in zip(ours, ref):  # a non-zero B changes the outputs
        assert float((mine - theirs).detach().abs().max()) > 1e-3
    pm = _peft_model(peft, base, rslora)
    with torch.no_grad():
        for n in res.replaced:
            pl = pm.base_model.model.get_submodule(n)
            pl.lora_A["default"].weight.copy_(model.get_submodule(n).A)
            pl.lora_B["default"].weight.copy_(model.get_submodule(n).B)
    theirs = _run(pm)
    for name, mine, t in zip(("last_hidden_state", "pooler_output"), ours, theirs):
        assert_close(mine, t, f"BERT {name}: ours vs peft", RTOL, ATOL)
    # and the gradients of A and B through the whole model
    w = torch.from_numpy(np.random.default_rng(3).standard_normal(tuple(ours[0].shape)))
    (ours[0] * w).sum().backward()
    (theirs[0] * w).sum().backward()
    for n in res.replaced:
        pl = pm.base_model.model.get_submodule(n)
        assert_close(model.get_submodule(n).A.grad, pl.lora_A["default"].weight.grad, f"{n} dA", RTOL, ATOL)
        assert_close(model.get_submodule(n).B.grad, pl.lora_B["default"].weight.grad, f"{n} dB", RTOL, ATOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_file_loads_into_peft(peft, transformers, rslora, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    base = _bert(transformers)
    model, res = _ours(base, rslora)
    _randomise(model, res)
    ours = _run(model)
    path = save_adapter(model, tmp_path / "ours.safetensors")

    # PEFT's own file, from save_pretrained: adapter_model.safetensors holds, for a layer at path P,
    # "base_model.model.P.lora_A.weight" (r, in) and "base_model.model.P.lora_B.weight" (out, r):
    # PeftModel's wrapper path, then the module path, with the adapter name ("default") that the
    # in-memory state_dict carries ("...lora_A.default.weight") removed. Our keys must be exactly these.
    pm = _peft_model(peft, base, rslora)
    pm.save_pretrained(str(tmp_path / "peft"))
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="pt") as f:
        peft_file = {k: f.get_tensor(k) for k in f.keys()}
        peft_header = f.metadata()
    with safe_open(str(path), framework="pt") as f:
        our_file = {k: f.get_tensor(k) for k in f.keys()}
        our_header = f.metadata()
    assert set(our_file) == set(peft_file) == set(peft.get_peft_model_state_dict(pm))
    assert set(our_file) == {f"base_model.model.{n}.lora_{t}.weight" for n in res.replaced for t in "AB"}
    for k in our_file:
        assert our_file[k].shape == peft_file[k].shape and our_file[k].dtype == peft_file[k].dtype, k
    assert our_header["format"] == peft_header["format"] == "pt"

    # load our file into a fresh PEFT model (its own init: B = 0, so it starts as the base)
    fresh = _peft_model(peft, base, rslora)
    before = _run(fresh)
    result = peft.set_peft_model_state_dict(fresh, load_file(str(path)))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    for name, mine, theirs, old in zip(("last_hidden_state", "pooler_output"), ours, _run(fresh), before):
        assert_close(theirs, mine, f"PEFT loaded from our file: {name}", RTOL, ATOL)
        assert float((old - mine).detach().abs().max()) > 1e-3  # the load changed something

    # and PEFT's own loader, PeftModel.from_pretrained, on a folder holding our tensors and an
    # adapter_config.json written from our file's metadata (r, alpha, scaling rule per layer)
    layers = read_adapter_metadata(path)["layers"]
    (c,) = {json.dumps(m["config"], sort_keys=True) for m in layers.values()}
    c = json.loads(c)
    assert {m["scaling_rule"] for m in layers.values()} == {"alpha/sqrt(r)" if rslora else "alpha/r"}
    folder = tmp_path / "from_ours"
    folder.mkdir()
    peft.LoraConfig(r=c["r"], lora_alpha=c["alpha"], use_rslora=c["rslora"], lora_dropout=c["dropout"],
                    target_modules=TARGETS).save_pretrained(str(folder))
    (folder / "adapter_model.safetensors").write_bytes(path_bytes(path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    for name, mine, theirs in zip(("last_hidden_state", "pooler_output"), ours, _run(loaded)):
        assert_close(theirs, mine, f"PeftModel.from_pretrained(our file): {name}", RTOL, ATOL)


def path_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()
