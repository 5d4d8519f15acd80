"""End to end on a tiny exported Llama: fine-tune, determinism, replay, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgezo.config import FinetuneConfig
from edgezo.train import finetune


@pytest.fixture(scope="module")
def data(memo_data):
    return memo_data


def cfg(bundle, data, out, **kw):
    base = dict(
        bundle=str(bundle),
        data=str(data[0]),
        eval_data=str(data[1]),
        out=str(out),
        steps=40,
        batch_size=4,
        max_length=32,
        eval_every=0,
        checkpoint_every=10,
        lr=3e-3,
        mu=1e-2,
        seed=0,
        threads=1,
        # the step mechanics under test, not the LoRA recipe (MODE_DEFAULTS)
        estimator="central",
        q=1,
        direction="rademacher",
    )
    base.update(kw)
    return FinetuneConfig(**base)


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def test_loss_goes_down_and_same_seed_same_bits(lora_bundle, data, tmp_path):
    a = finetune(cfg(lora_bundle, data, tmp_path / "a"), log=quiet, progress=False)
    assert a.heldout_after < a.heldout_before - 0.02, a
    assert a.train_evaluations == 2 * 40
    b = finetune(cfg(lora_bundle, data, tmp_path / "b"), log=quiet, progress=False)
    ta = load_file(str(Path(a.out) / "trained.safetensors"))
    tb = load_file(str(Path(b.out) / "trained.safetensors"))
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    c = finetune(cfg(lora_bundle, data, tmp_path / "c", seed=1, steps=5), log=quiet, progress=False)
    tc = load_file(str(Path(c.out) / "trained.safetensors"))
    assert any(not np.array_equal(ta[k], tc[k]) for k in ta)


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("norms", {}),
        ("full", {"perturbation": "inplace"}),
        ("lora", {"q": 2, "direction": "gaussian"}),
    ],
)
def test_modes_learn_and_replay_bit_exactly(make_bundle, data, tmp_path, mode, extra):
    bundle = make_bundle(mode)
    lr = {"full": 1e-3, "norms": 3e-3, "lora": 3e-3}[mode]
    s = finetune(cfg(bundle, data, tmp_path / "r", lr=lr, **extra), log=quiet, progress=False)
    assert s.heldout_after < s.heldout_before
    out = tmp_path / "replayed.safetensors"
    r = run_cli("replay", "--run", str(tmp_path / "r"), "--out", str(out), "--check")
    assert r.returncode == 0, r.stderr
    assert "bit-identical" in r.stdout


def run_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "edgezo.cli", *args], capture_output=True, text=True, **kw
    )


def test_kill_and_resume_is_bit_identical(lora_bundle, data, tmp_path):
    steps = 60
    ref = finetune(
        cfg(lora_bundle, data, tmp_path / "ref", steps=steps, checkpoint_every=7),
        log=quiet,
        progress=False,
    )
    out = tmp_path / "killed"
    args = [
        "finetune",
        "--bundle",
        str(lora_bundle),
        "--data",
        str(data[0]),
        "--eval-data",
        str(data[1]),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--lr",
        "3e-3",
        "--mu",
        "1e-2",
        "--seed",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "eval_every=0",
        "checkpoint_every=7",
        "estimator=central",
        "q=1",
        "direction=rademacher",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgezo.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ledger = out / "ledger.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill for real, mid-run, past a checkpoint
        if ledger.exists() and ledger.read_text().count("\n") > 20:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = ledger.read_text().count("\n") - 1
    assert 0 < done < steps, "the run finished before it could be killed"
    r = run_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at step" in r.stdout
    got = load_file(str(out / "trained.safetensors"))
    want = load_file(str(Path(ref.out) / "trained.safetensors"))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert json.loads((out / "summary.json").read_text())["steps"] == steps


def test_runtime_never_imports_torch(lora_bundle, data, tmp_path):
    code = (
        "import sys, edgezo, edgezo.cli, edgezo.train, edgezo.evaluate, edgezo.zo.replay\n"
        "from edgezo.config import FinetuneConfig\n"
        "from edgezo.train import finetune\n"
        f"finetune(FinetuneConfig(bundle={str(lora_bundle)!r}, data={str(data[0])!r}, "
        f"eval_data={str(data[1])!r}, out={str(tmp_path / 'x')!r}, steps=2), "
        "log=lambda *a: None, progress=False)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'optimum')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_eval_command_scores_trained_tensors(lora_bundle, data, tmp_path):
    s = finetune(cfg(lora_bundle, data, tmp_path / "e"), log=quiet, progress=False)
    r = run_cli("eval", "--run", s.out, "--data", str(data[1]), "--max-length", "32")
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout.split()[1]) - s.heldout_after) < 1e-4


def test_divergence_rolls_back_through_the_ledger(lora_bundle, data, tmp_path):
    from edgezo.zo.ledger import Ledger

    # a hair-trigger guard (any rise of the held-out loss counts as divergence) exercises the
    # mechanism on the tiny model: roll back to the best point, halve lr, give up after
    # max_rollbacks; the ledger replays bit for bit, rollbacks included
    s = finetune(
        cfg(
            lora_bundle,
            data,
            tmp_path / "d",
            steps=80,
            eval_every=2,
            divergence_tolerance=1e-9,
            max_rollbacks=2,
        ),
        log=quiet,
        progress=False,
    )
    assert s.stop_reason == "diverged"
    records = Ledger.read(tmp_path / "d/ledger.jsonl").records
    rollbacks = [r for r in records if r["status"] == "rollback"]
    assert len(rollbacks) == 3
    assert all(r["to"] < r["step"] for r in rollbacks)
    after_first = [r["lr"] for r in records[rollbacks[0]["step"] + 1 :] if r["status"] == "ok"]
    assert after_first and after_first[0] == 3e-3 / 2
    # θ ends at the best held-out point seen
    evals = [json.loads(x) for x in (tmp_path / "d/metrics.jsonl").read_text().splitlines()]
    best = min(e["heldout_loss"] for e in evals if e["kind"] == "eval")
    assert abs(s.heldout_after - best) < 1e-6
    r = run_cli("replay", "--run", str(tmp_path / "d"), "--out", str(tmp_path / "r.st"), "--check")
    assert r.returncode == 0 and "bit-identical" in r.stdout, r.stdout + r.stderr


def test_rollbacks_survive_a_budget_stop_and_resume(lora_bundle, data, tmp_path):
    kw = dict(steps=40, eval_every=2, divergence_tolerance=1e-9, max_rollbacks=50)
    ref = finetune(cfg(lora_bundle, data, tmp_path / "ref", **kw), log=quiet, progress=False)
    first = finetune(
        cfg(lora_bundle, data, tmp_path / "cut", eval_budget=30, **kw), log=quiet, progress=False
    )
    assert first.stop_reason == "eval_budget"
    # the stored budget is kept: each resumed session gets another 30 evaluations
    sessions, done = 1, first
    while done.stop_reason == "eval_budget":
        done = finetune(
            cfg(lora_bundle, data, tmp_path / "cut", **kw), resume=True, log=quiet, progress=False
        )
        sessions += 1
    assert done.steps == ref.steps and sessions >= 3 and done.session.index == sessions - 1
    a = load_file(str(tmp_path / "ref/trained.safetensors"))
    b = load_file(str(tmp_path / "cut/trained.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    led = (tmp_path / "ref/ledger.jsonl").read_text()
    assert '"status": "rollback"' in led  # the comparison covered rollbacks


def test_no_progress_warning(lora_bundle, data, tmp_path):
    lines = []
    # a learning rate too small to move the held-out loss: the run says so, once per stall
    finetune(
        cfg(lora_bundle, data, tmp_path / "s", lr=1e-9, steps=30, eval_every=5),
        log=lines.append,
        progress=False,
    )
    warnings = [x for x in lines if "no held-out progress" in x]
    assert len(warnings) == 1 and "try a larger lr" in warnings[0]


def test_plateau_lowers_the_lr_and_a_resumed_run_keeps_it(lora_bundle, data, tmp_path):
    kw = dict(steps=40, eval_every=2, lr=1e-2)
    finetune(cfg(lora_bundle, data, tmp_path / "ref", **kw), log=quiet, progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    plateaus = [m for m in metrics if m["kind"] == "plateau"]
    assert plateaus, "the tiny run should stall at least once after improving"
    steps = [m for m in metrics if m["kind"] == "step"]
    first = plateaus[0]["step"]  # steps < first ran at lr; the next at lr x plateau_factor
    assert {m["lr"] for m in steps if m["step"] < first} == {1e-2}
    assert steps[first]["lr"] == 1e-2 * 0.5
    ran = [m for m in plateaus if m["step"] < 40]  # a decay at the last step has no step after
    assert min(m["lr"] for m in steps) == 1e-2 * ran[-1]["lr_scale"]
    # a run stopped by its budget and resumed continues at the lowered rate: the same bits
    cut = finetune(
        cfg(lora_bundle, data, tmp_path / "cut", eval_budget=2 * (first + 4), **kw),
        log=quiet,
        progress=False,
    )
    assert cut.stop_reason == "eval_budget"
    finetune(cfg(lora_bundle, data, tmp_path / "cut", **kw), resume=True, log=quiet, progress=False)
    a = load_file(str(tmp_path / "ref/trained.safetensors"))
    b = load_file(str(tmp_path / "cut/trained.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # off: one learning rate throughout
    finetune(
        cfg(lora_bundle, data, tmp_path / "off", plateau_factor=1.0, **kw),
        log=quiet,
        progress=False,
    )
    off = [json.loads(x) for x in (tmp_path / "off/metrics.jsonl").read_text().splitlines()]
    assert {m["lr"] for m in off if m["kind"] == "step"} == {1e-2}


def test_ledger_lr_scale():
    from edgezo.session import ledger_lr_scale
    from edgezo.zo.optim import Schedule

    sched = Schedule("constant", 0.2, 100, 0)
    step = lambda i, lr: {"step": i, "lr": lr, "status": "ok"}  # noqa: E731
    back = {"step": 3, "status": "rollback", "to": 1, "lr_scale": 0.5}
    assert ledger_lr_scale([], sched) == 1.0
    assert ledger_lr_scale([step(0, 0.2), step(1, 0.05)], sched) == 0.25
    assert ledger_lr_scale([step(0, 0.2), step(1, 0.1), back], sched) == 0.25
    assert ledger_lr_scale([back], sched) == 0.5
