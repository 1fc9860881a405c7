"""Compare rows on the multi-task data (CompareRow.task) and training on MultiTaskData."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ref.experiments.compare import COLUMNS, MULTITASK_COLUMNS, VARIANTS, run_compare
from lowrank_ref.registry import CompareRow


def test_task_is_checked():
    with pytest.raises(ValueError, match="task must be one of"):
        CompareRow(task="klingon")
    assert VARIANTS["lora_shared"].task == "multitask"
    assert VARIANTS["lora_per_task"].task == "multitask_per_task"
    assert VARIANTS["lora"].task == "dialect"


def test_multitask_rows_keep_per_task_numbers():
    rows = run_compare("lora_shared,lora_per_task,hyperlora", steps=8, batch_size=4, eval_windows=8,
                       progress=False, verbose=False)
    shared, per_task, hyper = rows
    from lowrank_ref.data.multitask import TASKS

    for r in rows:
        assert tuple(r) == COLUMNS + MULTITASK_COLUMNS
        assert set(r["per_task"]) == set(TASKS)
        assert r["target_after"] == pytest.approx(np.mean([v["after"] for v in r["per_task"].values()]))
    # one LoRA per task: four adapters of the shared one's size; every task starts from the same model
    assert per_task["trainable_params"] == 4 * shared["trainable_params"]
    assert per_task["adapter_bytes"] > 3 * shared["adapter_bytes"]
    assert per_task["target_before"] == shared["target_before"]
    # a conditional row starts where every row starts (ΔW = 0 for every task at init)
    assert hyper["target_before"] == shared["target_before"]
    assert all(0 < r["retained_after"] < 1 for r in rows)


def test_evaluate_gives_a_condition_to_every_window():
    from lowrank_ref import data
    from lowrank_ref.adapters.hyperlora import HyperLoRAConfig
    from lowrank_ref.inject import inject
    from lowrank_ref.models import load_pretrained
    from lowrank_ref.train import evaluate

    model = load_pretrained(progress=False)
    inject(model, HyperLoRAConfig(n_tasks=4), targets=("q",), rng=0)
    tokens = data.builtin_task(0).base_heldout
    with pytest.raises(ValueError, match="needs a condition"):
        evaluate(model, tokens, max_windows=2)
    plain = evaluate(load_pretrained(progress=False), tokens, max_windows=4)
    assert evaluate(model, tokens, max_windows=4, cond=3) == plain  # ΔW = 0 at init, for every task


def test_training_on_multitask_data_matches_across_backends():
    pytest.importorskip("torch")
    from lowrank_gpu.nn.gpt import from_numpy
    from lowrank_ref import data
    from lowrank_ref.nn import GPT, GPTConfig
    from lowrank_ref.train import batch_source, train

    mt = data.multitask_data(0)
    cfg = GPTConfig(vocab_size=mt.vocab_size, block_size=8, n_layer=1, n_head=2, d_model=16, mlp_ratio=2)
    np_model = GPT(cfg, rng=np.random.default_rng(5), dtype=np.float64)
    t_model = from_numpy(np_model)
    kw = dict(steps=3, lr=1e-2, batch_size=4, progress=False, rng=1)
    r_np, r_t = train(np_model, mt, **kw), train(t_model, mt, **kw)
    np.testing.assert_allclose(r_np.losses, r_t.losses, rtol=1e-10)
    # an unconditional model gets no condition; the rows come from random tasks
    x, y, cond = batch_source(mt, 8, np_model)(np.random.default_rng(0), 16)
    assert cond is None and x.shape == (16, 8)
