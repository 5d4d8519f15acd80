"""Device profiles applied to runs: plan, provider fallback, caps, micro-batching, budgets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from edgezo.bundle import load_bundle
from edgezo.config import FinetuneConfig
from edgezo.device.plan import estimate, make_plan
from edgezo.device.resolve import load_profile
from edgezo.errors import ConfigError
from edgezo.runner import choose_provider
from edgezo.train import finetune

TEXTS = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "we bake bread on sunday.",
    "pepper likes long walks.",
    "the fjord is cold today.",
    "tea with honey at nine.",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, held = d / "train.jsonl", d / "held.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return train, held


@pytest.fixture(scope="module")
def bundle(make_bundle):
    return make_bundle("lora")


def profile_file(tmp_path, name="test-board", **fields):
    body = {
        "name": name,
        "description": "a test board",
        "family": "test",
        "memory_budget_mb": 4000,
        "providers": ["CPUExecutionProvider"],
        "threads": 1,
        "max_batch_size": 8,
        "max_seq_len": 512,
        "checkpoint_every": 100,
    }
    body.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


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
        checkpoint_every=5,
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


def tensors(summary_or_dir):
    out = getattr(summary_or_dir, "out", summary_or_dir)
    return load_file(str(Path(out) / "trained.safetensors"))


def same_bits(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


class Log(list):
    def __call__(self, msg="", **k):
        self.append(str(msg))

    @property
    def text(self):
        return "\n".join(self)


@pytest.fixture(scope="module")
def reference(bundle, data, tmp_path_factory):
    """The uninterrupted 12-step run every stopped-and-resumed run must reproduce."""
    return finetune(
        cfg(bundle, data, tmp_path_factory.mktemp("ref") / "r"), log=Log(), progress=False
    )


# -- plan -------------------------------------------------------------------------------------


def test_plan_fits_and_does_not_fit_with_the_right_suggestion(bundle, tmp_path):
    b = load_bundle(bundle)
    kw = dict(device="x", batch_size=64, max_length=256, optim_buffers=1, inplace=False)
    big = estimate(b, budget_mb=10**6, micro_batch=64, **kw)
    one = estimate(b, budget_mb=10**6, micro_batch=1, **kw)
    assert big.fits and big.peak_mb > one.peak_mb + 50  # activations scale with the batch
    # a budget between batch 1 and batch 64: a smaller micro-batch is the fix
    mid = int((big.peak_mb + one.peak_mb) / 2)
    prof = load_profile(profile_file(tmp_path, memory_budget_mb=mid, max_batch_size=64))
    p = make_plan(b, prof, batch_size=64, max_length=256, optim_buffers=1, dry_run=False)
    assert not p.fits
    assert (
        "micro_batch_size=" in p.suggestions[0] and "effective batch stays 64" in p.suggestions[0]
    )
    # under batch 1: shorter sequences, an int4 bundle, more memory
    prof = load_profile(
        profile_file(tmp_path, memory_budget_mb=int(one.peak_mb) - 1, max_batch_size=64)
    )
    p = make_plan(b, prof, batch_size=64, max_length=256, optim_buffers=1, dry_run=False)
    text = "\n".join(p.suggestions)
    assert not p.fits and "an int4 bundle" in text and "--quantize int4" in text
    assert "--max-length" in text or "more memory" in text


def test_plan_suggests_lora_for_a_full_bundle(make_bundle, tmp_path):
    b = load_bundle(make_bundle("full"))
    prof = load_profile(profile_file(tmp_path, memory_budget_mb=20))
    p = make_plan(b, prof, batch_size=8, max_length=64, dry_run=False)
    assert not p.fits
    assert any("LoRA instead of full" in s for s in p.suggestions)


def test_plan_cli_dry_run(bundle, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgezo.cli",
            "plan",
            "--bundle",
            str(bundle),
            "--device",
            profile_file(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and out["calibrated"], out
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgezo.cli",
            "plan",
            "--bundle",
            str(bundle),
            "--device",
            profile_file(tmp_path, memory_budget_mb=10),
            "--no-dry-run",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "does NOT fit" in r.stdout and "fix:" in r.stdout


# -- enforcement ------------------------------------------------------------------------------


def test_provider_fallback_message(bundle, data, tmp_path):
    chosen, note = choose_provider(
        ("CUDAExecutionProvider", "CPUExecutionProvider"), ["CPUExecutionProvider"]
    )
    assert chosen == "CPUExecutionProvider"
    assert "falling back to CPUExecutionProvider" in note and "onnxruntime-gpu" in note
    with pytest.raises(ConfigError, match="none of the profile's providers"):
        choose_provider(("CUDAExecutionProvider",), ["CPUExecutionProvider"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to see")
    dev = profile_file(
        tmp_path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], gpu_memory_mb=1000
    )
    log = Log()
    s = finetune(
        cfg(bundle, data, tmp_path / "r", steps=1, device=dev, threads=None),
        log=log,
        progress=False,
    )
    assert s.steps == 1
    assert "CUDAExecutionProvider is not available" in log.text
    assert "falling back to CPUExecutionProvider" in log.text


def test_caps_batch_and_sequence(bundle, data, tmp_path):
    dev = profile_file(tmp_path, max_batch_size=2, max_seq_len=16, checkpoint_every=3)
    with pytest.raises(ConfigError, match="max_length 32 exceeds .*max_seq_len 16") as e:
        finetune(cfg(bundle, data, tmp_path / "a", device=dev), log=Log(), progress=False)
    assert "--max-length 16" in e.value.fix
    with pytest.raises(ConfigError, match="micro_batch_size 4 exceeds .*max_batch_size 2"):
        finetune(
            cfg(bundle, data, tmp_path / "b", device=dev, max_length=16, micro_batch_size=4),
            log=Log(),
            progress=False,
        )
    log = Log()
    s = finetune(
        cfg(
            bundle, data, tmp_path / "c", device=dev, max_length=16, steps=3, checkpoint_every=None
        ),
        log=log,
        progress=False,
    )
    assert s.steps == 3
    assert "batch_size 4 exceeds the micro-batch of 2" in log.text
    assert "2 forward calls" in log.text
    assert "checkpoint every 3 steps" in log.text  # the profile's, as the config left it unset


def test_micro_batching_gives_the_same_step(bundle, data, tmp_path):
    """A batch of 4 in micro-batches of 1, 2 or 3 rows. The ZO step is the same function of
    the per-example losses, but ONNX Runtime (MLAS GEMM blocking depends on the row count)
    rounds a row's loss differently in its last bits at another batch shape: measured ~1 ulp
    of the float32 loss, ~1e-5 relative in the projected gradient. So: losses to 1e-6, the
    trained update to 1e-3 of its size — and bit-identical only where the losses are."""
    from edgezo.data import BatchStream, read_jsonl, tokenize
    from edgezo.runner import LossRunner, RuntimeOptions
    from edgezo.train import BATCH_INPUTS
    from edgezo.zo.params import FlatParams

    b = load_bundle(bundle)
    params = FlatParams(b.manifest.trainable)
    params.load(b.initial_trainable())
    ex = tokenize(read_jsonl(data[0]), b.tokenizer(), b.manifest.tokenizer, 32)
    batch = BatchStream(ex, 4, 0, b.manifest.tokenizer.pad_token_id).batch(0)
    whole = LossRunner(b.model_path, params, BATCH_INPUTS, RuntimeOptions(threads=1))
    ref = whole.losses(batch)
    for micro in (1, 2, 3):
        r = LossRunner(
            b.model_path, params, BATCH_INPUTS, RuntimeOptions(threads=1, micro_batch=micro)
        )
        got = r.losses(batch)
        assert r.forward_calls == -(-4 // micro)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    bitwise = all(
        np.array_equal(
            LossRunner(
                b.model_path, params, BATCH_INPUTS, RuntimeOptions(threads=1, micro_batch=m)
            ).losses(batch),
            ref,
        )
        for m in (1, 2)
    )
    a = finetune(cfg(bundle, data, tmp_path / "whole", steps=8), log=Log(), progress=False)
    m = finetune(
        cfg(bundle, data, tmp_path / "micro", steps=8, micro_batch_size=2),
        log=Log(),
        progress=False,
    )
    ta, tm = tensors(a), tensors(m)
    t0 = b.initial_trainable()
    moved = max(float(np.max(np.abs(ta[k] - t0[k]))) for k in ta)
    diff = max(float(np.max(np.abs(tm[k] - ta[k]))) for k in ta)
    assert moved > 1e-3 and diff <= 1e-3 * moved, (diff, moved)
    ga, gm = (
        [r["g"][0] for r in map(json.loads, (Path(x.out) / "ledger.jsonl").open()) if "g" in r]
        for x in (a, m)
    )
    np.testing.assert_allclose(gm, ga, rtol=1e-3)
    if bitwise:
        assert same_bits(ta, tm)
    assert a.train_evaluations == m.train_evaluations == 16  # evaluations, not forward calls


def test_eval_budget_stops_with_checkpoint_and_resume_is_bit_identical(
    bundle, data, tmp_path, reference
):
    out = tmp_path / "run"
    log = Log()
    s = finetune(cfg(bundle, data, out, eval_budget=10), log=log, progress=False)
    assert (s.steps, s.stop_reason, s.train_evaluations) == (5, "eval_budget", 10)
    assert "budget of 10 forward evaluations is spent" in log.text
    assert f"--resume --out {out}" in log.text
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "eval_budget"
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), framework="numpy") as f:
        assert f.metadata()["step"] == "5"
    s = finetune(cfg(bundle, data, out, eval_budget=13), resume=True, log=Log(), progress=False)
    assert (s.steps, s.stop_reason) == (11, "eval_budget")  # 6 steps of 2: 12 <= 13 < 14
    s = finetune(cfg(bundle, data, out), resume=True, log=Log(), progress=False)
    assert (s.steps, s.stop_reason) == (12, "completed")
    assert same_bits(tensors(out), tensors(reference))


def test_time_budget_from_the_profile_stops_each_session(bundle, data, tmp_path, reference):
    dev = profile_file(tmp_path, time_budget_s=0.001)  # every session: one step, then stop
    out = tmp_path / "run"
    s = finetune(cfg(bundle, data, out, device=dev, steps=12), log=Log(), progress=False)
    assert (s.steps, s.stop_reason) == (1, "time_budget")
    s = finetune(cfg(bundle, data, out, time_budget_s=3600), resume=True, log=Log(), progress=False)
    assert (s.steps, s.stop_reason) == (12, "completed")
    assert same_bits(tensors(out), tensors(reference))


def test_eval_budget_below_one_step_is_an_error(bundle, data, tmp_path):
    with pytest.raises(ConfigError, match="eval_budget 1 is less than one step's 2"):
        finetune(cfg(bundle, data, tmp_path / "r", eval_budget=1), log=Log(), progress=False)


def test_profile_that_cannot_fit_batch_one(bundle, data, tmp_path):
    dev = profile_file(tmp_path, memory_budget_mb=5)
    with pytest.raises(
        ConfigError, match="does not fit --device test-board even at micro-batch 1"
    ) as e:
        finetune(cfg(bundle, data, tmp_path / "r", device=dev), log=Log(), progress=False)
    assert "int4" in e.value.fix
    assert not (tmp_path / "r" / "ledger.jsonl").exists()  # nothing written to resume


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "edgezo.cli", *args], capture_output=True, text=True
    )


def test_unknown_device_and_malformed_profile(bundle, data, tmp_path):
    r = cli(
        "finetune",
        "--bundle",
        str(bundle),
        "--data",
        str(data[0]),
        "--out",
        str(tmp_path / "a"),
        "--device",
        "jetson-orin-nanoo",
        "--steps",
        "1",
    )
    assert r.returncode == 2
    assert "did you mean 'jetson-orin-nano'" in r.stderr and "laptop-cpu" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "name": "bad",
                "description": "x",
                "family": "test",
                "memory_budget_mb": 0,
                "providers": ["CUDA"],
                "max_batch": 4,
            }
        )
    )
    r = cli(
        "finetune",
        "--bundle",
        str(bundle),
        "--data",
        str(data[0]),
        "--out",
        str(tmp_path / "b"),
        "--device",
        str(bad),
        "--steps",
        "1",
    )
    assert r.returncode == 2
    assert "unknown key 'max_batch' (did you mean 'max_batch_size'?)" in r.stderr
    assert not (tmp_path / "b").exists()
