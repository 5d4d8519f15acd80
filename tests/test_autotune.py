"""The lr/μ auto-selection: bounded cost, sane choices, fallbacks, and runs that still replay."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from edgezo import autotune as at
from edgezo.bundle import load_bundle
from edgezo.config import MODE_DEFAULTS, FinetuneConfig
from edgezo.errors import ConfigError
from edgezo.train import finetune
from edgezo.zo.engine import EngineSettings
from edgezo.zo.ledger import Ledger
from edgezo.zo.replay import apply


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def data(memo_data):
    return memo_data


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def cfg(bundle, data, out, **kw):
    base = dict(
        bundle=str(bundle),
        data=str(data[0]),
        eval_data=str(data[1]),
        out=str(out),
        steps=12,
        batch_size=4,
        max_length=32,
        eval_every=0,
        checkpoint_every=6,
        seed=0,
        threads=1,
        autotune_steps=3,
        lr_race=True,
        estimator="central",
        q=1,
        direction="rademacher",
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_run_without_hyperparameters_tunes_within_its_bound_and_replays(
    lora_bundle, data, tmp_path
):
    lines = []
    s = finetune(cfg(lora_bundle, data, tmp_path / "a"), log=lines.append, progress=False)
    run = Path(s.out)
    tuned = json.loads((run / "autotune.json").read_text())
    bound = at.worst_case_evaluations(3, 2, 4, at.PROBE_BATCHES * 4, True)
    assert 0 < s.tune_evaluations == tuned["evaluations"] <= bound
    assert len(tuned["trials"]) >= 3 and all(
        np.isfinite(t["probe_loss"]) or t["probe_loss"] == float("inf") for t in tuned["trials"]
    )
    # the chosen values are what the run used, and a resumed run will find them in its config
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["lr"] == s.lr == tuned["lr"] and stored["mu"] == s.mu == tuned["mu"]
    ledger = Ledger.read(run / "ledger.jsonl")
    assert {r["lr"] for r in ledger.records} == {s.lr}
    assert s.train_evaluations == 2 * 12  # tuning is reported apart from training
    assert any("autotune: lr" in line for line in lines)
    # θ after the run is exactly the ledger replayed on the bundle: the trials left no trace
    bundle = load_bundle(lora_bundle)
    engine = bundle.engine(EngineSettings.from_dict(ledger.header["engine"]))
    apply(engine, ledger.records, ledger.records)
    trained = load_file(str(run / "trained.safetensors"))
    replayed = engine.params.state_dict()
    assert all(np.array_equal(trained[k], replayed[k]) for k in trained)
    # and the same seed tunes to the same values
    s2 = finetune(cfg(lora_bundle, data, tmp_path / "b"), log=quiet, progress=False)
    assert (s2.lr, s2.mu) == (s.lr, s.mu)


def test_given_lr_and_mu_or_autotune_off_spend_nothing(lora_bundle, data, tmp_path):
    s = finetune(
        cfg(lora_bundle, data, tmp_path / "a", lr=3e-3, mu=1e-2), log=quiet, progress=False
    )
    assert s.tune_evaluations == 0 and s.lr == 3e-3
    assert not (Path(s.out) / "autotune.json").exists()
    s = finetune(cfg(lora_bundle, data, tmp_path / "b", autotune=False), log=quiet, progress=False)
    assert s.tune_evaluations == 0 and s.lr == MODE_DEFAULTS["lora"]["lr"]


def test_tuning_counts_against_the_evaluation_budget(lora_bundle, data, tmp_path):
    s = finetune(cfg(lora_bundle, data, tmp_path / "a", eval_budget=60), log=quiet, progress=False)
    assert s.tune_evaluations + s.train_evaluations <= 60
    assert s.stop_reason != "completed"


def engine_for(bundle_path, seed=0):
    return load_bundle(bundle_path).engine(EngineSettings(seed=seed))


def fake_loss(engine, target):
    """A quadratic loss of θ: ||θ − target||² (the race only sees losses)."""

    def loss():
        d = engine.params.feed - target
        return float(np.dot(d, d))

    return loss


def test_race_moves_away_from_a_far_too_small_or_large_default(lora_bundle):
    engine = engine_for(lora_bundle)
    target = engine.params.master + 0.1
    loss = fake_loss(engine, target)
    best_lr = 1.0 / (2 * (engine.params.dim + 2))  # SPSA-SGD on ||θ − t||²: lr·d ≈ 1/2
    for default in (best_lr / 100, best_lr * 40):
        lr, before, trials, evals, note = at.select_lr(
            engine, default, 1e-3, 4, lambda t: loss, loss, 1, quiet
        )
        assert not note and lr != default, trials
        assert abs(np.log(lr / best_lr)) < abs(np.log(default / best_lr)), (default, trials)
        assert evals == 1 + sum(t["evaluations"] for t in trials)
        assert len(trials) <= 3 + at.MAX_EXTEND


def test_race_leaves_theta_and_optimizer_state_untouched(lora_bundle):
    engine = load_bundle(lora_bundle).engine(EngineSettings(seed=0, optimizer="adam"))
    theta0 = engine.params.master.copy()
    loss = fake_loss(engine, engine.params.master + 0.1)
    at.select_lr(engine, 1e-3, 1e-3, 3, lambda t: loss, loss, 1, quiet)
    assert np.array_equal(engine.params.master, theta0)
    assert not engine.optimizer.m.any() and not engine.optimizer.v.any()
    assert int(engine.optimizer.t[0]) == 0


def test_no_candidate_that_learns_keeps_the_default_and_says_so(lora_bundle):
    engine = engine_for(lora_bundle)
    lr, _, trials, _, note = at.select_lr(
        engine, 1e-3, 1e-3, 2, lambda t: lambda: 1.0, lambda: 1.0, 1, quiet
    )
    assert lr == 1e-3 and "kept the default" in note and len(trials) == 3


def test_mu_check_grows_a_mu_lost_in_noise_and_shrinks_one_lost_in_curvature(lora_bundle):
    engine = engine_for(lora_bundle)
    target = engine.params.master + 1.0
    loss = fake_loss(engine, target)
    mu, tries, evals = at.check_mu(engine, loss, 1e-9, quiet)
    assert tries[0]["first_order"] == 0.0  # 1e-9 vanishes in float32 θ
    assert mu > 1e-9 and evals == 1 + 2 * at.MU_DIRECTIONS * len(tries)
    # far from the minimum direction-wise tiny slope vs huge μ: curvature dominates
    engine2 = engine_for(lora_bundle)
    loss2 = fake_loss(engine2, engine2.params.master)  # at the minimum: only curvature
    mu2, tries2, _ = at.check_mu(engine2, loss2, 1.0, quiet)
    assert tries2[0]["second_order"] > abs(tries2[0]["first_order"])
    assert mu2 == 1.0  # no try settles a pure quadratic at its minimum: μ is kept


def test_smoothness_check_flags_a_loss_that_rounding_makes_a_step_function(lora_bundle):
    """A loss rounded to a grid (what run-time activation quantisation does to an int8 graph)
    gives derivative estimates that grow like 1/μ: the check warns with the fix; a smooth
    loss passes silently. The check spends 4 evaluations per direction and keeps μ."""
    engine = engine_for(lora_bundle)
    target = engine.params.master + 1.0
    smooth = fake_loss(engine, target)
    lines: list[str] = []
    mu, tries, evals = at.check_mu(
        engine, smooth, 1e-2, lines.append, curvature=False, smoothness=True
    )
    assert tries[-1]["smoothness_check"] and tries[-1]["rough"] < 0.05
    assert not any("not smooth" in x for x in lines)
    assert evals == 1 + 2 * at.MU_DIRECTIONS * (len(tries) - 1) + 4 * at.MU_DIRECTIONS
    engine2 = engine_for(lora_bundle)
    smooth2 = fake_loss(engine2, engine2.params.master + 1.0)

    def rough():  # the smooth loss plus a deterministic pseudo-random jump per θ, of 1%
        key = float(np.sin(1e4 * float(engine2.params.feed.sum())))
        return smooth2() * (1.0 + 0.01 * key)

    lines2: list[str] = []
    mu2, tries2, _ = at.check_mu(engine2, rough, 1e-2, lines2.append, False, smoothness=True)
    assert mu2 == 1e-2 and tries2[-1]["rough"] > at.ROUGH
    warning = [x for x in lines2 if "not smooth" in x]
    assert warning and "--precision-scope prefix" in warning[0]


def test_autotune_steps_must_be_positive():
    with pytest.raises(ConfigError, match="autotune_steps"):
        FinetuneConfig(autotune_steps=0)


def test_a_run_never_ends_on_a_diverged_theta(lora_bundle, data, tmp_path, monkeypatch):
    # the only guarded evaluation is the last step's, and it counts as diverged: θ must be
    # rolled back to the start instead of being saved as the run's result
    from edgezo.guard import HeldoutGuard

    observe = HeldoutGuard.observe  # every held-out loss seen as non-finite: diverged
    monkeypatch.setattr(HeldoutGuard, "observe", lambda g, step, loss: observe(g, step, np.inf))
    s = finetune(
        cfg(lora_bundle, data, tmp_path / "a", lr=3e-3, mu=1e-2, steps=6, eval_every=6),
        log=quiet,
        progress=False,
    )
    records = Ledger.read(Path(s.out) / "ledger.jsonl").records
    assert records[-1]["status"] == "rollback" and records[-1]["to"] == 0, records[-1]
    assert s.heldout_after == pytest.approx(s.heldout_before, rel=1e-5)


def test_lora_default_checks_mu_but_runs_its_measured_lr(lora_bundle, data, tmp_path):
    s = finetune(cfg(lora_bundle, data, tmp_path / "a", lr_race=None), log=quiet, progress=False)
    tuned = json.loads((Path(s.out) / "autotune.json").read_text())
    assert tuned["trials"] == [] and tuned["mu_trials"]  # μ checked, no lr race
    assert s.lr == MODE_DEFAULTS["lora"]["lr"]
    assert 0 < s.tune_evaluations <= at.worst_case_evaluations(8, 5, 4, 8, True, False) == 17
