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
from edgezo.device.plan import estimate, prefix_row_bytes, prefix_row_widths  # noqa: E402


def test_plan_counts_prefix_rows_in_memory_or_on_disk(make_bundle, memo_data):
    from edgezo import prefix_cache
    from edgezo.data import read_jsonl, tokenize_for
    from edgezo.runner import RuntimeOptions

    b = load_bundle(make_bundle("lora", lora_layers="last:1", lora_freeze_a=True))
    assert b.manifest.stages and b.manifest.stages["cached_shapes"]
    # the plan's count is the bytes the cache really holds for these examples
    examples = tokenize_for(b.manifest, read_jsonl(memo_data[0]), b.tokenizer(), 32)
    pad = b.manifest.tokenizer.pad_token_id
    (rows,), _ = prefix_cache.cache_rows(b, [examples], 8, pad, RuntimeOptions(threads=1))
    held = prefix_cache.rows_mb([rows]) * 2**20
    widths = prefix_row_widths(b)
    lengths = [len(e.input_ids) for e in examples]
    assert prefix_row_bytes(widths, lengths) == pytest.approx(held, rel=1e-9)
    assert prefix_row_widths(load_bundle(make_bundle("lora"))) == {}  # no split
    kw = dict(device="x", budget_mb=10**6, batch_size=4, max_length=64, micro_batch=4)
    kw.update(optim_buffers=0, inplace=False)
    none = estimate(b, **kw)
    rows = prefix_row_bytes(widths, [100] * 10**4) / 2**20
    ram = estimate(b, prefix_rows=rows * 2**20, cache_prefix_mb=rows + 1, **kw)
    disk = estimate(b, prefix_rows=rows * 2**20, cache_prefix_mb=rows / 2, **kw)
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
