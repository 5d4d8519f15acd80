"""``estimator=svrg`` (MeZO-SVRG): a control variate from an anchor pass over a fixed sample of
the training set; its forward count, its variance, exact replay, checkpoint and kill-and-resume.

The toy is least squares over 64 examples of 8 values with batches of 2: the batch noise
dominates, the case the control variate is for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_resume import cli, kill_when_ledger_has, ledger_records, same_tensors, start_args

from edgezo.config import FinetuneConfig
from edgezo.errors import ConfigError
from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.estimators import ANCHOR_INDEX, SVRG, OneSided
from edgezo.zo.params import TensorSpec
from edgezo.zo.perturb import Vector

N, D, BATCH = 64, 8, 2
SV = {"estimator": "svrg", "q": 4, "svrg_period": 20, "svrg_anchor_q": 32,
      "svrg_anchor_batches": 32}  # fmt: skip
ONESIDED = {"estimator": "onesided", "q": 4}


def problem():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(N, D))
    y = a @ rng.normal(size=D) + 2.0 * rng.normal(size=N)
    return a, y


def toy(seed=0, **kw):
    """(engine, step loss for step t, anchor loss, full loss, true gradient)."""
    a, y = problem()
    s = EngineSettings(**{"seed": seed, "direction": "sphere", "momentum": 0.0, **kw})
    eng = ZOEngine([TensorSpec("w", (D,))], lambda: {"w": np.zeros(D, np.float32)}, s)
    feed = eng.params.feed

    def loss_on(idx) -> float:
        r = a[idx] @ feed.astype(np.float64) - y[idx]
        return float(0.5 * np.mean(r * r))

    def batch(t):
        return np.random.default_rng([seed, t]).choice(N, BATCH, replace=False)

    per = N // s.svrg_anchor_batches
    groups = [np.arange(N)[j * per : (j + 1) * per] for j in range(s.svrg_anchor_batches)]

    def grad(theta) -> np.ndarray:
        return a.T @ (a @ theta.astype(np.float64) - y) / N

    return (
        eng,
        (lambda t: lambda: loss_on(batch(t))),
        (lambda j: loss_on(groups[j])),
        (lambda: loss_on(np.arange(N))),
        grad,
    )


def train(eng, step_loss, anchor, steps, lr):
    recs = [eng.step(t, lr, 1e-3, step_loss(t), anchor=anchor) for t in steps]
    eng.perturber.at_theta()
    return recs


def estimate_vector(eng, est) -> np.ndarray:
    """ĝ = (1/n) Σ g_i u_i of an Estimate (n its vectors), in float64."""
    n = len(est.g)
    out = np.zeros(eng.params.dim)
    for u, g in zip(est.vectors, est.g, strict=True):
        out += g / n * eng.perturber.vectors.chunk(u, 0).astype(np.float64)
    return out


def test_the_anchor_pass_and_the_steps_cost_what_the_ledger_records():
    eng, step_loss, anchor, _, _ = toy(**SV)
    calls = []

    def counted(f):
        return lambda *a: (calls.append(1), f(*a))[1]

    recs = [
        eng.step(t, 0.01, 1e-3, counted(step_loss(t)), anchor=counted(anchor)) for t in range(41)
    ]
    lens = [len(r["losses"]) for r in recs]
    assert sum(lens) == len(calls)
    est = eng.estimator
    assert lens[0] == lens[20] == lens[40] == est.anchor_evals == (32 + 1) * 32
    assert set(lens[1:20] + lens[21:40]) == {2 * 4 + 2}
    assert sum(lens[:20]) / 20 == est.evals_per_step
    assert est.max_evals_per_step == est.anchor_evals
    assert [r["svrg_anchor"] for r in recs[:22]] == [0] * 20 + [20, 20]
    # an anchor step moves along the anchor's own q_A directions; the others along z_i and v_k
    assert len(recs[0]["g"]) == 32 and len(recs[1]["g"]) == 4 + 32
    assert recs[0]["anchor_loss"] == pytest.approx(sum(recs[0]["losses"][:32]) / 32)


def test_the_control_variate_cuts_the_estimate_s_error_near_the_anchor():
    """Three steps past the second anchor (step 20), over 200 fresh batches and directions:
    the svrg estimate's mean squared error against the full gradient is well below one-sided
    q=4's on the same batches (whose batch noise it cancels)."""
    eng, step_loss, anchor, _, grad = toy(**SV)
    train(eng, step_loss, anchor, range(24), 0.03)
    assert int(eng.estimator.anchor_step[0]) == 20
    eng.estimator.period = 10**9  # no further anchor pass while sampling
    true = grad(eng.params.master)
    onesided = OneSided(q=4)
    err_sv, err_os = [], []
    for t in range(100, 300):
        e = eng.estimator.estimate(t, 1e-3, eng.perturber, step_loss(t), anchor)
        err_sv.append(np.sum((estimate_vector(eng, e) - true) ** 2))
        e = onesided.estimate(t, 1e-3, eng.perturber, step_loss(t))
        err_os.append(np.sum((estimate_vector(eng, e) - true) ** 2))
    assert np.mean(err_sv) < np.mean(err_os) / 4, (np.mean(err_sv), np.mean(err_os))


