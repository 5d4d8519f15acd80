"""Rebuild trained tensors from the initial values and a ledger, bit for bit, without a
forward pass: :func:`apply` redoes recorded steps (and rollbacks) on an engine."""

from __future__ import annotations

from ..errors import CheckpointError
from .engine import ZOEngine
from .ledger import Ledger


def check_ledger_fingerprint(ledger: Ledger, fingerprint: str, where: str) -> None:
    """The ledger must have been written for the bundle ``fingerprint`` (found at ``where``)."""
    if ledger.header.get("bundle") != fingerprint:
        raise CheckpointError(
            f"ledger {ledger.path} was written for bundle {ledger.header.get('bundle')}, "
            f"not for {where} ({fingerprint})",
            "replay it on the bundle the run used (its path is in the ledger header)",
        )


def is_rollback(record: dict) -> bool:
    return record.get("status") == "rollback"


def rollback_record(step: int, to: int, lr_scale: float, reason: str) -> dict:
    """A ledger record that returns θ (and optimiser state) to where they were after the
    first ``to`` records; later steps use learning rates scaled by ``lr_scale``."""
    return {
        "step": step,
        "lr": 0.0,
        "mu": 0.0,
        "losses": [],
        "g": [],
        "status": "rollback",
        "to": to,
        "lr_scale": lr_scale,
        "reason": reason,
    }


def copy_state(src: ZOEngine, dst: ZOEngine) -> None:
    dst.perturber.at_theta()
    dst.params.master[:] = src.params.master
    dst.optimizer.load_state(src.optimizer.state())


def apply(engine: ZOEngine, records: list[dict], history: list[dict], progress=None) -> None:
    """Replay ``records`` on ``engine``; ``history`` is the whole ledger up to and including
    them, which a rollback record needs to rebuild the state it returns to."""
    for rec in records:
        if is_rollback(rec):
            if not 0 <= rec["to"] < rec["step"]:
                raise CheckpointError(
                    f"ledger step {rec['step']}: rollback to {rec['to']} is out of range",
                    "the ledger was edited; restore the run folder from a backup",
                )
            target = engine.fresh()
            apply(target, history[: rec["to"]], history)
            copy_state(target, engine)
        else:
            engine.replay(rec)
        if progress is not None:
            progress(rec["step"])


def replay(engine: ZOEngine, ledger: Ledger, upto: int | None = None, progress=None) -> ZOEngine:
    """``engine`` (at the initial values) after replaying ``upto`` steps (all by default)."""
    records = ledger.records if upto is None else ledger.records[:upto]
    apply(engine, records, ledger.records, progress)
    return engine
