"""Solutions to notebooks/04-compare-exercises.ipynb (try the exercises first)."""


def lora_gpt_params(cfg, r, targets):
    """r (in + out) for every adapted linear layer, in every block."""
    d, f = cfg.d_model, cfg.d_model * cfg.mlp_ratio
    shape = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "fc": (d, f), "proj": (f, d)}
    return cfg.n_layer * sum(r * (shape[t][0] + shape[t][1]) for t in targets)


def adam_training_bytes(n_trainable):
    """float32 gradient (4) + Adam's float32 m and v (8): 12 bytes per trainable scalar."""
    return 12 * n_trainable
