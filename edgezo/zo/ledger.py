"""The ledger: an append-only, fsync'd (group-committed) JSONL record of every step.

Line 1 is a header: the bundle's fingerprint and the run settings that determine θ's
arithmetic (direction kind, estimator, q, optimiser, seed, perturbation mode). Every further
line is one step::

    {"step": 12, "lr": 0.001, "mu": 0.01, "losses": [2.31, 2.29], "g": [1.0], "status": "ok",
     "chain": "5c0f9a1e7d2b4c36"}

Floats are written with Python's shortest round-trip repr, so reading them back gives the exact
float64 values: replaying the ledger on the base bundle rebuilds θ bit for bit.

``chain`` links each line to everything before it: the first 16 hex digits of
sha256(previous chain, the record's JSON without ``chain``), starting from the sha256 of the
header line. A line copied from another run, a line edited, removed or moved, breaks the chain
at that line; :meth:`Ledger.chain_at` gives the value after any step (a checkpoint can record
it). Records in memory never hold ``chain``: it exists on disk only.

:meth:`Ledger.read` checks every line — UTF-8, a JSON object, the fields a step needs, steps in
order, the chain — and reports the first bad one by its line number, with the fix. A last line
cut off by a crash (no newline at its end) is dropped, and with ``repair`` the file is
truncated to the last complete line. The format: docs/reference/ledger-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ..atomic import fsync_dir
from ..errors import CheckpointError

LEDGER_VERSION = 2
#: versions this edgezo reads: 1 (no ``chain``) and 2
READABLE_VERSIONS = (1, 2)
#: group commit: every append is flushed to the OS at once (a killed process loses nothing);
#: fsync, which costs milliseconds, runs at most this often and always before a checkpoint
#: and on close — so a power cut loses at most this much of the newest steps, and a
#: checkpoint is never ahead of the durable ledger.
SYNC_INTERVAL_S = 0.25
CHAIN = "chain"
STATUSES = ("ok", "skipped", "rollback")
RESTORE = "restore the run folder from a backup; a ledger is never edited by hand"


def _digest(previous: str, text: str) -> str:
    return hashlib.sha256(f"{previous}\n{text}".encode()).hexdigest()[:16]


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record)


class Ledger:
    def __init__(self, path: Path, header: dict[str, Any], records: list[dict[str, Any]]):
        self.path = path
        self.header = header
        self.records = records
        self._f = None
        self._synced = time.monotonic()
        # chain after 0, 1, ... records (version 2); empty for a version 1 ledger
        self._chains: list[str] = []

    @property
    def chained(self) -> bool:
        """True when the ledger's lines carry a chain (version 2)."""
        return bool(self._chains)

    def chain_at(self, step: int) -> str | None:
        """The chain value after the first ``step`` records (None for a version 1 ledger)."""
        if not self._chains:
            return None
        return self._chains[step]

    @classmethod
    def create(cls, path: str | Path, header: dict[str, Any]) -> Ledger:
        path = Path(path)
        if path.exists():
            raise CheckpointError(
                f"ledger {path} already exists",
                "resume the run with --resume, or use another --out",
            )
        header = {"kind": "edgezo-ledger", "version": LEDGER_VERSION, **header}
        line = _dumps(header)
        with open(path, "x", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)
        ledger = cls(path, header, [])
        ledger._chains = [_digest("", line)]
        return ledger

    @classmethod
    def read(cls, path: str | Path, repair: bool = False) -> Ledger:
        """Read and check a ledger; with ``repair`` truncate a torn last line left by a crash.

        Raises :class:`CheckpointError` naming the first bad line (``ledger.jsonl:7``).
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ledger {path} does not exist", "check the run folder")
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        # every complete line ends with "\n": what follows the last one is a torn write
        torn, lines = lines[-1], lines[:-1]
        if not lines:
            raise CheckpointError(
                f"{path} holds no complete header line: the run was stopped while it started",
                "delete the run folder and start the run again",
            )
        header = _header(path, _parse(path, 1, lines[0]))
        version = header["version"]
        records: list[dict[str, Any]] = []
        chains = [_digest("", lines[0].decode("utf-8"))] if version >= 2 else []
        run = "federation" not in header
        for i, line in enumerate(lines[1:], start=2):
            if not line.strip():
                raise CheckpointError(f"{path}:{i} is empty: the ledger was edited", RESTORE)
            rec = _parse(path, i, line)
            if version >= 2:
                chain = rec.pop(CHAIN, None)
                expected = _digest(chains[-1], _dumps(rec))
                if chain != expected:
                    raise CheckpointError(
                        f"{path}:{i} does not follow the lines before it (its chain is "
                        f"{chain!r}, {expected!r} was expected): it comes from another run, "
                        "or a line was edited, removed or moved",
                        RESTORE,
                    )
                chains.append(expected)
            _check_record(path, i, rec, len(records), run)
            records.append(rec)
        if repair and torn:
            with open(path, "r+b") as f:
                f.truncate(len(raw) - len(torn))
                f.flush()
                os.fsync(f.fileno())
        ledger = cls(path, header, records)
        ledger._chains = chains
        return ledger

    def append(self, record: dict[str, Any]) -> None:
        if record.get("step") != len(self.records):
            raise CheckpointError(
                f"ledger append out of order: step {record.get('step')} after "
                f"{len(self.records)} records",
                "this is a bug in edgezo; please report it",
            )
        if CHAIN in record:
            raise CheckpointError(
                f"ledger record {record['step']} holds the reserved field {CHAIN!r}",
                "this is a bug in edgezo; please report it",
            )
        text = _dumps(record)
        if self._chains:
            chain = _digest(self._chains[-1], text)
            line = _dumps({**record, CHAIN: chain})
        else:  # a version 1 ledger stays version 1
            chain, line = None, text
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(line + "\n")
        self._f.flush()  # in the OS's hands: a killed process loses nothing
        self.records.append(record)
        if chain is not None:
            self._chains.append(chain)
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


# -- checking what was read -------------------------------------------------------------------


_JSON_NAMES = {list: "list", str: "string", bool: "boolean", type(None): "null"}


def _parse(path: Path, i: int, line: bytes) -> dict[str, Any]:
    """Line ``i`` as a JSON object."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}:{i} is not UTF-8 (byte {e.start + 1} of the line): the ledger is corrupted",
            RESTORE,
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}:{i} is not valid JSON ({e.msg}, column {e.colno}): the ledger is corrupted",
            RESTORE,
        ) from None
    except RecursionError:
        raise CheckpointError(
            f"{path}:{i} nests too deeply: it is not a ledger line", RESTORE
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path}:{i} is a JSON {_JSON_NAMES.get(type(value), 'number')}, not an object: "
            "the ledger is corrupted",
            RESTORE,
        )
    return value


