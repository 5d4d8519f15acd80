"""Every estimator × optimiser × direction on an analytic objective: descent, bit-exact replay
(copy and in place), positivity, P3/P4 unbiasedness, DAP's alignment, config validation."""

import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgezo.bundle import Bundle, Manifest, TensorSpec
from edgezo.config import FinetuneConfig
from edgezo.errors import ConfigError
from edgezo.zo.engine import EngineSettings
from edgezo.zo.estimators import DAP, ESTIMATORS, LevelSchedule
from edgezo.zo.optim import OPTIMIZERS
from edgezo.zo.perturb import Vector, plain

ESTS = sorted(ESTIMATORS)
OPTS = sorted(OPTIMIZERS)
KINDS = ["rademacher", "gaussian", "sphere"]
LR = {"sgd": 0.02, "adam": 0.05, "sign": 0.02, "hizoo": 0.02}
# hizoo reads second differences (estimator mirrored) and squared entries (not rademacher's)
MATRIX = [
    (est, opt, kind)
    for est in ESTS
    for opt in OPTS
    for kind in KINDS
    if opt != "hizoo" or (est == "mirrored" and kind != "rademacher")
]
# a: ordinary tensor, s: a positive "scale" tensor (moved multiplicatively)
SPECS = [TensorSpec("a", (3, 4)), TensorSpec("s", (5,), role="scale", positive=True)]
TARGET = np.concatenate([np.linspace(-1, 1, 12), np.linspace(0.5, 2.0, 5)])


def make_bundle(path, specs=SPECS):
    rng = np.random.default_rng(0)
    tensors = {}
    for sp in specs:
        x = rng.normal(size=sp.shape)
        tensors[sp.name] = (np.exp(0.3 * x) if sp.positive else x).astype(np.float32)
    save_file(tensors, str(path / "trainable.safetensors"))
    m = Manifest(
        task="causal_lm", architecture={}, trainable_mode="full", inputs=[], trainable=list(specs)
    )
    return Bundle(path=path, manifest=m)


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path)


def objective(eng):
    feed = eng.params.feed
    return lambda: float(np.sum((feed.astype(np.float64) - TARGET) ** 2))


def train(bundle, s, steps=60, lr=0.02, mu=1e-2):
    eng = bundle.engine(s)
    f = objective(eng)
    # svrg's anchor batches: here the one objective (the others ignore ``anchor``)
    records = [eng.step(t, lr, mu, f, anchor=lambda _j: f()) for t in range(steps)]
    eng.perturber.at_theta()
    return eng, records, f()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("est", "opt", "kind"), MATRIX)
def test_descends_and_replays_bit_exactly(bundle, est, opt, kind, inplace):
    if est == "svrg" and inplace:
        pytest.skip("svrg evaluates its anchor beside θ: refused in place (tests/test_svrg.py)")
    s = EngineSettings(
        seed=5,
        direction=kind,
        estimator=est,
        optimizer=opt,
        q=2,
        momentum=0.5 if opt != "adam" else 0.0,
        inplace=inplace,
        weight_decay=1e-3,
        clip=100.0,
        mu_floor=1e-5,
        # svrg: an anchor every 5 steps along d = 17 directions (its frozen direction noise
        # must not outweigh a noiseless objective's signal)
        **(
            {"svrg_period": 5, "svrg_anchor_q": 17, "svrg_anchor_batches": 1}
            if est == "svrg"
            else {}
        ),
    )
    # fzoo's steps are normalised (lr ≈ the step's length in θ): SGD needs a larger rate here
    lr = LR[opt] * (10 if (est, opt) == ("fzoo", "sgd") else 1)
    eng, records, final = train(bundle, s, lr=lr)
    start = bundle.engine(s)
    start.perturber.at_theta()
    assert final < 0.5 * objective(start)()
    assert np.all(eng.params.master[12:] > 0)
    assert sum(len(r["losses"]) for r in records) > 0
    rep = bundle.engine(s)
    for r in records:
        rep.replay(r)
    assert np.array_equal(rep.params.master, eng.params.master)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(rep.optimizer.state().values(), eng.optimizer.state().values(), strict=True)
    )


@pytest.mark.parametrize("est", ESTS)
def test_same_seed_same_bits_other_seed_other_bits(bundle, est):
    s = EngineSettings(seed=3, estimator=est, optimizer="adam", direction="sphere")
    a, _, _ = train(bundle, s, steps=8, lr=0.05)
    b, _, _ = train(bundle, s, steps=8, lr=0.05)
    c, _, _ = train(
        bundle,
        EngineSettings(seed=4, estimator=est, optimizer="adam", direction="sphere"),
        steps=8,
        lr=0.05,
    )
    assert np.array_equal(a.params.master, b.params.master)
    assert not np.array_equal(a.params.master, c.params.master)


