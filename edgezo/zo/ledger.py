"""The ledger: an append-only, fsync'd (group-committed) JSONL record of every step.

Line 1 is a header: the bundle's fingerprint and the run settings that determine θ's
arithmetic (direction kind, estimator, q, optimiser, seed, perturbation mode). Every further
line is one step::

    {"step": 12, "lr": 0.001, "mu": 0.01, "losses": [2.31, 2.29], "g": [1.0], "status": "ok"}

Floats are written with Python's shortest round-trip repr, so reading them back gives the exact
float64 values: replaying the ledger on the base bundle rebuilds θ bit for bit. A line cut off
by a crash is dropped (and the file truncated to its last complete line) on resume.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..atomic import fsync_dir
from ..errors import CheckpointError

LEDGER_VERSION = 1
#: group commit: every append is flushed to the OS at once (a killed process loses nothing);
#: fsync, which costs milliseconds, runs at most this often and always before a checkpoint
#: and on close — so a power cut loses at most this much of the newest steps, and a
#: checkpoint is never ahead of the durable ledger.
SYNC_INTERVAL_S = 0.25


class Ledger:
    def __init__(self, path: Path, header: dict[str, Any], records: list[dict[str, Any]]):
        self.path = path
        self.header = header
        self.records = records
        self._f = None
        self._synced = time.monotonic()

    @classmethod
    def create(cls, path: str | Path, header: dict[str, Any]) -> Ledger:
        path = Path(path)
        if path.exists():
            raise CheckpointError(
                f"ledger {path} already exists",
                "resume the run with --resume, or use another --out",
            )
        header = {"kind": "edgezo-ledger", "version": LEDGER_VERSION, **header}
        with open(path, "x", encoding="utf-8") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)
        return cls(path, header, [])

    @classmethod
    def read(cls, path: str | Path, repair: bool = False) -> Ledger:
        """Read a ledger; with ``repair`` truncate a torn last line left by a crash."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ledger {path} does not exist", "check the run folder")
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        good_bytes = 0
        parsed: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            if not line:
                good_bytes += 1 if i < len(lines) - 1 else 0
                continue
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # torn final line: the step never completed
                    break
                raise CheckpointError(
                    f"{path}:{i + 1} is not valid JSON: the ledger is corrupted",
                    "restore the run folder from a backup; a ledger is never edited by hand",
                ) from None
            good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
        if not parsed or parsed[0].get("kind") != "edgezo-ledger":
            raise CheckpointError(f"{path} is not an edgezo ledger", "check the run folder")
        header = parsed[0]
        if header.get("version") != LEDGER_VERSION:
            raise CheckpointError(
                f"{path} has ledger version {header.get('version')}, this edgezo reads "
                f"{LEDGER_VERSION}",
                "replay it with the edgezo version that wrote it",
            )
        records = parsed[1:]
        for k, r in enumerate(records):
            if r.get("step") != k:
                raise CheckpointError(
                    f"{path}: record {k + 2} is step {r.get('step')}, expected {k}: the ledger "
                    "has a gap or was edited",
                    "restore the run folder from a backup",
                )
        if repair and good_bytes < len(raw):
            with open(path, "r+b") as f:
                f.truncate(good_bytes)
                f.flush()
                os.fsync(f.fileno())
        return cls(path, header, records)

    def append(self, record: dict[str, Any]) -> None:
        if record.get("step") != len(self.records):
            raise CheckpointError(
                f"ledger append out of order: step {record.get('step')} after "
                f"{len(self.records)} records",
                "this is a bug in edgezo; please report it",
            )
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()  # in the OS's hands: a killed process loses nothing
        self.records.append(record)
        if time.monotonic() - self._synced >= SYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        """fsync what was appended: durable against power loss too."""
        if self._f is not None:
            os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._f is not None:
            self.sync()
            self._f.close()
            self._f = None
