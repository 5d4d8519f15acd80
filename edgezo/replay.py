"""Rebuild trained tensors from a bundle and a ledger, bit for bit, without a forward pass."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .engine import EngineSettings, ZOEngine
from .errors import CheckpointError
from .ledger import Ledger


def check_ledger_bundle(ledger: Ledger, bundle: Bundle) -> None:
    if ledger.header.get("bundle") != bundle.fingerprint:
        raise CheckpointError(
            f"ledger {ledger.path} was written for bundle {ledger.header.get('bundle')}, "
            f"not for {bundle.path} ({bundle.fingerprint})",
            "replay it on the bundle the run used (its path is in the ledger header)",
        )


def replay(bundle: Bundle, ledger_path: str | Path, upto: int | None = None,
           progress=None) -> ZOEngine:
    """The engine after replaying ``upto`` steps (all by default) of the ledger."""
    ledger = Ledger.read(ledger_path)
    check_ledger_bundle(ledger, bundle)
    engine = ZOEngine(bundle, EngineSettings.from_dict(ledger.header["engine"]))
    records = ledger.records if upto is None else ledger.records[:upto]
    for rec in records:
        engine.replay(rec)
        if progress is not None:
            progress(rec["step"])
    return engine
