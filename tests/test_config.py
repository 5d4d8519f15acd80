import pytest

from edgezo.config import FinetuneConfig
from edgezo.errors import ConfigError


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 5\nlr: 1e-4\nschedule: cosine\n")
    cfg = FinetuneConfig.load(str(p), {"q": 2})
    assert (cfg.steps, cfg.lr, cfg.schedule, cfg.q) == (5, 1e-4, "cosine", 2)


def test_unknown_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("step: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'step' \(did you mean 'steps'\?\)"):
        FinetuneConfig.load(str(p))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"q": 0}, "q must be >= 1"),
        ({"mu": -1.0}, "mu must be > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"schedule": "exp"}, "schedule must be one of"),
        ({"steps": "many"}, "steps must be an integer"),
    ],
)
def test_invalid_values_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig.load(None, overrides)


def test_mode_defaults():
    cfg = FinetuneConfig().resolved("full")
    assert cfg.lr == 1e-6 and cfg.mu == 1e-3
    assert FinetuneConfig(lr=0.5).resolved("lora").lr == 0.5


def test_per_mode_recipes_resolve_and_explicit_fields_win():
    from edgezo.config import FinetuneConfig

    lora = FinetuneConfig().resolved("lora")
    assert (lora.estimator, lora.q, lora.direction, lora.optimizer, lora.momentum) == (
        "onesided",
        4,
        "sphere",
        "sgd",
        0.9,
    )
    assert (lora.lr, lora.mu, lora.steps, lora.lr_race) == (1e-3, 1e-2, 100, False)
    assert FinetuneConfig().resolved("head").lr_race is True
    head = FinetuneConfig().resolved("head")
    assert (head.estimator, head.q, head.optimizer, head.momentum, head.steps) == (
        "onesided",
        8,
        "adam",
        0.0,
        2000,
    )
    norms = FinetuneConfig().resolved("norms")
    assert (norms.estimator, norms.q, norms.direction, norms.steps) == (
        "central",
        1,
        "rademacher",
        200,
    )
    mine = FinetuneConfig(estimator="central", q=2, steps=7, optimizer="adam").resolved("lora")
    assert (mine.estimator, mine.q, mine.steps, mine.momentum) == ("central", 2, 7, 0.0)
