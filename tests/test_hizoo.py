"""``optimizer=hizoo`` with ``estimator=mirrored``: a diagonal curvature preconditioner learnt
from the probes' second differences; exact replay, checkpoint and kill-and-resume.

The quadratic tests pin what the method is for (tensors of very different curvature, one lr)
and what it recovers (the curvature ordering); the others that its state is a pure function of
the recorded losses.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_resume import cli, kill_when_ledger_has, ledger_records, same_tensors, start_args

from edgezo.config import FinetuneConfig
from edgezo.errors import ConfigError
from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.estimators import Mirrored
from edgezo.zo.params import TensorSpec
from edgezo.zo.perturb import plain


def quadratic_engine(sizes, lams, seed=0, **kw):
    """(engine, loss) for f(θ) = ½ Σ λ_T (θ − t)² with one curvature λ_T per tensor T."""
    specs = [TensorSpec(f"t{i}", (n,)) for i, n in enumerate(sizes)]
    lam = np.concatenate([np.full(n, float(x)) for n, x in zip(sizes, lams, strict=True)])
    target = np.random.default_rng(123).normal(size=lam.size)
    s = EngineSettings(**{"seed": seed, "direction": "sphere", "momentum": 0.9, **kw})
    eng = ZOEngine(specs, lambda: {p.name: np.zeros(p.shape, np.float32) for p in specs}, s)
    feed = eng.params.feed

    def loss() -> float:
        x = feed.astype(np.float64) - target
        return float(0.5 * np.sum(lam * x * x))

    return eng, loss


def final_loss(steps, lr, seed, sizes=(16, 16), lams=(1.0, 0.01), **kw) -> float:
    eng, loss = quadratic_engine(sizes, lams, seed, **kw)
    with np.errstate(all="ignore"):
        for t in range(steps):
            eng.step(t, lr, 1e-3, loss)
        eng.perturber.at_theta()
        f = loss()
    return f if np.isfinite(f) else np.inf


SGD = {"optimizer": "sgd", "estimator": "onesided", "q": 4}  # the default recipe: 5 forwards
HIZOO = {"optimizer": "hizoo", "estimator": "mirrored", "q": 2}  # the same 5 forwards


def settings(**kw):
    return EngineSettings(**{"seed": 0, "direction": "sphere", "momentum": 0.9, **kw})


def test_mirrored_costs_2q_plus_1_and_its_second_difference_is_the_curvature():
    lam = np.linspace(0.5, 2.0, 8)
    specs = [TensorSpec("w", (8,))]
    eng = ZOEngine(specs, lambda: {"w": np.zeros(8, np.float32)}, settings(**HIZOO))
    feed = eng.params.feed
    calls = []

    def loss() -> float:
        calls.append(1)
        return float(0.5 * np.sum(lam * (feed.astype(np.float64) - 1.0) ** 2))

    rec = eng.step(0, 0.0, 1e-2, loss)
    assert len(calls) == len(rec["losses"]) == Mirrored(q=2).evals_per_step == 5
    f0, fp, fm = rec["losses"][:3]
    z = eng.perturber.vectors.chunk(plain(0, 0), 0, scaled=False).astype(np.float64)
    assert (fp + fm - 2 * f0) / 1e-4 == pytest.approx(float(np.sum(lam * z * z)), rel=1e-3)
    assert rec["g"][0] == pytest.approx((fp - fm) / 2e-2)


def test_hizoo_beats_sgd_at_its_best_rate_when_tensors_differ_100x_in_curvature():
    """Two tensors, curvatures 1 and 0.01; 300 steps of 5 forwards each; the best of four rates
    for each method, every seed: hizoo ends at least 5x lower."""
    rates = (0.003, 0.01, 0.03)
    for seed in range(3):
        sgd = min(final_loss(300, lr, seed, **SGD) for lr in rates)
        hz = min(final_loss(300, lr, seed, **HIZOO) for lr in rates)
        assert hz < sgd / 5, (seed, hz, sgd)


def test_the_preconditioner_recovers_the_curvature_ordering_per_value():
    eng, loss = quadratic_engine((1, 1, 1, 1), (1.0, 0.3, 0.1, 0.01), **HIZOO, hizoo_pool="value")
    for t in range(600):
        eng.step(t, 0.01, 1e-3, loss)
    p = eng.optimizer.preconditioner
    assert np.all(np.diff(p) > 0), p  # lower curvature, larger factor
    ideal = np.sqrt(np.mean([1.0, 0.3, 0.1, 0.01]) / np.array([1.0, 0.3, 0.1]))
    assert p[:3] == pytest.approx(ideal, rel=0.3)
    assert p[3] == eng.settings.hizoo_max_scale  # ideal 5.9, clipped at M = 4


def test_pooling_gives_one_factor_per_tensor():
    eng, loss = quadratic_engine((5, 7), (1.0, 0.05), **HIZOO)
    for t in range(50):
        eng.step(t, 0.01, 1e-3, loss)
    p = eng.optimizer.preconditioner
    assert len(set(p[:5].tolist())) == 1 and len(set(p[5:].tolist())) == 1
    assert p[5] > p[0]


def hizoo_engine(**kw) -> tuple[ZOEngine, object]:
    return quadratic_engine((30, 50), (1.0, 0.02), seed=4, **{**HIZOO, **kw})


def train(eng, loss, steps, lr=0.01):
    recs = [eng.step(t, lr, 1e-3, loss) for t in steps]
    eng.perturber.at_theta()
    return recs


@pytest.mark.parametrize(
    "kw",
    [{}, {"inplace": True}, {"hizoo_pool": "value"}, {"momentum": 0.0}, {"direction": "gaussian"}],
)
def test_the_ledger_replays_to_the_same_bits(kw):
    eng, loss = hizoo_engine(**kw)
    records = train(eng, loss, range(40))
    rep = eng.fresh()
    for r in records:
        rep.replay(r)
    rep.perturber.at_theta()
    assert np.array_equal(rep.params.master, eng.params.master)
    for k, v in eng.optimizer.state().items():
        assert np.array_equal(rep.optimizer.state()[k], v), k
    assert np.array_equal(rep.perturber.vectors.scale, eng.perturber.vectors.scale)


def test_same_seed_same_bits_other_seed_other_bits():
    a, la = hizoo_engine()
    b, lb = hizoo_engine()
    train(a, la, range(20))
    train(b, lb, range(20))
    assert np.array_equal(a.params.master, b.params.master)
    c, lc = quadratic_engine((30, 50), (1.0, 0.02), seed=5, **HIZOO)
    train(c, lc, range(20))
    assert not np.array_equal(a.params.master, c.params.master)


def test_a_checkpoint_restores_the_curvature_state():
    ref, lref = hizoo_engine()
    train(ref, lref, range(40))
    first, lf = hizoo_engine()
    train(first, lf, range(17))
    saved = {k: v.copy() for k, v in first.optimizer.state().items()}
    assert set(saved) == {
        "optim.momentum",
        "optim.hizoo_h",
        "optim.hizoo_t",
        "optim.hizoo_cbar",
        "optim.hizoo_m2",
    }
    resumed, lr_ = hizoo_engine()
    resumed.params.master[:] = first.params.master
    resumed.optimizer.load_state(saved)
    train(resumed, lr_, range(17, 40))
    assert np.array_equal(resumed.params.master, ref.params.master)
    # without the curvature state the preconditioner would restart at 1: a different run
    amnesiac, la = hizoo_engine()
    amnesiac.params.master[:] = first.params.master
    amnesiac.optimizer.load_state({**saved, "optim.hizoo_h": np.zeros_like(saved["optim.hizoo_h"])})
    train(amnesiac, la, range(17, 40))
    assert not np.array_equal(amnesiac.params.master, ref.params.master)


def per_tensor_estimates(kind, steps=300):
    """The pooled per-step curvature estimates of tensor 0 (of 2 × 64 values, curvatures 1 and
    0.1) over ``steps`` steps at θ₀ (lr 0), and the true mean curvature there (1)."""
    eng, loss = quadratic_engine((64, 64), (1.0, 0.1), **HIZOO, hizoo_estimate=kind)
    opt, seen = eng.optimizer, []
    for t in range(steps):
        before = opt.h.copy()
        eng.step(t, 0.0, 1e-3, loss)
        if t >= 1:  # h = β h + (1 − β) est: recover est
            seen.append(float((opt.h[0] - opt.beta * before[0]) / (1 - opt.beta)))
    return np.array(seen)


def test_the_baseline_cuts_the_curvature_estimate_s_noise_and_keeps_its_mean():
    """On the quadratic (curvatures 1 and 0.1 on 64 values each): the baseline estimate's
    per-step spread on a tensor is several times smaller than the first version's, and both
    average to the tensor's curvature."""
    base, moment = per_tensor_estimates("baseline"), per_tensor_estimates("moment")
    assert base.std() < moment.std() / 3, (base.std(), moment.std())
    assert base.mean() == pytest.approx(1.0, abs=4 * base.std() / np.sqrt(base.size))
    assert moment.mean() == pytest.approx(1.0, abs=4 * moment.std() / np.sqrt(moment.size))


