"""``mu_scale``: per-tensor perturbation factors (by name, role, ``*`` or the tensor's RMS).

A tensor with factor s is perturbed by μ·s·z and moved along s·z, so tensors of very different
sensitivity share one μ and one lr. The tests pin the syntax and its errors, the factors, the
perturbed feed and the step exactly, what it buys on a quadratic whose tensors differ 100x in
curvature, and exact replay through the real CLI.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_resume import cli, start_args

from edgezo.config import FinetuneConfig
from edgezo.errors import ConfigError
from edgezo.zo import scales
from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.params import TensorSpec
from edgezo.zo.perturb import plain

SPECS = [
    TensorSpec("blocks.0.norm", (6,), role="norm"),
    TensorSpec("blocks.0.lora_b", (4, 3), role="lora_b"),
    TensorSpec("blocks.1.lora_b", (5,), role="lora_b"),
]


def initial():
    return {
        "blocks.0.norm": np.full(6, 2.0, np.float32),
        "blocks.0.lora_b": np.zeros((4, 3), np.float32),
        "blocks.1.lora_b": np.array([3, -4, 0, 0, 0], np.float32),
    }


def engine(mu_scale: str, **kw) -> ZOEngine:
    s = {"seed": 2, "direction": "sphere", "estimator": "onesided", "q": 2, **kw}
    return ZOEngine(SPECS, initial, EngineSettings(mu_scale=mu_scale, **s))


@pytest.mark.parametrize(
    ("text", "factors"),
    [
        ("", [1.0, 1.0, 1.0]),
        ("rms", [2.0, 1.0, np.sqrt(25 / 5)]),  # an all-zero tensor gets 1
        ("norm=0.1", [0.1, 1.0, 1.0]),
        ("*=3, norm=0.5", [0.5, 3.0, 3.0]),  # a role beats *
        ("lora_b=2,blocks.1.lora_b=rms", [1.0, 2.0, np.sqrt(5.0)]),  # a name beats a role
    ],
)
def test_the_factors_follow_name_then_role_then_star(text, factors):
    got = scales.tensor_factors(SPECS, initial(), text)
    assert got == pytest.approx(factors)
    vec = scales.scale_vector(SPECS, got)
    if all(f == 1.0 for f in factors):
        assert vec is None
    else:
        assert vec.dtype == np.float32 and vec.size == 6 + 12 + 5
        assert vec[0] == np.float32(factors[0]) and vec[6] == np.float32(factors[1])


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("norm", "not key=value"),
        ("norm=0", "> 0"),
        ("norm=-1", "> 0"),
        ("norm=nan", "> 0"),
        ("norm=big", "a number or rms"),
        ("norm=1,norm=2", "twice"),
    ],
)
def test_bad_settings_are_refused_with_the_field_and_the_fix(text, why):
    with pytest.raises(ConfigError, match="mu_scale") as e:
        FinetuneConfig(mu_scale=text)
    assert e.match(why) and e.match("norm=0.1")


def test_a_key_that_names_nothing_is_refused_with_the_bundles_roles():
    with pytest.raises(ConfigError, match="embedding") as e:
        engine("embedding=0.1")
    assert e.match("lora_b") and e.match("norm")


def test_the_feed_is_theta_plus_mu_times_the_factor_times_z():
    eng = engine("norm=0.1,lora_b=3")
    raw = eng.perturber.vectors.chunk(plain(5, 1), 0, scaled=False).copy()
    eng.perturber.to(plain(5, 1), 1e-2)
    s = np.repeat(np.float32([0.1, 3.0, 3.0]), [6, 12, 5])
    expected = eng.params.master + np.float32(1e-2) * (raw * s)
    assert np.array_equal(eng.params.feed, expected)
    plain_eng = engine("")
    plain_eng.perturber.to(plain(5, 1), 1e-2)  # without the setting: the raw direction
    assert np.array_equal(plain_eng.params.feed, plain_eng.params.master + np.float32(1e-2) * raw)


def test_a_plain_sgd_step_moves_each_tensor_along_its_scaled_direction():
    eng = engine("norm=0.1", q=1)
    before = eng.params.master.copy()
    rec = eng.step(0, 0.5, 1e-2, lambda: float(eng.params.feed.sum()))  # a linear loss
    eng.perturber.at_theta()
    z = eng.perturber.vectors.chunk(plain(0, 0), 0, scaled=False).astype(np.float64)
    s = np.repeat([0.1, 1.0, 1.0], [6, 12, 5])
    moved = eng.params.master.astype(np.float64) - before
    assert moved == pytest.approx(-0.5 * rec["g"][0] * s * z, rel=1e-5, abs=1e-7)
    # g was measured along s·z: the expected step is s² times plain SGD's
    assert rec["g"][0] == pytest.approx(float(np.sum(s * z)), rel=1e-3)


def test_the_factors_let_stiff_and_soft_tensors_share_one_rate():
    """Curvature 1 on tensor a, 0.01 on b; the best of three rates each, three seeds: with
    a=0.1 (the stiff tensor perturbed and moved less) the run ends at least 5x lower."""
    specs = [TensorSpec("a", (16,)), TensorSpec("b", (16,))]
    lam = np.repeat([1.0, 0.01], 16)
    target = np.random.default_rng(123).normal(size=32)

    def final(text: str, lr: float, seed: int) -> float:
        st = EngineSettings(
            seed=seed, direction="sphere", estimator="onesided", q=4, momentum=0.9, mu_scale=text
        )
        eng = ZOEngine(
            specs, lambda: {"a": np.zeros(16, np.float32), "b": np.zeros(16, np.float32)}, st
        )
        feed = eng.params.feed

        def loss() -> float:
            x = feed.astype(np.float64) - target
            return float(0.5 * np.sum(lam * x * x))

        with np.errstate(all="ignore"):
            for t in range(300):
                eng.step(t, lr, 1e-3, loss)
            eng.perturber.at_theta()
            f = loss()
        return f if np.isfinite(f) else np.inf

    for seed in range(3):
        plain_best = min(final("", lr, seed) for lr in (0.003, 0.01, 0.03))
        scaled_best = min(final("a=0.1", lr, seed) for lr in (0.1, 0.3, 1.0))
        assert scaled_best < plain_best / 5, (seed, scaled_best, plain_best)


def test_the_ledger_replays_to_the_same_bits():
    eng = engine("rms", momentum=0.9)
    feed = eng.params.feed
    loss = lambda: float(np.sum((feed.astype(np.float64) - 1.0) ** 2))  # noqa: E731
    records = [eng.step(t, 1e-3, 1e-2, loss) for t in range(30)]
    rep = eng.fresh()
    for r in records:
        rep.replay(r)
    assert np.array_equal(rep.params.master, eng.params.master)
    other = engine("", momentum=0.9)
    for r in records:
        other.step(r["step"], r["lr"], r["mu"], iter(r["losses"]).__next__)
    assert not np.array_equal(other.params.master, eng.params.master)  # the factors count


# -- the real CLI: a norms bundle, replay --check ----------------------------------------------


def test_finetune_with_mu_scale_replays_bit_identically(make_bundle, memo_data, tmp_path):
    bundle = make_bundle("norms")
    args = ["--steps", "12", "--lr", "1e-2", "--mu", "1e-2", "mu_scale=norm=0.5,*=rms"]
    run = cli(*start_args(bundle, memo_data, tmp_path / "run", *args))
    assert run.returncode == 0, run.stderr
    header = (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()[0]
    assert '"mu_scale": "norm=0.5,*=rms"' in header
    rebuilt = tmp_path / "rebuilt.safetensors"
    check = cli("replay", "--run", str(tmp_path / "run"), "--out", str(rebuilt), "--check")
    assert check.returncode == 0 and "bit-identical" in check.stdout, check.stdout + check.stderr
