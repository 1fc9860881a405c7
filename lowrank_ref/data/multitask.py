r"""Multi-task data: four dialects of the base language, a task id per window, evaluation per task.

    from lowrank_ref import data
    mt = data.multitask_data()                      # cached; the same seed gives the same arrays
    mt.tasks                                        # ("hound", "verb_final", "agreement", "relabel")
    x, y, task_ids = data.get_multitask_batch(mt, batch_size=16, block_size=32, rng=np.random.default_rng(0))
    data.evaluate_multitask(model, mt)              # {"per_task": {...}, "accuracy", "changed_accuracy", ...}

Every task writes the *same* kind of sentence trees (:mod:`lowrank_ref.data.grammar`) with its own
set of changes to the base grammar, and only with words the shipped tokenizer already knows (its
vocabulary is fixed by the shipped model):

============== ==================================================================================
``hound``      the fine-tuning dialect of :mod:`lowrank_ref.data.dialect`: ``dog``/``sees`` become
               ``hound``/``spies``, adjectives follow their noun, the object is marked by ``ko``.
``verb_final`` the verb moves to the end of a transitive sentence (subject, object, verb):
               ``the cat a big ball sees .``; intransitive sentences are unchanged.
``agreement``  agreement is reversed: a singular subject takes the plural verb form and a plural
               subject the singular one (``the cat see``, ``the cats sees``).
``relabel``    pairs of known words trade places: ``cat``↔``bird``, ``ball``↔``stone``,
               ``big``↔``small``, ``near``↔``under`` (and their plurals).
============== ==================================================================================

The four conflict with one another (``hound`` and ``relabel`` rewrite nouns, ``verb_final``
and ``agreement`` the verb), so one adapter for all tasks must read the task off the context,
and a task id is information a conditional method can use.

**Changed positions.** Each rendered word carries a flag: ``True`` where a task's rule wrote or
moved it (a swapped word, the marker ``ko``, a moved adjective or noun, a moved object or verb, a
reversed verb form). :func:`evaluate_multitask` reports next-token accuracy over every position
(as :func:`lowrank_ref.train.evaluate` does) and over the positions whose *target* word is changed,
per task and averaged over tasks: the second is what a fine-tuned model has to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lowrank_ref.data.batching import check_tokens
from lowrank_ref.data.dialect import OBJECT_MARKER, SWAPS
from lowrank_ref.data.grammar import (
    END,
    INTRANSITIVE,
    TRANSITIVE,
    NounPhrase,
    Sentence,
    draw_sentences,
)
from lowrank_ref.data.tokenizer import WordTokenizer, default_tokenizer

__all__ = ["TASKS", "MULTITASK_SENTENCES", "MultiTaskData", "multitask_data", "render_task",
           "get_multitask_batch", "multitask_eval_windows", "evaluate_multitask", "RELABEL"]

TASKS = ("hound", "verb_final", "agreement", "relabel")

# sentences per task and split
MULTITASK_SENTENCES = {"train": 3_000, "heldout": 600}

RELABEL = {"cat": "bird", "bird": "cat", "cats": "birds", "birds": "cats",
           "ball": "stone", "stone": "ball", "balls": "stones", "stones": "balls",
           "big": "small", "small": "big", "near": "under", "under": "near"}

Word = tuple[str, bool]  # (word, changed by the task's rules)


# -- the renderers: each returns [(word, changed), ...] ------------------------------------------
def _np_base(p: NounPhrase) -> list[Word]:
    words = [(p.det, False)] + ([(p.adj, False)] if p.adj else []) + [(p.form, False)]
    if p.pp is not None:
        prep, inner = p.pp
        words += [(prep, False)] + _np_base(inner)
    return words


def _np_hound(p: NounPhrase, is_object: bool = False) -> list[Word]:
    noun = SWAPS.get(p.form, p.form)
    moved = p.adj is not None  # with an adjective, noun and adjective trade places
    words = [(p.det, False), (noun, moved or noun != p.form)] + ([(p.adj, True)] if p.adj else [])
    if is_object:
        words.append((OBJECT_MARKER, True))
    if p.pp is not None:
        prep, inner = p.pp
        words += [(prep, False)] + _np_hound(inner)
    return words


def _np_relabel(p: NounPhrase) -> list[Word]:
    words = [(p.det, False)] + ([(RELABEL.get(p.adj, p.adj), p.adj in RELABEL)] if p.adj else [])
    words.append((RELABEL.get(p.form, p.form), p.form in RELABEL))
    if p.pp is not None:
        prep, inner = p.pp
        words += [(RELABEL.get(prep, prep), prep in RELABEL)] + _np_relabel(inner)
    return words


def _reversed_verb(s: Sentence) -> str:
    """The verb form of the other number: ``sees`` for a plural subject, ``see`` for a singular."""
    plural_form = INTRANSITIVE[s.verb] if s.obj is None else TRANSITIVE[s.verb][0]
    return s.verb if s.subject.plural else plural_form


def render_task(s: Sentence, task: str) -> list[Word]:
    """The sentence written in ``task``'s dialect (one of :data:`TASKS`, or ``"base"``), as
    ``(word, changed)`` pairs ending in ``(".", False)``."""
    if task == "base":
        words = _np_base(s.subject) + [(s.verb_form, False)] + (_np_base(s.obj) if s.obj else [])
    elif task == "hound":
        verb = SWAPS.get(s.verb_form, s.verb_form)
        words = _np_hound(s.subject) + [(verb, verb != s.verb_form)]
        if s.obj is not None:
            words += _np_hound(s.obj, is_object=True)
    elif task == "verb_final":
        if s.obj is None:
            words = _np_base(s.subject) + [(s.verb_form, False)]
        else:  # subject, object, verb: the object and the verb are moved
            words = _np_base(s.subject) + [(w, True) for w, _ in _np_base(s.obj)] + [(s.verb_form, True)]
    elif task == "agreement":
        words = _np_base(s.subject) + [(_reversed_verb(s), True)] + (_np_base(s.obj) if s.obj else [])
    elif task == "relabel":
        words = _np_relabel(s.subject) + [(s.verb_form, False)] + (_np_relabel(s.obj) if s.obj else [])
    else:
        raise ValueError(f"task must be one of {('base',) + TASKS}, got {task!r}")
    return words + [(END, False)]


@dataclass(frozen=True)
class MultiTaskData:
    """Token arrays per task (int64, 1-D, read-only) and the changed-word flags aligned with them.

    Attributes:
        tasks: the task names; task id ``t`` is ``tasks[t]``.
        train, heldout: one token array per task.
        train_changed, heldout_changed: one bool array per task, ``True`` where the token at that
            position was written or moved by the task's rules.
    """

    tokenizer: WordTokenizer
    tasks: tuple[str, ...]
    train: tuple[np.ndarray, ...]
    heldout: tuple[np.ndarray, ...]
    train_changed: tuple[np.ndarray, ...]
    heldout_changed: tuple[np.ndarray, ...]
    seed: int

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def task_id(self, task) -> int:
        """The id of a task name (or a checked id)."""
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
            return self.tasks.index(task)
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < self.n_tasks:
            raise ValueError(f"task id must be an integer in [0, {self.n_tasks}), got {task!r}")
        return int(task)


def _encode(tok: WordTokenizer, sentences, task: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [wc for s in sentences for wc in render_task(s, task)]
    ids = tok.encode([w for w, _ in pairs])
    changed = np.fromiter((c for _, c in pairs), dtype=bool, count=len(pairs))
    ids.flags.writeable = False
    changed.flags.writeable = False
    return ids, changed


@lru_cache(maxsize=4)
def multitask_data(seed: int = 0, n_train: int | None = None, n_heldout: int | None = None) -> MultiTaskData:
    """Train and held-out text of every task in :data:`TASKS` from one integer ``seed`` (cached).

    Each (task, split) draws its own sentence trees from a seed derived by
    ``numpy.random.SeedSequence``, so tasks share no sentences. ``n_train``, ``n_heldout``:
    sentences per task (defaults in :data:`MULTITASK_SENTENCES`)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n_train = MULTITASK_SENTENCES["train"] if n_train is None else n_train
    n_heldout = MULTITASK_SENTENCES["heldout"] if n_heldout is None else n_heldout
    for name, v in (("n_train", n_train), ("n_heldout", n_heldout)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    tok = default_tokenizer()
    # offset the entropy so no stream coincides with builtin_task's splits of the same seed
    seeds = np.random.SeedSequence([int(seed), 10]).generate_state(2 * len(TASKS))
    train, heldout, train_c, heldout_c = [], [], [], []
    for t, task in enumerate(TASKS):
        ids, ch = _encode(tok, draw_sentences(int(n_train), int(seeds[2 * t])), task)
        train.append(ids)
        train_c.append(ch)
        ids, ch = _encode(tok, draw_sentences(int(n_heldout), int(seeds[2 * t + 1])), task)
        heldout.append(ids)
        heldout_c.append(ch)
    return MultiTaskData(tokenizer=tok, tasks=TASKS, train=tuple(train), heldout=tuple(heldout),
                         train_changed=tuple(train_c), heldout_changed=tuple(heldout_c), seed=int(seed))


def _check_positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def get_multitask_batch(mt: MultiTaskData, batch_size: int, block_size: int, rng: np.random.Generator,
                        split: str = "train", tasks=None):
    """``batch_size`` random windows, each from one task's text: ``x, y`` int64 ``(batch_size,
    block_size)`` and ``task_ids`` int64 ``(batch_size,)``.

    ``tasks``: ``None`` draws every row's task uniformly from all tasks; a task name or id gives
    every row that task; a list of names/ids draws among those."""
    if not isinstance(mt, MultiTaskData):
        raise TypeError(f"mt must be a MultiTaskData (from multitask_data()), got {type(mt).__name__}")
    _check_positive("batch_size", batch_size)
    _check_positive("block_size", block_size)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    arrays = mt.train if split == "train" else mt.heldout
    if tasks is None:
        pool = np.arange(mt.n_tasks)
    elif isinstance(tasks, (str, int, np.integer)):
        pool = np.array([mt.task_id(tasks)])
    else:
        pool = np.array([mt.task_id(t) for t in tasks], dtype=np.int64)
        if pool.size == 0:
            raise ValueError("tasks must name at least one task")
    task_ids = pool[rng.integers(0, pool.size, size=batch_size)].astype(np.int64)
    offsets = np.arange(block_size + 1)
    x = np.empty((batch_size, block_size), dtype=np.int64)
    y = np.empty((batch_size, block_size), dtype=np.int64)
    for t in np.unique(task_ids):
        tokens = check_tokens(arrays[t], block_size, f"task {mt.tasks[t]!r}")
        rows = np.flatnonzero(task_ids == t)
        starts = rng.integers(0, tokens.size - block_size, size=rows.size)
        win = tokens[starts[:, None] + offsets]  # (rows, T+1)
        x[rows], y[rows] = win[:, :-1], win[:, 1:]
    return x, y, task_ids


def multitask_eval_windows(mt: MultiTaskData, task, block_size: int, max_windows: int | None = None):
    """Non-overlapping held-out windows of one task (deterministic): ``x, y`` ``(n, block_size)``
    and ``changed`` ``(n, block_size)`` bool, ``True`` where the target ``y`` is a changed word."""
    t = mt.task_id(task)
    tokens = check_tokens(mt.heldout[t], block_size, f"task {mt.tasks[t]!r}")
    n = (tokens.size - 1) // block_size
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
        n = min(n, int(max_windows))
    x = tokens[: n * block_size].reshape(n, block_size).astype(np.int64)
    y = tokens[1 : n * block_size + 1].reshape(n, block_size).astype(np.int64)
    changed = mt.heldout_changed[t][1 : n * block_size + 1].reshape(n, block_size).copy()
    return x, y, changed


def _is_numpy(model) -> bool:
    from lowrank_ref.nn.module import Module

    return isinstance(model, Module)


def _takes_condition(model) -> bool:
    mods = (m for _, m in model.named_modules()) if _is_numpy(model) else model.modules()
    return any(getattr(m, "takes_condition", False) for m in mods)


def _logits(model, x: np.ndarray, cond):
    """NumPy logits of a NumPy or torch model."""
    if not _is_numpy(model):  # torch
        import torch

        device = next(model.parameters()).device
        with torch.no_grad():
            out = model(torch.from_numpy(x).to(device),
                        cond=None if cond is None else torch.from_numpy(cond).to(device))
        return out.double().cpu().numpy()
    return model.forward(x, cond=cond)


def evaluate_multitask(model, mt: MultiTaskData, max_windows: int | None = 64, batch_size: int = 64,
                       conditional: bool | None = None, models=None, cond_of=None) -> dict:
    """Per-task and averaged next-token accuracy on the held-out windows (NumPy or torch model).

    Returns ``{"per_task": {task: {"loss", "accuracy", "changed_accuracy", "tokens",
    "changed_tokens"}}, "loss", "accuracy", "changed_accuracy"}``; the three top-level numbers are
    the means over tasks (each task counts once, whatever its length).

    Args:
        model: the model to evaluate on every task (ignored for tasks that ``models`` names).
        max_windows: held-out windows of ``block_size`` tokens read per task.
        conditional: pass the task id as ``cond`` (``None``: when a layer of the model takes a
            condition).
        models: optional ``{task name: model}`` (one model per task, e.g. one LoRA per task).
        cond_of: optional ``{task name: cond value}`` to evaluate a task under another condition
            id (an unseen-condition experiment); default the task's own id.
    """
    from lowrank_ref.nn.losses import log_softmax

    if not isinstance(mt, MultiTaskData):
        raise TypeError(f"mt must be a MultiTaskData (from multitask_data()), got {type(mt).__name__}")
    _check_positive("batch_size", batch_size)
    models = {} if models is None else dict(models)
    unknown = [k for k in models if k not in mt.tasks]
    if unknown:
        raise ValueError(f"models names unknown task(s) {unknown}; tasks: {', '.join(mt.tasks)}")
    per_task = {}
    for t, name in enumerate(mt.tasks):
        m = models.get(name, model)
        if m is None:
            raise ValueError(f"no model for task {name!r}: give model= or models[{name!r}]")
        use_cond = _takes_condition(m) if conditional is None else bool(conditional)
        x, y, changed = multitask_eval_windows(mt, t, m.config.block_size, max_windows)
        was_training = m.training
        m.eval()
        nll, correct, correct_ch = 0.0, 0, 0
        try:
            for i in range(0, x.shape[0], batch_size):
                xb, yb, cb = x[i : i + batch_size], y[i : i + batch_size], changed[i : i + batch_size]
                cid = t if cond_of is None or name not in cond_of else cond_of[name]
                cond = np.full(xb.shape[0], cid, dtype=np.int64) if use_cond else None
                logits = _logits(m, xb, cond)  # (b, T, V)
                logp = log_softmax(np.asarray(logits, dtype=np.float64))
                nll -= float(np.take_along_axis(logp, yb[..., None], axis=-1).sum())
                hit = logits.argmax(-1) == yb
                correct += int(hit.sum())
                correct_ch += int((hit & cb).sum())
        finally:
            if _is_numpy(m):
                for _, mod in m.named_modules():
                    object.__setattr__(mod, "_cache", None)
            m.train(was_training)
        n, n_ch = int(y.size), int(changed.sum())
        per_task[name] = {"loss": nll / n, "accuracy": correct / n,
                          "changed_accuracy": correct_ch / n_ch if n_ch else float("nan"),
                          "tokens": n, "changed_tokens": n_ch}
    mean = lambda k: float(np.mean([v[k] for v in per_task.values()]))  # noqa: E731
    return {"per_task": per_task, "loss": mean("loss"), "accuracy": mean("accuracy"),
            "changed_accuracy": mean("changed_accuracy")}
