"""Solutions to notebooks/08-multitask-exercises.ipynb (try the exercises first)."""

import numpy as np


def hyper_backward(z, W1, b1, H_A, h_A, H_B, h_B, dA, dB):
    """Forward once to get p and g, then back through the heads, SiLU and the trunk."""
    p = W1 @ z + b1
    sig = 1.0 / (1.0 + np.exp(-p))
    g = p * sig  # SiLU
    a_bar, b_bar = dA.reshape(-1), dB.reshape(-1)  # vec Ā, vec B̄
    g_bar = H_A.T @ a_bar + H_B.T @ b_bar  # both heads feed g
    p_bar = g_bar * sig * (1.0 + p * (1.0 - sig))  # SiLU'(p)
    return {"H_A": np.outer(a_bar, g), "h_A": a_bar, "H_B": np.outer(b_bar, g), "h_B": b_bar,
            "W1": np.outer(p_bar, z), "b1": p_bar, "z": W1.T @ p_bar}
