"""The federation's server side: rounds, validation, aggregation, the global ledger.

Per round r::

    begin_round()            pool of candidate seeds for r (pure function of (S, r))
    instructions(client)     ledger records the client lacks + pool + θ's digest
    submit(reply, sender)    validated; a bad reply is rejected with a logged reason
    finish_round()           ḡ_k = Σ_c w_c Σ_{t: k_ct = k} g_ct, w_c = N_c / Σ N
                             → one record appended (fsync'd) to the global ledger, applied to θ

A rejected reply changes nothing; a round with fewer than ``min_clients`` accepted replies
appends an ``empty`` record, so round r is always ledger record r and clients never see a gap.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import CheckpointError
from ..zo.estimators import FLOAT32_MAX
from ..zo.ledger import Ledger
from .model import GlobalModel, check_entry, engine_settings
from .protocol import (
    TRAIN,
    VERSION,
    FedSettings,
    Rejected,
    check_reply_shape,
    encode_entry,
    round_pool,
)


class FederationServer:
    """Holds the global ledger (a file) and θ replayed from it."""

    def __init__(
        self,
        bundle: Bundle,
        fed: FedSettings,
        ledger_path: str | Path,
        log: Callable[[str], None] = print,
        resume: bool = False,
    ):
        self.bundle = bundle
        self.fed = fed
        self.log = log
        self.model = GlobalModel(bundle, engine_settings(fed))
        path = Path(ledger_path)
        header = {
            "bundle": bundle.fingerprint,
            "bundle_path": str(bundle.path),
            "federation_id": uuid.uuid4().hex,
            "engine": self.model.settings.to_dict(),
            "federation": fed.to_dict(),
        }
        if resume and path.exists():
            self.ledger = Ledger.read(path, repair=True)
            if self.ledger.header.get("bundle") != bundle.fingerprint:
                raise CheckpointError(
                    f"{path} belongs to bundle {self.ledger.header.get('bundle')}, not "
                    f"{bundle.fingerprint}",
                    "resume with the bundle the federation started on",
                )
            if self.ledger.header.get("engine") != self.model.settings.to_dict():
                raise CheckpointError(
                    f"{path} was written with other seed/direction settings",
                    "resume with the settings the federation started with (see its header)",
                )
            for rec in self.ledger.records:
                self.model.apply(rec)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.ledger = Ledger.create(path, header)
        self.federation_id = str(self.ledger.header.get("federation_id", ""))
        self.have: dict[str, int] = {}  # last ledger length each client reported
        self.round = self.ledger_rounds
        self.pool: list[int] = []
        self._accepted: dict[str, dict[str, Any]] = {}
        self.rejections: list[tuple[str, str]] = []  # (client, reason) this round
        self._digest = self.model.digest()

    @property
    def ledger_rounds(self) -> int:
        return len(self.ledger.records)

    # -- a round ----------------------------------------------------------------------------

    def begin_round(self) -> int:
        self.round = self.ledger_rounds
        self.pool = round_pool(self.fed.seed, self.round, self.fed.pool_size)
        self._accepted = {}
        self.rejections = []
        self._digest = self.model.digest()
        return self.round

    def sample(self, clients: list[str]) -> list[str]:
        """A seeded ``fraction`` of the connected clients (at least ``min_clients``)."""
        clients = sorted(clients)
        k = max(self.fed.min_clients, math.ceil(self.fed.fraction * len(clients)))
        if k >= len(clients):
            return clients
        # a raw-bit shuffle (stable across numpy versions, unlike Generator.choice): each
        # client gets one Philox word, the k smallest words are sampled
        bits = np.random.Philox(key=[self.fed.seed, self.round], counter=[0, 0, 0, 0x5A3])
        words = np.asarray(bits.random_raw(len(clients)), dtype=np.uint64)
        return sorted(clients[i] for i in np.argsort(words, kind="stable")[:k])

    def instructions(self, client: str, train: bool = True) -> dict[str, Any]:
        """The round's instruction for ``client``: the records it lacks, the pool, θ's digest.

        ``train=False``: catch up only (no pool, no local steps), e.g. after the last round.
        """
        since = min(self.have.get(client, 0), self.round)
        f = self.fed
        return {
            "kind": TRAIN,
            "version": VERSION,
            "bundle": self.bundle.fingerprint,
            "engine": json.dumps(self.model.settings.to_dict(), sort_keys=True),
            "federation": self.federation_id,
            "round": self.round,
            "since": since,
            "entries": [encode_entry(r) for r in self.ledger.records[since:]],
            "theta": self._digest,
            "pool": list(self.pool) if train else [],
            "local_steps": f.local_steps if train else 0,
            "lr": f.lr,
            "mu": f.mu,
            "batch_size": f.batch_size,
        }

    def confirm(self, reply: Any, sender: str | None = None) -> str | None:
        """Check a catch-up-only reply: None if the client holds θ bit for bit, else why not."""
        try:
            msg = check_reply_shape(reply)
            if sender is not None and msg["client"] != sender:
                raise Rejected(f"reply names client {msg['client']!r}, came from {sender!r}")
            if msg["status"] != "ok":
                raise Rejected(f"client refused: {msg['reason']}")
            self.have[msg["client"]] = min(max(0, msg["have"]), self.ledger_rounds)
            if msg["have"] != self.ledger_rounds or msg["theta"] != self._digest:
                raise Rejected(
                    f"client at {msg['have']} records, digest {msg['theta'][:12]}; "
                    f"server at {self.ledger_rounds}, {self._digest[:12]}"
                )
        except Rejected as e:
            return e.reason
        return None

    def reject(self, client: str, reason: str) -> bool:
        self.rejections.append((client, reason))
        self.log(f"edgezo federate: round {self.round}: rejected {client}: {reason}")
        return False

    def submit(self, reply: Any, sender: str | None = None) -> bool:
        """Validate a reply and keep it for this round; False (and a logged reason) if not."""
        who = sender or (reply.get("client") if isinstance(reply, dict) else None) or "?"
        try:
            msg = check_reply_shape(reply)
            self._check(msg, sender)
        except Rejected as e:
            return self.reject(str(who), e.reason)
        self._accepted[msg["client"]] = msg
        return True

    def _check(self, msg: dict[str, Any], sender: str | None) -> None:
        client = msg["client"]
        if sender is not None and client != sender:
            raise Rejected(f"reply names client {client!r} but came from {sender!r}")
        if msg["bundle"] != self.bundle.fingerprint:
            raise Rejected(
                f"bundle fingerprint {msg['bundle'][:16]}… differs from the "
                f"server's {self.bundle.fingerprint[:16]}… (another bundle)"
            )
        if 0 <= msg["have"] <= self.ledger_rounds:
            self.have[client] = msg["have"]  # what to send it next time, even if refused
        if msg["status"] == "refused":
            raise Rejected(f"client refused the round: {msg['reason']}")
        if msg["round"] != self.round:
            raise Rejected(
                f"reply for round {msg['round']} during round {self.round} "
                "(stale or replayed message)"
            )
        if client in self._accepted:
            raise Rejected("a reply from this client was already accepted this round (replayed)")
        if msg["have"] != self.round:
            raise Rejected(f"ledger gap: client holds {msg['have']} records, round is {self.round}")
        if msg["theta"] != self._digest:
            raise Rejected(
                "the client's replayed tensors differ from the server's (digest "
                f"{msg['theta'][:12]} vs {self._digest[:12]})"
            )
        if not msg["seeds"]:
            raise Rejected("no records")
        if len(msg["seeds"]) > self.fed.local_steps:
            raise Rejected(f"{len(msg['seeds'])} records, at most {self.fed.local_steps}")
        pool = set(self.pool)
        for k, g, n in zip(msg["seeds"], msg["g"], msg["n"], strict=True):
            if k not in pool:
                raise Rejected(f"seed {k} is not in this round's pool")
            if not math.isfinite(g) or abs(g) >= FLOAT32_MAX:
                raise Rejected(f"non-finite scalar {g!r} for seed {k} (or beyond float32)")
            if not 1 <= n <= self.fed.batch_size:
                raise Rejected(f"example count {n} outside 1..{self.fed.batch_size}")

    def finish_round(self) -> dict[str, Any]:
        """Aggregate the accepted replies, append the round's record, apply it to θ."""
        acc = [self._accepted[c] for c in sorted(self._accepted)]
        status = "ok" if len(acc) >= self.fed.min_clients else "empty"
        seeds: list[int] = []
        g: list[float] = []
        examples = sum(sum(m["n"]) for m in acc)
        if status == "ok":
            terms: dict[int, list[float]] = {}
            clip = self.fed.clip
            for m in acc:
                w = sum(m["n"]) / examples
                for k, gi in zip(m["seeds"], m["g"], strict=True):
                    gi = float(gi) if clip is None else min(clip, max(-clip, float(gi)))
                    terms.setdefault(k, []).append(w * gi)
            seeds = sorted(terms)
            g = [math.fsum(terms[k]) for k in seeds]
        else:
            self.log(
                f"edgezo federate: round {self.round}: {len(acc)} accepted replies, fewer "
                f"than min_clients={self.fed.min_clients}: θ unchanged"
            )
        record = {
            "step": self.round,
            "round": self.round,
            "status": status,
            "lr": self.fed.lr * self.fed.server_lr,
            "seeds": seeds,
            "g": g,
            "clients": len(acc) if status == "ok" else 0,
            "examples": examples if status == "ok" else 0,
            "rejected": len(self.rejections),
        }
        check_entry(record, self.ledger_rounds)  # nothing is written unless it applies
        self.ledger.append(record)
        self.ledger.sync()  # durable before any client is told about it
        self.model.apply(record)
        return record

    def close(self) -> None:
        self.ledger.close()