@pytest.mark.parametrize("opt", OPTS)
def test_positive_tensors_stay_positive_under_huge_steps(bundle, opt):
    for inplace in (False, True):
        hizoo = opt == "hizoo"  # its estimator and directions
        s = EngineSettings(
            seed=1,
            estimator="mirrored" if hizoo else "central",
            direction="sphere" if hizoo else "rademacher",
            optimizer=opt,
            inplace=inplace,
        )
        eng, _, _ = train(bundle, s, steps=10, lr=1e4, mu=5.0)
        scales = eng.params.master[12:]
        assert np.all(scales > 0) and np.all(np.isfinite(scales))


def test_evals_per_step_matches_the_record(bundle):
    for est, q, expect in [("central", 3, 6), ("onesided", 3, 4), ("dap", 2, 5)]:
        eng, records, _ = train(bundle, EngineSettings(seed=0, estimator=est, q=q), steps=3)
        assert eng.estimator.evals_per_step == expect
        assert all(len(r["losses"]) == expect for r in records)
    for est in ("p3", "p4"):  # an expected value: the ledger holds the actual counts
        eng, records, _ = train(
            bundle, EngineSettings(seed=0, estimator=est, q=2), steps=200, lr=0.0
        )
        mean = np.mean([len(r["losses"]) for r in records])
        assert abs(mean - eng.estimator.evals_per_step) < 0.3


def test_mu_floor_hits_are_counted_in_the_record(bundle):
    s = EngineSettings(seed=0, estimator="p4", mu_floor=0.009)  # μ₁ = 0.01: μ₂ is clamped
    _, records, _ = train(bundle, s, steps=5, lr=0.0)
    assert all(r["mu_floor_hits"] >= 1 for r in records)
    _, records, _ = train(bundle, EngineSettings(seed=0, estimator="p4"), steps=5, lr=0.0)
    assert "levels" in records[0]


# -- statistics on a quadratic ----------------------------------------------------------------


@pytest.mark.parametrize(
    "est,schedule", [("p4", "geometric"), ("p4", "zipf"), ("p3", "geometric"), ("p3", "zipf")]
)
def test_multilevel_is_unbiased_where_one_sided_is_not(tmp_path, est, schedule):
    # f(x) = Σ w (x − t)² is a quadratic: D(μ) = ∇fᵀz + μ zᵀWz, so the one-sided estimate is
    # biased by μ·E[zᵀWz] = μ·tr(W) while P3/P4 telescope to D(0) = ∇fᵀz.
    b = make_bundle(tmp_path, [TensorSpec("x", (8,))])
    w = np.linspace(1.0, 3.0, 8)
    t = np.linspace(-1, 1, 8)
    mu, n = 0.5, 600

    def errors(name):
        eng = b.engine(
            EngineSettings(seed=7, estimator=name, level_schedule=schedule, mu_floor=1e-4)
        )
        feed, x = eng.params.feed, eng.params.master.astype(np.float64)
        grad = 2 * w * (x - t)
        f = lambda: float(np.sum(w * (feed.astype(np.float64) - t) ** 2))  # noqa: E731
        out = []
        for step in range(n):
            est_ = eng.estimator.estimate(step, mu, eng.perturber, f)
            z = eng.perturber.vectors.chunk(plain(step, 0), 0).astype(np.float64)
            out.append(est_.g[0] - grad @ z)
        return np.array(out)

    e = errors(est)
    assert abs(e.mean()) < 4 * e.std() / math.sqrt(n) + 1e-3
    bias = errors("onesided").mean()
    assert abs(bias - mu * w.sum()) < 0.1 * mu * w.sum()  # visibly biased: μ·tr(W) = 4


def test_level_schedules_pair_mu_with_probability():
    for sch in (LevelSchedule("geometric", ratio=0.3), LevelSchedule("zipf", zipf_s=1.5)):
        assert abs(sum(sch.p(n) for n in range(1, 2000)) + sch.tail(2000) - 1.0) < 1e-9
        for n in (1, 2, 5, 40):  # p_n = (μ_n − μ_{n+1}) / μ₁
            assert math.isclose(sch.p(n), sch.tail(n) - sch.tail(n + 1), rel_tol=1e-9)
        assert sch.sample(0.0) == 1


