"""``lowrank-ref train``: every registered method on tiny Hugging Face models (GPT-2 with its
fused Conv1D ``c_attn``, LLaMA), PEFT loading what it writes, resuming after an interruption,
two gloo processes equal to one, and the bad-input list of issue 14."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lowrank_ref import registry  # noqa: E402
from lowrank_ref.cli import main  # noqa: E402
from lowrank_ref.train_cli import _convert_conv1d, build_config, parse_set  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny matrices: one thread (on busy shared cores spinning threads make a step 10x slower);
    the environment variable reaches the spawned ranks."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Tiny GPT-2 and LLaMA folders (random weights from a config, ``save_pretrained``), with a
    vocabulary large enough for the built-in data's ids."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=80, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(root / "gpt2")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0))
    llama.save_pretrained(root / "llama")
    return {"gpt2": str(root / "gpt2"), "llama": str(root / "llama")}


def _args(out, *extra, steps=2, batch=2):
    return ["train", "--steps", str(steps), "--batch-size", str(batch), "--block-size", "8",
            "--out", str(out), "--quiet", *extra]


def _load(folder):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    m.eval()
    return m


def _inject_error(folder, method):
    """What inject says for ``method`` on this model's default targets (None: it applies)."""
    from lowrank_ref.inject import inject
    from lowrank_ref.train_cli import DEFAULT_TARGETS

    model = _load(folder)
    _convert_conv1d(model)
    try:
        inject(model, registry.get_method(method).config(), targets=DEFAULT_TARGETS[model.config.model_type],
               method=method, rng=0)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", registry.method_names())
