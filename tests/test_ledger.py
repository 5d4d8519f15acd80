import json
import os

import numpy as np
import pytest

from edgezo.errors import CheckpointError
from edgezo.zo.checkpoint import load_checkpoint, save_tensors_atomic
from edgezo.zo.ledger import Ledger


def rec(step):
    return {
        "step": step,
        "lr": 0.1,
        "mu": 0.01,
        "losses": [1.0 / 3, 2.0 / 7],
        "g": [0.1 + step],
        "status": "ok",
    }


def test_round_trip_is_exact(tmp_path):
    led = Ledger.create(tmp_path / "l.jsonl", {"bundle": "abc"})
    for t in range(3):
        led.append(rec(t))
    led.close()
    back = Ledger.read(tmp_path / "l.jsonl")
    assert back.header["bundle"] == "abc"
    assert back.records == [rec(t) for t in range(3)]  # floats round-trip exactly


def test_refuses_to_overwrite(tmp_path):
    Ledger.create(tmp_path / "l.jsonl", {})
    with pytest.raises(CheckpointError, match="already exists"):
        Ledger.create(tmp_path / "l.jsonl", {})


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    p = tmp_path / "l.jsonl"
    led = Ledger.create(p, {})
    led.append(rec(0))
    led.append(rec(1))
    led.close()
    with open(p, "a") as f:
        f.write(json.dumps(rec(2))[:20])  # killed mid-write
    back = Ledger.read(p, repair=True)
    assert len(back.records) == 2
    back.append(rec(2))
    back.close()
    assert len(Ledger.read(p).records) == 3


def test_gap_or_garbage_is_an_error(tmp_path):
    p = tmp_path / "l.jsonl"
    led = Ledger.create(p, {})
    led.append(rec(0))
    led.close()
    with open(p, "a") as f:
        f.write(json.dumps(rec(2)) + "\n")
    with pytest.raises(CheckpointError, match="gap"):
        Ledger.read(p)
    p.write_text('{"kind": "edgezo-ledger", "version": 1}\n{bad\n' + json.dumps(rec(0)) + "\n")
    with pytest.raises(CheckpointError, match=r"l\.jsonl:2 is not valid JSON"):
        Ledger.read(p)


def test_checkpoint_belongs_to_its_bundle(tmp_path):
    p = save_tensors_atomic(
        tmp_path / "c.safetensors",
        {"master": np.ones(4, np.float32)},
        metadata={"bundle": "aaa", "step": "7"},
    )
    tensors, step = load_checkpoint(p, "aaa")
    assert step == 7 and tensors["master"].tolist() == [1, 1, 1, 1]
    with pytest.raises(CheckpointError, match="belongs to bundle aaa"):
        load_checkpoint(p, "bbb")
    assert [x.name for x in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left


def test_appends_are_visible_at_once_and_fsynced_in_groups(tmp_path, monkeypatch):
    import edgezo.zo.ledger as ledger_mod

    calls = []
    real = os.fsync
    monkeypatch.setattr(ledger_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    led = Ledger.create(tmp_path / "l.jsonl", {"bundle": "x"})
    calls.clear()
    for k in range(200):
        led.append(rec(k))
    # another reader (a resumed run after a kill) sees every appended record at once
    assert len(Ledger.read(tmp_path / "l.jsonl").records) == 200
    assert len(calls) < 20  # group commit: not one fsync per step
    led.sync()
    assert len(calls) >= 1
    n = len(calls)
    led.close()
    assert len(calls) == n + 1  # close makes the tail durable