def final_gap(kw, steps, lr, seed) -> tuple[float, int]:
    eng, step_loss, anchor, full, _ = toy(seed, **kw)
    recs = train(eng, step_loss, anchor, range(steps), lr)
    a, y = problem()
    w = np.linalg.lstsq(a, y, rcond=None)[0]
    best = 0.5 * np.mean((a @ w - y) ** 2)
    return full() - best, sum(len(r["losses"]) for r in recs)


def test_svrg_beats_onesided_at_equal_forwards_on_the_toy():
    """Best of the rates for each, both seeds, the same forward count (anchor passes
    included): svrg ends at least 5x closer to the least-squares optimum."""
    for seed in range(2):
        gaps = [final_gap(SV, 200, lr, seed) for lr in (0.01, 0.03)]
        forwards = gaps[0][1]
        sv = min(g for g, _ in gaps)
        os_ = min(final_gap(ONESIDED, forwards // 5, lr, seed)[0] for lr in (0.001, 0.003, 0.01))
        assert sv < os_ / 5, (seed, sv, os_)


def test_same_seed_same_bits_other_seed_other_bits():
    a, sa, aa, _, _ = toy(**SV)
    b, sb, ab, _, _ = toy(**SV)
    train(a, sa, aa, range(30), 0.03)
    train(b, sb, ab, range(30), 0.03)
    assert np.array_equal(a.params.master, b.params.master)
    c, sc, ac, _, _ = toy(1, **SV)
    train(c, sc, ac, range(30), 0.03)
    assert not np.array_equal(a.params.master, c.params.master)


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"optimizer": "adam"}, {"q": 1}])
def test_the_ledger_replays_to_the_same_bits(kw):
    eng, step_loss, anchor, _, _ = toy(**{**SV, **kw})
    records = train(eng, step_loss, anchor, range(45), 0.01)
    records = json.loads(json.dumps(records))  # as the ledger stores them
    rep = eng.fresh()
    for r in records:
        rep.replay(r)
    rep.perturber.at_theta()
    assert np.array_equal(rep.params.master, eng.params.master)
    for k, v in eng.optimizer.state().items():
        assert np.array_equal(rep.optimizer.state()[k], v), k


def test_a_checkpoint_restores_the_anchor():
    ref, sr, ar, _, _ = toy(**SV, momentum=0.9)
    train(ref, sr, ar, range(50), 0.01)
    first, sf, af, _, _ = toy(**SV, momentum=0.9)
    train(first, sf, af, range(27), 0.01)
    saved = {k: v.copy() for k, v in first.optimizer.state().items()}
    assert set(saved) == {"optim.momentum", "svrg.anchor_theta", "svrg.anchor_step",
                          "svrg.anchor_g"}  # fmt: skip
    assert int(saved["svrg.anchor_step"][0]) == 20
    resumed, s2, a2, _, _ = toy(**SV, momentum=0.9)
    resumed.params.master[:] = first.params.master
    resumed.optimizer.load_state(saved)
    train(resumed, s2, a2, range(27, 50), 0.01)
    assert np.array_equal(resumed.params.master, ref.params.master)
    # with the anchor's θ̃ lost (θ in its place) the run differs
    amnesiac, s3, a3, _, _ = toy(**SV, momentum=0.9)
    amnesiac.params.master[:] = first.params.master
    amnesiac.optimizer.load_state({**saved, "svrg.anchor_theta": first.params.master.copy()})
    train(amnesiac, s3, a3, range(27, 50), 0.01)
    assert not np.array_equal(amnesiac.params.master, ref.params.master)


