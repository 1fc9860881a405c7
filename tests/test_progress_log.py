"""Progress output suits a log: no carriage-return bar when stderr is not a terminal, one summary
line per method from ``compare``."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
from lowrank_ref.experiments import run_compare
run_compare(["lora", "bitfit"], steps=25, batch_size=2, eval_windows=1, progress=True, verbose=False)
"""


def test_compare_into_a_log_writes_one_line_per_method_and_no_bar():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, timeout=300, check=True)
    assert b"\r" not in out.stderr and b"\r" not in out.stdout  # bytes: text mode would hide \r
    err = out.stderr.decode()
    assert "it/s" not in err  # no bar frames
    lines = [ln for ln in err.splitlines() if "dialect" in ln]
    assert [ln.split(":")[0].strip() for ln in lines] == ["lora", "bitfit"], err


def test_the_bar_is_drawn_on_a_terminal(monkeypatch):
    import io

    from lowrank_ref import train

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", Tty())
    assert not train.progress_bar(3, True, "t").disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file: no bar
    assert train.progress_bar(3, True, "t").disable
    assert train.progress_bar(3, False, "t").disable
