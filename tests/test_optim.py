"""Optimiser state: checkpoints round-trip, memory is counted, resume is bit-exact."""

import numpy as np
import pytest

from edgezo.zo.engine import EngineSettings
from tests.test_estimators import make_bundle, objective


@pytest.mark.parametrize(
    "opt,momentum,buffers", [("sgd", 0.0, 0), ("sgd", 0.9, 1), ("sign", 0.9, 1), ("adam", 0.0, 2)]
)
def test_state_resumes_bit_exactly_and_is_counted(tmp_path, opt, momentum, buffers):
    b = make_bundle(tmp_path)
    s = EngineSettings(
        seed=0, optimizer=opt, momentum=momentum, estimator="onesided", direction="sphere"
    )
    full = b.engine(s)
    f = objective(full)
    for t in range(12):
        full.step(t, 0.01, 1e-2, f)
    first = b.engine(s)
    f = objective(first)
    for t in range(6):
        first.step(t, 0.01, 1e-2, f)
    saved = {
        "master": first.params.master.copy(),
        **{k: v.copy() for k, v in first.optimizer.state().items()},
    }
    resumed = b.engine(s)
    resumed.params.master[:] = saved["master"]
    resumed.optimizer.load_state(saved)
    f = objective(resumed)
    for t in range(6, 12):
        resumed.step(t, 0.01, 1e-2, f)
    assert np.array_equal(resumed.params.master, full.params.master)
    dim = full.params.dim
    assert full.optimizer.nbytes >= buffers * dim * 4
    assert full.optimizer.nbytes < buffers * dim * 4 + 64


def test_weight_decay_spares_positive_tensors(tmp_path):
    b = make_bundle(tmp_path)
    eng = b.engine(EngineSettings(seed=0, weight_decay=0.5))
    before = eng.params.master.copy()
    eng.optimizer.update([], [], lr=1.0)  # no directions: only the decay
    np.testing.assert_array_equal(eng.params.master[:12], before[:12] * np.float32(0.5))
    np.testing.assert_array_equal(eng.params.master[12:], before[12:])


def test_adam_state_survives_an_atomic_checkpoint(tmp_path):
    from edgezo.zo.checkpoint import load_checkpoint, save_tensors_atomic

    b = make_bundle(tmp_path)
    eng = b.engine(EngineSettings(seed=0, optimizer="adam"))
    f = objective(eng)
    for t in range(3):
        eng.step(t, 0.01, 1e-2, f)
    path = tmp_path / "ckpt.safetensors"
    save_tensors_atomic(
        path,
        {"master": eng.params.master, **eng.optimizer.state()},
        metadata={"bundle": "fp", "step": "3"},
    )
    tensors, step = load_checkpoint(path, "fp")
    other = b.engine(EngineSettings(seed=0, optimizer="adam"))
    other.optimizer.load_state(tensors)
    assert step == 3 and int(other.optimizer.t[0]) == 3
    assert np.array_equal(other.optimizer.m, eng.optimizer.m)
