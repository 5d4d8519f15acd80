"""The seed-federation protocol: settings, the two messages, and their validation.

Nothing here knows Flower. A message is a flat dict of ints, floats, strings and homogeneous
lists of them, which is exactly what a Flower ``ConfigRecord`` carries, and also plain JSON.

Down (server → client), one per sampled client per round::

    {"kind": "edgezo-fed-train", "version": 1, "bundle": <fingerprint>, "engine": <json>,
     "federation": <id of the server's ledger>,
     "round": r, "since": s, "entries": [<ledger record json>, ...],   # records s .. r-1
     "theta": <digest of θ after record r-1>, "pool": [seed, ...],
     "local_steps": τ, "lr": η, "mu": μ, "batch_size": b}

Up (client → server)::

    {"kind": "edgezo-fed-reply", "version": 1, "bundle": <fingerprint>, "client": <id>,
     "round": r, "have": <ledger records held>, "theta": <digest after catch-up>,
     "status": "ok" | "refused", "reason": "", "seeds": [k, ...], "g": [ĝ, ...],
     "n": [examples, ...], "loss": <mean local training loss>}

Only (seed, projected-gradient scalar, example count) triples go up: no tensors, no data.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ..errors import ConfigError

VERSION = 1
TRAIN = "edgezo-fed-train"
REPLY = "edgezo-fed-reply"
SEED_SPACE = 1 << 31  # candidate seeds are direction keys (S, k), k < SEED_SPACE
MAX_CLIENT_ID = 128  # characters


@dataclass(frozen=True)
class FedSettings:
    """One federation's knobs; the server sends the per-round ones with every instruction."""

    seed: int = 0  # the direction seed S: candidate k is direction z(S, k)
    direction: str = "rademacher"
    rounds: int = 10
    local_steps: int = 4  # τ: local ZO steps (two forwards each) per client per round
    lr: float = 1e-3
    mu: float = 1e-3
    batch_size: int = 4
    pool_size: int = 64  # candidate seeds offered per round (FedKSeed's K)
    fraction: float = 1.0  # share of the connected clients sampled each round
    min_clients: int = 1  # fewer accepted replies than this: the round changes nothing
    clip: float | None = None  # bound on each uploaded scalar |g| before aggregation
    #: the global step is server_lr × the weighted mean of the clients' local steps; the mean
    #: of C clients' independent estimates has ~1/C the variance, so a step up to ~C× holds
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        def bad(field: str, why: str, fix: str) -> None:
            raise ConfigError(f"federation setting {field}={getattr(self, field)!r}: {why}", fix)

        for name in ("rounds", "local_steps", "batch_size", "pool_size", "min_clients"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer", f"set {name} to 1 or more")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be an integer >= 0", "use e.g. seed=0")
        if self.direction not in ("rademacher", "gaussian", "sphere"):
            bad("direction", "is unknown", "use rademacher, gaussian or sphere")
        for name in ("lr", "mu", "server_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, "must be a finite number > 0", f"set {name} to e.g. 1e-3")
        if not (0.0 < self.fraction <= 1.0):
            bad("fraction", "must be in (0, 1]", "use 1.0 to sample every connected client")
        if self.pool_size > 4096:
            bad("pool_size", "is above 4096", "FedKSeed uses K <= 4096; lower it")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            bad("clip", "must be a finite number > 0 or None", "drop it or use e.g. 100")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FedSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown federation settings: {unknown}", f"use only: {', '.join(sorted(known))}"
            )
        return cls(**d)


class Rejected(Exception):
    """A message that must not change the round; ``reason`` is logged."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def theta_digest(master: np.ndarray) -> str:
    """A short sha256 of θ's bytes: two parties with the same digest hold the same bits."""
    return hashlib.sha256(np.ascontiguousarray(master).tobytes()).hexdigest()[:32]


def round_pool(seed: int, rnd: int, size: int) -> list[int]:
    """The round's candidate seeds: ``size`` distinct keys drawn from (S, round), sorted."""
    # raw Philox words (covered by numpy's stream-stability promise; Generator.integers is
    # not), each reduced to its low 31 bits: exact, as SEED_SPACE is a power of two
    bits = np.random.Philox(key=[seed, rnd], counter=[0, 0, 0, 0xFED5EED])
    picks: set[int] = set()
    while len(picks) < size:
        words = bits.random_raw(size - len(picks))
        picks.update(int(x) for x in np.asarray(words, dtype=np.uint64) % SEED_SPACE)
    return sorted(picks)


