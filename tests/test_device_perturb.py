"""Device-side perturbation (edgezo.device_perturb) on the CPU provider: the host path, bit for
bit."""

import numpy as np
import pytest

from edgezo.bundle import load_bundle
from edgezo.device_perturb import _pm1_rows, attach, build_apply_graph
from edgezo.errors import ConfigError
from edgezo.runner import LossRunner, RuntimeOptions
from edgezo.train import BATCH_INPUTS
from edgezo.zo.directions import CHUNK, Directions
from edgezo.zo.engine import EngineSettings
from edgezo.zo.params import FlatParams

pytest.importorskip("onnx")


def _batch(bundle, rows=4, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    vocab = int(bundle.manifest.architecture["vocab_size"])
    ids = rng.integers(3, vocab, size=(rows, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, -3:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)}


def _pair(path, settings, threads=1):
    """(host engine + runner, device engine + runner) over the same bundle and settings."""
    bundle = load_bundle(path)
    host = bundle.engine(settings)
    host_runner = LossRunner(
        bundle.model_path, host.params, BATCH_INPUTS, RuntimeOptions(threads=threads)
    )
    dev = bundle.engine(settings)
    opts = RuntimeOptions(threads=threads, device_perturbation=True)
    dev_runner = LossRunner(bundle.model_path, dev.params, BATCH_INPUTS, opts)
    state = attach(dev, dev_runner)
    return bundle, (host, host_runner), (dev, dev_runner), state


@pytest.mark.parametrize(
    "direction,estimator,q,clip",
    [
        ("rademacher", "central", 1, None),
        ("rademacher", "onesided", 3, 0.5),
        ("gaussian", "central", 2, None),
        ("sphere", "p4", 2, None),
    ],
)
def test_device_steps_equal_host_steps_bit_for_bit(make_bundle, direction, estimator, q, clip):
    settings = EngineSettings(seed=11, direction=direction, estimator=estimator, q=q, clip=clip)
    bundle, (host, hr), (dev, dr), state = _pair(make_bundle("full"), settings)
    batch = _batch(bundle)
    for step in range(4):
        a = host.step(step, 1e-2, 1e-2, lambda: hr.mean_loss(batch))
        b = dev.step(step, 1e-2, 1e-2, lambda: dr.mean_loss(batch))
        assert a["losses"] == b["losses"] and a["g"] == b["g"]
    host.perturber.at_theta()
    dev.perturber.at_theta()
    # held-out style evaluation at θ, on the device buffers, without a pull
    assert np.array_equal(hr.losses(batch, heldout=True), dr.losses(batch, heldout=True))
    (lh,) = hr.outputs(batch, ("loss",))
    (ld,) = dr.outputs(batch, ("loss",))
    assert np.array_equal(lh, ld)
    before = dev.params.master.copy()
    state.pull()
    assert not np.array_equal(before, dev.params.master)  # it was stale, as documented
    assert np.array_equal(host.params.master.view(np.uint32), dev.params.master.view(np.uint32))


def test_device_run_replays_on_the_host(make_bundle, tmp_path):
    """The ledger of a device run rebuilds its θ on the host (replay's promise holds)."""
    from edgezo.zo.ledger import Ledger

    settings = EngineSettings(seed=5)
    bundle, _, (dev, dr), state = _pair(make_bundle("lora"), settings)
    batch = _batch(bundle, seed=1)
    header = {
        "bundle": bundle.fingerprint,
        "bundle_path": str(bundle.path),
        "engine": settings.to_dict(),
    }
    ledger = Ledger.create(tmp_path / "ledger.jsonl", header)
    for step in range(5):
        ledger.append(dev.step(step, 5e-2, 1e-2, lambda: dr.mean_loss(batch)))
    ledger.close()
    state.pull()
    rebuilt = bundle.replay(Ledger.read(tmp_path / "ledger.jsonl"))
    assert np.array_equal(rebuilt.params.master.view(np.uint32), dev.params.master.view(np.uint32))


def test_push_sends_a_changed_master(make_bundle):
    bundle, (host, hr), (dev, dr), state = _pair(make_bundle("lora"), EngineSettings(seed=2))
    batch = _batch(bundle)
    rng = np.random.default_rng(0)
    new = rng.standard_normal(dev.params.dim).astype(np.float32) * 0.1
    for engine in (host, dev):
        engine.params.master[:] = new
        engine.params.sync_feed()
    state.push()
    dev.perturber.at_theta()
    assert np.array_equal(hr.losses(batch), dr.losses(batch))


def test_apply_graph_expands_the_generators_directions():
    """The graph's z is Directions.full(), across chunk boundaries and a partial last byte."""
    import onnxruntime as ort

    from edgezo.bundle import TensorSpec

    dim = CHUNK + 1003  # two chunks, the last one not a whole number of bytes
    specs = [
        TensorSpec("a", (CHUNK - 5,)),
        TensorSpec("b", (3, 336)),
        TensorSpec("c", (dim - CHUNK + 5 - 1008,)),
    ]
    params = FlatParams(specs)
    assert params.dim == dim
    theta = np.zeros(dim, dtype=np.float32)
    for kind in ("rademacher", "gaussian"):
        d = Directions(9, dim, kind)
        sess = ort.InferenceSession(build_apply_graph(params, kind))
        feeds = {f"theta.{i}": v for i, v in enumerate(params.views(theta).values())}
        if kind == "rademacher":
            feeds["bits"] = d.packed_bits(4, 2)
        else:
            feeds["indices"] = d.table_indices(4, 2)
            feeds["table"] = d.value_table(4, 2)
        feeds["c"] = np.array(1.0, dtype=np.float32)
        z = np.concatenate([o.reshape(-1) for o in sess.run(None, feeds)])
        assert np.array_equal(z.view(np.uint32), d.full(4, 2).view(np.uint32))


def test_pm1_rows_match_unpackbits():
    b = np.arange(256, dtype=np.uint8)
    expect = np.unpackbits(b, bitorder="little").astype(np.float32) * 2 - 1
    assert np.array_equal(_pm1_rows().reshape(-1), expect)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"inplace": True}, "perturbation in place"),
        ({"momentum": 0.9}, "only plain sgd"),
        ({"optimizer": "adam"}, "only plain sgd"),
        ({"weight_decay": 0.1}, "only plain sgd"),
        ({"estimator": "dap"}, "estimator dap"),
    ],
)
def test_unsupported_settings_are_refused(make_bundle, change, match):
    bundle = load_bundle(make_bundle("lora"))
    engine = bundle.engine(EngineSettings(seed=0, **change))
    runner = LossRunner(
        bundle.model_path, engine.params, BATCH_INPUTS, RuntimeOptions(device_perturbation=True)
    )
    with pytest.raises(ConfigError, match=match):
        attach(engine, runner)


def test_a_runner_without_engine_or_option_says_what_to_do(make_bundle):
    bundle = load_bundle(make_bundle("lora"))
    engine = bundle.engine(EngineSettings(seed=0))
    runner = LossRunner(
        bundle.model_path, engine.params, BATCH_INPUTS, RuntimeOptions(device_perturbation=True)
    )
    with pytest.raises(ConfigError, match="no ZO engine is attached"):
        runner.losses(_batch(bundle))
    plain = LossRunner(bundle.model_path, engine.params, BATCH_INPUTS)
    with pytest.raises(ConfigError, match="device_perturbation=True"):
        attach(engine, plain)