def test_dap_aligned_direction_has_unit_component_along_the_pilot(tmp_path):
    b = make_bundle(tmp_path, [TensorSpec("a", (30,)), TensorSpec("b", (7, 3))])
    eng = b.engine(EngineSettings(seed=2, direction="gaussian", estimator="dap"))
    vs = eng.perturber.vectors
    v = Vector(4, 1, kind="sphere")
    for gp, xi in [(0.7, 1.0), (-2.5, -1.0), (3.0, -1.0)]:
        u = DAP.aligned(eng.perturber, plain(4, 0), v, gp, xi)
        zu = vs.chunk(u, 0).astype(np.float64).copy()
        zz = vs.chunk(plain(4, 0), 0).astype(np.float64).copy()
        vv = vs.chunk(v, 0).astype(np.float64).copy()
        for a, e in eng.params.offsets:
            gt = gp * vv[a:e]  # the pilot on this tensor
            unit = gt / np.linalg.norm(gt)
            assert math.isclose(zu[a:e] @ unit, xi, abs_tol=1e-5)
            # the component orthogonal to the pilot is z's
            np.testing.assert_allclose(
                zu[a:e] - (zu[a:e] @ unit) * unit, zz[a:e] - (zz[a:e] @ unit) * unit, atol=1e-5
            )
    assert DAP.aligned(eng.perturber, plain(4, 0), v, 0.0, 1.0) == plain(4, 0)


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"q": 0}, "q must be >= 1"),
        ({"mu": 0.0}, "mu must be > 0"),
        ({"mu": -1e-3}, "mu must be > 0"),
        ({"level_ratio": 1.2}, "level_ratio must be in"),
        ({"level_ratio": -0.5}, "level_ratio must be in"),
        ({"zipf_s": 1.0}, "zipf_s must be > 1"),
        ({"mu_floor": 0.0}, "mu_floor must be > 0"),
        ({"estimator": "p4", "mu": 1e-3, "mu_floor": 1e-2}, "mu_floor .* must be below mu"),
        ({"adam_beta2": 1.0}, "adam_beta2 must be in"),
        ({"adam_eps": 0.0}, "adam_eps must be > 0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"estimator": "spsa"}, "estimator must be one of"),
        ({"direction": "uniform"}, "direction must be one of"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum .* is for optimizer sgd or sign"),
    ],
)
def test_config_validation_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig.load(overrides=overrides)


def test_new_choices_load_and_old_ledger_headers_stay_readable():
    cfg = FinetuneConfig.load(
        overrides={
            "estimator": "dap",
            "optimizer": "adam",
            "direction": "sphere",
            "level_schedule": "zipf",
        }
    )
    assert (cfg.estimator, cfg.optimizer, cfg.direction) == ("dap", "adam", "sphere")
    assert cfg.resolved("lora").momentum == 0.0  # the mode's SGD momentum is not Adam's
    old = {
        "seed": 1,
        "direction": "gaussian",
        "estimator": "central",
        "q": 1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "clip": None,
        "inplace": False,
    }  # a header from edgezo 0.1
    s = EngineSettings.from_dict(old)
    assert s.optimizer == "sgd" and s.momentum == 0.9


def test_engine_settings_from_a_newer_edgezo_are_refused():
    from edgezo.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not know"):
        EngineSettings.from_dict({"seed": 0, "telepathy": True})


def test_fzoo_steps_do_not_follow_the_loss_scale(bundle):
    """g_i = (f_i − f_0)/σ: scaling the loss by 1000 leaves every g_i, so every step, the same
    (one-sided's g_i scale with it); |g_i| ≤ √q; a flat loss gives no step and is recorded."""
    s = EngineSettings(seed=3, direction="rademacher", estimator="fzoo", optimizer="sgd", q=4)

    def run(scale: float, steps: int = 5):
        eng = bundle.engine(s)
        f = objective(eng)
        recs = [eng.step(t, 0.05, 1e-2, lambda: scale * f()) for t in range(steps)]
        return eng, recs

    (a, ra), (b, rb) = run(1.0), run(1000.0)
    for x, y in zip(ra, rb, strict=True):
        assert x["g"] == pytest.approx(y["g"], rel=1e-9)
        assert all(abs(g) <= 2.0 + 1e-12 for g in x["g"])  # √q
        assert y["sigma"] == pytest.approx(1000 * x["sigma"], rel=1e-9)
    np.testing.assert_allclose(a.params.master, b.params.master, rtol=1e-5)

    eng = bundle.engine(s)
    before = eng.params.master.copy()
    rec = eng.step(0, 0.05, 1e-2, lambda: 1.0)  # every probe equal: nothing to normalise
    assert rec["flat"] == 1 and rec["g"] == [0.0] * 4
    np.testing.assert_array_equal(eng.params.master, before)
