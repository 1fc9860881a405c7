r"""The small GPT the package ships, pre-trained on the base language, and how to rebuild it.

    from lowrank_ref.models import load_pretrained
    model = load_pretrained()                              # NumPy GPT, float32
    model = load_pretrained(backend="torch", dtype="float64")

The weights live in ``lowrank_ref/assets/gpt_base.safetensors`` and everything needed to rebuild
them — the model config, the seeds, the data version, the training settings, the final loss — in
``gpt_base.json``. :func:`pretrain` (``lowrank-ref pretrain``) rebuilds the file from those
settings: the same seed gives the same bytes on the same machine and NumPy build (BLAS is run on
one thread, so the order of every floating-point sum is fixed). When the weights file is missing,
:func:`load_pretrained` rebuilds it from its seed (a few minutes) instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lowrank_ref.registry import check_backend

__all__ = ["PretrainSettings", "DEFAULT_SETTINGS", "ASSET_DIR", "WEIGHTS_FILE", "CONFIG_FILE",
           "pretrain", "load_pretrained", "save_model", "load_model", "blas_threads", "shipped_settings"]

ASSET_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "gpt_base.safetensors"
CONFIG_FILE = "gpt_base.json"


@dataclass(frozen=True)
class PretrainSettings:
    """How the shipped model is made: its size, its data, its optimiser, its seeds."""

    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    min_lr: float = 3e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0  # the model's init and the batch order
    data_seed: int = 0  # lowrank_ref.data.builtin_task(data_seed)


DEFAULT_SETTINGS = PretrainSettings()


@contextlib.contextmanager
def blas_threads(n: int | None = 1, torch_too: bool = False):
    """Run NumPy's BLAS (and, with ``torch_too``, PyTorch's CPU ops) on ``n`` threads inside the
    block (``None``: leave both alone).

    The matrices here are tiny (64 x 256); spreading them over threads buys little, and on busy
    cores the spinning threads made a training step ten times slower (NumPy: 0.16 s -> 0.04 s;
    torch CPU: 0.15 s -> 0.015 s, measured on 2 shared cores). One thread also fixes the
    summation order, which makes rebuilds bit-for-bit repeatable."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    old = None
    if torch_too:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(int(n))
    try:
        with threadpool_limits(limits=int(n), user_api="blas"):
            yield
    finally:
        if old is not None:
            import torch

            torch.set_num_threads(old)


def _as_numpy_dtype(dtype):
    if dtype is None:
        return np.dtype(np.float32)
    # a NumPy dtype or scalar type (np.float64) is taken as it is; a string or torch dtype by name
    is_numpy = isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic))
    name = np.dtype(dtype).name if is_numpy else str(dtype).replace("torch.", "")
    if name == "bfloat16":
        raise ValueError("dtype bfloat16 has no NumPy type; use backend='torch' or 'cuda' for bfloat16")
    try:
        dt = np.dtype(name)
    except TypeError as e:
        raise TypeError(f"dtype must be a floating dtype such as 'float32', got {dtype!r}") from e
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"dtype must be a floating dtype such as 'float32', got {dtype!r}")
    return dt


def _as_torch_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype.replace("torch.", "")
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype such as 'float32', got {dtype!r}")
    return dt


# -- files ----------------------------------------------------------------------------------
def save_model(model, path) -> None:
    """Write a NumPy GPT's parameters as safetensors (names as in ``model.parameters()``)."""
    from safetensors.numpy import save_file

    tensors = {n: np.ascontiguousarray(p.data) for n, p in model.parameters().items()}
    save_file(tensors, str(path))


