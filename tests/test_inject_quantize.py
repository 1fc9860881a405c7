"""inject(quantize="nf4"): any layer method on a 4-bit base, in both backends.

The targeted layers' float weights are replaced by QLoRA's 4-bit storage before the adapter wraps
them, so each injected layer must compute its method's formula on ``W̃0 = dequant(NF4(W0))``
(written out here from the float weight the model had), pass float64 gradcheck, agree with torch
autograd, train only its adapter, merge as QLoRA's layer does, survive save/load (or refuse a
mismatched base), and refuse ``quantize=`` where it cannot apply, with the same error in both
backends and the model left as it was."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import assert_close

import lowrank_ref as lr
from lowrank_ref.inject import BaseQuant, adapter_layers, inject
from lowrank_ref.nn.gpt import GPT, GPTConfig

torch = pytest.importorskip("torch")

BS = 16  # values per absmax block (the tiny GPT's weights are 16 x 16)
CONFIGS = {
    "lora": lambda: lr.LoRAConfig(r=2, alpha=4.0),
    "dora": lambda: lr.DoRAConfig(r=2, alpha=4.0, detach_norm=False),  # the exact gradient, norm included
    "adalora": lambda: lr.AdaLoRAConfig(init_r=3, target_r=2, alpha=6.0, total_step=10),
}
TARGETS = ("q", "v")


def _gpt(seed=0):
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, d_model=16),
               rng=np.random.default_rng(seed), dtype=np.float64)


def _perturb(model, seed=1):
    """Move every adapter tensor off its init (B = 0, E = 0 would hide the update)."""
    rng = np.random.default_rng(seed)
    for layer in adapter_layers(model).values():
        for p in layer.adapter_parameters().values():
            p.data = (p.data + 0.3 * rng.standard_normal(p.shape)).astype(p.data.dtype)


def _injected(method, seed=0, double_quant=True):
    model = _gpt(seed)
    floats = {n: (m.weight.data.copy(), m.bias.data.copy()) for n, m in model.named_modules()
              if n.endswith((".q", ".v"))}
    res = inject(model, CONFIGS[method](), targets=TARGETS, rng=0, quantize="nf4", blocksize=BS,
                 double_quant=double_quant)
    _perturb(model)
    return model, floats, res


def _expected(method, layer, W0, b, x):
    """The method's forward on W̃0 = dequant(NF4(W0)), written out in float64."""
    Wt = lr.quant.quantize_4bit(W0, blocksize=BS, double_quant=True).dequantize().astype(np.float64)
    p = {n: v.data.astype(np.float64) for n, v in layer.adapter_parameters().items()}
    s = layer.scaling
    if method == "lora":  # y = x W̃0ᵀ + b + s x Aᵀ Bᵀ
        return x @ Wt.T + b + s * (x @ p["A"].T) @ p["B"].T
    if method == "dora":  # y = (m / ‖W̃0 + s B A‖_row) ⊙ (x (W̃0 + s B A)ᵀ) + b
        V = Wt + s * p["B"] @ p["A"]
        return (x @ V.T) * (p["m"] / np.linalg.norm(V, axis=1)) + b
    # AdaLoRA: y = x W̃0ᵀ + b + s ((x Qᵀ) ⊙ E) Pᵀ, s = α / init_r
    return x @ Wt.T + b + s * ((x @ p["Q"].T) * p["E"]) @ p["P"].T