def test_the_anchor_directions_are_a_stream_apart_from_the_steps():
    eng, *_ = toy(**SV)
    v = eng.perturber.vectors
    z = v.chunk(Vector(0, 0), 0).copy()
    a = v.chunk(Vector(0, ANCHOR_INDEX), 0).copy()
    assert not np.array_equal(z, a)
    assert np.sum(a.astype(np.float64) ** 2) == pytest.approx(D, rel=1e-5)  # sphere, radius √d


def test_svrg_without_anchor_losses_or_in_place_is_refused():
    eng, step_loss, _, _, _ = toy(**SV)
    with pytest.raises(ValueError, match="anchor sample"):
        eng.step(0, 0.01, 1e-3, step_loss(0))
    eng, step_loss, anchor, _, _ = toy(**SV)
    with pytest.raises(ConfigError, match="perturbation=copy"):
        toy(**SV, inplace=True)
    assert isinstance(eng.estimator, SVRG)


@pytest.mark.parametrize(
    ("overrides", "field", "what"),
    [
        ({"svrg_period": 0}, "svrg_period", ">= 1"),
        ({"svrg_anchor_q": 0}, "svrg_anchor_q", ">= 1"),
        ({"svrg_anchor_batches": 0}, "svrg_anchor_batches", ">= 1"),
        ({"estimator": "svrg", "direction": "cone", "momentum": 0.9}, "estimator", "cone"),
        ({"estimator": "svrg", "optimizer": "hizoo"}, "estimator", "hizoo"),
        ({"estimator": "svrg", "perturbation": "inplace"}, "perturbation", "beside"),
    ],
)
def test_bad_svrg_settings_are_refused_with_the_field(overrides, field, what):
    with pytest.raises(ConfigError, match=field) as e:
        FinetuneConfig.load(overrides=overrides)
    assert e.match(what)


# -- the real CLI: kill and resume, replay --check ---------------------------------------------

SVRG_ARGS = ["estimator=svrg", "svrg_period=5", "svrg_anchor_q=2", "svrg_anchor_batches=2",
             "direction=sphere", "momentum=0.9", "q=2"]  # fmt: skip


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def test_kill_and_resume_and_replay_are_exact_with_svrg(lora_bundle, memo_data, tmp_path):
    args = ["--steps", "16", "--lr", "3e-3", "--mu", "1e-2", "checkpoint_every=4", "eval_every=6"]
    ref = cli(*start_args(lora_bundle, memo_data, tmp_path / "ref", *args, *SVRG_ARGS))
    assert ref.returncode == 0, ref.stderr
    recs = ledger_records(tmp_path / "ref")
    assert [len(r["losses"]) for r in recs[:6]] == [6, 6, 6, 6, 6, 6]  # 3·2 anchor; 2q + 2
    assert [r["svrg_anchor"] for r in recs[:6]] == [0, 0, 0, 0, 0, 5]
    summary = json.loads((tmp_path / "ref/summary.json").read_text())
    assert summary["train_evaluations"] == sum(len(r["losses"]) for r in recs)
    out = tmp_path / "killed"
    killed_at = kill_when_ledger_has(
        start_args(lora_bundle, memo_data, out, *args, *SVRG_ARGS), out, 11
    )
    r = cli("finetune", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ledger_records(tmp_path / "ref") == ledger_records(out), killed_at
    assert same_tensors(tmp_path / "ref", out), killed_at
    rebuilt = tmp_path / "rebuilt.safetensors"
    check = cli("replay", "--run", str(tmp_path / "ref"), "--out", str(rebuilt), "--check")
    assert check.returncode == 0 and "bit-identical" in check.stdout, check.stdout + check.stderr


def test_an_anchor_sample_larger_than_the_training_set_is_refused(lora_bundle, memo_data, tmp_path):
    r = cli(
        *start_args(lora_bundle, memo_data, tmp_path / "big", "--steps", "2", *SVRG_ARGS),
        "svrg_anchor_batches=100000",
    )
    assert r.returncode != 0
    assert "svrg_anchor_batches" in r.stderr and "at most" in r.stderr, r.stderr
