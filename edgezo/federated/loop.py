"""Run a federation in one process, without Flower: the same messages, through JSON.

Tests and ``tools/bench_federated.py`` use this; the Flower apps drive the same
:class:`FederationServer` / :class:`FederationClient` through Flower's ``Grid`` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic
from ..bundle import Bundle
from ..data import Example, eval_batches, read_jsonl, tokenize
from ..runner import LossRunner, RuntimeOptions
from .client import BATCH_INPUTS, FederationClient
from .model import GlobalModel
from .protocol import payload_bytes
from .server import FederationServer


def load_examples(bundle: Bundle, path: str, max_length: int = 64) -> list[Example]:
    return tokenize(
        read_jsonl(path), bundle.tokenizer(), bundle.manifest.tokenizer, max_length, where=path
    )


class HeldoutEval:
    """Mean per-example held-out loss at a :class:`GlobalModel`'s θ."""

    def __init__(
        self, model: GlobalModel, examples: list[Example], batch_size: int = 16, threads: int = 1
    ):
        self.model = model
        self.examples = examples
        self.batch_size = batch_size
        self.runner = LossRunner(
            model.bundle.model_path,
            model.engine.params,
            BATCH_INPUTS,
            RuntimeOptions(threads=threads),
        )

    def __call__(self) -> float:
        self.model.engine.perturber.at_theta()
        pad = self.model.bundle.manifest.tokenizer.pad_token_id
        total = 0.0
        for batch in eval_batches(self.examples, self.batch_size, pad):
            total += float(np.sum(self.runner.losses(batch, heldout=True), dtype=np.float64))
        return total / len(self.examples)


@dataclass
class RoundReport:
    round: int
    status: str
    accepted: int
    rejected: list[tuple[str, str]]
    up_bytes: dict[str, int]  # per client that replied
    down_bytes: dict[str, int]  # per client instructed
    heldout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "status": self.status,
            "accepted": self.accepted,
            "rejected": [list(x) for x in self.rejected],
            "up_bytes": self.up_bytes,
            "down_bytes": self.down_bytes,
            "heldout": self.heldout,
        }

    def line(self) -> str:
        up = max(self.up_bytes.values()) if self.up_bytes else 0
        down = max(self.down_bytes.values()) if self.down_bytes else 0
        held = "" if self.heldout is None else f"held-out loss {self.heldout:.4f}, "
        return (
            f"round {self.round}: {held}{self.accepted} accepted, "
            f"{len(self.rejected)} rejected; up ≤ {up} B/client, down ≤ {down} B/client"
        )


Tamper = Callable[[int, str, dict[str, Any]], list[Any]]


def run_rounds(
    server: FederationServer,
    clients: dict[str, FederationClient],
    rounds: int,
    evaluate: Callable[[], float] | None = None,
    drop: Callable[[int, str], bool] | None = None,
    tamper: Tamper | None = None,
    log: Callable[[str], None] | None = None,
) -> list[RoundReport]:
    """``rounds`` rounds; ``drop(r, c)`` makes client c miss round r (no reply), and
    ``tamper(r, c, reply)`` returns the replies the server actually receives (tests)."""
    reports = []
    for _ in range(rounds):
        r = server.begin_round()
        up, down = {}, {}
        for cid in server.sample(list(clients)):
            ins = server.instructions(cid)
            down[cid] = payload_bytes(ins)
            if drop is not None and drop(r, cid):
                server.reject(cid, "no reply (dropped out)")
                continue
            reply = clients[cid].handle(json.loads(json.dumps(ins)))
            wire = json.loads(json.dumps(reply))
            up[cid] = payload_bytes(wire)
            for msg in tamper(r, cid, wire) if tamper is not None else [wire]:
                server.submit(msg, sender=cid)
        rec = server.finish_round()
        rep = RoundReport(
            r,
            rec["status"],
            rec["clients"],
            list(server.rejections),
            up,
            down,
            evaluate() if evaluate is not None else None,
        )
        reports.append(rep)
        if log is not None:
            log(f"edgezo federate: {rep.line()}")
    return reports


def sync_all(
    server: FederationServer, clients: dict[str, FederationClient]
) -> dict[str, str | None]:
    """Bring every client to the server's θ (catch-up only); per client None if bit-identical,
    else the reason."""
    server.begin_round()
    out = {}
    for cid, client in sorted(clients.items()):
        ins = json.loads(json.dumps(server.instructions(cid, train=False)))
        out[cid] = server.confirm(json.loads(json.dumps(client.handle(ins))), sender=cid)
    return out


def write_summary(
    out: Path,
    server: FederationServer,
    before: float | None,
    reports: list[RoundReport],
    synced: dict[str, str | None],
) -> dict[str, Any]:
    """``summary.json``, ``metrics.jsonl`` and the final ``trained.safetensors`` in ``out``."""
    from ..zo.checkpoint import save_tensors_atomic

    save_tensors_atomic(
        out / "trained.safetensors",
        server.model.engine.params.state_dict(),
        metadata={"bundle": server.bundle.fingerprint, "step": str(server.ledger_rounds)},
    )
    rows = [r.row() for r in reports]
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:  # a resumed run appends
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = {
        "rounds": server.ledger_rounds,
        "heldout_before": before,
        "heldout": [r["heldout"] for r in rows],
        "history": rows,
        "synced": synced,
        "digest": server.model.digest(),
        "settings": server.fed.to_dict(),
    }
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def fedavg_bytes(bundle: Bundle) -> int:
    """What one FedAvg message of the bundle's trainable tensors holds (float32 values)."""
    return int(sum(s.size for s in bundle.manifest.trainable)) * np.dtype(np.float32).itemsize
