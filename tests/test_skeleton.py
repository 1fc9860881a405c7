"""The import contract: lowrank_ref never imports torch or cupy by itself."""

import subprocess
import sys


def test_import_lowrank_ref_does_not_import_torch_or_cupy():
    code = "import sys, lowrank_ref, lowrank_ref.adapters, lowrank_ref.nn; print('torch' in sys.modules, 'cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_backend_lists_known_ones():
    import numpy as np
    import pytest

    import lowrank_ref as lr

    base = lr.nn.Linear.from_arrays(np.ones((2, 3)))
    with pytest.raises(ValueError, match="numpy, torch, cuda, cupy"):
        lr.adapt(base, lr.LoRAConfig(r=1), backend="tpu")