@pytest.mark.parametrize("method", list(CONFIGS))
def test_each_layer_is_its_method_on_the_dequantised_weight(method):
    model, floats, res = _injected(method)
    assert res.replaced == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    assert res.quantize == BaseQuant("nf4", BS, True) and "nf4 (blocksize 16" in str(res)
    x = np.random.default_rng(2).standard_normal((3, 5, 16))
    for name, layer in adapter_layers(model).items():
        assert isinstance(layer.base, lr.quant.QuantizedLinear) and layer.base.blocksize == BS
        assert type(layer) is lr.registry.get_method(method).layer_class("numpy")
        layer.astype(np.float64)
        W0, b = floats[name]
        assert_close(layer.forward(x), _expected(method, layer, W0, b, x), f"{name} y", 1e-10, 1e-12)
    # the layers that are not targets keep their float weights
    assert isinstance(model.get_submodule("blocks.0.attn.k"), lr.nn.Linear)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_adapter_computes_in_the_float_models_dtype_in_both_backends(dtype):
    from lowrank_gpu.nn.gpt import from_numpy

    npm = _gpt().astype(dtype)
    tm = from_numpy(npm)
    for model in (npm, tm):
        inject(model, CONFIGS["dora"](), targets=TARGETS, rng=0, quantize="nf4", blocksize=BS)
    for ln, lt in zip(adapter_layers(npm).values(), adapter_layers(tm).values()):
        assert ln.m.data.dtype == dtype and ln.base.bias.data.dtype == dtype
        assert str(lt.m.dtype) == f"torch.{np.dtype(dtype).name}"
        assert ln.base.qweight.nbytes == lt.base.qweight.nbytes  # the storage is not cast


def test_lora_with_quantize_is_the_qlora_layer():
    """inject(LoRAConfig, quantize='nf4') and the qlora method store the same 4-bit base."""
    a, _, _ = _injected("lora")
    b = _gpt()
    inject(b, lr.QLoRAConfig(r=2, alpha=4.0, blocksize=BS, double_quant=True), targets=TARGETS, rng=0)
    for (n, la), lb in zip(adapter_layers(a).items(), adapter_layers(b).values()):
        for k, v in la.base.qweight.arrays().items():
            np.testing.assert_array_equal(v, lb.base.qweight.arrays()[k], err_msg=f"{n}.{k}")


@pytest.mark.parametrize("method", ["dora", "adalora"])
def test_gradcheck_of_the_injected_model_in_float64(method):
    model, _, _ = _injected(method)
    model.astype(np.float64)
    assert all(layer.quantized for layer in adapter_layers(model).values())  # astype kept the 4-bit storage
    idx = np.random.default_rng(3).integers(0, 13, (2, 6))
    report = lr.gradcheck(model, idx)
    assert report.ok, str(report)
    names = {r.name for r in report.results}
    assert names == {f"{n}.{p}" for n, la in adapter_layers(model).items() for p in la.adapter_parameters()}


def _torch_twin(npm, method):
    from lowrank_gpu.nn.convert import to_torch
    from lowrank_gpu.nn.gpt import from_numpy

    tm = from_numpy(_gpt())  # the float model the NumPy one started as
    inject(tm, CONFIGS[method](), targets=TARGETS, rng=0, quantize="nf4", blocksize=BS, double_quant=True)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if p.requires_grad:
                p.copy_(to_torch(npm.parameters()[n].data))
    return tm


@pytest.mark.parametrize("method", ["dora", "adalora"])
def test_numpy_and_torch_autograd_agree_on_the_injected_model(method):
    npm, _, _ = _injected(method)
    npm.astype(np.float64)
    tm = _torch_twin(npm, method).double()
    for (n, ln), lt in zip(adapter_layers(npm).items(), adapter_layers(tm).values()):
        assert type(lt.base).__name__ == "QuantizedLinear"
        for k, v in ln.base.qweight.arrays().items():  # the same 4-bit codes and scales
            np.testing.assert_array_equal(v, lt.base.qweight.arrays()[k].cpu().numpy(), err_msg=f"{n}.{k}")
    idx = np.random.default_rng(4).integers(0, 13, (2, 7))
    loss, dlogits = npm.loss(idx[:, :-1], idx[:, 1:])
    npm.backward(dlogits)
    logits = tm(torch.tensor(idx[:, :-1]))
    tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), torch.tensor(idx[:, 1:]).reshape(-1))
    tloss.backward()
    assert_close(tloss.detach().numpy(), np.asarray(loss), "loss", 1e-10, 1e-12)
    grads = {n: p.grad for n, p in tm.named_parameters() if p.requires_grad}
    assert set(grads) == set(npm.trainable_parameters())
    for n, p in npm.trainable_parameters().items():
        assert_close(grads[n].numpy(), p.grad, f"{n}.grad torch vs numpy", 1e-9, 1e-11)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_only_the_adapter_trains_and_the_4bit_storage_stays(backend):
    npm, _, _ = _injected("dora")
    model = npm if backend == "numpy" else _torch_twin(npm, "dora")
    layers = adapter_layers(model)
    own = {f"{n}.{p}" for n, la in layers.items() for p in la.adapter_parameters()}
    if backend == "numpy":
        params = model.parameters()
        trainable = set(model.trainable_parameters())
        arr = lambda a: np.array(a)  # noqa: E731
    else:
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        arr = lambda a: a.detach().cpu().numpy().copy()  # noqa: E731
    assert trainable == own
    storage = {n: {k: arr(v) for k, v in la.base.qweight.arrays().items()} for n, la in layers.items()}
    before = {n: arr(p.data) for n, p in params.items()}
    idx = np.random.default_rng(5).integers(0, 13, (2, 7))
    for _ in range(2):
        if backend == "numpy":
            opt = lr.optim.AdamW(model.trainable_parameters(), lr=1e-2)
            _, dl = model.loss(idx[:, :-1], idx[:, 1:])
            model.backward(dl)
            opt.step()
        else:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            out = model(torch.tensor(idx[:, :-1]))
            torch.nn.functional.cross_entropy(out.reshape(-1, 13), torch.tensor(idx[:, 1:]).reshape(-1)).backward()
            opt.step()
    for n, p in params.items():
        assert (not np.array_equal(arr(p.data), before[n])) == (n in own), n
    for n, la in layers.items():
        for k, v in la.base.qweight.arrays().items():
            np.testing.assert_array_equal(arr(v), storage[n][k], err_msg=f"{n}.{k}")


