"""Golden values: θ after a few steps of every estimator × optimiser × direction kind, and the
data order, pinned bit for bit.

An old ledger replays to the θ it was trained to only while the arithmetic stays the same:
a change to an estimator, an optimiser, the perturbation or the directions that moves θ by one
bit fails here instead of silently replaying old ledgers to another θ. If a change is meant to
alter the arithmetic, it breaks every existing ledger: say so (a ledger or engine version) and
only then update these values.

Why the values are the same on every machine: θ and every update are float32 *elementwise*
operations (add, multiply, divide, sqrt — all correctly rounded in IEEE 754) in a fixed order;
directions come from Philox raw bits (covered by numpy's stability promise) and a table fixed at
import; the reductions that enter θ — the sphere norm and DAP's dot products — are
``math.fsum`` (correctly rounded, independent of order); no BLAS call touches θ. The loss below
is float64 elementwise plus ``math.fsum``. Not covered, on purpose: tensors marked ``positive``
(moved by ``np.exp``, whose float32 SIMD and libm versions may differ by an ulp between CPUs)
and the Gaussian table itself (pinned in test_directions.py).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from edgezo.data import EPOCH_ORDER, HOLDOUT_SPLIT, BatchStream, Example, shuffled, split_holdout
from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.params import TensorSpec

SPECS = [TensorSpec("w", (4, 5)), TensorSpec("b", (7,))]
DIM = 27
STEPS = 5
TARGET = [math.sin(i) for i in range(DIM)]


def initial():
    x = np.array([math.cos(3 * i) / 2 for i in range(DIM)], dtype=np.float32)
    return {"w": x[:20].reshape(4, 5).copy(), "b": x[20:].copy()}


def loss_of(engine: ZOEngine):
    feed = engine.params.feed

    def loss() -> float:  # float64 elementwise, summed correctly rounded: machine-independent
        d = feed.astype(np.float64) - TARGET
        return math.fsum((d * d + 0.1 * d**4).tolist())

    return loss


def theta_hash(engine: ZOEngine) -> str:
    engine.perturber.at_theta()
    h = hashlib.sha256(engine.params.master.astype("<f4").tobytes())
    for k, v in sorted(engine.optimizer.state().items()):
        h.update(k.encode() + np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()[:16]


def train(settings: EngineSettings, lr: float = 0.02, mu: float = 1e-2):
    engine = ZOEngine(SPECS, initial, settings)
    loss = loss_of(engine)
    records = [engine.step(t, lr, mu, loss) for t in range(STEPS)]
    return engine, records


OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "momentum": 0.9},
    "adam": {"optimizer": "adam"},
    "sign": {"optimizer": "sign", "momentum": 0.5},
}

#: (estimator, optimiser, direction) -> θ and optimiser state after STEPS steps
GOLDEN = {
    ("central", "sgd", "rademacher"): "5dcf634135a5c666",
    ("central", "sgd", "gaussian"): "0dfb581efb3e3551",
    ("central", "sgd", "sphere"): "5721d3f2af26aaac",
    ("central", "adam", "rademacher"): "ed786a6f1b2b5383",
    ("central", "adam", "gaussian"): "93b01ec23765e698",
    ("central", "adam", "sphere"): "df90caf0a6b905b5",
    ("central", "sign", "rademacher"): "75d7cf83c453c69a",
    ("central", "sign", "gaussian"): "087105669b25aec4",
    ("central", "sign", "sphere"): "36e9551f56c46976",
    ("onesided", "sgd", "rademacher"): "8b25ea68065ca1bf",
    ("onesided", "sgd", "gaussian"): "3fa5ef2aa12562c2",
    ("onesided", "sgd", "sphere"): "cf75667d204c4e36",
    ("onesided", "adam", "rademacher"): "2eb148e007f44a7d",
    ("onesided", "adam", "gaussian"): "0440fd83a5bdf617",
    ("onesided", "adam", "sphere"): "0cc38615b15908be",
    ("onesided", "sign", "rademacher"): "d8dc9a66684d6f0a",
    ("onesided", "sign", "gaussian"): "c03d8e5042ead95f",
    ("onesided", "sign", "sphere"): "2c0cfe2ade22ea50",
    ("dap", "sgd", "rademacher"): "ce05fec90d49fb7d",
    ("dap", "sgd", "gaussian"): "c19e36d16d7eb2b7",
    ("dap", "sgd", "sphere"): "07d46d9a97d43942",
    ("dap", "adam", "rademacher"): "91751a6c7347523f",
    ("dap", "adam", "gaussian"): "96da4624b9f72def",
    ("dap", "adam", "sphere"): "03c6e36bf8fe25e8",
    ("dap", "sign", "rademacher"): "37910044281f0e3b",
    ("dap", "sign", "gaussian"): "6467f5aca3da6084",
    ("dap", "sign", "sphere"): "071ecb2b42537962",
    ("p3", "sgd", "rademacher"): "9c5db83b7eec6dcf",
    ("p3", "sgd", "gaussian"): "545f2ee1b3f134b8",
    ("p3", "sgd", "sphere"): "0e25056b7f451dca",
    ("p3", "adam", "rademacher"): "baf3033bae1da0a7",
    ("p3", "adam", "gaussian"): "9f46000c12a62d71",
    ("p3", "adam", "sphere"): "95524b20a890f08a",
    ("p3", "sign", "rademacher"): "23982c9e7fd7e46e",
    ("p3", "sign", "gaussian"): "2396b25f86fecce4",
    ("p3", "sign", "sphere"): "59b1cbba80d95ee8",
    ("p4", "sgd", "rademacher"): "3f00fb9c218075ef",
    ("p4", "sgd", "gaussian"): "7a28710245833aa7",
    ("p4", "sgd", "sphere"): "9e70ed735f2666da",
    ("p4", "adam", "rademacher"): "03f91ec2608341fe",
    ("p4", "adam", "gaussian"): "6e082f5d0c0c7412",
    ("p4", "adam", "sphere"): "01930be15c333130",
    ("p4", "sign", "rademacher"): "0224a1854d02443a",
    ("p4", "sign", "gaussian"): "500d9eb22c6c9480",
    ("p4", "sign", "sphere"): "d53d1a0f8fd7b0c1",
    ("fzoo", "sgd", "rademacher"): "4120ea59f47ec1ca",
    ("fzoo", "sgd", "gaussian"): "c4674e3070bc1828",
    ("fzoo", "sgd", "sphere"): "362ee298bd324075",
    ("fzoo", "adam", "rademacher"): "27d5b586be5be612",
    ("fzoo", "adam", "gaussian"): "381bc943a3fda83e",
    ("fzoo", "adam", "sphere"): "74dda6e3f3326099",
    ("fzoo", "sign", "rademacher"): "72fabe5ea880b4b9",
    ("fzoo", "sign", "gaussian"): "75bd1eee36f60522",
    ("fzoo", "sign", "sphere"): "a36a617572418078",
}


def combos():
    for est in ("central", "onesided", "dap", "p3", "p4", "fzoo"):
        for opt in OPTIMIZERS:
            for direction in ("rademacher", "gaussian", "sphere"):
                yield est, opt, direction


def settings_of(est: str, opt: str, direction: str, **kw) -> EngineSettings:
    return EngineSettings(seed=11, direction=direction, estimator=est, q=2, **OPTIMIZERS[opt], **kw)


@pytest.mark.parametrize("combo", list(combos()), ids="-".join)
def test_theta_after_a_few_steps_is_pinned(combo):
    engine, records = train(settings_of(*combo))
    assert all(r["status"] == "ok" for r in records)
    assert theta_hash(engine) == GOLDEN[combo]
    # and the ledger's records replay to the same bits
    again = ZOEngine(SPECS, initial, engine.settings)
    for r in records:
        again.replay(r)
    assert theta_hash(again) == GOLDEN[combo]


#: the other arithmetic paths: in-place perturbation, clipping, weight decay
VARIANTS = {
    "inplace-central-sgd": (("central", "sgd", "rademacher"), {"inplace": True}),
    "inplace-onesided-adam": (("onesided", "adam", "sphere"), {"inplace": True}),
    "clip-wd-central-sgd": (("central", "sgd", "gaussian"), {"clip": 0.5, "weight_decay": 0.1}),
    "zipf-p4-adam": (("p4", "adam", "rademacher"), {"level_schedule": "zipf", "zipf_s": 1.5}),
}
GOLDEN_VARIANTS = {
    "inplace-central-sgd": "2d161e230d442a0e",
    "inplace-onesided-adam": "1585b1ccd3ecb53e",
    "clip-wd-central-sgd": "cdbec6cb43dae859",
    "zipf-p4-adam": "994b52f050085c59",
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_other_arithmetic_paths_are_pinned(name):
    combo, kw = VARIANTS[name]
    engine, _ = train(settings_of(*combo, **kw))
    assert theta_hash(engine) == GOLDEN_VARIANTS[name]


# -- the data order ---------------------------------------------------------------------------


def examples(n: int) -> list[Example]:
    return [Example((1, 2 + i), (1, 2 + i), i + 1) for i in range(n)]


def test_the_batch_order_of_a_seed_is_pinned():
    stream = BatchStream(examples(10), batch_size=3, seed=7, pad_id=0)
    assert [stream.indices(t) for t in range(8)] == GOLDEN_BATCHES


def test_the_holdout_split_of_a_seed_is_pinned():
    train_, held = split_holdout(examples(20), 0.25, seed=7)
    assert [e.line - 1 for e in held] == GOLDEN_HELDOUT
    assert len(train_) == 15


def test_the_data_order_is_its_own_stream():
    """Not the bits of any direction: the old order (Philox key (seed, epoch) at counter 0)
    was the raw stream of direction (seed, step=epoch, index 0)."""
    from edgezo.zo.directions import _raw_bits

    n = 64
    words = np.random.Philox(key=[7, 1 << 63], counter=[0, 0, 0, 0]).random_raw(n)
    assert shuffled(n, 7, EPOCH_ORDER, 0).tolist() == np.argsort(words, kind="stable").tolist()
    for step in range(4):
        assert not np.array_equal(_raw_bits(7, step, 0, 0, n), words)
    assert shuffled(n, 7, HOLDOUT_SPLIT, 0).tolist() != shuffled(n, 7, EPOCH_ORDER, 0).tolist()
    assert sorted(shuffled(n, 7, EPOCH_ORDER, 3).tolist()) == list(range(n))


GOLDEN_BATCHES = [
    [9, 6, 5],
    [2, 8, 7],
    [1, 3, 4],
    [0, 6, 3],
    [2, 5, 4],
    [1, 0, 8],
    [7, 9, 3],
    [4, 9, 7],
]
GOLDEN_HELDOUT = [0, 1, 10, 11, 18]
