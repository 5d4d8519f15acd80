"""Resuming a run needs nothing but its folder, and gives the uninterrupted run's result.

`edgezo finetune --resume --out RUN` reads the stored config before anything else (no default
bundle, no per-mode default overrides a stored value); a start killed during the lr/μ selection
is redone exactly; the summary reports the run and the session apart; a failed start leaves no
folder behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from edgezo.config import FinetuneConfig
from edgezo.errors import CheckpointError, ConfigError, DataError
from edgezo.train import finetune

#: the recipe these tests pin, as CLI arguments (the stored config must carry all of it)
RECIPE = ["estimator=central", "q=1", "direction=rademacher", "eval_every=0", "threads=1"]


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgezo.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "EDGEZO_CACHE": "/nonexistent/no-default-bundle", **(env or {})},
        **kw,
    )


def start_args(bundle, data, out, *extra: str) -> list[str]:
    return [
        "finetune",
        "--bundle",
        str(bundle),
        "--data",
        str(data[0]),
        "--eval-data",
        str(data[1]),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--no-progress",
        *RECIPE,
        *extra,
    ]


def kill_when_ledger_has(args: list[str], out: Path, lines: int, timeout: float = 60) -> int:
    """Start ``edgezo <args>``, SIGKILL it once ``out``'s ledger has ``lines`` lines (or after
    ``timeout`` s); returns the number of step records the ledger then held."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgezo.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ledger = out / "ledger.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ledger.exists() and ledger.read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return ledger.read_bytes().count(b"\n") - 1


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / "trained.safetensors")), load_file(str(b / "trained.safetensors"))
    return ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


def ledger_records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()[1:]]


def test_resume_needs_only_the_run_folder_and_keeps_the_stored_steps(
    lora_bundle, memo_data, tmp_path
):
    common = ("--steps", "24", "--lr", "3e-3", "--mu", "1e-2")
    ref = cli(*start_args(lora_bundle, memo_data, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr
    cut = cli(*start_args(lora_bundle, memo_data, tmp_path / "cut", *common, "--eval-budget", "10"))
    assert cut.returncode == 0, cut.stderr
    assert json.loads((tmp_path / "cut/summary.json").read_text())["stop_reason"] == "eval_budget"
    # nothing but the folder: no default bundle is exported or loaded (EDGEZO_CACHE points
    # nowhere), and the stored 24 steps, not a mode default, are run; the stored budget is
    # kept, so a larger one is given for this session
    r = cli("finetune", "--resume", "--out", str(tmp_path / "cut"), "--eval-budget", "1000")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "cut/summary.json").read_text())
    assert summary["steps"] == 24 and summary["stop_reason"] == "completed"
    assert same_tensors(tmp_path / "ref", tmp_path / "cut")
    assert ledger_records(tmp_path / "ref") == ledger_records(tmp_path / "cut")
    # the summary: the run from step 0, the session from where it resumed
    first = json.loads((tmp_path / "ref/summary.json").read_text())
    assert summary["heldout_before"] == first["heldout_before"]
    assert summary["session"]["start_step"] == 5 and summary["session"]["index"] == 1
    assert summary["session"]["heldout_before"] != summary["heldout_before"]
    assert summary["train_evaluations"] == 48 and summary["session"]["train_evaluations"] == 38
    assert summary["lr_last"] == 3e-3


def test_resume_refuses_to_change_what_the_ledger_depends_on(lora_bundle, memo_data, tmp_path):
    base = dict(
        bundle=str(lora_bundle),
        data=str(memo_data[0]),
        eval_data=str(memo_data[1]),
        out=str(tmp_path / "r"),
        steps=6,
        lr=3e-3,
        mu=1e-2,
        batch_size=4,
        max_length=32,
        eval_every=0,
    )
    finetune(FinetuneConfig(**base), log=lambda *a: None, progress=False)
    with pytest.raises(ConfigError, match="seed is 0 in .*config.yaml, not 3"):
        finetune(FinetuneConfig(out=base["out"], seed=3), resume=True, log=lambda *a: None)
    # steps may grow; lr may change (each record keeps its own)
    s = finetune(
        FinetuneConfig(out=base["out"], steps=9, lr=1e-3), resume=True, log=lambda *a: None
    )
    assert s.steps == 9 and s.lr == 1e-3
    assert [r["lr"] for r in ledger_records(tmp_path / "r")] == [3e-3] * 6 + [1e-3] * 3