def load_model(path, config, dtype=np.float32):
    """A NumPy GPT built from ``config`` (a GPTConfig) with the weights in ``path``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from lowrank_ref.nn.gpt import GPT

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read model weights from {path}: {e}") from e
    model = GPT(config, rng=np.random.default_rng(0), dtype=dtype)
    model.load_state_dict(state)  # checks every name and shape; casts to the model's dtype
    return model


def _read_meta(asset_dir: Path) -> dict | None:
    p = asset_dir / CONFIG_FILE
    if not p.exists():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _settings_from_meta(meta: dict | None) -> PretrainSettings:
    if meta is None:
        return DEFAULT_SETTINGS
    return PretrainSettings(**meta["settings"])


def shipped_settings(asset_dir=None) -> PretrainSettings:
    """The settings recorded in ``gpt_base.json`` (the defaults when there is no such file)."""
    return _settings_from_meta(_read_meta(ASSET_DIR if asset_dir is None else Path(asset_dir)))


# -- pre-training ---------------------------------------------------------------------------
def pretrain(out=None, steps: int | None = None, settings: PretrainSettings | None = None,
             progress: bool = True, threads: int | None = 1) -> tuple:
    """Pre-train the GPT on the base language and write ``gpt_base.safetensors`` + ``gpt_base.json``.

    Args:
        out: a directory to write the two files into; ``None`` writes nothing.
        steps: overrides ``settings.steps`` (short runs for tests).
        settings: a :class:`PretrainSettings` (default: :data:`DEFAULT_SETTINGS`).
        progress: show a progress bar.
        threads: BLAS threads during training (see :func:`blas_threads`).
    Returns:
        ``(model, meta)``: the NumPy GPT (float32) and the dict written to the JSON file.
    """
    from lowrank_ref import data
    from lowrank_ref.nn.gpt import GPT, GPTConfig
    from lowrank_ref.train import evaluate, train

    s = DEFAULT_SETTINGS if settings is None else settings
    if not isinstance(s, PretrainSettings):
        raise TypeError(f"settings must be a PretrainSettings, got {type(s).__name__}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        s = PretrainSettings(**{**asdict(s), "steps": int(steps)})
    if s.warmup >= s.steps:  # a short run (tests) keeps a warmup shorter than itself
        s = PretrainSettings(**{**asdict(s), "warmup": s.steps - 1})
    if out is not None:  # fail on an unwritable folder before minutes of training, not after
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"cannot write to {out}")
    task = data.builtin_task(s.data_seed)
    cfg = GPTConfig(vocab_size=task.vocab_size, block_size=s.block_size, n_layer=s.n_layer,
                    n_head=s.n_head, d_model=s.d_model, mlp_ratio=s.mlp_ratio, dropout=0.0)
    init_seed, batch_seed = np.random.SeedSequence(s.seed).generate_state(2)
    with blas_threads(threads):
        model = GPT(cfg, rng=np.random.default_rng(int(init_seed)), dtype=np.float32)
        result = train(model, task.base_train, s.steps, lr=s.lr, batch_size=s.batch_size,
                       warmup=s.warmup, min_lr=min(s.min_lr, s.lr), weight_decay=s.weight_decay,
                       clip=s.clip, rng=np.random.default_rng(int(batch_seed)), progress=progress,
                       desc="pretrain")
        base = evaluate(model, task.base_heldout)
        dialect = evaluate(model, task.dialect_heldout)
    tail = result.losses[-min(50, len(result.losses)):]
    meta = {
        "description": "A small GPT pre-trained on lowrank-ref's built-in base language "
                       "(rebuild: lowrank-ref pretrain)",
        "config": cfg.to_dict(),
        "settings": asdict(s),
        "data_version": data.DATA_VERSION,
        "dtype": "float32",
        "final_loss": round(float(np.mean(tail)), 6),
        "heldout": {
            "base_loss": round(base["loss"], 6), "base_accuracy": round(base["accuracy"], 6),
            "dialect_loss": round(dialect["loss"], 6), "dialect_accuracy": round(dialect["accuracy"], 6),
        },
    }
    if out is not None:
        save_model(model, out / WEIGHTS_FILE)
        with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    return model, meta


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lowrank-ref"


@lru_cache(maxsize=2)
def _load_numpy_base(asset_dir: str, progress: bool):
    """(GPTConfig, {name: float32 array}) of the shipped model, rebuilt if its file is missing."""
    from lowrank_ref.data import DATA_VERSION
    from lowrank_ref.nn.gpt import GPTConfig

    d = Path(asset_dir)
    meta = _read_meta(d)
    weights = d / WEIGHTS_FILE
    if meta is not None and meta.get("data_version") != DATA_VERSION:
        raise ValueError(
            f"{d / CONFIG_FILE} was trained on data version {meta.get('data_version')!r} but the "
            f"package generates version {DATA_VERSION!r}: rebuild it with `lowrank-ref pretrain`"
        )
    if meta is None or not weights.exists():
        cached = _cache_dir()
        if (cached / WEIGHTS_FILE).exists() and _read_meta(cached) is not None:
            d, meta, weights = cached, _read_meta(cached), cached / WEIGHTS_FILE
        else:
            settings = _settings_from_meta(meta)
            if progress:
                print(f"lowrank-ref: {weights} is missing; rebuilding it from seed {settings.seed} "
                      f"({settings.steps} steps, a few minutes)")
            target = d if os.access(d if d.exists() else d.parent, os.W_OK) else cached
            _, meta = pretrain(out=target, settings=settings, progress=progress)
            weights = target / WEIGHTS_FILE
    cfg = GPTConfig(**meta["config"])
    model = load_model(weights, cfg, dtype=np.float32)
    return cfg, {n: p.data for n, p in model.parameters().items()}


def load_pretrained(backend: str = "numpy", dtype=None, asset_dir=None, progress: bool = True):
    """The shipped pre-trained GPT as a fresh model (each call returns a new copy).

    Args:
        backend: ``"numpy"`` (a :class:`lowrank_ref.nn.GPT`), ``"torch"`` (a
            :class:`lowrank_gpu.nn.gpt.GPT` on the CPU) or ``"cuda"`` (the same on the GPU).
        dtype: ``"float32"`` (default), ``"float64"``, a NumPy or torch dtype; ``"bfloat16"`` on
            the torch backends only.
        asset_dir: where ``gpt_base.safetensors`` and ``gpt_base.json`` are (default: the package's).
        progress: show progress if the model has to be rebuilt.
    """
    backend = check_backend(backend)
    if backend == "cupy":
        raise ValueError("load_pretrained supports backends numpy, torch and cuda, got 'cupy'")
    d = ASSET_DIR if asset_dir is None else Path(asset_dir)
    cfg, state = _load_numpy_base(str(d.resolve()), bool(progress))
    if backend == "numpy":
        from lowrank_ref.nn.gpt import GPT

        dt = _as_numpy_dtype(dtype)
        model = GPT(cfg, rng=np.random.default_rng(0), dtype=dt)
        model.load_state_dict(state)
        return model
    from lowrank_ref.backend import torch_device

    device = torch_device(backend)
    tdt = _as_torch_dtype(dtype)
    from lowrank_gpu.nn.gpt import GPT as TorchGPT
    from lowrank_gpu.nn.gpt import copy_state
    from lowrank_ref.nn.gpt import GPT

    np_model = GPT(cfg, rng=np.random.default_rng(0), dtype=np.float32)
    np_model.load_state_dict(state)
    model = TorchGPT(cfg, dtype=tdt, device="cpu", rng=0)
    copy_state(np_model, model)  # cast to tdt on the way in
    return model.to(device)
