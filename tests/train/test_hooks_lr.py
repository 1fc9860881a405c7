"""The training loops tell every method's hooks object the learning rate of the current step
(``TrainingHooks.lr``), the value the optimizer uses at that step (SoRA's ξ = η_t λ needs it)."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank_ref import data
from lowrank_ref.nn.gpt import GPT, GPTConfig
from lowrank_ref.optim import cosine_schedule
from lowrank_ref.train import TrainingHooks, train


class LrSeen(TrainingHooks):
    def __init__(self):
        super().__init__()
        self.seen = []

    def before_step(self, step):
        self.seen.append(("before", step, self.lr))

    def after_step(self, step):
        self.seen.append(("after", step, self.lr))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_hooks_see_the_learning_rate_of_each_step(backend):
    cfg = GPTConfig(vocab_size=data.default_tokenizer().vocab_size, block_size=8, n_layer=1, n_head=2,
                    d_model=8, mlp_ratio=2)
    model = GPT(cfg, rng=np.random.default_rng(0), dtype=np.float64)
    if backend == "torch":
        pytest.importorskip("torch")
        from lowrank_gpu.nn.gpt import from_numpy

        model = from_numpy(model)
    hook = LrSeen()
    assert hook.lr is None  # outside a loop
    res = train(model, data.builtin_task(0).dialect_train, steps=4, lr=0.1, batch_size=2, warmup=1,
                progress=False, rng=0, hooks=[hook])
    # the schedule's values: 0 at step 0 (warm-up), the peak 0.1 at step 1, then down
    want = [cosine_schedule(s, 4, 0.1, warmup_steps=1, min_lr=0.0) for s in range(4)]
    assert want[1] == pytest.approx(0.1) and want[0] == 0.0
    assert hook.seen == [(w, s, pytest.approx(want[s])) for s in range(4) for w in ("before", "after")]
    assert res.lrs == pytest.approx(want)  # what the optimizer used