KILL_IN_AUTOTUNE = """
import os, signal, sys
import edgezo.session as session
real = session.autotune
def killed(*a, **k):
    real(*a, **k)  # the selection runs to its end and is killed before its result is stored
    os.kill(os.getpid(), signal.SIGKILL)
session.autotune = killed
sys.argv = ["edgezo"] + sys.argv[1:]
from edgezo.cli import main
main()
"""


def test_a_kill_during_the_lr_and_mu_selection_changes_nothing(make_bundle, memo_data, tmp_path):
    bundle = make_bundle("norms")  # a mode whose recipe runs the learning-rate race
    args = ["--steps", "6", "autotune_steps=2"]
    ref = cli(*start_args(bundle, memo_data, tmp_path / "ref", *args))
    assert ref.returncode == 0, ref.stderr
    assert "autotune: lr" in ref.stdout
    out = tmp_path / "killed"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_AUTOTUNE, *start_args(bundle, memo_data, out, *args)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "ledger.jsonl").exists()  # killed before the run started
    assert json.loads(json.dumps(FinetuneConfig.load(str(out / "config.yaml")).lr)) is None
    r = cli("finetune", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "starting it afresh" in r.stdout
    assert ledger_records(tmp_path / "ref") == ledger_records(out)
    assert same_tensors(tmp_path / "ref", out)
    stored = FinetuneConfig.load(str(out / "config.yaml"))
    assert stored.lr == FinetuneConfig.load(str(tmp_path / "ref/config.yaml")).lr is not None


def test_kill_at_many_moments_then_resume_is_exact(lora_bundle, memo_data, tmp_path):
    args = ["--steps", "40", "--lr", "3e-3", "--mu", "1e-2", "checkpoint_every=7", "eval_every=5"]
    ref = cli(*start_args(lora_bundle, memo_data, tmp_path / "ref", *args))
    assert ref.returncode == 0, ref.stderr
    killed_at = []
    for trial, lines in enumerate((1, 9, 23, 36)):  # header only, before and after checkpoints
        out = tmp_path / f"k{trial}"
        killed_at.append(
            kill_when_ledger_has(start_args(lora_bundle, memo_data, out, *args), out, lines)
        )
        r = cli("finetune", "--resume", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert ledger_records(tmp_path / "ref") == ledger_records(out), trial
        assert same_tensors(tmp_path / "ref", out), trial
    assert sum(0 <= k < 40 for k in killed_at) >= 3, killed_at  # they were killed mid-run


def test_a_failed_start_leaves_no_run_folder(lora_bundle, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 3}\n')
    with pytest.raises(DataError):
        finetune(
            FinetuneConfig(bundle=str(lora_bundle), data=str(bad), out=str(tmp_path / "run")),
            log=lambda *a: None,
        )
    assert not (tmp_path / "run").exists()


def test_a_run_whose_every_step_is_skipped_does_not_report_completed(
    lora_bundle, memo_data, tmp_path, monkeypatch
):
    import edgezo.runner as runner

    monkeypatch.setattr(runner.LossRunner, "mean_loss", lambda self, batch: float("nan"))
    s = finetune(
        FinetuneConfig(
            bundle=str(lora_bundle),
            data=str(memo_data[0]),
            eval_data=str(memo_data[1]),
            out=str(tmp_path / "nan"),
            steps=30,
            lr=1e-3,
            mu=1e-2,
            max_length=32,
            eval_every=0,
        ),
        log=lambda *a: None,
        progress=False,
    )
    assert s.stop_reason == "non_finite" and s.steps == 10


def test_a_checkpoint_from_another_run_is_refused(lora_bundle, memo_data, tmp_path):
    def run(out, data, **kw):
        cfg = FinetuneConfig(
            bundle=str(lora_bundle),
            data=str(data),
            eval_data=str(memo_data[1]),
            out=str(out),
            steps=10,
            lr=3e-3,
            mu=1e-2,
            max_length=32,
            eval_every=0,
            checkpoint_every=5,
            **kw,
        )
        return finetune(cfg, log=lambda *a: None, progress=False)

    run(tmp_path / "a", memo_data[0], eval_budget=12)  # stops at step 5 with a checkpoint
    run(tmp_path / "b", memo_data[1], eval_budget=12)  # same settings, other data
    (tmp_path / "b/checkpoint.safetensors").write_bytes(
        (tmp_path / "a/checkpoint.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="was not written by the run whose ledger"):
        finetune(FinetuneConfig(out=str(tmp_path / "b")), resume=True, log=lambda *a: None)
