"""Save, then load in a fresh process with a different seed: the same outputs, for every registered
method in both backends. Layer methods go through ``lowrank_ref.io.save_adapter`` /
``load_adapter`` on one layer; whole-model modes (``full``, ``bitfit``) save what they train
(``save_trained``: every trainable tensor by name) into a freshly built model.

One child process loads every file (a process per method would cost seconds each); a tensor that
the file lacks but that a seed would regenerate shows up as a mismatch, because the child builds
every layer with another seed and checks that it differs before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from contract_build import (
    GPT_CFG,
    IDX,
    LAYER_METHODS,
    MODEL_METHODS,
    build,
    gpt_in,
    mode_config,
    perturb_trainable,
    torch,
)

from lowrank_ref.experiments.compare import save_trained
from lowrank_ref.inject import inject
from lowrank_ref.io import save_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("numpy", "torch")

CHILD = """
import json, sys
import numpy as np
np.random.seed(98765)  # another global seed; every layer below is built with another rng too
import torch
torch.manual_seed(2024)
import lowrank_ref as lr
from lowrank_ref import registry
from lowrank_ref.io import load_adapter
from safetensors.numpy import load_file
from lowrank_ref.nn.gpt import GPT, GPTConfig
IDX = np.load({idx!r})


def gpt_in(backend):  # the parent's model: the same config and weights
    model = GPT(GPTConfig(**{gpt!r}), rng=np.random.default_rng(0), dtype=np.float64)
    if backend == "numpy":
        return model
    from lowrank_gpu.nn.gpt import from_numpy

    return from_numpy(model)


jobs = json.load(open({jobs!r}))
for job in jobs:
    d = job["dir"]
    if job["kind"] == "layer":
        ex = registry.get_method(job["method"]).example()
        W = np.load(d + "/W.npy")
        b = np.load(d + "/b.npy") if job["bias"] else None
        layer = lr.adapt(lr.nn.Linear.from_arrays(W, b), ex.config, backend=job["backend"],
                         method=job["method"], rng=4242, **ex.kwargs)
        if ex.condition is not None:  # a conditional method: the example's task id, as the parent set it
            layer.condition = ex.condition
        x = np.load(d + "/x.npy")
        run = (lambda: layer.forward(x.astype(job["dtype"]))) if job["backend"] == "numpy" else \\
              (lambda: layer(torch.from_numpy(x).to(getattr(torch, job["dtype"]))).detach().numpy())
        np.save(d + "/fresh.npy", run())
        load_adapter(layer, d + "/adapter.safetensors")
        np.save(d + "/loaded.npy", run())
    else:
        model = gpt_in(job["backend"])
        spec = registry.get_method(job["method"])
        lr.inject.inject(model, None if spec.example is None else spec.example().config, method=job["method"])
        tensors = load_file(d + "/trained.safetensors")
        if job["backend"] == "numpy":
            model.load_state_dict(tensors, strict=False)
            np.save(d + "/loaded.npy", model.forward(IDX))
        else:
            model.load_state_dict({{k: torch.from_numpy(v) for k, v in tensors.items()}}, strict=False)
            np.save(d + "/loaded.npy", model(torch.from_numpy(IDX)).detach().numpy())
        json.dump(sorted(tensors), open(d + "/keys.json", "w"))
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Save every (method, backend) here, load them all in one child process; return
    ``{(method, backend): (dir, expected output, trainable names or None)}``."""
    torch()
    root = tmp_path_factory.mktemp("contract_io")
    jobs, expected = [], {}
    for method in LAYER_METHODS:
        for backend in BACKENDS:
            d = root / f"{method}-{backend}"
            d.mkdir()
            case = build(method, backend, seed=3)
            x = np.random.default_rng(4).standard_normal((2, 3, case.in_features))
            np.save(d / "W.npy", case.W)
            if case.b is not None:
                np.save(d / "b.npy", case.b)
            np.save(d / "x.npy", x)
            save_adapter(case.layer, d / "adapter.safetensors")
            expected[(method, backend)] = (d, case.forward(x), None)
            jobs.append({"kind": "layer", "method": method, "backend": backend, "dir": str(d),
                         "bias": case.b is not None, "dtype": case.dtype})
    for method in MODEL_METHODS:
        for backend in BACKENDS:
            d = root / f"{method}-{backend}"
            d.mkdir()
            model = gpt_in(backend)
            inject(model, mode_config(method), method=method)
            names = perturb_trainable(model, np.random.default_rng(5))
            save_trained(model, d / "trained.safetensors")
            out = model.forward(IDX) if backend == "numpy" else \
                model(torch().from_numpy(IDX)).detach().numpy()
            expected[(method, backend)] = (d, out, names)
            jobs.append({"kind": "model", "method": method, "backend": backend, "dir": str(d)})
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = root / "child.py"
    np.save(root / "idx.npy", IDX)
    script.write_text(textwrap.dedent(CHILD.format(jobs=str(root / "jobs.json"), idx=str(root / "idx.npy"),
                                                   gpt=GPT_CFG)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr
    return expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", LAYER_METHODS)
def test_a_layer_saved_then_loaded_in_a_fresh_process_gives_the_same_outputs(loaded, method, backend):
    d, y, _ = loaded[(method, backend)]
    fresh, got = np.load(d / "fresh.npy"), np.load(d / "loaded.npy")
    assert not np.allclose(fresh, y), "the child's freshly built layer already matched: the test could not fail"
    np.testing.assert_array_equal(got, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MODEL_METHODS)
def test_a_whole_model_mode_saved_then_loaded_in_a_fresh_process_gives_the_same_outputs(loaded, method, backend):
    d, y, names = loaded[(method, backend)]
    assert json.loads((d / "keys.json").read_text()) == sorted(names)  # the file holds what trains
    np.testing.assert_array_equal(np.load(d / "loaded.npy"), y)