def test_equal_mean_curvatures_leave_the_preconditioner_near_one():
    """Four tensors of 32 values whose curvatures spread over 0.05–1 in the same way, so that
    their means are equal and the bends are noisy: the baseline version keeps every factor
    within 10% of 1 on at least 90% of the steps after its warm-up; the first version does
    not."""

    def near_one(kind: str) -> float:
        specs = [TensorSpec(f"t{i}", (32,)) for i in range(4)]
        lam = np.tile(np.geomspace(0.05, 1.0, 32), 4)
        target = np.random.default_rng(123).normal(size=lam.size)
        st = settings(**HIZOO, hizoo_estimate=kind)
        eng = ZOEngine(specs, lambda: {p.name: np.zeros(32, np.float32) for p in specs}, st)
        feed = eng.params.feed

        def loss() -> float:
            x = feed.astype(np.float64) - target
            return float(0.5 * np.sum(lam * x * x))

        near = 0
        for t in range(200):
            eng.step(t, 0.01, 1e-3, loss)
            near += t >= 20 and np.max(np.abs(eng.optimizer.preconditioner - 1.0)) <= 0.1
        return near / 180

    base, moment = near_one("baseline"), near_one("moment")
    assert base >= 0.9 > moment, (base, moment)


def test_the_preconditioner_waits_for_the_warm_up():
    eng, loss = quadratic_engine((8, 8), (1.0, 0.01), **HIZOO, hizoo_warmup=10)
    scales = []
    for t in range(12):
        eng.step(t, 0.01, 1e-3, loss)
        scales.append(eng.optimizer.preconditioner.copy())
    assert all(np.all(s == 1.0) for s in scales[:9])  # updates 1..9 < 10
    assert not np.all(scales[-1] == 1.0)


