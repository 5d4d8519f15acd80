"""θ of the federation, rebuilt from the global ledger: the same code on server and clients.

A global ledger record (one per round)::

    {"step": r, "round": r, "status": "ok" | "empty", "lr": η,
     "seeds": [k1 < k2 < ...], "g": [ḡ1, ḡ2, ...], "clients": c, "examples": N, "rejected": x}

Applying it moves θ ← θ ⊕ float32(−η·ḡ_j)·z(S, k_j) for j in order: float32 arithmetic, seeds
in ascending order, directions regenerated from their keys. Every party that applies the same
records to the same bundle holds the same bits (checked by a digest in every reply).
"""

from __future__ import annotations

import math
from typing import Any

from ..bundle import Bundle
from ..errors import CheckpointError
from ..zo.engine import EngineSettings
from ..zo.perturb import plain
from .protocol import FedSettings, theta_digest


def engine_settings(fed: FedSettings) -> EngineSettings:
    """Local steps are MeZO's central two-point estimate along one pool seed, plain ZO-SGD."""
    return EngineSettings(seed=fed.seed, direction=fed.direction, estimator="central", q=1)


def check_entry(record: Any, step: int) -> dict[str, Any]:
    """A global ledger record's shape; ``CheckpointError`` when it cannot be applied."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"global ledger record {step}: {why}",
            "catch up from the server's ledger again (it was altered in transit or on disk)",
        )

    if not isinstance(record, dict) or record.get("step") != step:
        raise bad(f"expected step {step}, got {getattr(record, 'get', lambda k: None)('step')}")
    seeds, g, lr = record.get("seeds"), record.get("g"), record.get("lr")
    if not isinstance(seeds, list) or not isinstance(g, list) or len(seeds) != len(g):
        raise bad("seeds and g must be lists of equal length")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in seeds):
        raise bad("seeds must be non-negative integers")
    if seeds != sorted(set(seeds)):
        raise bad("seeds must be distinct and ascending")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in g):
        raise bad("scalars must be finite numbers")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr)):
        raise bad("lr must be a finite number")
    return record


class GlobalModel:
    """A ZO engine at the global θ after ``len(records)`` rounds of the ledger."""

    def __init__(self, bundle: Bundle, settings: EngineSettings):
        self.bundle = bundle
        self.settings = settings
        self.engine = bundle.engine(self.settings)
        self.records: list[dict[str, Any]] = []

    @property
    def rounds(self) -> int:
        return len(self.records)

    @property
    def master(self):
        return self.engine.params.master

    def apply(self, record: dict[str, Any]) -> None:
        """Apply the next round's record (checked first; nothing moves if it is bad)."""
        check_entry(record, self.rounds)
        eng = self.engine
        eng.perturber.at_theta()
        master = eng.params.master
        for k, g in zip(record["seeds"], record["g"], strict=True):
            eng.perturber.vectors.move(plain(k, 0), -record["lr"] * g, master, master)
        eng.perturber.at_theta()  # the feed follows θ
        self.records.append(record)

    def digest(self) -> str:
        return theta_digest(self.master)