def _header(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    if header.get("kind") != "edgezo-ledger":
        raise CheckpointError(
            f"{path} is not an edgezo ledger (its first line has kind {header.get('kind')!r})",
            "point at the ledger.jsonl of a run folder",
        )
    version = header.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has ledger version {version!r}, this edgezo reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}",
            "replay it with the edgezo version that wrote it",
        )

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}:1 (the header) {what}: the ledger is corrupted", RESTORE)

    if not isinstance(header.get("bundle"), str):
        raise bad("has no bundle fingerprint (a string under 'bundle')")
    if "federation" not in header and not isinstance(header.get("bundle_path"), str):
        raise bad("has no bundle_path (a string)")
    for name in ("heldout_before", "heldout_accuracy_before"):
        if name in header and not _number(header[name]):
            raise bad(f"has {name} {header[name]!r}, not a number")
    engine = header.get("engine")
    if not isinstance(engine, dict):
        raise bad("has no engine settings (a mapping under 'engine')")
    problem = engine_problem(engine)
    if problem:
        raise bad(f"has engine settings that cannot be used: {problem}")
    return header


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _number(x) and math.isfinite(x)


#: the engine settings that are integers, with their least value
_INTEGERS = {
    "seed": 0,
    "q": 1,
    "hizoo_warmup": 0,
    "svrg_period": 1,
    "svrg_anchor_q": 1,
    "svrg_anchor_batches": 1,
}