def test_a_ledger_of_the_first_hizoo_replays_with_its_arithmetic():
    """A header without hizoo_estimate (the first version's) reads as moment, no warm-up."""
    old = {"seed": 0, "optimizer": "hizoo", "estimator": "mirrored", "q": 2}
    s = EngineSettings.from_dict(old)
    assert (s.hizoo_estimate, s.hizoo_warmup) == ("moment", 0)
    assert EngineSettings.from_dict({"seed": 0}).hizoo_estimate == "baseline"


def test_hizoo_without_second_differences_is_refused():
    with pytest.raises(ConfigError, match="estimator=mirrored"):
        FinetuneConfig(optimizer="hizoo", estimator="onesided")
    with pytest.raises(ConfigError, match="estimator=mirrored"):  # the mode's onesided
        FinetuneConfig(optimizer="hizoo").resolved("lora")
    with pytest.raises(ConfigError, match="direction=sphere"):  # rademacher: z² = 1
        FinetuneConfig(optimizer="hizoo", estimator="mirrored", direction="rademacher")
    with pytest.raises(ConfigError, match="direction=sphere"):  # the full mode's rademacher
        FinetuneConfig(optimizer="hizoo", estimator="mirrored").resolved("full")
    eng, loss = quadratic_engine((4,), (1.0,), optimizer="hizoo", estimator="onesided", q=2)
    with pytest.raises(ValueError, match="estimator=mirrored"):
        eng.step(0, 0.01, 1e-3, loss)


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("hizoo_beta", 1.0, "in \\[0, 1\\)"),
        ("hizoo_beta", -0.1, "in \\[0, 1\\)"),
        ("hizoo_max_scale", 0.5, ">= 1"),
        ("hizoo_pool", "block", "hizoo_pool"),
        ("hizoo_estimate", "mean", "hizoo_estimate"),
        ("hizoo_warmup", -1, ">= 0"),
    ],
)
def test_bad_hizoo_settings_are_refused_with_the_field(field, value, what):
    with pytest.raises(ConfigError, match=field) as e:
        FinetuneConfig.load(overrides={field: value})
    assert e.match(what)


# -- the real CLI: kill and resume, replay --check ---------------------------------------------

HZ = ["optimizer=hizoo", "estimator=mirrored", "q=2", "direction=sphere", "momentum=0.9"]


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def test_kill_and_resume_and_replay_are_exact_with_hizoo(lora_bundle, memo_data, tmp_path):
    args = ["--steps", "24", "--lr", "3e-3", "--mu", "1e-2", "checkpoint_every=5", "eval_every=6"]
    ref = cli(*start_args(lora_bundle, memo_data, tmp_path / "ref", *args, *HZ))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    # past a checkpoint
    killed_at = kill_when_ledger_has(start_args(lora_bundle, memo_data, out, *args, *HZ), out, 13)
    r = cli("finetune", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ledger_records(tmp_path / "ref") == ledger_records(out), killed_at
    assert same_tensors(tmp_path / "ref", out), killed_at
    rebuilt = tmp_path / "rebuilt.safetensors"
    check = cli("replay", "--run", str(tmp_path / "ref"), "--out", str(rebuilt), "--check")
    assert check.returncode == 0 and "bit-identical" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("kw", "momentum"),
    [
        ({**SGD}, 0.9),
        ({**SGD}, 0.0),
        ({**SGD, "optimizer": "adam"}, 0.9),
        ({**HIZOO}, 0.9),
        ({**HIZOO}, 0.0),
        ({**SGD, "mu_scale": "t0=2"}, 0.9),
    ],
)
def test_plan_counts_the_buffers_the_update_rule_holds(kw, momentum):
    """edgezo plan's θ-sized buffers (edgezo.device.plan.optimizer_buffers) are those the
    engine's update rule and vector scale really hold."""
    from edgezo.device.plan import optimizer_buffers

    eng, _ = quadratic_engine((16, 16), (1.0, 0.01), momentum=momentum, **kw)
    held = eng.optimizer.nbytes + (
        0 if eng.perturber.vectors.scale is None else eng.perturber.vectors.scale.nbytes
    )
    theta = eng.params.dim * 4
    want = optimizer_buffers(kw["optimizer"], momentum, scaled=bool(kw.get("mu_scale")))
    assert held // theta == want  # whole buffers; hizoo's step counter is 8 bytes more
