r"""The training loop and the evaluation, for the NumPy models (and the switch to the torch loop).

One step of :func:`train` is the whole of backpropagation by hand:

.. code-block:: text

    x, y   = random windows of block_size + 1 tokens          (B, T) each
    z      = model.forward(x)                                 (B, T, V)
    L, z̄   = cross_entropy(z, y)                              mean over B·T tokens
    model.backward(z̄)                                         .grad on trainable parameters only
    clip the global gradient norm; set the lr from the schedule; optimizer.step()

:func:`evaluate` gives next-token loss and accuracy (the share of positions where the arg-max of
the logits is the true next token) on deterministic, non-overlapping windows.

Training hooks: a method whose ``SPEC.hooks`` names a :class:`TrainingHooks` class (one per
backend) gets one instance per model, built from the model and that method's layers, and the loop
calls it on every step, so an allocator or a proximal step cannot be forgotten:

.. code-block:: text

    hooks.before_step(step)            before the forward pass (DyLoRA's rank sampling)
    L += hooks.loss_terms(step)        NumPy: after model.backward, the value of the extra loss
                                       terms, whose hand-derived gradients it adds into .grad;
                                       torch: a scalar tensor added to the loss before backward
    optimizer.step()
    hooks.after_step(step)             after the update, before the gradients are zeroed
                                       (AdaLoRA's allocator reads them; SoRA's proximal step)

Each :class:`TrainingHooks` object's ``lr`` holds the learning rate of the current step, set by
the loop before ``before_step`` (both loops, the same schedule value).

``train(..., hooks=[...])`` adds hooks of the caller's own (an experiment that records values
every few steps), called after the methods' hooks.

``backend=`` picks the loop: ``"numpy"`` runs here; ``"torch"`` and ``"cuda"`` hand over to
:func:`lowrank_gpu.train.train` with the same arguments (the model must then be a torch model).
``None`` reads the backend off the model.

Peak memory (``measure_memory=True``): the first two steps run under :mod:`tracemalloc`, which
sees every NumPy allocation (NumPy reports its data buffers to it). The number reported is the
bytes the model holds before training (every parameter, frozen or not, and any other arrays its
modules keep, such as packed 4-bit weights) plus the peak of what those steps allocate on top:
activations kept for the backward pass, gradients, and the optimizer state. Two steps, because the
first step creates the optimizer state only after its backward pass has freed the activations;
from the second step on the state is live while activations and gradients peak, as in every
later step. Timing skips the traced steps, because tracing slows allocation down.
"""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from lowrank_ref.data.batching import check_tokens, eval_windows, get_batch
from lowrank_ref.nn.module import as_rng, where_is
from lowrank_ref.registry import check_backend