def engine_problem(engine: dict[str, Any]) -> str | None:
    """What is wrong with a header's engine settings (types and ranges), or None."""
    from .directions import ALL_KINDS
    from .engine import EngineSettings
    from .estimators import ESTIMATORS
    from .optim import HIZOO_ESTIMATES, HIZOO_POOLS, OPTIMIZERS
    from .scales import parse as parse_mu_scale

    known = EngineSettings.__dataclass_fields__
    unknown = sorted(set(engine) - set(known))
    if unknown:
        return (
            f"fields this edgezo does not know: {unknown} (replay it with the newer edgezo that "
            "wrote it)"
        )
    choices = {
        "direction": ALL_KINDS,
        "estimator": tuple(ESTIMATORS),
        "optimizer": tuple(OPTIMIZERS),
        "level_schedule": ("geometric", "zipf"),
        "hizoo_pool": HIZOO_POOLS,
        "hizoo_estimate": HIZOO_ESTIMATES,
    }
    if "seed" not in engine:
        return "no seed"
    for name, value in engine.items():
        if name in choices:
            if value not in choices[name]:
                return f"{name} is {value!r}, not one of {', '.join(choices[name])}"
        elif name in _INTEGERS:
            least = _INTEGERS[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                return f"{name} is {value!r}, not an integer >= {least}"
        elif name == "inplace":
            if not isinstance(value, bool):
                return f"inplace is {value!r}, not true or false"
        elif name == "mu_scale":
            try:
                parse_mu_scale(value if isinstance(value, str) else None)
            except ValueError as e:
                return f"mu_scale is {value!r}: {e}"
            if not isinstance(value, str):
                return f"mu_scale is {value!r}, not a string"
        elif name == "clip":
            if value is not None and not (_finite(value) and value > 0):
                return f"clip is {value!r}, not a positive number or null"
        elif not _finite(value):
            return f"{name} is {value!r}, not a finite number"
    ratio, s = engine.get("level_ratio", 0.5), engine.get("zipf_s", 2.0)
    if not 0.0 < ratio < 1.0 or not s > 1.0 or engine.get("mu_floor", 1.0) <= 0:
        return "level_ratio must be in (0, 1), zipf_s > 1 and mu_floor > 0"
    if not 0.0 <= engine.get("hizoo_beta", 0.0) < 1.0 or engine.get("hizoo_max_scale", 1.0) < 1:
        return "hizoo_beta must be in [0, 1) and hizoo_max_scale >= 1"
    return None


def _check_record(path: Path, i: int, rec: dict[str, Any], k: int, run: bool) -> None:
    """Record ``k`` (line ``i``) has its step in order and, in a run's ledger, the fields a
    replay reads, of the right types. (A federation's records are checked when applied.)"""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}:{i} {what}: the ledger is corrupted or edited", RESTORE)

    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise bad(f"has no step number (got {step!r})")
    if step != k:
        raise CheckpointError(
            f"{path}:{i} is step {step}, expected {k}: the ledger has a gap, a line out of "
            "order, or a line written by another run",
            RESTORE,
        )
    for name in ("heldout", "heldout_accuracy"):  # a held-out evaluation after the step
        if name in rec and not _number(rec[name]):
            raise bad(f"has {name} {rec[name]!r}, not a number")
    status = rec.get("status")
    if status not in STATUSES and run:
        raise bad(f"has status {status!r}, not one of {', '.join(STATUSES)}")
    if not run:
        return
    if status == "rollback":
        to, scale = rec.get("to"), rec.get("lr_scale")
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < step:
            raise bad(f"rolls back to {to!r}, not an earlier step")
        if not (_finite(scale) and scale > 0):
            raise bad(f"has lr_scale {scale!r}, not a positive number")
        return
    for name in ("lr", "mu"):
        if not _finite(rec.get(name)):
            raise bad(f"has {name} {rec.get(name)!r}, not a finite number")
    for name in ("losses", "g"):
        v = rec.get(name)
        if not isinstance(v, list) or not all(_number(x) for x in v):
            raise bad(f"has no list of numbers under {name!r}")
    if status == "ok" and not (rec["losses"] and all(math.isfinite(x) for x in rec["g"])):
        raise bad("is an 'ok' step without losses or with non-finite g")