def client_token(client: str) -> int:
    return int.from_bytes(hashlib.sha256(client.encode()).digest()[:8], "little")


def payload_bytes(msg: dict[str, Any]) -> int:
    """Bytes of the message as compact JSON (the Flower adapter also measures its protobuf)."""
    return len(json.dumps(msg, separators=(",", ":")).encode())


def parse_drops(spec: str) -> set[tuple[int, int]]:
    """``"2@1,0@3"`` -> {(2, 1), (0, 3)}: partition 2 drops out in round 1, ... (simulations)."""
    out = set()
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        pid, sep, rnd = part.partition("@")
        try:
            out.add((int(pid), int(rnd)))
        except ValueError:
            raise ConfigError(
                f"drop spec {part!r} is not PARTITION@ROUND", "write e.g. --drop 2@1,0@3"
            ) from None
    return out


def encode_entry(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


# -- validation -------------------------------------------------------------------------------


def _need(msg: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in msg:
        raise Rejected(f"malformed: no {key!r}")
    v = msg[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise Rejected(f"malformed: {key!r} is a bool")
    if not isinstance(v, types):
        raise Rejected(f"malformed: {key!r} is a {type(v).__name__}")
    return v


def _int_list(msg: dict[str, Any], key: str) -> list[int]:
    v = _need(msg, key, list)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        raise Rejected(f"malformed: {key!r} must hold integers")
    return v


def check_reply_shape(msg: Any) -> dict[str, Any]:
    """Types and lengths of a reply, before anything about the round is trusted."""
    if not isinstance(msg, dict):
        raise Rejected(f"malformed: a reply must be a record of fields, not {type(msg).__name__}")
    if msg.get("kind") != REPLY or msg.get("version") != VERSION:
        raise Rejected(
            f"malformed: kind/version {msg.get('kind')!r}/{msg.get('version')!r}, "
            f"expected {REPLY!r}/{VERSION}"
        )
    for key in ("bundle", "client", "theta", "status", "reason"):
        _need(msg, key, str)
    for key in ("round", "have"):
        _need(msg, key, int)
    if len(msg["client"]) > MAX_CLIENT_ID or not msg["client"]:
        raise Rejected("malformed: client id empty or too long")
    if msg["status"] not in ("ok", "refused"):
        raise Rejected(f"malformed: status {msg['status']!r}")
    if msg["status"] == "refused":
        return msg
    seeds, ns = _int_list(msg, "seeds"), _int_list(msg, "n")
    g = _need(msg, "g", list)
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in g):
        raise Rejected("malformed: 'g' must hold numbers")
    if not (len(seeds) == len(g) == len(ns)):
        raise Rejected(f"malformed: {len(seeds)} seeds, {len(g)} scalars, {len(ns)} counts")
    _need(msg, "loss", (int, float))
    return msg


def check_train_shape(msg: Any) -> dict[str, Any]:
    """Types of an instruction, checked by the client before it touches its state."""
    if not isinstance(msg, dict) or msg.get("kind") != TRAIN or msg.get("version") != VERSION:
        raise Rejected(f"malformed instruction: expected {TRAIN!r} version {VERSION}")
    for key in ("bundle", "engine", "theta", "federation"):
        _need(msg, key, str)
    for key in ("round", "since", "local_steps", "batch_size"):
        _need(msg, key, int)
    for key in ("lr", "mu"):
        _need(msg, key, (int, float))
    entries = _need(msg, "entries", list)
    if any(not isinstance(e, str) for e in entries):
        raise Rejected("malformed instruction: entries must be JSON strings")
    _int_list(msg, "pool")
    if msg["since"] + len(entries) != msg["round"]:
        raise Rejected(
            f"malformed instruction: entries {msg['since']}..+{len(entries)} do not "
            f"end at round {msg['round']}"
        )
    return msg
