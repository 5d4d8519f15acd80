"""tools/bench_forward.py --quick on the tiny model: the table's structure and finite values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")


def test_bench_forward_quick(make_bundle, tiny_hf_dir, tmp_path):
    fp32 = make_bundle("lora", lora_layers="last:1", lora_freeze_a=True)
    int8 = make_bundle("lora", lora_layers="last:1", lora_freeze_a=True, precision="int8")
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench_forward.py"),
            "--quick",
            "--bundle",
            f"fp32={fp32}",
            "--bundle",
            str(int8),
            "--model",
            str(tiny_hf_dir),
            "--suffix",
            "--profile",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == [
        "edgezo fp32",
        "edgezo fp32 suffix",
        "edgezo int8",
        "edgezo int8 suffix",
        "pytorch fp32",
        "pytorch autocast",
        "pytorch bf16",
    ]
    for r in rows.values():
        assert "error" not in r, r
        assert len(r["times"]) == 2 and all(t > 0 for t in r["times"])
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        if r["graph"] == "model":
            assert math.isfinite(r["heldout"]) and r["heldout"] > 0
    # the same model, fp32 on both frameworks: the same held-out loss
    assert abs(rows["edgezo fp32"]["heldout"] - rows["pytorch fp32"]["heldout"]) < 1e-3
    # the int8 bundle quantises the prefix of its own graph: a loss near, not equal to, fp32's
    assert rows["edgezo int8"]["heldout"] != rows["edgezo fp32"]["heldout"]
    shares = rows["edgezo fp32"]["profile"]
    assert abs(sum(shares.values()) - 1) < 1e-6 and "MatMul" in shares
    assert "DynamicQuantizeMatMul" in rows["edgezo int8"]["profile"]
    text = proc.stdout
    assert "vs pytorch fp32" in text and "held-out" in text and "profile edgezo int8" in text
