"""``direction=cone``: probes on a cone around the momentum, exact replay and resume.

Each probe is u = √d·(cos φ·m̂ + sin φ·ẑ⊥) with m the optimiser's momentum (sphere while m = 0).
The tests pin its geometry, its fallback, that it is defined inside its step only, and that the
history it leans on is rebuilt exactly by replay, by a checkpoint and by a killed-and-resumed run.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_resume import cli, kill_when_ledger_has, ledger_records, same_tensors, start_args

from edgezo.config import FinetuneConfig
from edgezo.errors import ConfigError
from edgezo.zo.directions import CHUNK, ConeDirections, Directions
from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.params import TensorSpec

SPECS = [TensorSpec("a", (30, 20)), TensorSpec("b", (400,))]
DIM = 1000
TARGET = np.linspace(-1, 1, DIM)


def initial():
    rng = np.random.default_rng(5)
    return {
        "a": rng.normal(size=(30, 20)).astype(np.float32),
        "b": rng.normal(size=400).astype(np.float32),
    }


def engine(**kw) -> ZOEngine:
    s = {"seed": 3, "direction": "cone", "q": 3, "momentum": 0.9, "estimator": "onesided", **kw}
    return ZOEngine(SPECS, initial, EngineSettings(**s))


def quadratic(eng: ZOEngine):
    feed = eng.params.feed
    return lambda: float(np.sum((feed.astype(np.float64) - TARGET) ** 2))


def train(eng: ZOEngine, steps: range, lr: float = 2e-4) -> list[dict]:
    loss = quadratic(eng)
    records = [eng.step(t, lr, 1e-3, loss) for t in steps]
    eng.perturber.at_theta()
    return records


@pytest.mark.parametrize("angle", [30.0, 60.0, 80.0])
def test_probes_have_norm_sqrt_d_and_the_configured_cosine_with_the_momentum(angle):
    eng = engine(cone_angle=angle)
    train(eng, range(4))
    m = eng.optimizer.buf.astype(np.float64)
    assert np.linalg.norm(m) > 0
    eng.cone.begin(4)
    us = [eng.cone.full(4, i).astype(np.float64) for i in range(3)]
    eng.cone.end()
    for u in us:
        assert np.linalg.norm(u) == pytest.approx(np.sqrt(DIM), rel=1e-5)
        cos = u @ m / (np.linalg.norm(u) * np.linalg.norm(m))
        assert cos == pytest.approx(np.cos(np.radians(angle)), abs=1e-5)
    # the probes differ in their part orthogonal to m (not q copies of one vector)
    assert not np.allclose(us[0], us[1])


def test_step_zero_and_a_zero_momentum_fall_back_to_the_sphere_bit_for_bit():
    eng = engine()
    sphere = Directions(3, DIM, "sphere")
    eng.cone.begin(0)
    assert all(np.array_equal(eng.cone.full(0, i), sphere.full(0, i)) for i in range(3))
    eng.cone.end()
    train(eng, range(3))
    eng.optimizer.buf[:] = 0.0  # no history (e.g. a momentum reset): sphere again
    eng.cone.begin(3)
    assert np.array_equal(eng.cone.full(3, 1), sphere.full(3, 1))
    eng.cone.end()
    # and with history it is not the sphere direction
    train(eng, range(3, 5))
    eng.cone.begin(5)
    assert not np.allclose(eng.cone.full(5, 1), sphere.full(5, 1))
    eng.cone.end()


def test_a_direction_is_defined_inside_its_step_only():
    eng = engine()
    sphere = Directions(3, DIM, "sphere")
    # before any history (the μ check before step 0) it is the sphere direction, step open or not
    assert np.array_equal(eng.cone.full(0, 1), sphere.full(0, 1))
    train(eng, range(2))
    with pytest.raises(RuntimeError, match="defined inside their step"):
        eng.cone.full(1, 0)  # step 1 closed: its momentum has moved since
    eng.cone.begin(2)
    with pytest.raises(RuntimeError, match="step 1 asked for while step 2"):
        eng.cone.full(1, 0)
    eng.cone.end()


def test_chunked_directions_equal_the_formula_past_one_chunk():
    dim = CHUNK + 4099  # two chunks: ‖m‖, z·m and the values are assembled chunk by chunk
    cone = ConeDirections(seed=9, dim=dim, angle_deg=70.0)
    m = np.random.default_rng(1).normal(size=dim).astype(np.float32)
    cone.bind(m)
    cone.begin(7)
    u = cone.full(7, 2).astype(np.float64)
    cone.end()
    z = Directions(9, dim, "sphere").full(7, 2).astype(np.float64)
    mh = m / np.linalg.norm(m.astype(np.float64))
    zh = z / np.linalg.norm(z)
    perp = zh - (zh @ mh) * mh
    want = np.sqrt(dim) * (
        np.cos(np.radians(70)) * mh + np.sin(np.radians(70)) * perp / np.linalg.norm(perp)
    )
    np.testing.assert_allclose(u, want, atol=2e-5)


def test_cone_descends_on_the_quadratic():
    eng = engine()
    loss = quadratic(eng)
    eng.perturber.at_theta()
    start = loss()
    train(eng, range(60))
    assert loss() < 0.98 * start  # 1277 -> 1234 when written


def test_a_wide_cone_beats_the_sphere_on_an_ill_conditioned_quadratic():
    """tools/cone_quadratic.py's measured case (d = 256, λ from 1 to 0.01, 300 steps, lr 3e-3):
    cone at 85° ends below sphere on every seed (1.52/1.55/1.76 against 1.66/1.81/1.82 when
    written). At 60° cone is far behind there (docs/benchmarks/methods.md); no test claims it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "cone_quadratic.py"
    spec = importlib.util.spec_from_file_location("cone_quadratic", path)
    cq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cq)
    for seed in range(3):
        sphere = cq.final_loss("sphere", 256, 300, 3e-3, seed, 60.0)
        cone = cq.final_loss("cone", 256, 300, 3e-3, seed, 85.0)
        assert cone < sphere, (seed, cone, sphere)