__all__ = ["TrainResult", "train", "evaluate", "model_backend", "model_bytes", "as_rng",
           "OPTIMIZERS", "SCHEDULES", "check_train_args", "TrainingHooks", "training_hooks", "call_hooks", "set_hooks_lr",
           "resolve_backend", "lr_at", "progress_bar"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainResult:
    """What a training run recorded.

    Attributes:
        losses: the training loss of every step (mean next-token cross-entropy of the batch).
        lrs: the learning rate used at every step.
        seconds_per_step: mean wall time of a step (steps after the first).
        optimizer_state_bytes: bytes in the optimizer state after the last step.
        peak_memory_bytes: see the module docstring; ``None`` unless ``measure_memory=True``.
        backend: the loop that ran.
    """

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds_per_step: float = float("nan")
    optimizer_state_bytes: int = 0
    peak_memory_bytes: int | None = None
    backend: str = "numpy"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- small helpers --------------------------------------------------------------------------
def model_backend(model) -> str:
    """``"numpy"`` for a lowrank_ref Module; ``"torch"``/``"cuda"`` for a torch module by device."""
    from lowrank_ref.nn.module import Module

    if isinstance(model, Module):
        return "numpy"
    if hasattr(model, "parameters") and hasattr(model, "state_dict"):  # a torch.nn.Module
        for p in model.parameters():
            return "cuda" if p.device.type == "cuda" else "torch"
        return "torch"
    raise TypeError(f"model must be a lowrank_ref.nn.Module or a torch.nn.Module, got {type(model).__name__}")


def resolve_backend(model, backend) -> str:
    """The backend to train ``model`` in: its own (:func:`model_backend`) when ``backend`` is
    None, else ``backend`` checked against it (shared with ``lowrank_gpu.train``)."""
    actual = model_backend(model)
    if backend is None:
        return actual
    backend = check_backend(backend)
    if backend == "cupy":
        raise ValueError("train supports backends numpy, torch and cuda; 'cupy' is a layer-level "
                         "switch (lr.adapt): train on the GPU with backend='cuda'")
    if backend != actual:
        raise ValueError(
            f"backend={backend!r} but the model is a {actual} model; build it for that backend "
            f"(lowrank_ref.models.load_pretrained(backend={backend!r})) or pass backend={actual!r}"
        )
    return backend



def model_bytes(model) -> int:
    """Bytes of every array a NumPy model holds: parameters (frozen too) and other arrays its
    modules keep as attributes (one level into plain objects, e.g. a quantised-weight record)."""
    from lowrank_ref.nn.module import Parameter

    seen: set[int] = set()
    total = 0

    def add(a) -> None:
        nonlocal total
        if isinstance(a, np.ndarray) and id(a) not in seen:
            seen.add(id(a))
            total += int(a.nbytes)

    for _, mod in model.named_modules():
        for key, v in vars(mod).items():
            if key == "_cache":
                continue  # activations kept for a backward pass, not the model
            if isinstance(v, Parameter):
                add(v.data)
            elif isinstance(v, np.ndarray):
                add(v)
            elif hasattr(v, "__dict__") and not callable(v) and not hasattr(v, "named_modules"):
                for w in vars(v).values():
                    add(w)
    return total


def check_train_args(steps, lr, batch_size, optimizer, schedule, warmup, clip, weight_decay):
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or not 0 <= warmup < steps:
        raise ValueError(f"warmup must be an integer in [0, steps={steps}), got {warmup!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip must be None or a positive number, got {clip!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known optimizers: {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known schedules: {', '.join(SCHEDULES)}")


def lr_at(step: int, steps: int, lr: float, schedule: str, warmup: int, min_lr: float) -> float:
    """The learning rate of ``step`` (0-based)."""
    if schedule == "constant":
        return lr if step >= warmup else lr * step / warmup
    from lowrank_ref.optim import cosine_schedule

    return cosine_schedule(step, steps, lr, warmup_steps=warmup, min_lr=min_lr)


def _bar_fits_the_output() -> bool:
    """A live bar only on a terminal or in a Jupyter kernel (a widget): in a log file
    (``make demo > log 2>&1``) its carriage-return updates would be hundreds of lines."""
    import sys

    return "ipykernel" in sys.modules or bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(steps: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    show = progress and _bar_fits_the_output()  # in a log, callers print one summary line instead
    return tqdm(range(steps), desc=desc, disable=not show, leave=False, dynamic_ncols=True)


# -- training hooks -------------------------------------------------------------------------
class TrainingHooks:
    """What a method (or an experiment) may do at each training step; every call is optional.

    A method's hooks class is built once per model as ``cls(model, layers)``, with ``layers``
    ``{dotted name: layer}`` of that method's layers in the model (``SPEC.hooks`` names the class
    per backend). Subclasses override what they need; the defaults do nothing."""

    def __init__(self, model=None, layers: dict | None = None):
        self.model = model
        self.layers = {} if layers is None else dict(layers)
        #: the learning rate of the current step (the schedule's value, the one the optimizer
        #: uses at this step), set by both training loops before ``before_step``; ``None``
        #: outside a loop. A proximal step (SoRA's soft-threshold ``ξ = η_t λ``) reads it.
        self.lr: float | None = None

    def before_step(self, step: int) -> None:
        """Before the forward pass of ``step``."""

    def loss_terms(self, step: int):
        """Extra loss terms. NumPy: return their value (a float) and add their gradients into the
        parameters' ``.grad`` (called after ``model.backward``). Torch: return a scalar tensor
        (added to the loss before ``backward``). ``0.0``: none."""
        return 0.0

    def after_step(self, step: int) -> None:
        """After the optimizer's update of ``step``."""


def training_hooks(model, extra=None, backend: str | None = None) -> list:
    """One hooks object per method in ``model`` whose ``SPEC.hooks`` names one for ``backend``
    (the model's own by default), in registry order, then the ``extra`` objects (each anything
    with some of ``before_step`` / ``loss_terms`` / ``after_step``)."""
    from lowrank_ref import registry

    backend = model_backend(model) if backend is None else backend
    if backend == "numpy":
        from lowrank_ref.inject import adapter_layers
    else:
        from lowrank_gpu.inject import adapter_layers
    by_method: dict[str, dict] = {}
    for name, layer in adapter_layers(model).items():
        try:
            spec = registry.spec_of_layer(layer)
        except ValueError:  # an experiment's own layer class (chapter 02's double LoRA): no SPEC
            continue
        if spec.hooks is not None and spec.hooks.for_backend(backend) is not None:
            by_method.setdefault(spec.name, {})[name] = layer
    hooks = []
    for method, layers in by_method.items():
        cls = registry.load_object(registry.get_method(method).hooks.for_backend(backend))
        hooks.append(cls(model, layers))
    extra = [] if extra is None else list(extra)
    for h in extra:
        if not any(callable(getattr(h, n, None)) for n in ("before_step", "loss_terms", "after_step")):
            raise TypeError(f"hooks must have before_step, loss_terms or after_step; got {type(h).__name__}")
    return hooks + extra


def set_hooks_lr(hooks, lr: float) -> None:
    """Tell every :class:`TrainingHooks` in ``hooks`` the learning rate of the step about to run
    (its ``lr`` attribute); other hook objects are left alone."""
    for h in hooks:
        if isinstance(h, TrainingHooks):
            h.lr = float(lr)


def call_hooks(hooks, what: str, step: int):
    """Call ``what`` on every hook that has it; for ``loss_terms`` return the list of values."""
    out = []
    for h in hooks:
        fn = getattr(h, what, None)
        if fn is not None:
            out.append(fn(step))
    return out


# -- the loop -------------------------------------------------------------------------------
def train(model, data, steps: int, lr: float = 1e-3, batch_size: int = 16, optimizer: str = "adamw",
          schedule: str = "cosine", warmup: int = 0, clip: float | None = 1.0, rng=None,
          progress: bool = True, backend: str | None = None, weight_decay: float = 0.0,
          betas=(0.9, 0.999), eps: float = 1e-8, min_lr: float = 0.0, momentum: float = 0.9,
          measure_memory: bool = False, desc: str = "train", hooks=None, start_step: int = 0,
          optimizer_state: dict | None = None, on_step=None) -> TrainResult:
    """Train the model's trainable parameters on next-token prediction over ``data``.

    Args:
        model: a NumPy :class:`~lowrank_ref.nn.Module` whose ``forward(idx (B, T)) -> (B, T, V)``
            (a GPT, possibly with adapters); or a torch model when ``backend`` is torch/cuda.
        data: a 1-D integer array of token ids; batches are random windows of it.
        steps, lr, batch_size: the run's length, peak learning rate and windows per step.
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"`` (with ``momentum``).
        schedule: ``"cosine"`` (linear warmup, cosine to ``min_lr``) or ``"constant"``.
        warmup: warmup steps. clip: max global gradient norm, or None for no clipping.
        rng: an int seed or ``numpy.random.Generator`` for the batches (the same in every backend).
        progress: show a tqdm progress bar (stderr); False is quiet.
        backend: ``None`` (the model's), ``"numpy"``, ``"torch"`` or ``"cuda"``.
        measure_memory: measure the peak memory of the first step (module docstring).
        hooks: extra :class:`TrainingHooks`-like objects, called after the methods' own hooks.
        start_step, optimizer_state, on_step (NumPy backend): resuming a run. The loop runs steps
            ``start_step .. steps-1`` of the same schedule, the optimizer starts from
            ``optimizer_state`` (:meth:`~lowrank_ref.optim.Optimizer.state_dict`), and
            ``on_step(done, optimizer, loss)`` is called after every step (``lowrank-ref train`` writes
            its checkpoints there). Pass the batch generator in the state it had at ``start_step``.
            ``result.losses`` holds the steps run in this call only.
    Returns:
        A :class:`TrainResult`.
    """
    backend = resolve_backend(model, backend)
    if backend in ("torch", "cuda"):
        if start_step or optimizer_state is not None or on_step is not None:
            raise ValueError("start_step, optimizer_state and on_step are the NumPy loop's; the torch "
                             "backends resume through `lowrank-ref train` (its checkpoint file)")
        from lowrank_gpu.train import train as torch_train

        return torch_train(model, data, steps, lr=lr, batch_size=batch_size, optimizer=optimizer,
                           schedule=schedule, warmup=warmup, clip=clip, rng=rng, progress=progress,
                           backend=backend, weight_decay=weight_decay, betas=betas, eps=eps,
                           min_lr=min_lr, momentum=momentum, measure_memory=measure_memory, desc=desc,
                           hooks=hooks)
    if backend != "numpy":
        raise ValueError(f"train supports backends numpy, torch and cuda, got {backend!r}")
    check_train_args(steps, lr, batch_size, optimizer, schedule, warmup, clip, weight_decay)
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or not 0 <= start_step < steps:
        raise ValueError(f"start_step must be an int in [0, steps={steps}), got {start_step!r}")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be callable(done, optimizer, loss), got {type(on_step).__name__}")
    from lowrank_ref import optim
    from lowrank_ref.nn.losses import cross_entropy

    block_size = getattr(model, "max_input_length", model.config.block_size)  # less a prompt's k positions
    data = check_tokens(data, block_size, "data")
    rng = as_rng(rng)
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to train")
    step_hooks = training_hooks(model, hooks, backend="numpy")
    if optimizer == "adamw":
        opt = optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    else:
        opt = optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)

    result = TrainResult(backend="numpy")
    model.train()
    opt.zero_grad()
    times = []
    bar = progress_bar(steps - start_step, progress, desc)
    last_traced = min(start_step + 1, steps - 1)  # the second step: the optimizer state already exists
    traced_times: list[float] = []  # used for the time per step only if no untraced step ran
    for step in range(start_step, steps):
        tracing = measure_memory and step <= last_traced
        if tracing and step == start_step:
            started = not tracemalloc.is_tracing()
            if started:
                tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        t0 = time.perf_counter()
        step_lr = lr_at(step, steps, lr, schedule, warmup, min_lr)
        set_hooks_lr(step_hooks, step_lr)  # the hooks see this step's lr (SoRA's ξ = η_t λ)
        call_hooks(step_hooks, "before_step", step)
        x, y = get_batch(data, batch_size, block_size, rng)  # (B, T) each
        logits = model.forward(x)  # (B, T, V)
        loss, dlogits = cross_entropy(logits, y)
        del logits
        model.backward(dlogits)  # fills .grad of the trainable parameters
        del dlogits
        for extra in call_hooks(step_hooks, "loss_terms", step):  # their gradients are in .grad now
            loss = loss + float(extra)
        if clip is not None:
            optim.clip_grad_norm(params, clip)
        opt.lr = step_lr
        opt.step()
        call_hooks(step_hooks, "after_step", step)  # gradients still in place (AdaLoRA's scores read them)
        opt.zero_grad()
        elapsed = time.perf_counter() - t0
        if tracing:
            traced_times.append(elapsed)
        if tracing and step == last_traced:
            peak = tracemalloc.get_traced_memory()[1] - before
            if started:
                tracemalloc.stop()
            result.peak_memory_bytes = model_bytes(model) + int(peak)
        elif not tracing and (step > start_step or steps - start_step == 1):
            times.append(elapsed)
        if not np.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {step}; lower lr (now {lr})")
        result.losses.append(float(loss))
        result.lrs.append(float(opt.lr))
        bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss:.3f}")
        if on_step is not None:
            on_step(step + 1, opt, float(loss))
    bar.close()
    result.seconds_per_step = float(np.mean(times or traced_times)) if (times or traced_times) else float("nan")
    result.optimizer_state_bytes = int(opt.state_bytes())
    return result


