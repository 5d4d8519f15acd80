"""The ledger and checkpoint files: exact round trips, torn writes repaired, and every corrupt,
foreign or hostile line an error naming its line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgezo.errors import CheckpointError, EdgezoWarning
from edgezo.zo.checkpoint import checksum, load_checkpoint, load_tensors, save_tensors_atomic
from edgezo.zo.ledger import Ledger

HEADER = {"bundle": "fp2-0123456789abcdef", "bundle_path": "b", "engine": {"seed": 0}}


def rec(step):
    return {
        "step": step,
        "lr": 0.1,
        "mu": 0.01,
        "losses": [1.0 / 3, 2.0 / 7],
        "g": [0.1 + step],
        "status": "ok",
    }


def ledger(path, n=3, header=HEADER):
    led = Ledger.create(path, header)
    for t in range(n):
        led.append(rec(t))
    led.close()
    return path


def test_round_trip_is_exact(tmp_path):
    back = Ledger.read(ledger(tmp_path / "l.jsonl"))
    assert back.header["bundle"] == HEADER["bundle"]
    assert back.records == [rec(t) for t in range(3)]  # floats round-trip exactly, no chain
    assert back.chained and back.chain_at(3) != back.chain_at(2)


def test_refuses_to_overwrite(tmp_path):
    Ledger.create(tmp_path / "l.jsonl", HEADER)
    with pytest.raises(CheckpointError, match="already exists"):
        Ledger.create(tmp_path / "l.jsonl", HEADER)


@pytest.mark.parametrize(
    "tail", [json.dumps(rec(2))[:20], json.dumps(rec(2)), "\xff\xfe garbage"], ids=str
)
def test_torn_last_line_is_dropped_and_repaired(tmp_path, tail):
    """Whatever follows the last newline is a write cut off by a crash — even valid JSON, and
    bytes that are not UTF-8 — and is dropped; repair truncates it so appends line up."""
    p = ledger(tmp_path / "l.jsonl", 2)
    with open(p, "ab") as f:
        f.write(tail.encode("latin-1") if tail.startswith("\xff") else tail.encode())
    assert len(Ledger.read(p).records) == 2  # a reader without repair leaves the file alone
    back = Ledger.read(p, repair=True)
    assert len(back.records) == 2
    back.append(rec(2))
    back.close()
    assert Ledger.read(p).records == [rec(t) for t in range(3)]


def test_a_header_cut_off_at_creation(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"kind": "edgezo-led')
    with pytest.raises(CheckpointError, match="(?s)no complete header.*start the run again"):
        Ledger.read(p)


def bad_line(tmp_path, line: bytes, at: int = 2):
    """The ledger of three records with its line ``at`` replaced by ``line``."""
    p = ledger(tmp_path / "l.jsonl")
    lines = p.read_bytes().split(b"\n")
    lines[at - 1] = line
    p.write_bytes(b"\n".join(lines))
    return p


@pytest.mark.parametrize(
    "line,match",
    [
        (b"{bad", r"l\.jsonl:2 is not valid JSON"),
        (b"[1, 2]", r"l\.jsonl:2 is a JSON list, not an object"),
        (b"null", r"l\.jsonl:2 is a JSON null, not an object"),
        (b'{"step": 0, "lr": 0.1, \xff}', r"l\.jsonl:2 is not UTF-8"),
        (b"", r"l\.jsonl:2 is empty"),
        (b"[" * 100_000, r"l\.jsonl:2 (nests too deeply|is not valid JSON)"),
    ],
)
def test_lines_that_are_not_objects(tmp_path, line, match):
    with pytest.raises(CheckpointError, match=match) as e:
        Ledger.read(bad_line(tmp_path, line))
    assert "backup" in e.value.fix


def unchained(tmp_path, records, header=HEADER):
    """A version 1 ledger (no chain) holding ``records``: the field checks, without the
    chain check that would catch every edit first."""
    p = tmp_path / "v1.jsonl"
    head = {"kind": "edgezo-ledger", "version": 1, **header}
    p.write_text("".join(json.dumps(x) + "\n" for x in [head, *records]))
    return p


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"losses": None}, r"v1\.jsonl:3 has no list of numbers under 'losses'"),
        ({"losses": ["x"]}, r"v1\.jsonl:3 has no list of numbers under 'losses'"),
        ({"g": "1"}, r"v1\.jsonl:3 has no list of numbers under 'g'"),
        ({"lr": None}, r"v1\.jsonl:3 has lr None"),
        ({"mu": float("nan")}, r"v1\.jsonl:3 has mu nan"),
        ({"status": "great"}, r"v1\.jsonl:3 has status 'great'"),
        ({"step": "1"}, r"v1\.jsonl:3 has no step number"),
        ({"step": True}, r"v1\.jsonl:3 has no step number"),
        ({"step": 5}, r"v1\.jsonl:3 is step 5, expected 1"),
        ({"status": "rollback", "to": 4, "lr_scale": 0.5}, r"rolls back to 4"),
        ({"status": "rollback", "to": 0, "lr_scale": float("inf")}, r"lr_scale inf"),
        ({"status": "ok", "losses": []}, "without losses"),
        ({"heldout": "low"}, r"v1\.jsonl:3 has heldout 'low', not a number"),
    ],
)
def test_records_lacking_what_replay_reads(tmp_path, edit, match):
    records = [rec(0), {**rec(1), **edit}]
    with pytest.raises(CheckpointError, match=match):
        Ledger.read(unchained(tmp_path, records))


def test_a_version_1_ledger_still_reads_and_stays_version_1(tmp_path):
    p = unchained(tmp_path, [rec(0), rec(1)])
    led = Ledger.read(p)
    assert led.records == [rec(0), rec(1)] and not led.chained
    led.append(rec(2))
    led.close()
    assert '"chain"' not in p.read_text()
    assert Ledger.read(p).records == [rec(t) for t in range(3)]


@pytest.mark.parametrize(
    "header,match",
    [
        ({"kind": "other", "version": 2}, "is not an edgezo ledger"),
        ({"kind": "edgezo-ledger", "version": 9}, "ledger version 9, this edgezo reads 1, 2"),
        ({"kind": "edgezo-ledger", "version": 2}, "has no bundle fingerprint"),
        (
            {"kind": "edgezo-ledger", "version": 2, "bundle": "x", "engine": {"seed": 0}},
            "has no bundle_path",
        ),
        ({"kind": "edgezo-ledger", "version": 2, "bundle": "x", "bundle_path": "b"}, "no engine"),
        (
            {**HEADER, "kind": "edgezo-ledger", "version": 2, "engine": {"seed": -1}},
            "seed is -1",
        ),
        (
            {**HEADER, "kind": "edgezo-ledger", "version": 2, "heldout_before": None},
            "heldout_before None",
        ),
        (
            {**HEADER, "kind": "edgezo-ledger", "version": 2, "engine": {"seed": 0, "q": "2"}},
            "q is '2'",
        ),
        (
            {**HEADER, "kind": "edgezo-ledger", "version": 2, "engine": {"seed": 0, "x": 1}},
            "does not know",
        ),
        (
            {
                **HEADER,
                "kind": "edgezo-ledger",
                "version": 2,
                "engine": {"seed": 0, "direction": "uniform"},
            },
            "direction is 'uniform'",
        ),
    ],
)
def test_headers_lacking_what_replay_reads(tmp_path, header, match):
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps(header) + "\n")
    with pytest.raises(CheckpointError, match=match):
        Ledger.read(p)


def test_a_line_from_another_run_breaks_the_chain(tmp_path):
    """The probe's silent case: another run's record, with the right step number, appended
    after the checkpoint. Every field is valid; only the chain tells."""
    a = ledger(tmp_path / "a.jsonl", 2)
    other = {**HEADER, "engine": {"seed": 1}}
    b = ledger(tmp_path / "b.jsonl", 3, header=other)
    foreign = b.read_bytes().split(b"\n")[3]  # b's step 2
    with open(a, "ab") as f:
        f.write(foreign + b"\n")
    with pytest.raises(CheckpointError, match=r"a\.jsonl:4 does not follow the lines before it"):
        Ledger.read(a)


@pytest.mark.parametrize("what", ["edit", "swap", "drop"])
def test_edited_moved_or_removed_lines_break_the_chain(tmp_path, what):
    p = ledger(tmp_path / "l.jsonl", 4)
    lines = p.read_text().splitlines()
    if what == "edit":  # a loss changed in its last digit: every field still valid
        lines[2] = lines[2].replace("0.3333333333333333", "0.3333333333333334")
    elif what == "swap":
        lines[2], lines[3] = lines[3], lines[2]
    else:
        del lines[2]  # (dropping the last lines leaves a valid shorter ledger: a checkpoint
        # ahead of it is what the resume refuses)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="does not follow|is step"):
        Ledger.read(p)


def test_federation_ledgers_need_no_run_fields(tmp_path):
    header = {"bundle": "x", "engine": {"seed": 0}, "federation": "abc", "client": "c1"}
    led = Ledger.create(tmp_path / "f.jsonl", header)
    led.append({"step": 0, "round": 0, "status": "empty", "seeds": [], "g": [], "lr": 0.1})
    led.close()
    assert Ledger.read(tmp_path / "f.jsonl").records[0]["status"] == "empty"


def test_appends_are_visible_at_once_and_fsynced_in_groups(tmp_path, monkeypatch):
    import edgezo.zo.ledger as ledger_mod

    calls = []
    real = os.fsync
    monkeypatch.setattr(ledger_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    led = Ledger.create(tmp_path / "l.jsonl", HEADER)
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


# -- checkpoints and tensor files ---------------------------------------------------------------


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


def tensors():
    rng = np.random.default_rng(0)
    return {
        "master": rng.standard_normal(1000).astype(np.float32),
        "optim.momentum": rng.standard_normal(1000).astype(np.float32),
        "optim.adam_t": np.array([3], np.int64),
    }


def test_a_bit_flip_anywhere_in_the_data_is_an_error(tmp_path):
    p = save_tensors_atomic(tmp_path / "c.safetensors", tensors(), {"bundle": "a", "step": "3"})
    raw = p.read_bytes()
    for offset in (len(raw) - 1, len(raw) - 2000, len(raw) - 4005):  # 3 tensors' data
        flipped = bytearray(raw)
        flipped[offset] ^= 0x10
        p.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match="does not match the checksum") as e:
            load_checkpoint(p, "a")
        assert "rebuilds the state from the ledger" in e.value.fix


def test_the_checksum_covers_the_metadata(tmp_path):
    p = save_tensors_atomic(tmp_path / "c.safetensors", tensors(), {"bundle": "a", "step": "3"})
    p.write_bytes(p.read_bytes().replace(b'"step":"3"', b'"step":"2"'))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(p, "a")


def test_identical_tensors_give_identical_files_across_processes(tmp_path):
    """safetensors' own writer orders the metadata by a per-process hash map."""
    code = (
        "import sys, numpy as np\n"
        "from edgezo.zo.checkpoint import save_tensors_atomic\n"
        "t = {n: np.arange(7, dtype=np.float32) * i for i, n in enumerate('zyxabc')}\n"
        "meta = {k: str(len(k)) for k in ['step', 'bundle', 'guard_best', 'guard_step', 'a']}\n"
        "save_tensors_atomic(sys.argv[1], t, meta)\n"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors.numpy import load_file  # and the library reads what we wrote

    assert load_file(str(files[0]))["z"].tolist() == [0.0] * 7


def test_a_file_without_checksum_loads_with_a_note(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "old.safetensors"
    save_file({"master": np.ones(3, np.float32)}, str(p), metadata={"bundle": "a", "step": "2"})
    with pytest.warns(EdgezoWarning, match="carries no checksum"):
        assert load_checkpoint(p, "a")[1] == 2


@pytest.mark.parametrize(
    "content,match",
    [(b"", "cannot read"), (b"\x10" + b"\0" * 7 + b"{}", "cannot read"), (b"x" * 100, "cannot")],
)
def test_unreadable_tensor_files(tmp_path, content, match):
    p = tmp_path / "c.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_tensors(p, "checkpoint")


def test_a_checkpoint_without_master_or_step(tmp_path):
    p = save_tensors_atomic(tmp_path / "c.safetensors", {"x": np.ones(2, np.float32)}, {})
    with pytest.raises(CheckpointError, match="lacks its step"):
        load_checkpoint(p, None)


def test_checksum_is_order_independent_and_names_count():
    t = tensors()
    assert checksum(t, {"a": "1", "b": "2"}) == checksum(
        dict(reversed(t.items())), {"b": "2", "a": "1"}
    )
    renamed = {("x" if k == "master" else k): v for k, v in t.items()}
    assert checksum(renamed, {}) != checksum(t, {})
