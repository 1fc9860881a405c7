"""How big the notebooks' and experiments' runs are: one switch, read in one place.

``LOWRANK_REF_MODE`` picks one of three sizes:

* ``full`` (the default): the runs the chapters report; notebooks read results that are committed
  under ``chapters/data/`` where recomputing them takes long;
* ``classroom``: runs that are smaller but still big enough for each notebook's conclusions to hold,
  about five minutes a notebook on a laptop; notebooks recompute their results at that size
  (``make classroom`` re-measures the sizes and the conclusions, ``chapters/data/classroom.json``);
* ``quick``: a smoke test that checks the code path, not the conclusions (the notebook tests).

``LOWRANK_REF_QUICK=1`` is the older spelling of ``LOWRANK_REF_MODE=quick`` and wins over it (the
test suite sets it). ``LOWRANK_REF_RERUN=1`` makes a notebook recompute results that are committed
under ``chapters/data/`` instead of reading them (at the mode's size).
"""

from __future__ import annotations

import os

__all__ = ["MODES", "mode", "quick_mode", "classroom_mode", "sized", "rerun_mode"]

MODES = ("quick", "classroom", "full")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def mode() -> str:
    """The run size: ``"quick"``, ``"classroom"`` or ``"full"``.

    ``LOWRANK_REF_QUICK`` set to anything but empty or ``0`` gives ``"quick"``; otherwise
    ``LOWRANK_REF_MODE`` (case and surrounding spaces ignored; empty means ``"full"``)."""
    if _flag("LOWRANK_REF_QUICK"):
        return "quick"
    raw = os.environ.get("LOWRANK_REF_MODE", "").strip().lower()
    if raw == "":
        return "full"
    if raw not in MODES:
        raise ValueError(f"LOWRANK_REF_MODE must be one of {', '.join(MODES)} (or unset), got {raw!r}")
    return raw


def quick_mode() -> bool:
    """Shrink every run to a smoke test: ``LOWRANK_REF_QUICK`` set, or ``LOWRANK_REF_MODE=quick``."""
    return mode() == "quick"


def classroom_mode() -> bool:
    """``LOWRANK_REF_MODE=classroom`` (and not quick): runs sized so the conclusions still hold."""
    return mode() == "classroom"


def sized(*, quick, classroom, full, current: str | None = None):
    """The value for the current mode (or for ``current``): ``sized(quick=20, classroom=150, full=300)``."""
    m = mode() if current is None else current
    if m not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {m!r}")
    return {"quick": quick, "classroom": classroom, "full": full}[m]


def rerun_mode() -> bool:
    """Recompute committed results: ``LOWRANK_REF_RERUN`` set, or a quick or classroom mode (whose
    sizes differ from the committed runs, so they recompute at their own size)."""
    return _flag("LOWRANK_REF_RERUN") or mode() != "full"
