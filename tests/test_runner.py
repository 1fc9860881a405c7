"""The experiments' one runner: fine-tune + evaluate, recording through a hook, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lowrank_ref as lr
from lowrank_ref.experiments import runner
from lowrank_ref.models import load_pretrained


@pytest.fixture(scope="module")
def base():
    return load_pretrained(progress=False)


def test_finetune_leaves_the_base_alone_and_reports_the_recipe(base):
    before = {k: v.copy() for k, v in base.state_dict().items()}
    out = runner.finetune(base, lr.LoRAConfig(r=2, alpha=4), steps=3, batch_size=2, eval_windows=4)
    for k, v in base.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert out["method"] == "lora" and len(out["train_losses"]) == 3 and out["steps"] == 3
    assert out["targets"] == [n for n in out["targets"] if n.endswith((".q", ".v"))] and out["targets"]
    for k in ("target_after", "retained_after"):
        assert 0.0 <= out[k] <= 1.0
    again = runner.finetune(base, lr.LoRAConfig(r=2, alpha=4), steps=3, batch_size=2, eval_windows=4)
    assert again["train_losses"] == out["train_losses"]  # seed-determined


def test_whole_model_modes_run_through_the_same_recipe(base):
    out = runner.finetune(base, None, method="bitfit", steps=2, batch_size=2, eval_windows=4)
    assert out["method"] == "bitfit" and out["targets"] == []
    assert out["trainable_params"] == sum(p.size for n, p in base.parameters().items() if n.endswith("bias"))


def test_the_recorder_sees_step_zero_and_every_kth_step(base):
    seen = []

    def record(model, step):
        seen.append(step)
        return float(model.parameters()["blocks.0.attn.q.B"].data.std())

    out = runner.finetune(base, lr.LoRAConfig(r=2, alpha=4), targets="q", steps=7, batch_size=2,
                          eval_windows=4, record=record, record_every=3)
    assert seen == [0, 3, 6] and len(out["records"]) == 3
    assert out["records"][0] == 0.0 and out["records"][-1] > 0.0  # B starts at zero, then trains
    with pytest.raises(ValueError, match="record_every must be a positive integer"):
        runner.finetune(base, lr.LoRAConfig(r=2, alpha=4), steps=2, record=record, record_every=0)


def test_quick_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv("LOWRANK_REF_QUICK", "1")
    assert runner.quick_mode()
    monkeypatch.setenv("LOWRANK_REF_QUICK", "0")
    assert not runner.quick_mode()


def test_experiment_main_writes_json(tmp_path):
    got = {}

    def run(a):
        got["quick"], got["n"] = a.quick, a.n
        return {"x": np.float64(1.5), "n": a.n}

    path = tmp_path / "sub" / "r.json"
    rc = runner.experiment_main(run, ["--quick", "--out", str(path), "--n", "3"], prog="t", description="d",
                                default_out="unused.json",
                                add_arguments=lambda p: p.add_argument("--n", type=int, default=1))
    assert rc == 0 and got == {"quick": True, "n": 3}
    assert json.loads(path.read_text()) == {"x": 1.5, "n": 3}
