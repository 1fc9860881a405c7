"""The measured comparisons: the main job (:func:`run_compare`, ``lowrank-ref compare``) and the
chapters' experiments."""

from lowrank_ref.experiments.compare import VARIANTS, Variant, format_table, run_compare

__all__ = ["run_compare", "VARIANTS", "Variant", "format_table"]
