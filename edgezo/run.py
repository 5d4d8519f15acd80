"""A run folder and its configuration across sessions.

A run is one folder (``--out``)::

    config.yaml              the resolved configuration (lr/μ as chosen at the start)
    ledger.jsonl             header + one record per step: the run's ground truth
    checkpoint.safetensors   θ and optimiser state at some step (a cache of the ledger)
    metrics.jsonl            one row per step, held-out evaluation and event, per session
    trained.safetensors      the trained tensors at the end of the latest session
    summary.json             the run and the latest session, in numbers
    autotune.json            what the lr/μ selection tried (when it ran)

The ledger is the commit point: a folder without one holds a run whose start never finished
(killed while it was set up or chose lr/μ). Starting or resuming such a folder begins the run
afresh from its stored config, which gives the same result the interrupted start would have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import atomic
from .config import FinetuneConfig
from .errors import CheckpointError, ConfigError
from .zo.engine import EngineSettings

#: the files a run writes (a folder holding only these, without a ledger, never started)
RUN_FILES = (
    "config.yaml",
    "ledger.jsonl",
    "checkpoint.safetensors",
    "metrics.jsonl",
    "trained.safetensors",
    "summary.json",
    "autotune.json",
    "prefix_rows.bin",  # frozen-prefix rows past cache_prefix_mb (edgezo.prefix_cache)
    "prefix_rows.json",
)
#: engine settings a resumed run cannot change: the ledger's steps were computed with them
ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineSettings) if f.name != "inplace")
#: what a resume may not change: the ledger's arithmetic depends on it (lr and μ are recorded
#: per step, the batches are not needed to replay: those may change)
FIXED_ON_RESUME = (*ENGINE_FIELDS, "perturbation")


class RunFolder:
    """The paths of one run folder, its metrics file and its stored config."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.ledger = self.path / "ledger.jsonl"
        self.checkpoint = self.path / "checkpoint.safetensors"
        self.metrics = self.path / "metrics.jsonl"
        self.trained = self.path / "trained.safetensors"
        self.summary = self.path / "summary.json"
        self.autotune = self.path / "autotune.json"

    @property
    def started(self) -> bool:
        """Whether the run got past its start (its ledger exists)."""
        return self.ledger.is_file()

    def metric(self, **row: Any) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def metric_rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (unreadable lines, e.g. torn by a kill, are skipped)."""
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def write_config(self, cfg: FinetuneConfig) -> None:
        atomic.write_text(self.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def stored_config(self) -> FinetuneConfig:
        if not self.config.is_file():
            raise CheckpointError(
                f"{self.path} holds no run (no config.yaml)",
                "point --out at the folder of the run to resume, or drop --resume",
            )
        return FinetuneConfig.load(str(self.config))

    def clear_unstarted(self) -> None:
        """Remove what a start that never finished left behind (only edgezo's own files)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        atomic.remove_stale_temps(self.path)

    def previous_seconds(self) -> float:
        """Wall-clock seconds of the earlier sessions, from their metrics rows."""
        per_session: dict[int, float] = {}
        for row in self.metric_rows():
            if "session" in row and "elapsed_s" in row:
                s = int(row["session"])
                per_session[s] = max(per_session.get(s, 0.0), float(row["elapsed_s"]))
        return sum(per_session.values())

    def sessions(self) -> int:
        """How many sessions have started (rows of kind ``session``)."""
        return sum(1 for r in self.metric_rows() if r.get("kind") == "session")


def default_out() -> str:
    return os.path.join("runs", time.strftime("finetune-%Y%m%d-%H%M%S"))


def explicit_fields(cfg: FinetuneConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from FinetuneConfig's defaults: what the user set."""
    out = {}
    for f in dataclasses.fields(FinetuneConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(cfg, f.name) != default:
            out[f.name] = getattr(cfg, f.name)
    return out


def resume_config(stored: FinetuneConfig, given: FinetuneConfig, where: Path) -> FinetuneConfig:
    """The stored config with the fields the user set again on top (``steps`` may grow,
    budgets, device, threads may change); changing what the ledger depends on is refused."""
    values = stored.to_dict()
    problems = []
    for key, value in explicit_fields(given).items():
        if key == "out":
            continue
        if key in FIXED_ON_RESUME and value != values[key]:
            problems.append(
                f"{key} is {values[key]!r} in {where / 'config.yaml'}, not {value!r}: the "
                "run's steps were computed with it"
            )
            continue
        values[key] = value
    if problems:
        raise ConfigError(
            "; ".join(problems),
            "resume with the stored values (drop those options), or start a new run with "
            "another --out",
        )
    return FinetuneConfig(**values)


@dataclass
class SessionReport:
    """What one session (one `finetune` call) did."""

    index: int
    start_step: int
    steps: int
    heldout_before: float
    seconds: float
    train_evaluations: int
    eval_evaluations: int
    prefix_forward_calls: int = 0


@dataclass
class RunSummary:
    """The run so far (every session), with the latest session in ``session``."""

    out: str
    steps: int
    stop_reason: str
    heldout_before: float  # at the run's start (step 0)
    heldout_after: float
    train_evaluations: int  # the whole run's, from the ledger
    eval_evaluations: int  # this session's held-out evaluations
    seconds: float  # every session's wall-clock time
    trainable_parameters: int
    heldout_accuracy_before: float | None = None  # classification tasks
    heldout_accuracy_after: float | None = None
    tune_evaluations: int = 0  # spent by the lr/μ auto-selection (edgezo.autotune)
    prefix_forward_calls: int = 0  # this session's pass over the data of a cached prefix
    lr: float | None = None  # the configured (or chosen) learning rate
    mu: float | None = None
    lr_last: float | None = None  # the rate the last step ran at (after rollbacks, plateaus)
    rollbacks: int = 0
    lr_decays: int = 0
    session: SessionReport | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run: RunFolder) -> None:
        atomic.write_text(run.summary, json.dumps(self.to_dict(), indent=2) + "\n")


def remove_failed_start(run: RunFolder, created: bool) -> None:
    """Undo a start that failed before its ledger existed: nothing of it is left behind."""
    if run.started:
        return
    run.clear_unstarted()
    if created:
        try:
            run.path.rmdir()  # only if nothing else was put there meanwhile
        except OSError:
            pass