def evaluate(model, tokens, block_size: int | None = None, max_windows: int | None = 256,
             batch_size: int = 64, backend: str | None = None) -> dict:
    """Next-token ``{"loss", "accuracy", "tokens"}`` on non-overlapping windows of ``tokens``.

    ``accuracy`` is the share of positions whose arg-max prediction is the true next token, in
    [0, 1]. The model is evaluated in eval mode (dropout off) and put back in the mode it was in.
    """
    backend = resolve_backend(model, backend)
    if backend in ("torch", "cuda"):
        from lowrank_gpu.train import evaluate as torch_evaluate

        return torch_evaluate(model, tokens, block_size=block_size, max_windows=max_windows,
                              batch_size=batch_size, backend=backend)
    from lowrank_ref.nn.losses import log_softmax

    block_size = getattr(model, "max_input_length", model.config.block_size) if block_size is None else block_size
    x, y = eval_windows(tokens, block_size, max_windows)
    was_training = model.training
    model.eval()
    nll, correct = 0.0, 0
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            logits = model.forward(xb)  # (b, T, V)
            yb = where_is(logits, yb)  # on CuPy: the targets to the device
            logp = log_softmax(logits.astype(np.float64))
            nll -= float(np.take_along_axis(logp, yb[..., None], axis=-1).sum())
            correct += int((logits.argmax(-1) == yb).sum())
    finally:
        _drop_caches(model)
        model.train(was_training)
    n = int(y.size)
    return {"loss": nll / n, "accuracy": correct / n, "tokens": n}


def _drop_caches(model) -> None:
    """Release the activations that forward passes kept for a backward that will not come."""
    for _, mod in model.named_modules():
        object.__setattr__(mod, "_cache", None)
