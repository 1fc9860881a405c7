r"""``lowrank-ref train``: train any registered method on the built-in GPT or a local Hugging Face
causal LM, in one process or under ``torchrun`` (DistributedDataParallel).

    lowrank-ref train --method lora --set r=8 alpha=16 --steps 200 --out runs/lora
    lowrank-ref train --method lora --model hf:./my-gpt2 --data notes.txt --backend cuda --precision bf16
    torchrun --nproc_per_node 2 -m lowrank_ref train --method lora --backend torch --batch-size 16

What it writes into ``--out DIR`` (only rank 0 writes; nothing is created before every argument,
the model, the data and the injection have checked out):

* ``DIR/adapter/``: a PEFT folder (:func:`lowrank_ref.io.save_peft`) for a method with a PEFT
  mapping; the project's own adapter file (:func:`lowrank_ref.io.save_adapter`) for one without;
  the trainable tensors as ``trainable.safetensors`` for the whole-model modes.
* ``DIR/metrics.json``: the loss per step, the evaluation before and after, tokens per second,
  peak memory; ``DIR/loss.png``: the loss curve.
* ``DIR/checkpoint.safetensors`` (every backend): the trainable tensors, the optimizer state, the
  step and the batch generator's state, in one file written to a temporary name and moved into
  place, so that an interrupted run resumes from the last complete checkpoint: run the same
  command again (``--steps`` may grow). A checkpoint of another method, config, model, targets,
  data, batch size or seed is refused.

**Targets.** Default: the built-in GPT's ``q``, ``v``; for a Hugging Face folder, the defaults
PEFT uses for LoRA by ``model_type`` (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``:
GPT-2 ``c_attn``, LLaMA ``q_proj``, ``v_proj``). GPT-2 stores its projections as
``transformers.pytorch_utils.Conv1D`` with the weight as ``(in, out)``; the torch adapters wrap
``torch.nn.Linear`` only, so every ``Conv1D`` is converted into the equal ``nn.Linear`` (weight
transposed, same forward) before injection, and the PEFT folder says ``fan_in_fan_out: true`` so
that PEFT applies the saved tensors to the original ``Conv1D`` layers.

**Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank draws the same global batch
from the same seeded generator and takes its slice (``--batch-size`` is the global batch and must
divide by the number of processes); DDP averages the gradients, so the step equals the step of one
process on the whole batch, to float rounding. gloo on the CPU, NCCL on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np

from lowrank_ref.cli import (
    positive_float as _positive_float,  # one definition of these argparse types
)
from lowrank_ref.cli import positive_int as _positive_int

__all__ = ["add_train_parser", "run_train", "parse_set", "build_config", "DEFAULT_TARGETS",
           "CHECKPOINT_NAME"]

# PEFT's LoRA defaults per Hugging Face model_type (peft/utils/constants.py, the LoRA mapping).
DEFAULT_TARGETS = {"builtin": ("q", "v"), "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"),
                   "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
                   "gpt_neox": ("query_key_value",), "opt": ("q_proj", "v_proj")}

CHECKPOINT_NAME = "checkpoint.safetensors"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_IDENTITY = ("method", "config", "model", "targets", "data", "batch_size", "seed", "block_size", "lr")


# --- arguments -------------------------------------------------------------------------------
def add_train_parser(sub) -> argparse.ArgumentParser:
    from lowrank_ref.registry import BACKENDS, method_names

    t = sub.add_parser(
        "train", help="train one method on the built-in GPT or a local Hugging Face model",
        description="Inject --method into the model's --targets, train the adapter on --data and write "
                    "DIR/adapter/ (a PEFT folder where the method has one), DIR/metrics.json and "
                    "DIR/loss.png. Run again with the same DIR to resume. Also runs under "
                    "`torchrun --nproc_per_node N -m lowrank_ref train ...`.")
    t.add_argument("--method", required=True, help=f"a registered method: {', '.join(method_names())}")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config fields of the method (values read as JSON scalars: r=8 alpha=16.0 use_rslora=true)")
    t.add_argument("--targets", default=None,
                   help="comma-separated target layers (default: q,v on the built-in GPT; PEFT's LoRA "
                        "defaults for a Hugging Face model: c_attn on GPT-2, q_proj,v_proj on LLaMA)")
    t.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int4"],
                   help="store the targeted layers' base weights in 4 bits (blocks of 64, double-quantised "
                        "scales) under any layer method: --method dora --quantize nf4 is QDoRA")
    t.add_argument("--model", default="builtin", help="builtin (default) or hf:DIR, a local Hugging Face causal LM folder")
    t.add_argument("--data", default="builtin",
                   help="builtin (default: the dialect task) or a local text file")
    t.add_argument("--steps", type=_positive_int, default=100, help="total training steps (default 100)")
    t.add_argument("--batch-size", type=_positive_int, default=16,
                   help="the global batch: windows per step over all processes (default 16)")
    t.add_argument("--block-size", type=_positive_int, default=32, help="tokens per window (default 32)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate, cosine schedule (default 1e-3)")
    t.add_argument("--seed", type=int, default=0, help="adapter init and batch order (default 0)")
    t.add_argument("--backend", default="torch", choices=list(BACKENDS),
                   help="torch (default, CPU), cuda, numpy (built-in model, hand-written backward) or cupy")
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32 (default) or bf16 autocast (torch backends)")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: only before and after)")
    t.add_argument("--checkpoint-every", type=int, default=50, help="write a checkpoint every N steps (default 50)")
    t.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return t


def parse_set(items) -> dict:
    """``["r=8", "alpha=16", "init=gaussian"]`` -> ``{"r": 8, "alpha": 16, "init": "gaussian"}``:
    each value is read as a JSON scalar (number, true/false, null, string); a word that is not JSON
    is kept as a string."""
    out = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"--set gives {key!r} twice")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if isinstance(value, (list, dict)):
            raise ValueError(f"--set {key}: expected a scalar (number, true/false, null or a word), got {text!r}")
        out[key] = value
    return out


def build_config(spec, values: dict):
    """The method's config from ``--set`` values, checked by the config class; an unknown key or
    a bad value is a ``ValueError`` naming the key."""
    fields = [f.name for f in dataclasses.fields(spec.config)] if dataclasses.is_dataclass(spec.config) else []
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"--set {unknown[0]}: method {spec.name!r} has no config field {unknown[0]!r}; "
                         f"its fields: {', '.join(fields) or '(none)'}")
    try:
        return spec.config(**values)
    except (TypeError, ValueError) as e:
        keys = ", ".join(sorted(values)) or "(defaults)"
        raise ValueError(f"--set {keys}: {e}") from None


# --- the distributed environment -------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(rank=int(os.environ.get("RANK", "0")), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


# --- model and data --------------------------------------------------------------------------
def _hf_folder(spec: str) -> str:
    folder = spec[3:]
    if not folder:
        raise ValueError("--model hf:DIR needs a folder after 'hf:'")
    if not os.path.isdir(folder):
        raise ValueError(f"--model {spec}: no folder {folder!r}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"--model {spec}: {folder!r} has no config.json (looked for a Hugging Face model folder)")
    if not any(os.path.isfile(os.path.join(folder, w)) for w in _WEIGHT_FILES):
        raise ValueError(f"--model {spec}: {folder!r} holds no weights (looked for {' or '.join(_WEIGHT_FILES)}; "
                         "only safetensors are read)")
    return folder


def _convert_conv1d(model) -> list[str]:
    """Replace every ``transformers.pytorch_utils.Conv1D`` (weight ``(in, out)``, ``y = x W + b``)
    by the equal ``torch.nn.Linear`` (weight ``(out, in)``); returns their names."""
    import torch

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return []
    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        lin = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                              dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)  # (out, in) = (in, out)ᵀ
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return names


def load_model(args, device):
    """``(model, kind, info)``: kind ``"builtin"`` or the Hugging Face ``model_type``."""
    if args.model == "builtin":
        from lowrank_ref.models import load_pretrained

        model = load_pretrained(backend="numpy" if args.backend in ("numpy", "cupy") else
                                ("cuda" if device is not None and device.type == "cuda" else "torch"),
                                progress=False)
        return model, "builtin", {"fan_in_fan_out": False, "tokenizer": None, "max_positions": model.config.block_size}
    if not args.model.startswith("hf:"):
        raise ValueError(f"--model must be 'builtin' or 'hf:DIR', got {args.model!r}")
    folder = _hf_folder(args.model)
    if args.backend not in ("torch", "cuda"):
        raise ValueError(f"--model {args.model}: a Hugging Face model trains on backend torch or cuda, "
                         f"not {args.backend!r} (the NumPy backends run the built-in GPT)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ValueError("--model hf:DIR needs the transformers package: pip install transformers") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {args.model}: could not load it as a causal LM: {e}") from None
    converted = _convert_conv1d(model)
    model.to(device)
    tokenizer = None
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    cfg = model.config
    max_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1 << 30
    return model, str(cfg.model_type), {"fan_in_fan_out": bool(converted), "tokenizer": tokenizer,
                                        "max_positions": int(max_pos), "vocab_size": int(cfg.vocab_size)}


def load_data(args, kind: str, info: dict, block: int):
    """``(train ids, eval ids)`` as int64 arrays, every id below the model's vocabulary size."""
    from lowrank_ref.data import builtin_task

    task = builtin_task(0)
    if args.data == "builtin":
        train, heldout = np.asarray(task.dialect_train), np.asarray(task.dialect_heldout)
    else:
        if not os.path.isfile(args.data):
            raise ValueError(f"--data: no file {args.data!r}")
        with open(args.data, encoding="utf-8") as f:
            text = f.read()
        if kind == "builtin":
            try:
                ids = task.tokenizer.encode(text)
            except ValueError as e:
                raise ValueError(f"--data {args.data}: the built-in GPT reads its own word vocabulary: {e}") from None
        elif info["tokenizer"] is not None:
            ids = np.asarray(info["tokenizer"](text)["input_ids"], dtype=np.int64)
        else:
            raise ValueError(f"--data {args.data}: the model folder {args.model[3:]!r} has no tokenizer to read "
                             "a text file with (use --data builtin, or add the tokenizer's files)")
        cut = max(block + 1, int(ids.size * 0.9))
        train, heldout = ids[:cut], ids[cut:]
        if heldout.size < block + 1:
            heldout = train
    for name, ids in (("train", train), ("evaluation", heldout)):
        if ids.size < block + 1:
            raise ValueError(f"--data {args.data}: the {name} split has {ids.size} tokens, fewer than "
                             f"--block-size + 1 = {block + 1}")
    vocab = info.get("vocab_size")
    if vocab is not None:
        top = int(max(train.max(), heldout.max()))
        if top >= vocab:
            raise ValueError(f"--data {args.data}: token id {top} is outside the model's vocabulary of "
                             f"{vocab} (the built-in data has {task.vocab_size} ids)")
    return train.astype(np.int64), heldout.astype(np.int64)