def test_merge_on_the_4bit_base_is_qloras():
    """merge() keeps W̃0 + ΔW (DoRA: its merged weight) as a float array beside the untouched
    4-bit storage; unmerge() drops it. The same rule as the qlora layer."""
    model, floats, _ = _injected("dora")
    layer = model.get_submodule("blocks.0.attn.q")
    x = np.random.default_rng(6).standard_normal((4, 16))
    y = layer.forward(x)
    stored = {k: v.copy() for k, v in layer.base.qweight.arrays().items()}
    layer.merge()
    # a float weight in the model's dtype (float64 here), W̃0 + ΔW rescaled by m / ‖·‖ (DoRA's merge)
    assert layer.merged and layer._merged_W.dtype == np.float64 and layer._merged_W.shape == (16, 16)
    assert_close(layer.forward(x), y, "merged y", 1e-10, 1e-12)
    layer.unmerge()
    assert layer._merged_W is None
    np.testing.assert_array_equal(layer.forward(x), y)
    for k, v in layer.base.qweight.arrays().items():
        np.testing.assert_array_equal(v, stored[k])


# --- errors: the same kind and message in both backends, nothing changed ----------------------
def _state(model, backend):
    mods = dict(model.named_modules())
    if backend == "numpy":
        return mods, {n: (p.trainable, p.data.copy()) for n, p in model.parameters().items()}
    return mods, {n: (p.requires_grad, p.detach().clone().numpy()) for n, p in model.named_parameters()}


def _fresh(backend):
    from lowrank_gpu.nn.gpt import from_numpy

    return _gpt() if backend == "numpy" else from_numpy(_gpt())


BAD = [
    (dict(config=lr.DoRAConfig(r=2), quantize="nf5"), ValueError, "quantize must be None or one of"),
    (dict(config=lr.DoRAConfig(r=2), quantize=4), TypeError, "quantize must be None or one of"),
    (dict(config=lr.DoRAConfig(r=2), quantize="nf4", blocksize=7), ValueError, "blocksize must be a positive even"),
    (dict(config=lr.DoRAConfig(r=2), quantize="nf4", double_quant="yes"), TypeError, "double_quant"),
    (dict(config=None, method="full", quantize="nf4"), ValueError, "'full' is a whole-model mode"),
    (dict(config=None, method="bitfit", quantize="nf4"), ValueError, "'bitfit' is a whole-model mode"),
    (dict(config=lr.QLoRAConfig(r=2), quantize="nf4"), ValueError, "'qlora' stores its base in 4 bits itself"),
    (dict(config=lr.LoRAConfig(r=2), method="lora_int4", quantize="nf4"), ValueError, "'lora_int4' stores its base"),
    # fails while building the first layer, after its base was quantised: rolled back
    (dict(config=lr.LoRAConfig(r=2, init="pissa"), quantize="nf4"), ValueError, "PiSSA on a quantised base"),
]


