"""The `lowrank-ref` command: help, clear errors, compare end to end, pretrain determinism."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowrank_ref.cli import main


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "lowrank_ref.cli", "--help"], capture_output=True,
                         text=True, check=True)
    assert "compare" in out.stdout and "pretrain" in out.stdout


def test_compare_help_names_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--methods", "--backend", "--steps", "--out", "--quiet"):
        assert flag in text


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_method_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--methods", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2
    from lowrank_ref.experiments.compare import VARIANTS

    err = capsys.readouterr().err
    assert "unknown method(s) 'nope'" in err and "known methods: " + ", ".join(VARIANTS) in err
    assert "full, bitfit, lora" in err
    assert not (tmp_path / "compare.json").exists()  # failed before any work


@pytest.mark.parametrize("argv, match", [
    (["compare", "--steps", "0"], "positive integer"),
    (["compare", "--steps", "ten"], "positive integer"),
    (["compare", "--backend", "tpu"], "invalid choice"),
    (["pretrain", "--steps", "-3"], "positive integer"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    import helpers

    if helpers.CUDA:
        pytest.skip("a CUDA GPU is present: this checks the message shown without one")
    with pytest.raises(SystemExit) as e:
        main(["compare", "--backend", "cuda", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_compare_end_to_end(capsys, tmp_path):
    assert main(["compare", "--methods", "bitfit,lora", "--steps", "2", "--batch-size", "2",
                 "--out", str(tmp_path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "target before" in text and "bitfit" in text and "lora" in text
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["bitfit", "lora"]
    assert (tmp_path / "compare.png").exists()


def test_methods_lists_rows_and_registry(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "full" in text and "bitfit" in text and "lora" in text and "Hu et al." in text


def test_pretrain_is_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", "--steps", "3", "--out", str(a), "--quiet"]) == 0
    assert main(["pretrain", "--steps", "3", "--out", str(b), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    wa, wb = (a / "gpt_base.safetensors").read_bytes(), (b / "gpt_base.safetensors").read_bytes()
    assert wa == wb
    assert (a / "gpt_base.json").read_text() == (b / "gpt_base.json").read_text()
    meta = json.loads((a / "gpt_base.json").read_text())
    assert meta["settings"]["steps"] == 3 and meta["data_version"]
    # a different seed gives different weights (the test above could not pass by writing constants)
    from lowrank_ref.models import PretrainSettings, pretrain

    m3, _ = pretrain(steps=3, settings=PretrainSettings(seed=1), progress=False)
    from lowrank_ref.models import load_model

    m1 = load_model(a / "gpt_base.safetensors", m3.config)
    assert any((m1.parameters()[n].data != p.data).any() for n, p in m3.parameters().items())


def test_load_pretrained_rebuilds_a_missing_file(tmp_path, monkeypatch):
    import numpy as np

    from lowrank_ref import models

    # a JSON with a tiny recipe and no weights file next to it: load_pretrained rebuilds from the seed
    settings = models.PretrainSettings(steps=2, batch_size=2)
    from dataclasses import asdict

    meta = {"config": {}, "settings": asdict(settings), "data_version": "1"}
    (tmp_path / "gpt_base.json").write_text(json.dumps(meta))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = models.load_pretrained(asset_dir=tmp_path, progress=False)
    assert (tmp_path / "gpt_base.safetensors").exists()
    ref, _ = models.pretrain(settings=settings, progress=False)
    for n, p in ref.parameters().items():
        assert np.array_equal(m.parameters()[n].data, p.data), n
