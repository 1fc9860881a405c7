"""``scripts/gpu_check.py --dry`` (run by ``make test``): the plan names only tests that exist,
its commands parse, and its limits fit the 8-minute budget; a plan that names a missing test fails."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_dry_run_passes():
    r = subprocess.run([sys.executable, SCRIPT, "--dry"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "steps" in r.stdout


def test_the_dry_run_catches_a_missing_test_a_bad_command_and_the_budget(monkeypatch):
    mod = _module()
    assert mod.check_plan() == []
    monkeypatch.setattr(mod, "GPU_TESTS", (*mod.GPU_TESTS, "tests/test_io.py::test_no_such_thing", "tests/nope.py"))
    problems = mod.check_plan()
    assert any("test_no_such_thing" in p for p in problems) and any("nope.py" in p for p in problems)
    real = mod.steps
    monkeypatch.setattr(mod, "steps", lambda out: [dict(s, limit=200) for s in real(out)] +
                        [{"name": "bad", "limit": 1, "needs": [], "argv": ["-m", "lowrank_ref", "train", "--steps", "x"]}])
    problems = mod.check_plan()
    assert any("bad: the command does not parse" in p for p in problems)
    assert any("budget" in p for p in problems)


def test_run_all_writes_one_report_and_reports_missing_modules(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "steps", lambda out: [
        {"name": "help", "limit": 60, "needs": [], "argv": ["-m", "lowrank_ref", "train", "--help"]},
        {"name": "needs a module", "limit": 60, "needs": ["no_such_module_xyz"], "argv": ["-c", "pass"]},
        {"name": "fails", "limit": 60, "needs": [], "argv": ["-c", "import sys; sys.exit(3)"]},
    ])
    report = mod.run_all(str(tmp_path))
    status = {r["name"]: r["status"] for r in report["steps"]}
    assert status == {"help": "passed", "needs a module": "skipped", "fails": "failed (exit 3)"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "no_such_module_xyz" in md and "--grad-checkpointing" in md
    assert (tmp_path / "gpu_check.json").exists()