@pytest.mark.parametrize("kwargs, kind, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_quantize_is_the_same_error_in_both_backends_and_changes_nothing(kwargs, kind, match):
    msgs = []
    for backend in ("numpy", "torch"):
        model = _fresh(backend)
        mods, params = _state(model, backend)
        kw = dict(kwargs)
        with pytest.raises(kind, match=match) as e:
            inject(model, kw.pop("config"), targets=TARGETS, rng=0, **kw)
        msgs.append(str(e.value))
        mods2, params2 = _state(model, backend)
        assert mods2 == mods
        for n, (flag, v) in params.items():
            assert params2[n][0] == flag and np.array_equal(params2[n][1], v), n
    assert msgs[0] == msgs[1]


def test_blocksize_without_quantize_still_completes_a_qlora_config():
    model = _gpt()
    res = inject(model, lr.LoRAConfig(r=2), method="qlora", blocksize=BS, targets="q")
    assert res.quantize is None and res.configs["blocks.0.attn.q"].blocksize == BS


# --- adapter files ------------------------------------------------------------------------
@pytest.mark.parametrize("src, dst", [("numpy", "torch"), ("torch", "numpy")])
def test_save_load_rebuilds_the_4bit_base_in_a_fresh_model(tmp_path, src, dst):
    npm, _, _ = _injected("dora")
    model = npm if src == "numpy" else _torch_twin(npm, "dora")
    path = lr.io.save_adapter(model, tmp_path / "qdora.safetensors")
    meta = lr.io.read_adapter_metadata(path)["layers"]["blocks.1.attn.v"]
    assert meta["base_quant"] == {"quant_type": "nf4", "blocksize": BS, "double_quant": True}
    fresh = _fresh(dst)
    lr.io.load_adapter(fresh, path)
    layers = adapter_layers(fresh)
    assert all(la.quantized and la.base.blocksize == BS for la in layers.values())
    idx = np.random.default_rng(7).integers(0, 13, (2, 6))
    ref = npm.forward(idx)
    out = fresh.forward(idx) if dst == "numpy" else fresh(torch.tensor(idx)).detach().numpy()
    assert_close(out, ref, "logits after load", 1e-4, 1e-5)


def test_load_refuses_a_base_stored_otherwise(tmp_path):
    npm, _, _ = _injected("dora")
    path = lr.io.save_adapter(npm, tmp_path / "qdora.safetensors")
    floatbase = _gpt()
    inject(floatbase, CONFIGS["dora"](), targets=TARGETS, rng=0)
    with pytest.raises(ValueError, match="trained on a base stored in nf4 .* the model's layer has a float base"):
        lr.io.load_adapter(floatbase, path)
    other = _gpt()
    inject(other, CONFIGS["dora"](), targets=TARGETS, rng=0, quantize="nf4", blocksize=32)
    with pytest.raises(ValueError, match="blocksize 16.*blocksize 32"):
        lr.io.load_adapter(other, path)
    # and a float-base file does not load into a 4-bit one
    fpath = lr.io.save_adapter(floatbase, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match="trained on a float base"):
        lr.io.load_adapter(other, fpath)


@pytest.mark.parametrize("bad, match", [
    ({"quant_type": "nf5", "blocksize": 16, "double_quant": True}, "quantize must be None or one of"),
    ({"quant_type": "nf4", "blocksize": -2, "double_quant": True}, "blocksize"),
    ({"quant_type": "nf4", "blocksize": 16}, "must be an object with"),
    ("nf4", "must be an object with"),
])
def test_a_damaged_base_quant_entry_is_refused_before_anything_changes(tmp_path, bad, match):
    import json

    from safetensors.numpy import save_file

    npm, _, _ = _injected("dora")
    tensors, header = lr.io.read_safetensors(lr.io.save_adapter(npm, tmp_path / "ok.safetensors"))
    layers = json.loads(header["layers"])
    layers["blocks.0.attn.q"]["base_quant"] = bad
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={**header, "layers": json.dumps(layers)})
    fresh = _gpt()
    mods = dict(fresh.named_modules())
    with pytest.raises(ValueError, match=rf"layer 'blocks.0.attn.q': bad 'base_quant' metadata: .*{match}"):
        lr.io.load_adapter(fresh, path)
    assert dict(fresh.named_modules()) == mods


