"""Chapter 05's Kronecker exercises (cells in ``notebooks/05-products-exercises.ipynb``, checked
with the chapter's other exercises by ``tests/test_exercises.py``): here only a plausible wrong
answer that the generic tests do not try, a solution that builds the product it should avoid."""

from __future__ import annotations

import numpy as np

from lowrank_ref import exercises as ex


def test_kron_matvec_check_refuses_a_solution_that_builds_the_product():
    def dense(x, C, D):
        return x @ np.kron(C, D).T

    res = ex.check_kron_matvec(dense, verbose=False)
    assert not res.ok and "np.kron" in res.message
    assert np.kron(np.eye(2), np.ones((1, 1))).shape == (2, 2)  # np.kron is restored after the check