# --- checkpoints -----------------------------------------------------------------------------
def _atomic_write_bytes(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: str, model, opt, meta: dict) -> None:
    """Trainable tensors, optimizer state and ``meta`` (JSON: step, generator state, run identity)
    in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors = {f"param.{n}": p.detach().cpu().clone().contiguous() for n, p in _trainable(model).items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().clone().contiguous().reshape(v.shape)
    meta = dict(meta, param_groups=[{k: v for k, v in g.items()} for g in sd["param_groups"]])
    text = json.dumps(meta, allow_nan=False, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    _atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={"lowrank_ref_checkpoint": text}))


def read_checkpoint(path: str, framework: str = "pt") -> tuple[dict, dict]:
    from safetensors import safe_open

    from lowrank_ref.io import parse_json

    try:
        with safe_open(path, framework=framework) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint: {e}") from None
    if "lowrank_ref_checkpoint" not in header:
        raise ValueError(f"{path}: not a lowrank-ref train checkpoint (no run metadata)")
    return parse_json(header["lowrank_ref_checkpoint"], path), tensors


def _check_resume(meta: dict, identity: dict, path: str, loop: str = "torch") -> None:
    written = meta.get("loop", "torch")  # files from before the NumPy loop had checkpoints: torch
    if written != loop:
        raise ValueError(f"--out: {path} was written by the {written} training loop and this run uses the "
                         f"{loop} one (--backend); use another --out or the same backend")
    for key in (*_IDENTITY, "quantize"):  # quantize: absent (None) in runs without --quantize
        if meta.get(key) != identity.get(key):
            raise ValueError(f"--out: {path} was written by another run ({key} {meta.get(key)!r}, this run "
                             f"{identity.get(key)!r}); use another --out or the same arguments")


def _restore(path: str, model, opt, tensors: dict, meta: dict) -> None:
    import torch

    params = _trainable(model)
    want = {f"param.{n}" for n in params}
    have = {k for k in tensors if k.startswith("param.")}
    if want != have:
        raise ValueError(f"{path}: its tensors do not match this model's trainable parameters "
                         f"(missing {sorted(want - have)[:3]}, extra {sorted(have - want)[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[f"param.{n}"]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            p.copy_(t)
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# --- outputs ---------------------------------------------------------------------------------
def _save_adapter_folder(model, spec, folder: str, fan_in_fan_out: bool) -> str:
    """``folder`` written whole or not at all (built in a sibling temporary folder, then swapped in)."""
    from lowrank_ref import io

    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        if spec.peft is not None and spec.peft.to_peft is not None:
            io.save_peft(model, tmp)
            kind = "peft"
            if fan_in_fan_out:  # GPT-2's Conv1D layers store (in, out): PEFT must know
                cpath = os.path.join(tmp, io.PEFT_CONFIG_NAME)
                with open(cpath, encoding="utf-8") as f:
                    cfg = json.load(f)
                if "fan_in_fan_out" in cfg:  # the methods whose PEFT config has the flag (LoRA, DoRA)
                    cfg["fan_in_fan_out"] = True
                with open(cpath, "w", encoding="utf-8") as f:
                    json.dump(cfg, f, indent=2, sort_keys=True)
        elif spec.is_layer:
            io.save_adapter(model, os.path.join(tmp, "adapter.safetensors"), metadata={"method": spec.name})
            kind = "lowrank_ref"
        else:
            from safetensors.torch import save_file

            save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                      os.path.join(tmp, "trainable.safetensors"), metadata={"method": spec.name})
            kind = "trainable"
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=".old-adapter-", dir=parent)
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return kind
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False, default=float)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write_bytes(path, write)


def _plot(path: str, losses, evals) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(len(losses)), losses, lw=1, label="training loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="evaluation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    _atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# --- the run ---------------------------------------------------------------------------------
def _check_backend(args, dist: Dist):
    """The torch device (``None`` for NumPy); a clear error for what is missing."""
    if args.backend == "cupy":
        from lowrank_ref.backend import require_cupy

        try:
            cp = require_cupy()
            cp.cuda.runtime.getDeviceCount()
        except Exception as e:
            raise ValueError(f"--backend cupy: {e}") from None
    if args.backend in ("numpy", "cupy"):  # the reference's own loop, on NumPy or CuPy arrays
        if args.precision != "fp32":
            raise ValueError(f"--precision bf16: the {args.backend} backend computes in float32 only (bf16 needs torch or cuda)")
        if args.grad_checkpointing:
            raise ValueError(f"--grad-checkpointing: the {args.backend} backend keeps its own caches; use torch or cuda")
        if dist.world > 1:
            raise ValueError(f"torchrun: the {args.backend} backend runs in one process; use --backend torch or cuda")
        return None
    from lowrank_ref.backend import torch_device

    try:
        device = torch_device(args.backend)
    except (RuntimeError, ImportError) as e:
        raise ValueError(f"--backend {args.backend}: {e}") from None
    if device.type == "cuda":
        import torch

        device = torch.device("cuda", dist.local_rank)
    return device


def _forward(model, x, kind: str):
    out = model(x) if kind == "builtin" else model(input_ids=x)
    return out if kind == "builtin" else out.logits  # (B, T, V)


def _enable_checkpointing(model, kind: str) -> None:
    if kind != "builtin":
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward
        block.forward = lambda x, f=inner: checkpoint(f, x, use_reentrant=False)


def _evaluate(model, tokens, block: int, kind: str, device, autocast) -> dict:
    import torch

    from lowrank_ref.data.batching import eval_windows

    xs, ys = eval_windows(tokens, block, 64)
    was = model.training
    model.eval()
    nll, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, xs.shape[0], 32):
            x = torch.from_numpy(xs[i:i + 32]).to(device)
            y = torch.from_numpy(ys[i:i + 32]).to(device)
            with autocast():
                logits = _forward(model, x, kind)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll -= float(logp.gather(-1, y[..., None]).sum())
            correct += int((logits.argmax(-1) == y).sum())
    model.train(was)
    return {"loss": nll / ys.size, "accuracy": correct / ys.size}


def run_train(args) -> int:
    import contextlib

    from lowrank_ref import registry
    from lowrank_ref.train import progress_bar

    dist = _dist_from_env()
    spec = registry.get_method(args.method)  # an unknown name: a ValueError listing the registered
    config = build_config(spec, parse_set(args.set))
    if args.batch_size % dist.world:
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) does not divide by the "
                         f"{dist.world} processes")
    if args.eval_every < 0 or args.checkpoint_every < 0:
        raise ValueError("--eval-every and --checkpoint-every must be >= 0")
    device = _check_backend(args, dist)
    model, kind, info = load_model(args, device)
    block = args.block_size
    if block > info["max_positions"]:
        raise ValueError(f"--block-size {block} is longer than the model's {info['max_positions']} positions")
    train_ids, heldout = load_data(args, kind, info, block)
    if args.targets is not None:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        if not targets:
            raise ValueError("--targets is empty")
    elif kind in DEFAULT_TARGETS:
        targets = DEFAULT_TARGETS[kind]
    else:
        raise ValueError(f"--targets: no default for model_type {kind!r}; name the layers (e.g. --targets q_proj,v_proj)")

    from lowrank_ref.inject import inject

    quantize = getattr(args, "quantize", None)
    try:
        result = inject(model, config, targets=targets, method=spec.name, rng=args.seed, quantize=quantize)
    except ValueError as e:
        quant = f" --quantize {quantize}" if quantize else ""
        raise ValueError(f"--method {spec.name}{quant} --targets {','.join(targets)}: {e}") from None
    room = getattr(model, "max_input_length", block)  # a prompt (prompt tuning) takes k positions
    if block > room:
        raise ValueError(f"--block-size {block}: --method {spec.name} leaves the model {room} positions for the "
                         f"input (its prompt takes {info['max_positions'] - room}); pass --block-size {room} or less")
    # one data stream is one task: a conditional method (HyperLoRA) trains and evaluates task id 0
    mods = model.modules() if hasattr(model, "modules") else (m for _, m in model.named_modules())
    for m in mods:
        if getattr(m, "takes_condition", False) and getattr(m, "default_condition", 0) is None:
            m.default_condition = 0
    identity = {"method": spec.name, "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
                "model": args.model, "targets": list(targets), "data": args.data,
                "batch_size": args.batch_size, "seed": args.seed, "block_size": block, "lr": args.lr}
    if quantize:  # only when given, so that earlier checkpoints still resume
        identity["quantize"] = quantize
    if args.backend in ("numpy", "cupy"):
        if args.backend == "cupy":  # every array of the model onto the GPU; the code stays the reference's
            from lowrank_ref.backend import require_cupy
            from lowrank_ref.nn.module import to_array_module

            to_array_module(model, require_cupy())
        return _run_numpy(args, model, spec, train_ids, heldout, identity, result)

    import torch
    import torch.nn.functional as F

    from lowrank_ref.train import call_hooks, lr_at, set_hooks_lr, training_hooks

    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
    resume = None
    if os.path.isfile(ckpt_path):
        meta, tensors = read_checkpoint(ckpt_path)
        _check_resume(meta, identity, ckpt_path)
        if meta["step"] > args.steps:
            raise ValueError(f"--steps {args.steps}: {ckpt_path} is already at step {meta['step']}")
        resume = (meta, tensors)
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder")

    if args.grad_checkpointing:
        _enable_checkpointing(model, kind)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"--method {spec.name}: nothing to train on this model")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    hooks = training_hooks(model, None, backend=args.backend)
    rng = np.random.default_rng(args.seed)
    start, losses, evals = 0, [], []
    if resume is not None:
        meta, tensors = resume
        _restore(ckpt_path, model, opt, tensors, meta)
        rng.bit_generator.state = meta["rng"]
        start, losses, evals = int(meta["step"]), list(meta["losses"]), list(meta["evals"])

    amp = args.precision == "bf16"

    def autocast():
        if not amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    ddp = model
    if dist.world > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if dist.main:
        os.makedirs(args.out, exist_ok=True)
    before = _evaluate(model, heldout, block, kind, device, autocast) if start == 0 else None
    local = args.batch_size // dist.world
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    bar = progress_bar(args.steps - start, not args.quiet and dist.main, f"train {spec.name}")
    t_start, tokens_done = time.perf_counter(), 0
    model.train()

    def checkpoint(step):
        if dist.main:
            save_checkpoint(ckpt_path, model, opt, dict(identity, step=step, rng=rng.bit_generator.state,
                                                        losses=losses, evals=evals, loop="torch"))

    for step in range(start, args.steps):
        from lowrank_ref.data.batching import get_batch

        lr_now = lr_at(step, args.steps, args.lr, "cosine", 0, 0.0)
        set_hooks_lr(hooks, lr_now)  # as both training loops: the hooks see this step's lr
        call_hooks(hooks, "before_step", step)
        xb, yb = get_batch(train_ids, args.batch_size, block, rng)  # the same global batch on every rank
        sl = slice(dist.rank * local, (dist.rank + 1) * local)
        x = torch.from_numpy(xb[sl]).to(device)
        y = torch.from_numpy(yb[sl]).to(device)
        with autocast():
            logits = _forward(ddp, x, kind)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        for extra in call_hooks(hooks, "loss_terms", step):
            loss = loss + extra
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_now
        opt.step()
        call_hooks(hooks, "after_step", step)  # before zeroing: AdaLoRA's allocator reads the gradients
        opt.zero_grad(set_to_none=True)
        value = loss.detach().float()
        if dist.world > 1:
            import torch.distributed as td

            td.all_reduce(value)
            value = value / dist.world
        value = float(value)
        if not np.isfinite(value):
            raise FloatingPointError(f"the training loss became {value} at step {step}; lower --lr (now {args.lr})")
        losses.append(value)
        tokens_done += args.batch_size * block
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            ev = dict(_evaluate(model, heldout, block, kind, device, autocast), step=done)
            evals.append(ev)
            if dist.main:
                print(f"step {done}: evaluation loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.3f}", flush=True)
        if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps:
            checkpoint(done)
    bar.close()
    wall = time.perf_counter() - t_start
    after = dict(_evaluate(model, heldout, block, kind, device, autocast), step=args.steps)
    evals.append(after)
    if dist.main:
        print(f"step {args.steps}: evaluation loss {after['loss']:.4f}, accuracy {after['accuracy']:.3f}", flush=True)
        checkpoint(args.steps)
        adapter_kind = _save_adapter_folder(model, spec, os.path.join(args.out, "adapter"), info["fan_in_fan_out"])
        metrics = dict(identity, backend=args.backend, precision=args.precision, processes=dist.world,
                       steps=args.steps, resumed_from=start, losses=losses, evaluation={"before": before, "after": after},
                       evals=evals, trainable=result.trainable_params, total=result.total_params, adapter_format=adapter_kind,
                       tokens_per_second=(tokens_done / wall if wall > 0 and tokens_done else None),
                       peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None,
                       peak_memory_note="torch.cuda.max_memory_allocated" if cuda else
                       "not measured on the CPU (PyTorch's CPU allocator keeps no peak counter)")
        _write_json(os.path.join(args.out, "metrics.json"), metrics)
        _plot(os.path.join(args.out, "loss.png"), losses, evals)
        print(f"trained {spec.name} for {args.steps} steps ({dist.world} process(es)); "
              f"wrote {args.out}/adapter/, metrics.json, loss.png")
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
    return 0


def save_numpy_checkpoint(path: str, model, opt, meta: dict) -> None:
    """The NumPy loop's checkpoint: the trainable arrays (``param.<name>``), the optimizer's array
    state (``opt.<name>.<key>``) and, in the JSON metadata, its numbers, the step, the batch
    generator's state and the run's identity; one safetensors file written atomically."""
    from safetensors.numpy import save_file

    from lowrank_ref.nn.module import to_host

    tensors = {f"param.{n}": np.ascontiguousarray(to_host(p.data)) for n, p in model.trainable_parameters().items()}
    sd = opt.state_dict()
    numbers: dict = {}
    for name, st in sd["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                tensors[f"opt.{name}.{k}"] = np.ascontiguousarray(to_host(v))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                numbers.setdefault(name, {})[k] = v
            else:
                raise TypeError(f"optimizer state {name}.{k}: cannot checkpoint a {type(v).__name__}")
    meta = dict(meta, opt_steps=sd["steps"], opt_numbers=numbers, loop="numpy")
    text = json.dumps(meta, allow_nan=False)
    _atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={"lowrank_ref_checkpoint": text}))


def _restore_numpy(path: str, model, tensors: dict, meta: dict) -> dict:
    """Check every tensor against the model before changing anything, then load the trainable
    arrays; return the optimizer state for :func:`lowrank_ref.train.train`."""
    params = model.trainable_parameters()
    want = {f"param.{n}" for n in params}
    have = {k for k in tensors if k.startswith("param.")}
    if want != have:
        raise ValueError(f"{path}: its tensors do not match this model's trainable parameters "
                         f"(missing {sorted(want - have)[:3]}, extra {sorted(have - want)[:3]})")
    for n, p in params.items():
        t = tensors[f"param.{n}"]
        if t.shape != p.data.shape or t.dtype != p.data.dtype:
            raise ValueError(f"{path}: {n} is {t.dtype}{list(t.shape)}, the model's is {p.data.dtype}{list(p.data.shape)}")
    from lowrank_ref.nn.module import array_module

    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            name, _, key = k[4:].rpartition(".")
            if name not in params:
                raise ValueError(f"{path}: optimizer state for {name!r}, which this model does not train")
            state.setdefault(name, {})[key] = array_module(params[name].data).asarray(v)  # CuPy: to the device
    for name, nums in meta.get("opt_numbers", {}).items():
        state.setdefault(name, {}).update(nums)
    for n, p in params.items():
        p.data = array_module(p.data).asarray(tensors[f"param.{n}"].copy())
    return {"steps": int(meta.get("opt_steps", 0)), "state": state}


def _run_numpy(args, model, spec, train_ids, heldout, identity, result) -> int:
    """The built-in GPT with the hand-written backward (:func:`lowrank_ref.train.train`), with the
    same checkpoints and resume as the torch loop (:func:`save_numpy_checkpoint`).

    What a checkpoint does not hold, in either loop: the state of a method's training hooks
    (AdaLoRA's sensitivity averages, DyLoRA's rank draws); those methods resume with fresh hook
    state."""
    from lowrank_ref import io
    from lowrank_ref.train import evaluate, train

    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
    rng = np.random.default_rng(args.seed)
    start, losses, opt_state, before = 0, [], None, None
    if os.path.isfile(ckpt_path):
        meta, tensors = read_checkpoint(ckpt_path, framework="np")
        _check_resume(meta, identity, ckpt_path, loop="numpy")
        if meta["step"] > args.steps:
            raise ValueError(f"--steps {args.steps}: {ckpt_path} is already at step {meta['step']}")
        opt_state = _restore_numpy(ckpt_path, model, tensors, meta)
        rng.bit_generator.state = meta["rng"]
        start, losses, before = int(meta["step"]), list(meta["losses"]), meta.get("before")
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    os.makedirs(args.out, exist_ok=True)
    if before is None:
        before = evaluate(model, heldout, max_windows=64)

    def on_step(done, opt, loss):
        losses.append(loss)
        if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps:
            save_numpy_checkpoint(ckpt_path, model, opt, dict(identity, step=done, rng=rng.bit_generator.state,
                                                             losses=losses, before=before))

    t0 = time.perf_counter()
    res, final_opt = None, None
    if start < args.steps:
        def on_step_last(done, opt, loss):
            nonlocal final_opt
            final_opt = opt
            on_step(done, opt, loss)

        res = train(model, train_ids, args.steps, lr=args.lr, batch_size=args.batch_size, rng=rng,
                    progress=not args.quiet, desc=f"train {spec.name}", start_step=start,
                    optimizer_state=opt_state, on_step=on_step_last)
        # the end state too, so that a later run with a larger --steps continues from here
        save_numpy_checkpoint(ckpt_path, model, final_opt, dict(identity, step=args.steps,
                                                                rng=rng.bit_generator.state, losses=losses, before=before))
    wall = time.perf_counter() - t0
    after = dict(evaluate(model, heldout, max_windows=64), step=args.steps)
    if args.backend == "cupy":  # the adapter files are written from host arrays
        from lowrank_ref.nn.module import to_array_module

        to_array_module(model, np)
    folder = os.path.join(args.out, "adapter")
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        if spec.peft is not None and spec.peft.to_peft is not None:
            io.save_peft(model, tmp)
            kind = "peft"
        elif spec.is_layer:
            io.save_adapter(model, os.path.join(tmp, "adapter.safetensors"), metadata={"method": spec.name})
            kind = "lowrank_ref"
        else:
            from safetensors.numpy import save_file

            save_file({n: np.ascontiguousarray(p.data) for n, p in model.trainable_parameters().items()},
                      os.path.join(tmp, "trainable.safetensors"), metadata={"method": spec.name})
            kind = "trainable"
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    ran = args.steps - start
    metrics = dict(identity, backend=args.backend, precision="fp32", processes=1, steps=args.steps, resumed_from=start,
                   losses=losses, evaluation={"before": before, "after": after}, evals=[after],
                   trainable=result.trainable_params, total=result.total_params, adapter_format=kind,
                   tokens_per_second=ran * args.batch_size * args.block_size / wall if wall > 0 and ran else None,
                   peak_memory_bytes=res.peak_memory_bytes if res is not None else None,
                   peak_memory_note="lowrank_ref.train (counted)")
    _write_json(os.path.join(args.out, "metrics.json"), metrics)
    _plot(os.path.join(args.out, "loss.png"), losses, [after])
    print(f"trained {spec.name} for {args.steps} steps ({args.backend}); wrote {args.out}/adapter/, metrics.json, loss.png")
    return 0