# --- the compare rows -----------------------------------------------------------------------
def test_compare_rows_qdora_and_qadalora_are_their_float_twins_on_an_nf4_base():
    from lowrank_ref.experiments.compare import VARIANTS

    for q, fl in (("qdora", "dora"), ("qadalora", "adalora")):
        v, f = VARIANTS[q], VARIANTS[fl]
        assert v.method == f.method and v.config == f.config and v.targets == f.targets and v.lr == f.lr
        assert v.kwargs == {"quantize": "nf4", "blocksize": 64, "double_quant": True}
        assert dataclasses.replace(v, kwargs={}) == f  # nothing else differs


def test_compare_runs_the_rows_on_the_same_4bit_base_as_qlora():
    from lowrank_ref.experiments import run_compare

    rows = run_compare(["lora", "qlora", "qdora", "qadalora"], steps=3, batch_size=2, eval_windows=64,
                       progress=False)
    by = {r["method"]: r for r in rows}
    # every adapter starts as its base: the three 4-bit rows read the same NF4 model, not LoRA's float one
    assert by["qdora"]["target_before"] == by["qadalora"]["target_before"] == by["qlora"]["target_before"]
    assert by["qlora"]["target_before"] != by["lora"]["target_before"]
    assert by["qadalora"]["final_ranks"] and by["qdora"]["trainable_params"] == 4352


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "vera", "tied_lora"])
def test_adapt_with_quantize_is_one_such_layer_in_both_backends(method):
    """``lr.adapt(linear, cfg, quantize="nf4")``: the base stored in 4 bits, the method's formula
    on W̃0 (NumPy against the formula; torch against NumPy), shared state (VeRA) from the float base."""
    rng = np.random.default_rng(4)
    base = lr.nn.Linear(16, 12, rng=rng, dtype=np.float64)
    W0, b = base.weight.data.copy(), base.bias.data.copy()
    cfg = {"vera": lambda: lr.VeRAConfig(r=4), "tied_lora": lambda: lr.TiedLoRAConfig(r=4)}.get(method, CONFIGS.get(method))()
    layer = lr.adapt(base, cfg, quantize="nf4", blocksize=BS, rng=0)
    assert isinstance(layer.base, lr.quant.QuantizedLinear) and layer.base.blocksize == BS
    assert layer.weight_dtype == np.float64  # computes in the float base's dtype
    params = {n: p for n, p in layer.parameters().items() if n != "base.bias"}  # tied tensors included
    for p in params.values():
        p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    x = rng.standard_normal((3, 16))
    if method not in ("vera", "tied_lora"):
        assert_close(layer.forward(x), _expected(method, layer, W0, b, x), rtol=1e-10, atol=1e-12)
    else:  # the update is the method's: the output differs from the 4-bit base's alone
        Wt = lr.quant.quantize_4bit(W0, blocksize=BS, double_quant=True).dequantize().astype(np.float64)
        assert not np.allclose(layer.forward(x), x @ Wt.T + b)
    tl = lr.adapt(base, cfg, backend="torch", quantize="nf4", blocksize=BS, rng=0)
    for name, p in tl.named_parameters():
        if name in params:
            with torch.no_grad():
                p.copy_(torch.from_numpy(params[name].data))
    assert {n for n, _ in tl.named_parameters()} == set(layer.parameters())
    assert_close(tl(torch.from_numpy(x)).detach().numpy(), layer.forward(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_adapt_refuses_quantize_where_inject_does(backend):
    base = lr.nn.Linear(16, 12, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        lr.adapt(base, lr.LoRAConfig(r=2), backend=backend, quantize="nf5")
    with pytest.raises(ValueError, match="stores its base in 4 bits itself"):
        lr.adapt(base, lr.LoRAConfig(r=2), backend=backend, method="qlora", quantize="nf4")
    with pytest.raises(TypeError, match="quantize must be None or one of"):
        lr.adapt(base, lr.LoRAConfig(r=2), backend=backend, quantize=4)
