"""``edgezo plan`` counts a frozen-prefix split's cached rows: in memory within
cache_prefix_mb, on disk (memory-mapped, not in the peak) past it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.device.plan import estimate, prefix_row_bytes  # noqa: E402


def test_plan_counts_prefix_rows_in_memory_or_on_disk(make_bundle):
    b = load_bundle(make_bundle("lora", lora_layers="last:1", lora_freeze_a=True))
    st = b.manifest.stages
    assert st and st["cached_shapes"]
    # the tiny Llama caches its hidden states entering block 1: 32 floats per token
    assert prefix_row_bytes(b, tokens=1000, examples=10) == pytest.approx(4 * 32 * 1000)
    assert prefix_row_bytes(load_bundle(make_bundle("lora")), 1000, 10) is None  # no split
    kw = dict(device="x", budget_mb=10**6, batch_size=4, max_length=64, micro_batch=4)
    kw.update(optim_buffers=0, inplace=False)
    none = estimate(b, **kw)
    rows = 4 * 32 * 10**6 / 2**20  # a million tokens: 122 MiB
    ram = estimate(b, data_tokens=(10**6, 10**4), cache_prefix_mb=1024, **kw)
    disk = estimate(b, data_tokens=(10**6, 10**4), cache_prefix_mb=10, **kw)
    assert ram.prefix_rows_where == "memory" and ram.peak_mb == pytest.approx(
        none.peak_mb + rows, rel=1e-6
    )
    assert disk.prefix_rows_where == "disk" and disk.peak_mb == pytest.approx(none.peak_mb)
    assert disk.prefix_rows_mb == pytest.approx(rows) and "on disk" in disk.report()


def test_plan_cli_reads_the_data(make_bundle, memo_data, tmp_path):
    bundle = make_bundle("lora", lora_layers="last:1", lora_freeze_a=True)
    base = [sys.executable, "-m", "edgezo.cli", "plan", "--bundle", str(bundle)]
    base += ["--device", "laptop-cpu", "--no-dry-run", "--json", "--data", str(memo_data[0])]
    r = subprocess.run(base, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prefix_rows_where"] == "memory" and out["prefix_rows_mb"] > 0
    r = subprocess.run([*base, "--cache-prefix-mb", "1e-6"], capture_output=True, text=True)
    assert json.loads(r.stdout)["prefix_rows_where"] == "disk"
