r"""Optimizers with state you can inspect and count: SGD, Adam, AdamW; a cosine schedule with
warmup; global-norm gradient clipping. The update rules are PyTorch's, so trajectories match
``torch.optim`` to rounding in float64 (tests/optim checks it).

    opt = AdamW(model.trainable_parameters(), lr=1e-3)
    sched = CosineWithWarmup(opt, total_steps=100, warmup_steps=10)
    ... model.backward(dy) ...
    clip_grad_norm(opt.params, 1.0); opt.step(); sched.step(); opt.zero_grad()
    opt.state["blocks.0.attn.q.A"]["exp_avg"]; opt.state_bytes()
"""

from lowrank_ref.optim.adam import Adam, AdamW
from lowrank_ref.optim.adam8bit import Adam8bit
from lowrank_ref.optim.clip import clip_grad_norm, grad_norm
from lowrank_ref.optim.optimizer import Optimizer, grow_state
from lowrank_ref.optim.paged import PagedAdamW
from lowrank_ref.optim.schedule import CosineWithWarmup, cosine_schedule
from lowrank_ref.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "cosine_schedule", "CosineWithWarmup",
           "clip_grad_norm", "grad_norm"]
__all__ += ["Adam8bit", "PagedAdamW"]  # optimizer-state memory (chapter 03)
__all__ += ["grow_state"]  # a parameter that grew (SeLoRA-style rank growth): its state follows
