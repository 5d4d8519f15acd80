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


def _stages_calibration(**kw):
    mib = 2**20
    c = dict(
        base=100 * mib,
        prefix_loaded=300 * mib,
        prefix_load_peak=320 * mib,
        prefix_peak=340 * mib,
        released=150 * mib,
        suffix_loaded=300 * mib,
        loaded=320 * mib,
        load_peak=330 * mib,
        eval_peak=400 * mib,
        train_peak=380 * mib,
        feed_bytes=0,
        vocab_session=True,
        shapes={"cache": 4, "eval": 4, "train": 4, "seq": 64},
        peak_reset=True,
        params_bytes=0,
    )
    c.update(kw)
    return c


def test_staged_estimate_is_the_larger_of_its_phases(make_bundle):
    from edgezo.device.plan import estimate_staged

    b = load_bundle(make_bundle("lora", lora_layers="last:1", lora_freeze_a=True))
    kw = dict(device="x", budget_mb=10**6, batch_size=4, max_length=64, micro_batch=4)
    kw.update(eval_batch=4, optim_buffers=1, inplace=False, vocab_rows=100)
    mib = 2**20
    dim = b.manifest.trainable_size
    theta = (4 * dim * 2 + 3 * 4 * (1 << 20) * min(1.0, dim / (1 << 20))) / mib
    optim = 4 * dim / mib
    # the training phase: sessions 320 + held-out forward +80 (larger than training's +60)
    p = estimate_staged(b, _stages_calibration(), **kw)
    assert p.staged and p.calibrated and "dry run of the cached run's phases" in p.report()
    assert p.parts_mb["(prefix phase)"] == pytest.approx(340 + theta)
    assert p.parts_mb["(training phase)"] == pytest.approx(320 + theta + optim + 80)
    assert p.peak_mb == pytest.approx(400 + theta + optim)
    assert any("over 100 head rows" in k for k in p.parts_mb)
    # a prefix session larger than the suffix's: the prefix phase is the peak
    big = estimate_staged(
        b, _stages_calibration(prefix_loaded=700 * mib, prefix_peak=760 * mib), **kw
    )
    assert big.peak_mb == pytest.approx(760 + theta)
    # rows count in both phases in memory, in neither on disk
    ram = estimate_staged(b, _stages_calibration(), prefix_rows=50 * mib, cache_prefix_mb=60, **kw)
    disk = estimate_staged(b, _stages_calibration(), prefix_rows=50 * mib, cache_prefix_mb=10, **kw)
    assert ram.peak_mb == pytest.approx(p.peak_mb + 50)
    assert ram.parts_mb["(prefix phase)"] == pytest.approx(p.parts_mb["(prefix phase)"] + 50)
    assert disk.peak_mb == pytest.approx(p.peak_mb) and disk.prefix_rows_where == "disk"
    # the probe's own feed rows are not the run's: left out of the sessions
    fed = estimate_staged(b, _stages_calibration(feed_bytes=20 * mib), **kw)
    assert fed.parts_mb["(training phase)"] == pytest.approx(p.parts_mb["(training phase)"] - 20)


def test_plan_dry_run_measures_the_cached_runs_phases(make_bundle, memo_data):
    from edgezo.data import read_jsonl, tokenize_for
    from edgezo.device.plan import make_plan, vocab_rows_for
    from edgezo.device.resolve import load_profile

    b = load_bundle(make_bundle("lora", lora_layers="last:1", lora_freeze_a=True))
    assert b.manifest.stages.get("vocab")
    profile = load_profile("laptop-cpu").with_overrides({"threads": 1})
    train = tokenize_for(b.manifest, read_jsonl(memo_data[0]), b.tokenizer(), 32)
    rows = vocab_rows_for(b, 3, 2, train)
    assert 0 < rows < b.manifest.vocab_size
    assert vocab_rows_for(b, 0, 2, train) == 0  # the subset off
    assert vocab_rows_for(b, b.manifest.vocab_size, 0, train) == 0  # the whole vocabulary
    kw = dict(batch_size=4, max_length=32, data_lengths=[len(e.input_ids) for e in train])
    staged = make_plan(b, profile, eval_batch=4, vocab_rows=rows, **kw)
    assert staged.staged and staged.calibrated
    assert any("vocabulary-subset session" in k for k in staged.parts_mb)
    assert staged.parts_mb["prefix phase: runtime + prefix session (measured)"] > 0
    assert staged.peak_mb >= max(
        staged.parts_mb["(prefix phase)"], staged.parts_mb["(training phase)"]
    )
    whole = make_plan(b, profile, eval_batch=4, vocab_rows=0, **kw)
    assert whole.staged and not any("vocabulary-subset" in k for k in whole.parts_mb)
    full = make_plan(b, profile, cache_prefix=False, **kw)  # no caching: the full graph
    assert not full.staged and full.calibrated and full.prefix_rows_mb is None