def test_every_method_trains_on_tiny_hf_models(hf_models, arch, method, tmp_path, capsys):
    out = tmp_path / "run"
    why_not = _inject_error(hf_models[arch], method)
    if why_not is not None:  # the method does not apply to these layers: a clear error, nothing written
        with pytest.raises(SystemExit) as e:
            main(_args(out, "--method", method, "--model", f"hf:{hf_models[arch]}"))
        assert e.value.code == 2
        assert why_not in capsys.readouterr().err
        assert not out.exists()
        return
    assert main(_args(out, "--method", method, "--model", f"hf:{hf_models[arch]}")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method and len(m["losses"]) == 2 and all(np.isfinite(m["losses"]))
    assert m["trainable"] > 0 and np.isfinite(m["evaluation"]["after"]["loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(out / "adapter")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_loads_the_lora_folder_onto_the_same_base(hf_models, arch, tmp_path):
    from peft import PeftModel

    from lowrank_ref.io import load_peft

    out = tmp_path / "run"
    main(_args(out, "--method", "lora", "--set", "r=4", "alpha=8", "--model", f"hf:{hf_models[arch]}",
               "--lr", "0.05", steps=4))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")  # GPT-2's Conv1D stores (in, out)
    x = torch.randint(0, 80, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = _load(hf_models[arch])(input_ids=x).logits
        theirs = PeftModel.from_pretrained(_load(hf_models[arch]), str(out / "adapter"))(input_ids=x).logits
        ours_model = _load(hf_models[arch])
        _convert_conv1d(ours_model)
        load_peft(ours_model, str(out / "adapter"))
        ours = ours_model(input_ids=x).logits
    assert (theirs - base).abs().max() > 1e-4  # the adapter changed the output: the check has teeth
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_conv1d_conversion_keeps_the_forward(hf_models):
    a, b = _load(hf_models["gpt2"]), _load(hf_models["gpt2"])
    names = _convert_conv1d(b)
    assert any(n.endswith("attn.c_attn") for n in names)
    assert isinstance(b.get_submodule(names[0]), torch.nn.Linear)
    x = torch.randint(0, 80, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, rtol=1e-5, atol=1e-6)


def _adapter_tensors(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_resume_after_an_interruption_continues_the_same_run(tmp_path, monkeypatch, backend):
    import lowrank_ref.train as train_mod

    base = ["--method", "lora", "--set", "r=2", "--checkpoint-every", "3", "--backend", backend]
    main(_args(tmp_path / "whole", *base, steps=7))
    real = train_mod.call_hooks

    def interrupt(hooks, what, step):
        if what == "before_step" and step == 5:
            raise KeyboardInterrupt
        return real(hooks, what, step)

    monkeypatch.setattr(train_mod, "call_hooks", interrupt)
    with pytest.raises(SystemExit) as e:
        main(_args(tmp_path / "cut", *base, steps=7))
    assert e.value.code == 130
    assert not (tmp_path / "cut" / "adapter").exists()  # only the step-3 checkpoint
    monkeypatch.setattr(train_mod, "call_hooks", real)
    main(_args(tmp_path / "cut", *base, steps=7))
    m = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    w = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert m["resumed_from"] == 3
    np.testing.assert_allclose(m["losses"], w["losses"], rtol=1e-6)
    a, b = _adapter_tensors(tmp_path / "whole"), _adapter_tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_under_torchrun_equal_one(tmp_path):
    import subprocess
    import sys

    argv = ["--method", "lora", "--set", "r=2", "--lr", "0.01"]
    main(_args(tmp_path / "one", *argv, steps=3, batch=4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "lowrank_ref", *_args(tmp_path / "two", *argv, steps=3, batch=4)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _adapter_tensors(tmp_path / "one"), _adapter_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    moved = max(float(np.abs(one[k]).max()) for k in one if "lora_B" in k)
    assert moved > 0  # B left zero after training: the comparison would prove nothing
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6)
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["processes"] == 2


def test_numpy_backend_trains_the_builtin_model(tmp_path):
    out = tmp_path / "np"
    assert main(_args(out, "--method", "lora", "--backend", "numpy", steps=2)) == 0
    assert json.loads((out / "metrics.json").read_text())["backend"] == "numpy"
    assert (out / "adapter" / "adapter_config.json").exists()


# --- bad input: each a clear error, nothing written ----------------------------------------------------
def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs_are_clear_errors_and_write_nothing(hf_models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    _fails(capsys, _args(out, "--method", "lora", "--model", f"hf:{tmp_path / 'missing'}"), "no folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _fails(capsys, _args(out, "--method", "lora", "--model", f"hf:{empty}"), "holds no weights", "model.safetensors")
    _fails(capsys, _args(out, "--method", "lora", "--set", "rank=4"), "--set rank", "r, alpha")
    _fails(capsys, _args(out, "--method", "lora", "--set", "r=0"), "--set r", "r must be")
    _fails(capsys, _args(out, "--method", "nope"), "nope")
    _fails(capsys, _args(out, "--method", "lora", "--model", f"hf:{hf_models['llama']}", "--targets", "c_attn"),
           "c_attn", "q_proj")  # names the layers that exist
    _fails(capsys, _args(out, "--method", "lora", "--backend", "numpy", "--precision", "bf16"), "bf16")
    _fails(capsys, _args(out, "--method", "lora", "--backend", "cupy"), "--backend cupy")
    if not torch.cuda.is_available():
        _fails(capsys, _args(out, "--method", "lora", "--backend", "cuda"), "--backend cuda", "CUDA")
    monkeypatch.setenv("WORLD_SIZE", "3")
    _fails(capsys, _args(out, "--method", "lora", batch=4), "--batch-size 4", "3 processes")
    monkeypatch.delenv("WORLD_SIZE")
    assert not out.exists()


def test_resume_folder_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    main(_args(out, "--method", "lora", "--set", "r=2", steps=2))
    before = {p: (out / p).read_bytes() for p in ("checkpoint.safetensors", "metrics.json")}
    _fails(capsys, _args(out, "--method", "ia3", steps=2), "another run", "method")
    _fails(capsys, _args(out, "--method", "lora", "--set", "r=3", steps=2), "another run", "config")
    assert {p: (out / p).read_bytes() for p in before} == before


def test_set_values_are_json_scalars():
    assert parse_set(["r=8", "alpha=16.5", "rslora=true", "init=gaussian", "x=null"]) == {
        "r": 8, "alpha": 16.5, "rslora": True, "init": "gaussian", "x": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set(["r"])
    with pytest.raises(ValueError, match="scalar"):
        parse_set(["r=[1,2]"])
    with pytest.raises(ValueError, match="twice"):
        parse_set(["r=1", "r=2"])
    cfg = build_config(registry.get_method("lora"), {"r": 3, "alpha": 6})
    assert (cfg.r, cfg.alpha) == (3, 6)


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lowrank_ref", "train", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--grad-checkpointing" in r.stdout


@pytest.mark.parametrize("model", ["builtin", "llama"])
def test_grad_checkpointing_gives_the_same_run(hf_models, model, tmp_path):
    spec = "builtin" if model == "builtin" else f"hf:{hf_models[model]}"
    argv = ["--method", "lora", "--set", "r=2", "--model", spec, "--lr", "0.01"]
    main(_args(tmp_path / "plain", *argv, steps=3))
    main(_args(tmp_path / "ckpt", *argv, "--grad-checkpointing", steps=3))
    a = json.loads((tmp_path / "plain" / "metrics.json").read_text())["losses"]
    b = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["losses"]
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert a[0] != a[-1]


def test_bf16_autocast_on_the_cpu_trains(tmp_path):
    out = tmp_path / "bf16"
    main(_args(out, "--method", "lora", "--precision", "bf16", steps=2))
    m = json.loads((out / "metrics.json").read_text())
    assert m["precision"] == "bf16" and all(np.isfinite(m["losses"]))


def _text(path, n_words=400):
    from lowrank_ref.data import builtin_task

    task = builtin_task(0)
    path.write_text(task.tokenizer.decode(task.dialect_train[:n_words]), encoding="utf-8")
    return path


def test_a_text_file_is_read_with_the_folders_tokenizer(hf_models, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from lowrank_ref.data import builtin_task

    text = _text(tmp_path / "notes.txt")
    _fails(capsys, _args(tmp_path / "x", "--method", "lora", "--model", f"hf:{hf_models['llama']}", "--data",
                         str(text)), "has no tokenizer")
    folder = tmp_path / "llama-tok"
    shutil.copytree(hf_models["llama"], folder)
    words = builtin_task(0).tokenizer.words
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    out = tmp_path / "run"
    assert main(_args(out, "--method", "lora", "--model", f"hf:{folder}", "--data", str(text))) == 0
    assert json.loads((out / "metrics.json").read_text())["data"] == str(text)


def test_a_text_file_on_the_builtin_model_uses_its_words(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--method", "lora", "--data", str(_text(tmp_path / "ok.txt")))) == 0
    bad = tmp_path / "bad.txt"
    bad.write_text("zebra " * 100, encoding="utf-8")
    _fails(capsys, _args(tmp_path / "never", "--method", "lora", "--data", str(bad)), "zebra", "vocabulary")
    _fails(capsys, _args(tmp_path / "never", "--method", "lora", "--data", str(tmp_path / "none.txt")), "no file")
    assert not (tmp_path / "never").exists()


def test_numpy_resume_refuses_a_torch_checkpoint_and_continues_to_more_steps(tmp_path, capsys):
    out = tmp_path / "run"
    main(_args(out, "--method", "lora", "--set", "r=2", "--backend", "torch", steps=2))
    before = (out / "checkpoint.safetensors").read_bytes()
    _fails(capsys, _args(out, "--method", "lora", "--set", "r=2", "--backend", "numpy", steps=2),
           "torch training loop", "numpy")
    assert (out / "checkpoint.safetensors").read_bytes() == before
    # a finished NumPy run continues when --steps grows (the schedule is then the new run's)
    base = ["--method", "lora", "--set", "r=2", "--backend", "numpy"]
    main(_args(tmp_path / "two", *base, steps=2))
    first = json.loads((tmp_path / "two" / "metrics.json").read_text())
    main(_args(tmp_path / "two", *base, steps=4))
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m["resumed_from"], len(m["losses"])) == (2, 4)
    assert m["losses"][:2] == first["losses"]
    assert m["evaluation"]["before"] == first["evaluation"]["before"]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_quantize_puts_the_method_on_a_4bit_base(tmp_path, capsys, backend):
    """``--method dora --quantize nf4`` is QDoRA: the base the run starts from is the NF4 one (its
    loss before training differs from the float run's), the run says so, and resuming without the
    flag is another run; methods that cannot take it are refused."""
    runs = {}
    for q in (None, "nf4"):
        out = tmp_path / f"{backend}-{q}"
        extra = ["--quantize", q] if q else []
        assert main(_args(out, "--method", "dora", "--backend", backend, *extra, steps=2)) == 0
        runs[q] = json.loads((out / "metrics.json").read_text())
    assert runs["nf4"]["quantize"] == "nf4" and "quantize" not in runs[None]
    before = {q: m["evaluation"]["before"]["loss"] for q, m in runs.items()}
    assert before["nf4"] != before[None], before
    assert abs(before["nf4"] - before[None]) < 0.1 * before[None]  # 4 bits change the base a little
    _fails(capsys, _args(tmp_path / f"{backend}-nf4", "--method", "dora", "--backend", backend, steps=3),
           "another run", "quantize")
    _fails(capsys, _args(tmp_path / "q", "--method", "qlora", "--quantize", "nf4", "--backend", backend),
           "--quantize nf4", "stores its base in 4 bits itself")
    _fails(capsys, _args(tmp_path / "f", "--method", "full", "--quantize", "nf4", "--backend", backend),
           "--quantize nf4", "whole-model mode")
    _fails(capsys, _args(tmp_path / "x", "--method", "dora", "--quantize", "nf5"), "--quantize", "nf5")
    assert not (tmp_path / "q").exists() and not (tmp_path / "f").exists()
