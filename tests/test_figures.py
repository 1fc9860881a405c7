"""The chapters' figures are the ones the code makes: each committed figure's data equals what its
data function computes now, and every chapter shows its figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_ref.experiments import figures

NAMES = list(figures.FIGURES)


def _close(a, b, rtol, path="data"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], rtol, f"{path}.{k}")
    elif isinstance(a, list) and a and isinstance(a[0], (dict, list, str)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, rtol, f"{path}[{i}]")
    elif isinstance(a, (list, float, int)) and not isinstance(a, bool):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=0, err_msg=path)
    else:
        assert a == b, path


@pytest.mark.parametrize("name", NAMES)
def test_committed_figure_is_what_the_code_makes(name):
    png, js = figures.OUT / f"{name}.png", figures.OUT / f"{name}.json"
    assert png.exists() and png.stat().st_size > 1000, f"{png} missing: run make figures"
    committed = json.loads(js.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(figures.data_of(name)))
    # float32 rounding paths may differ across BLAS builds in the last bits; float64 ones do not
    _close(now, committed, rtol=1e-3 if name.startswith("00-") else 1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_each_chapter_shows_its_figure(name):
    chapter = figures.FIGURES[name][2]
    text = (figures.ROOT / "chapters" / f"{chapter}.md").read_text(encoding="utf-8")
    assert f"](figures/{name}.png)" in text


def test_every_committed_figure_is_registered():
    on_disk = {p.stem for p in figures.OUT.glob("*.png")}
    assert on_disk == set(NAMES)
