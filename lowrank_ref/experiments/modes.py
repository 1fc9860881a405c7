"""How big the notebooks' and experiments' runs are: one switch, read in one place.

``LOWRANK_REF_QUICK=1`` (the notebook tests set it) shrinks every run to a smoke test that checks
the code path, not the conclusions; ``LOWRANK_REF_RERUN=1`` makes a notebook recompute results
that are committed under ``chapters/data/`` instead of reading them.
"""

from __future__ import annotations

import os

__all__ = ["quick_mode", "rerun_mode"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def quick_mode() -> bool:
    """``LOWRANK_REF_QUICK`` set to anything but empty or ``0``: shrink every run to a smoke test."""
    return _flag("LOWRANK_REF_QUICK")


def rerun_mode() -> bool:
    """Recompute committed results: ``LOWRANK_REF_RERUN`` set, or quick mode (so the code runs)."""
    return _flag("LOWRANK_REF_RERUN") or quick_mode()
