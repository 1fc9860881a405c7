"""lowrank_gpu.models mirrors lowrank_ref.models: the same shipped weights, as a torch model."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lowrank_gpu as lg  # noqa: E402
from lowrank_ref.models import load_pretrained  # noqa: E402


def test_torch_model_has_the_numpy_models_weights_and_logits():
    np_model = load_pretrained(backend="numpy", dtype=np.float64, progress=False)
    t_model = lg.models.load_pretrained("cpu", dtype=torch.float64, progress=False)
    t_state = {k: v.numpy() for k, v in t_model.state_dict().items()}
    np_state = np_model.state_dict()
    assert set(t_state) == set(np_state)
    for k in np_state:
        np.testing.assert_array_equal(t_state[k], np_state[k], err_msg=k)
    idx = np.random.default_rng(0).integers(0, np_model.config.vocab_size, (2, 8))
    with torch.no_grad():
        t_logits = t_model(torch.from_numpy(idx)).numpy()
    np.testing.assert_allclose(np_model.eval().forward(idx), t_logits, rtol=1e-10, atol=1e-12)


def test_unknown_device_is_named():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        lg.models.load_pretrained("tpu")
