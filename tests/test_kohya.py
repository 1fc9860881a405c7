"""kohya-ss LoRA and LyCORIS LoHa/LoKr files: the keys, shapes and the alpha convention of the
format; round trips in NumPy and torch and across them (per-layer ranks and alphas, rsLoRA, LoKr's
full and low-rank factors); bad files refused with the model left as it was."""

import math

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrank_ref as lr
from lowrank_ref.inject import adapter_layers, inject
from lowrank_ref.kohya import kohya_name, load_kohya, save_kohya
from lowrank_ref.nn.gpt import GPT, GPTConfig

CFG = dict(vocab_size=13, block_size=8, d_model=8, n_layer=2, n_head=2)
IDX = np.random.default_rng(5).integers(0, 13, (2, 7))


def _gpt():
    return GPT(GPTConfig(**CFG), rng=np.random.default_rng(0), dtype=np.float64)


def _adapted(cfg=None, seed=1):
    model = _gpt()
    inject(model, cfg or lr.LoRAConfig(r=2, alpha=4.0), targets=("attn", "fc"),
           ranks={"blocks.1.*": 3}, alphas={"v": 7.0}, rng=0)
    rng = np.random.default_rng(seed)
    for p in model.trainable_parameters().values():
        p.data = rng.standard_normal(p.shape)
    return model


