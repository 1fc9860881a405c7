r"""The training loop and the evaluation in PyTorch (CPU or CUDA): the same API as
:mod:`lowrank_ref.train`, autograd for the backward pass.

The batches come from the same NumPy generator as the NumPy loop (:func:`lowrank_ref.data.get_batch`),
the learning rate from the same :func:`~lowrank_ref.optim.cosine_schedule`, the optimizer is
``torch.optim.AdamW`` (whose update rule ``lowrank_ref.optim.AdamW`` follows) and clipping is
``torch.nn.utils.clip_grad_norm_`` (the same ``min(1, max_norm/(norm + 1e-6))`` factor). So from the
same weights, in float64, both loops walk the same trajectory to rounding (tests/test_train.py).

Peak memory (``measure_memory=True``):

- **CUDA**: ``torch.cuda.max_memory_allocated()`` over the first two steps (the counter reset just
  before the first): every tensor live on the device at the high-water mark, weights included.
  Two steps, because the optimizer state created at the end of the first is live during the
  second, as in every later step (the NumPy loop measures the same way).
- **CPU**: PyTorch's CPU allocator keeps no peak counter and :mod:`tracemalloc` does not see it,
  so the number is counted, not measured: the model's parameters and buffers, plus the
  tensors autograd saves for the backward pass (caught with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once), plus the gradients,
  plus the optimizer state after the step. Temporaries freed inside an operation are not in it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from lowrank_gpu.optim import grow_state
from lowrank_ref.data.batching import eval_windows
from lowrank_ref.train import (
    TrainResult,
    as_rng,
    batch_source,
    call_hooks,
    check_train_args,
    lr_at,
    progress_bar,
    resolve_backend,
    set_hooks_lr,
    training_hooks,
)

__all__ = ["train", "evaluate", "TrainResult", "torch_model_bytes"]


def torch_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _make_optimizer(params, optimizer, lr, betas, eps, weight_decay, momentum):
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # skip the scalar step counter
                total += v.numel() * v.element_size()
    return total


def train(model, data, steps: int, lr: float = 1e-3, batch_size: int = 16, optimizer: str = "adamw",
          schedule: str = "cosine", warmup: int = 0, clip: float | None = 1.0, rng=None,
          progress: bool = True, backend: str | None = None, weight_decay: float = 0.0,
          betas=(0.9, 0.999), eps: float = 1e-8, min_lr: float = 0.0, momentum: float = 0.9,
          measure_memory: bool = False, desc: str = "train", hooks=None) -> TrainResult:
    """Train a torch model's ``requires_grad`` parameters; arguments as :func:`lowrank_ref.train.train`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backend = resolve_backend(model, backend)
    check_train_args(steps, lr, batch_size, optimizer, schedule, warmup, clip, weight_decay)
    block_size = getattr(model, "max_input_length", model.config.block_size)  # less a prompt's k positions
    next_batch = batch_source(data, block_size, model)
    rng = as_rng(rng)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to train")
    opt = _make_optimizer(params, optimizer, lr, tuple(betas), eps, weight_decay, momentum)
    step_hooks = training_hooks(model, hooks, backend=backend)
    cuda = device.type == "cuda"

    result = TrainResult(backend=backend)
    model.train()
    opt.zero_grad(set_to_none=True)
    times = []
    bar = progress_bar(steps, progress, desc)
    last_measured = min(1, steps - 1) if cuda else 0  # CUDA: the second step holds the optimizer state
    for step in bar:
        measuring = measure_memory and step <= last_measured
        saved: dict = {}
        if measuring and cuda and step == 0:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        lr_now = lr_at(step, steps, lr, schedule, warmup, min_lr)
        set_hooks_lr(step_hooks, lr_now)  # the hooks see this step's lr (SoRA's ξ = η_t λ)
        call_hooks(step_hooks, "before_step", step)
        xb, yb, cb = next_batch(rng, batch_size)
        x = torch.from_numpy(xb).to(device)
        y = torch.from_numpy(yb).to(device)
        cond = None if cb is None else torch.from_numpy(cb).to(device)
        if measuring and not cuda:

            def pack(t, saved=saved):
                saved[(t.untyped_storage().data_ptr(), t.device.type)] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(x) if cond is None else model(x, cond=cond)  # (B, T, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        else:
            logits = model(x) if cond is None else model(x, cond=cond)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        for extra in call_hooks(step_hooks, "loss_terms", step):  # autograd takes their gradients
            loss = loss + extra
        loss.backward()
        del logits
        if measuring and not cuda:
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        for g in opt.param_groups:
            g["lr"] = lr_now
        grow_state(opt)  # a parameter that grew (SeLoRA-style rank growth): its Adam moments follow
        opt.step()
        call_hooks(step_hooks, "after_step", step)  # gradients still in place (AdaLoRA's scores read them)
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())  # synchronises on CUDA
        elapsed = time.perf_counter() - t0
        if measuring:
            if cuda:
                if step == last_measured:
                    result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
            else:
                params_in_saved = {(p.untyped_storage().data_ptr(), p.device.type) for p in model.parameters()}
                act = sum(v for k, v in saved.items() if k not in params_in_saved)
                result.peak_memory_bytes = int(torch_model_bytes(model) + act + grad_bytes + _state_bytes(opt))
        elif step > 0 or steps == 1:
            times.append(elapsed)
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"the training loss became {loss_value} at step {step}; lower lr (now {lr})")
        result.losses.append(loss_value)
        result.lrs.append(float(lr_now))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    result.seconds_per_step = float(np.mean(times)) if times else float("nan")
    result.optimizer_state_bytes = _state_bytes(opt)
    return result


@torch.no_grad()
def evaluate(model, tokens, block_size: int | None = None, max_windows: int | None = 256,
             batch_size: int = 64, backend: str | None = None, cond: int | None = None) -> dict:
    """Next-token ``{"loss", "accuracy", "tokens"}``, as :func:`lowrank_ref.train.evaluate`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    resolve_backend(model, backend)
    block_size = getattr(model, "max_input_length", model.config.block_size) if block_size is None else block_size
    xs, ys = eval_windows(tokens, block_size, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, correct = 0.0, 0
    try:
        for i in range(0, xs.shape[0], batch_size):
            x = torch.from_numpy(xs[i : i + batch_size]).to(device)
            y = torch.from_numpy(ys[i : i + batch_size]).to(device)
            logits = model(x) if cond is None else \
                model(x, cond=torch.full((x.shape[0],), int(cond), dtype=torch.int64, device=device))  # (b, T, V)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll -= float(logp.gather(-1, y[..., None]).sum())
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    n = int(ys.size)
    return {"loss": nll / n, "accuracy": correct / n, "tokens": n}
