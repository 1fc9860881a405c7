r"""Where one GPT LoRA training step spends its time, layer by layer, NumPy against torch.

The step of ``bench_lora``'s ``gpt_lora_train_step`` (the same model, batch and LoRA on ``q``,
``v``), with every layer's forward and backward timed on the wall clock, *exclusive* of the layers
inside it (a stack of timers), and summed over the step by kind:

``qv_lora``      the adapted ``q`` and ``v`` projections (base product and adapter together)
``linear``       the frozen ``k``, ``o``, ``fc``, ``proj`` and ``head`` products
``attention``    the attention core: ``Q Kᵀ``, the mask, softmax, ``P V``, the head split/merge
``layernorm``, ``gelu``, ``embedding``
``glue``         what the blocks themselves do (residual adds, dropout calls)
``cross_entropy`` NumPy: loss and gradient together; torch: the forward (its backward is in ``rest``)
``optimizer``    AdamW's step and zeroing the gradients
``rest``         the step's time that no timer covered

NumPy's layers are wrapped (their ``forward``/``backward`` replaced on the instance); torch's get
forward hooks and full backward hooks (pre and post), which add a little overhead of their own,
so the ``step`` row of each backend says what the profiled step took in total. Rows: one name per
kind (``gpt_step_part_<kind>``), ``numpy`` divided by ``torch``; the median over the profiled steps.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np

from bench.run import single_thread

KINDS = ("qv_lora", "linear", "attention", "layernorm", "gelu", "embedding", "glue", "cross_entropy",
         "optimizer", "rest")


def _kind(path: str, adapted: set) -> str | None:
    """The kind of the module at ``path`` (dotted), or None for one inside an adapted layer."""
    if any(path.startswith(a + ".") for a in adapted):
        return None  # inside an adapter: timed as part of it
    last = path.rsplit(".", 1)[-1]
    if path in adapted:
        return "qv_lora"
    if last in ("k", "o", "fc", "proj", "head", "q", "v"):
        return "linear"
    if last in ("ln1", "ln2", "ln_f"):
        return "layernorm"
    if last == "act":
        return "gelu"
    if last == "attn":
        return "attention"
    if last in ("tok_emb", "pos_emb"):
        return "embedding"
    return "glue"


class _Clock:
    """Exclusive wall time per kind: a timer started inside another pauses the outer one."""

    def __init__(self):
        self.totals = dict.fromkeys(KINDS, 0.0)
        self.stack = []  # [kind, start, children's time]

    def enter(self, kind):
        self.stack.append([kind, time.perf_counter(), 0.0])

    def leave(self):
        if not self.stack:
            raise RuntimeError("a timer stopped that never started (a hook that did not fire in pairs)")
        kind, t0, inner = self.stack.pop()
        dt = time.perf_counter() - t0
        self.totals[kind] += dt - inner
        if self.stack:
            self.stack[-1][2] += dt


def _wrap_numpy(model, clock, adapted):
    for path, mod in model.named_modules():
        kind = _kind(path, adapted) if path else "glue"
        if kind is None:
            continue
        for meth in ("forward", "backward"):
            fn = getattr(mod, meth)

            def timed(*a, _fn=fn, _kind=kind, **k):
                clock.enter(_kind)
                try:
                    return _fn(*a, **k)
                finally:
                    clock.leave()
            object.__setattr__(mod, meth, timed)


def _hook_torch(model, clock, adapted):
    handles = []
    for path, mod in model.named_modules():
        kind = _kind(path, adapted) if path else "glue"
        if kind is None:
            continue
        handles.append(mod.register_forward_pre_hook(lambda m, a, _k=kind: clock.enter(_k)))
        handles.append(mod.register_forward_hook(lambda m, a, o: clock.leave()))
        handles.append(mod.register_full_backward_pre_hook(lambda m, g, _k=kind: clock.enter(_k)))
        handles.append(mod.register_full_backward_hook(lambda m, gi, go: clock.leave()))
    return handles


def _profile(step, clock, steps: int) -> tuple[dict, float]:
    per_kind = {k: [] for k in KINDS}
    totals = []
    step()  # warm-up
    for _ in range(steps):
        clock.totals = dict.fromkeys(KINDS, 0.0)
        t0 = time.perf_counter()
        step()
        total = time.perf_counter() - t0
        if clock.stack:
            raise RuntimeError(f"{len(clock.stack)} timer(s) never stopped (a hook that did not fire in pairs)")
        clock.totals["rest"] = max(0.0, total - sum(clock.totals.values()))
        for k in KINDS:
            per_kind[k].append(clock.totals[k])
        totals.append(total)
    return {k: statistics.median(v) for k, v in per_kind.items()}, statistics.median(totals)


def run(quick: bool) -> list[dict]:
    import bench.bench_lora as bl
    from lowrank_ref.inject import adapter_layers, inject

    size = bl.QUICK if quick else bl.FULL
    steps = 2 if quick else 7
    rng = np.random.default_rng(0)
    lr, model, cfg, x, y = bl._gpt(size, rng)
    r = size["r"]
    lcfg = lr.LoRAConfig(r=r, alpha=2 * r)
    shape = bl._gpt_shape(cfg, x.shape[0], r) + ", 1 thread"
    torch = bl._torch()
    tmodel = None
    if torch is not None:
        import lowrank_gpu as lg

        tmodel = lg.nn.gpt.from_numpy(model)
    inject(model, lcfg, targets=("q", "v"), rng=0)
    adapted = set(adapter_layers(model))
    opt = lr.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.train()
    from lowrank_ref.nn import losses

    clock = _Clock()
    _wrap_numpy(model, clock, adapted)

    def np_step():
        logits = model.forward(x)
        clock.enter("cross_entropy")
        _, dlogits = losses.cross_entropy(logits, y)
        clock.leave()
        model.backward(dlogits)
        clock.enter("optimizer")
        opt.step()
        opt.zero_grad()
        clock.leave()

    results = {}
    with single_thread():
        results["numpy"] = _profile(np_step, clock, steps)
        if tmodel is not None:
            import torch.nn.functional as F

            inject(tmodel, lcfg, targets=("q", "v"), rng=0)
            topt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=1e-3)
            tmodel.train()
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)
            tclock = _Clock()
            _hook_torch(tmodel, tclock, adapted)

            def torch_step():
                logits = tmodel(tx)
                tclock.enter("cross_entropy")
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty.reshape(-1))
                tclock.leave()
                loss.backward()
                tclock.enter("optimizer")
                topt.step()
                topt.zero_grad(set_to_none=True)
                tclock.leave()

            with warnings.catch_warnings():  # block 0's input needs no gradient: its hook fires on the outputs
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                results["torch"] = _profile(torch_step, tclock, steps)
    rows = []
    for kind in (*KINDS, "step"):
        for impl, (parts, total) in results.items():
            sec = total if kind == "step" else parts[kind]
            rows.append({"name": f"gpt_step_part_{kind}", "impl": impl, "seconds": sec, "repeats": steps,
                         "ratio_to": "torch" if impl == "numpy" and "torch" in results else None,
                         "shape": shape, "threads": 1,
                         "note": "the whole profiled step (timers and hooks included)" if kind == "step"
                         else "exclusive wall time of this kind of layer in one step, forward + backward"})
    return rows
