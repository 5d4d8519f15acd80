"""The embedding API: a background fit that can be paused, cancelled and resumed, and scoring."""

import threading
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from edgezo import Personalizer
from edgezo.errors import DataError, EdgezoError

NOTES = [
    {"text": t}
    for t in [
        "the cat sat on the mat.",
        "a dog ran in the park.",
        "we bake bread on sunday.",
        "pepper likes long walks.",
        "the fjord is cold today.",
        "tea with honey at nine.",
    ]
    * 3
]
KW = dict(
    batch_size=4,
    max_length=32,
    lr=3e-3,
    mu=1e-2,
    seed=0,
    threads=1,
    estimator="central",
    q=1,
    direction="rademacher",
    checkpoint_every=50,
)


@pytest.fixture(scope="module")
def bundle(make_bundle):
    return make_bundle("lora")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "app-board.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "app-board",
                "description": "test",
                "family": "test",
                "memory_budget_mb": 4000,
                "providers": ["CPUExecutionProvider"],
                "threads": 1,
                "max_batch_size": 2,
            }
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(bundle, profile, tmp_path_factory):
    p = Personalizer(bundle, profile, tmp_path_factory.mktemp("ref"), **KW)
    s = p.fit(NOTES, steps=16).wait()
    assert (s.steps, s.stop_reason) == (16, "completed")
    return p


def trained(p):
    return load_file(str(p.run_dir / "trained.safetensors"))


def test_pause_cancel_and_resume_lose_nothing(bundle, profile, tmp_path, uninterrupted):
    p = Personalizer(bundle, profile, tmp_path / "app", **KW)
    seen, at3 = [], threading.Event()

    def progress(pr):
        seen.append(pr)
        if pr.step == 3:
            at3.set()
        time.sleep(0.02)  # give the main thread room to act mid-run

    p.fit(NOTES, steps=16, on_progress=progress)
    assert at3.wait(60)
    p.pause()  # from this (another) thread; holds at the next step boundary
    time.sleep(0.3)
    held = len(seen)
    time.sleep(0.5)
    assert p.paused and p.running and len(seen) == held < 16  # nothing moves while paused
    p.resume()
    p.cancel()  # mid-run: stops after the step under way
    s = p.wait(60)
    assert s.stop_reason == "cancelled" and 3 <= s.steps < 16
    ledger_steps = (p.run_dir / "ledger.jsonl").read_text().count("\n") - 1
    assert ledger_steps == s.steps == seen[-1].step  # ledger, checkpoint and report agree
    assert [x.step for x in seen] == list(range(1, s.steps + 1))
    assert seen[-1].evaluations == 2 * s.steps and seen[-1].evaluations_left is None
    s2 = p.fit(NOTES, steps=16).wait()  # the next fit resumes
    assert (s2.steps, s2.stop_reason) == (16, "completed")
    a, b = trained(p), trained(uninterrupted)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert p.score(["the cat sat on the mat."]) == uninterrupted.score(["the cat sat on the mat."])


def test_budget_and_scoring(bundle, profile, tmp_path):
    p = Personalizer(bundle, profile, tmp_path / "app", **KW)
    base = p.score(["the cat sat on the mat.", "zzzz qqq"])
    assert len(base) == 2 and all(np.isfinite(base))
    before = p.loss(NOTES[:6])
    s = p.fit(NOTES, steps=40, eval_budget=20).wait()
    assert (s.steps, s.stop_reason) == (10, "eval_budget")
    assert p.loss(NOTES[:6]) < before  # scored with the personalised weights


def test_bad_examples_and_busy(bundle, profile, tmp_path):
    p = Personalizer(bundle, profile, tmp_path / "app", **KW)
    with pytest.raises(DataError, match="neither"):
        p.fit([{"text": "fine"}, {"body": "no text key"}])
    p.fit(NOTES, steps=200)
    try:
        with pytest.raises(EdgezoError, match="already running"):
            p.fit(NOTES)
        with pytest.raises(EdgezoError, match="being personalised"):
            p.score(["x"])
    finally:
        p.cancel()
        p.wait(60)


def test_example_app_runs(bundle, profile, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "example_app.py"
    r = subprocess.run(
        [
            sys.executable,
            str(tool),
            "--bundle",
            str(bundle),
            "--device",
            profile,
            "--app-dir",
            str(tmp_path / "app"),
            "--steps",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # this checkout's edgezo, not an installed one (the script's folder is tools/)
        env={**os.environ, "PYTHONPATH": str(tool.parents[1])},
    )
    assert r.returncode == 0, r.stderr
    assert "[edgezo] step 6/6" in r.stdout and "loss of two texts after" in r.stdout
