"""tools/convergence.py on a tiny bundle: evaluation counting, reuse, table, plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location(
        "edgezo_tool_convergence", TOOLS / "convergence.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_configs_are_valid_and_include_mezo_and_default(conv):
    from edgezo.config import FinetuneConfig

    assert conv.CONFIGS["default"] == {}
    mezo = conv.CONFIGS["mezo"]
    assert (mezo["direction"], mezo["q"], mezo["estimator"], mezo["optimizer"]) == (
        "gaussian",
        1,
        "central",
        "sgd",
    )
    assert (mezo["momentum"], mezo["lr"], mezo["mu"]) == (0.0, 1e-4, 1e-2)
    for overrides in conv.CONFIGS.values():
        FinetuneConfig(**overrides)  # validates


def test_runs_count_training_evaluations_and_are_reused(conv, make_bundle, tmp_path):
    bundle = str(make_bundle("lora"))
    held = conv.heldout_subset(8, tmp_path)
    assert len(held.read_text().splitlines()) == 8
    kw = dict(
        max_evals=15, eval_every_evals=4, heldout_file=held, bundle=bundle, log=lambda _m: None
    )
    res = conv.run_config("onesided-q4", conv.CONFIGS["onesided-q4"], 0, tmp_path, **kw)
    # onesided q=4: 5 evaluations per step, 3 steps; held-out every round(4/5)=1 step
    assert res.train_evaluations == 15
    assert res.evals == [0, 5, 10, 15]
    assert len(res.heldout) == 4 and all(math.isfinite(h) for h in res.heldout)
    assert res.resolved["q"] == 4 and res.resolved["eval_budget"] == 15
    assert res.eval_evaluations > 0  # held-out forwards reported, not on the x axis
    # reached at the first held-out point at or below the target
    assert res.evals_to(res.heldout[0]) == 0
    assert res.evals_to(min(res.heldout) - 1.0) is None

    summary = Path(res.out) / "summary.json"
    stamp = summary.stat().st_mtime_ns
    again = conv.run_config("onesided-q4", conv.CONFIGS["onesided-q4"], 0, tmp_path, **kw)
    assert summary.stat().st_mtime_ns == stamp and again.evals == res.evals


def test_evaluations_spent_before_training_are_counted(conv):
    assert (
        conv.extra_evaluations(
            {"train_evaluations": 40, "eval_evaluations": 9, "autotune_evaluations": 12, "steps": 3}
        )
        == 12
    )
    assert conv.extra_evaluations({"train_evaluations": 40, "eval_evaluations": 9}) == 0


def test_median_counts_a_miss_as_infinite(conv):
    assert conv.median_hits([100, None, 60]) == 100
    assert conv.median_hits([100, None, None]) is None


def test_main_writes_table_json_and_png(conv, make_bundle, tmp_path, capsys):
    out = tmp_path / "conv"
    conv.main(
        [
            "--seeds",
            "0",
            "1",
            "--configs",
            "mezo",
            "default",
            "--max-evals",
            "6",
            "--eval-every-evals",
            "2",
            "--heldout",
            "6",
            "--target",
            "100",
            "--bundle",
            str(make_bundle("lora")),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    text = capsys.readouterr().out
    assert "mezo" in text and "default" in text and "lr=0.0001" in text
    assert (out / "convergence.png").stat().st_size > 1000
    data = json.loads((out / "convergence.json").read_text())
    assert [(r["config"], r["seed"]) for r in data["runs"]] == [
        ("mezo", 0),
        ("mezo", 1),
        ("default", 0),
        ("default", 1),
    ]
    # a target above every loss is reached at the first measurement: 0 evaluations for mezo
    # (lr and μ given); the default's first point comes after its lr/μ selection, if any
    assert all(r["evals"][0] == r["extra_evaluations"] for r in data["runs"])
    assert [r["extra_evaluations"] for r in data["runs"][:2]] == [0, 0]
    assert "mezo                 0 0" in text
    # --report runs nothing and finds the same runs
    stamps = sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json"))
    conv.main(["--report", "--seeds", "0", "1", "2", "--target", "100", "--out", str(out)])
    assert "mezo                 0 0" in capsys.readouterr().out
    assert sorted(p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")) == stamps
