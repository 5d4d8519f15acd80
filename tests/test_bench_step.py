"""tools/bench_step.py on the tiny model: the cached-suffix step and the PyTorch MeZO side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")


def test_bench_step_suffix_and_mezo(make_bundle, tiny_hf_dir):
    bundle = make_bundle("lora", lora_layers="last:1", lora_freeze_a=True, precision="int8")
    args = ["--batch", "2", "--seq", "12", "--steps", "2", "--forwards", "2", "--threads", "1"]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_step.py"),
            "--bundle",
            str(bundle),
            *args,
            "--suffix",
            "--torch-mezo",
            "--model",
            str(tiny_hf_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["step_s"] > 0 and figures["mezo_step_s"] > 0
    assert figures["steps_per_s_vs_mezo"] == pytest.approx(
        figures["mezo_step_s"] / figures["step_s"]
    )
    assert "suffix.onnx on cached rows" in proc.stdout and "PyTorch MeZO step" in proc.stdout