def test_the_file_has_kohyas_keys_shapes_and_alpha(tmp_path):
    model = _adapted()
    save_kohya(model, tmp_path / "k.safetensors")
    t = load_file(tmp_path / "k.safetensors")
    name = kohya_name("blocks.1.attn.v")
    assert name == "lora_blocks_1_attn_v"
    assert t[f"{name}.lora_down.weight"].shape == (3, 8) and t[f"{name}.lora_up.weight"].shape == (8, 3)
    assert t[f"{name}.alpha"].shape == () and float(t[f"{name}.alpha"]) == 7.0
    layer = adapter_layers(model)["blocks.1.attn.v"]
    # kohya's rule: ΔW = (alpha / rows of lora_down) · up @ down equals the layer's own ΔW
    dW = float(t[f"{name}.alpha"]) / 3 * t[f"{name}.lora_up.weight"] @ t[f"{name}.lora_down.weight"]
    np.testing.assert_allclose(dW, layer.merged_weight() - layer.base.weight.data, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
def test_numpy_round_trip_gives_the_same_outputs(tmp_path, rslora):
    model = _adapted(lr.LoRAConfig(r=2, alpha=4.0, rslora=rslora))
    save_kohya(model, tmp_path / "k.safetensors", prefix="lora_te")
    fresh = _gpt()
    names = load_kohya(fresh, tmp_path / "k.safetensors", prefix="lora_te")
    assert names == sorted(adapter_layers(model))
    assert not np.allclose(model.forward(IDX), _gpt().forward(IDX))  # the adapters change the output
    tol = 1e-6 if rslora else 1e-10  # the file's alpha is a float32 scalar: α·√2 is rounded there
    np.testing.assert_allclose(fresh.forward(IDX), model.forward(IDX), rtol=tol, atol=tol)
    if rslora:  # written as alpha·√r under kohya's α/r rule: loads as plain LoRA with that alpha
        cfg = adapter_layers(fresh)["blocks.0.attn.q"].config
        assert not cfg.rslora and math.isclose(cfg.alpha, 4.0 * math.sqrt(2), rel_tol=1e-7)


def test_torch_round_trip_and_numpy_to_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy

    model = _adapted()
    save_kohya(model, tmp_path / "np.safetensors")
    tm = from_numpy(_gpt())
    load_kohya(tm, tmp_path / "np.safetensors")
    with torch.no_grad():
        out = tm(torch.tensor(IDX)).numpy()
    np.testing.assert_allclose(out, model.forward(IDX), rtol=1e-9, atol=1e-9)
    save_kohya(tm, tmp_path / "t.safetensors")
    a, b = load_file(tmp_path / "np.safetensors"), load_file(tmp_path / "t.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12)


def test_bad_files_are_refused_and_the_model_is_unchanged(tmp_path):
    good = tmp_path / "k.safetensors"
    save_kohya(_adapted(), good)
    t = load_file(good)
    cases = {
        "half a loha": ({"lora_blocks_0_attn_q.hada_w1_a": np.zeros((8, 2))}, "lacks hada_w1_b"),
        "mixed": ({**t, "lora_blocks_0_attn_k.hada_w1_a": np.zeros((8, 2))}, "mixes"),
        "tucker": ({"lora_blocks_0_attn_q.hada_t1": np.zeros((2, 2, 1, 1))}, "Tucker"),
        "unknown layer": ({**t, "lora_nowhere.lora_down.weight": np.zeros((2, 8)),
                           "lora_nowhere.lora_up.weight": np.zeros((8, 2))}, "lora_nowhere"),
        "no up": ({k: v for k, v in t.items() if k != "lora_blocks_0_attn_q.lora_up.weight"}, "lacks lora_up"),
        "bad key": ({**t, "lora_blocks_0_attn_q.weird": np.zeros(2)}, "not a kohya LoRA or LyCORIS"),
        "bad shapes": ({**t, "lora_blocks_0_attn_q.lora_up.weight": np.zeros((8, 5))}, "do not make"),
    }
    for name, (tensors, needle) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(tensors, bad)
        model = _gpt()
        before = model.forward(IDX)
        with pytest.raises(ValueError, match=needle):
            load_kohya(model, bad)
        assert not adapter_layers(model), name
        np.testing.assert_array_equal(model.forward(IDX), before)


def test_only_lora_loha_and_lokr_layers_are_written(tmp_path):
    model = _gpt()
    inject(model, lr.IA3Config(), targets=("q",), rng=0)
    with pytest.raises(ValueError, match="LoRA, LoHa and LoKr layers"):
        save_kohya(model, tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match="prefix"):
        save_kohya(_adapted(), tmp_path / "k.safetensors", prefix="bad prefix")
    assert not (tmp_path / "k.safetensors").exists()


# --- LyCORIS LoHa and LoKr -----------------------------------------------------------------------
def _randomised(model, seed=1):
    rng = np.random.default_rng(seed)
    for p in model.trainable_parameters().values():
        p.data = rng.standard_normal(p.shape)
    return model


def _delta(layer):
    return layer.merged_weight() - layer.base.weight.data


def test_a_loha_file_follows_lycoris_formula_and_round_trips(tmp_path):
    model = _gpt()
    inject(model, lr.LoHaConfig(r=2, alpha=3.0), targets=("q", "v"), alphas={"v": 5.0}, rng=0)
    _randomised(model)
    save_kohya(model, tmp_path / "h.safetensors")
    t = load_file(tmp_path / "h.safetensors")
    name = kohya_name("blocks.0.attn.v")
    # LyCORIS's rule, written out here: ΔW = (alpha / r) (w1a w1b) ⊙ (w2a w2b), r = rows of hada_w1_b
    r = t[f"{name}.hada_w1_b"].shape[0]
    dW = (float(t[f"{name}.alpha"]) / r) * (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) \
        * (t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"])
    np.testing.assert_allclose(dW, _delta(adapter_layers(model)["blocks.0.attn.v"]), rtol=1e-12, atol=1e-12)
    fresh = _gpt()
    assert load_kohya(fresh, tmp_path / "h.safetensors") == sorted(adapter_layers(model))
    np.testing.assert_allclose(fresh.forward(IDX), model.forward(IDX), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [lr.LoKrConfig(r=1, alpha=3.0),                       # C full, D = B A
                                 lr.LoKrConfig(r=6, alpha=3.0),                       # both full: s folded in
                                 lr.LoKrConfig(r=1, alpha=2.0, decompose_factor=4)],  # C (4, 4), D (2, 2)
                         ids=["low-rank-w2", "both-full", "factor-4"])
def test_a_lokr_file_follows_lycoris_formula_and_round_trips(tmp_path, cfg):
    model = _gpt()
    inject(model, cfg, targets=("q", "fc"), rng=0)
    _randomised(model)
    save_kohya(model, tmp_path / "k.safetensors")
    t = load_file(tmp_path / "k.safetensors")
    for p, layer in adapter_layers(model).items():
        n = kohya_name(p)

        def get(i, n=n):
            full = f"{n}.lokr_w{i}"
            return t[full] if full in t else t[f"{full}_a"] @ t[f"{full}_b"]
        low = [t[f"{n}.lokr_w{i}_b"].shape[0] for i in (1, 2) if f"{n}.lokr_w{i}_b" in t]
        scale = float(t[f"{n}.alpha"]) / low[0] if low else 1.0  # the readers' rule: 1 with no low-rank factor
        np.testing.assert_allclose(scale * np.kron(get(1), get(2)), _delta(layer), rtol=1e-12, atol=1e-12)
    fresh = _gpt()
    load_kohya(fresh, tmp_path / "k.safetensors")
    np.testing.assert_allclose(fresh.forward(IDX), model.forward(IDX), rtol=1e-10, atol=1e-10)


def test_lycoris_files_load_into_torch_models_too(tmp_path):
    torch = pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy

    model = _gpt()
    inject(model, lr.LoKrConfig(r=1, alpha=3.0), targets=("q",), rng=0)
    _randomised(model)
    save_kohya(model, tmp_path / "k.safetensors")
    tm = from_numpy(_gpt())
    load_kohya(tm, tmp_path / "k.safetensors")
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.tensor(IDX)).numpy(), model.forward(IDX), rtol=1e-9, atol=1e-9)
    save_kohya(tm, tmp_path / "t.safetensors")
    a, b = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "t.safetensors")
    assert a.keys() == b.keys()


def test_a_lokr_factorisation_peft_cannot_express_is_refused(tmp_path):
    # C (2, 4) ⊗ D (4, 2) for an 8x8 layer: PEFT's factorization gives C square for one factor
    n = kohya_name("blocks.0.attn.q")
    bad = tmp_path / "k.safetensors"
    save_file({f"{n}.lokr_w1": np.ones((2, 4)), f"{n}.lokr_w2": np.ones((4, 2)), f"{n}.alpha": np.asarray(1.0)}, bad)
    model = _gpt()
    with pytest.raises(ValueError, match="factorization rule"):
        load_kohya(model, bad)
    assert not adapter_layers(model)