def test_same_seed_same_bits_other_seed_other_bits():
    a, b, c = engine(), engine(), engine(seed=4)
    for e in (a, b, c):
        train(e, range(25))
    assert np.array_equal(a.params.master, b.params.master)
    assert np.array_equal(a.optimizer.buf, b.optimizer.buf)
    assert not np.array_equal(a.params.master, c.params.master)


@pytest.mark.parametrize(
    "kw",
    [
        {"inplace": False},
        {"inplace": True},
        {"optimizer": "adam", "momentum": 0.0},
        {"optimizer": "sign", "estimator": "central", "q": 2},
        {"estimator": "dap", "q": 2},
    ],
)
def test_the_ledger_replays_to_the_same_bits(kw):
    eng = engine(**kw)
    records = train(eng, range(30), lr=1e-3 if kw.get("optimizer") == "sign" else 2e-4)
    rep = eng.fresh()
    for r in records:
        rep.replay(r)
    rep.perturber.at_theta()
    assert np.array_equal(rep.params.master, eng.params.master)
    for k, v in eng.optimizer.state().items():
        assert np.array_equal(rep.optimizer.state()[k], v), k


def test_a_checkpoint_restores_the_history_it_leans_on():
    ref = engine()
    train(ref, range(40))
    first = engine()
    train(first, range(17))
    saved = {
        "master": first.params.master.copy(),
        **{k: v.copy() for k, v in first.optimizer.state().items()},
    }
    resumed = engine()  # what a resumed session does: load θ and the optimiser state
    resumed.params.master[:] = saved["master"]
    resumed.optimizer.load_state(saved)
    train(resumed, range(17, 40))
    assert np.array_equal(resumed.params.master, ref.params.master)
    # without the momentum the directions of step 17 would be spheres: a different run
    amnesiac = engine()
    amnesiac.params.master[:] = saved["master"]
    train(amnesiac, range(17, 40))
    assert not np.array_equal(amnesiac.params.master, ref.params.master)


@pytest.mark.parametrize("angle", [0.0, 90.0, -5.0, 120.0, float("nan")])
def test_a_bad_cone_angle_is_refused_with_the_field_and_the_fix(angle):
    with pytest.raises(ConfigError, match="cone_angle") as e:
        FinetuneConfig(direction="cone", cone_angle=angle)
    assert "between 0 and 90 degrees" in str(e.value)
    with pytest.raises(ValueError, match="cone angle"):
        ConeDirections(0, 10, angle)


def test_cone_without_momentum_is_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="momentum") as e:
        FinetuneConfig(direction="cone", momentum=0.0, optimizer="sgd")
    assert "momentum=0.9" in str(e.value)
    with pytest.raises(ConfigError, match="momentum"):  # a mode whose recipe has none (full)
        FinetuneConfig(direction="cone").resolved("full")
    with pytest.raises(ConfigError, match="keeps none"):  # the engine refuses it too
        engine(momentum=0.0)
    assert FinetuneConfig(direction="cone", momentum=0.0).resolved("head").optimizer == "adam"


def test_the_plain_kinds_refuse_cone_and_name_the_class():
    with pytest.raises(ValueError, match="ConeDirections"):
        Directions(0, 10, "cone")


# -- the real CLI: kill and resume, replay --check ---------------------------------------------

CONE = ["direction=cone", "momentum=0.9", "cone_angle=60", "estimator=onesided", "q=2"]


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def test_kill_and_resume_and_replay_are_exact_with_cone(lora_bundle, memo_data, tmp_path):
    args = ["--steps", "24", "--lr", "3e-3", "--mu", "1e-2", "checkpoint_every=5", "eval_every=6"]
    ref = cli(*start_args(lora_bundle, memo_data, tmp_path / "ref", *args, *CONE))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    # past a checkpoint
    killed_at = kill_when_ledger_has(start_args(lora_bundle, memo_data, out, *args, *CONE), out, 13)
    r = cli("finetune", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ledger_records(tmp_path / "ref") == ledger_records(out), killed_at
    assert same_tensors(tmp_path / "ref", out), killed_at
    rebuilt = tmp_path / "rebuilt.safetensors"
    check = cli("replay", "--run", str(tmp_path / "ref"), "--out", str(rebuilt), "--check")
    assert check.returncode == 0 and "bit-identical" in check.stdout, check.stdout + check.stderr
