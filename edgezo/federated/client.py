"""The federation's client side: catch up from the global ledger, run local ZO steps.

For an instruction of round r the client

1. checks it (kind, bundle fingerprint, engine settings, no ledger gap),
2. applies the global records it lacks (kept in its own fsync'd copy of the ledger, so a
   restarted device catches up from disk) and checks θ's digest against the server's,
3. from that θ runs τ local steps: step t draws seed k from the round's pool, evaluates
   f(θ ± μ z(S, k)) on a batch of its own data and moves θ by −η·g·z(S, k) (MeZO),
4. puts θ back to the global one and replies with the (k, g, n) triples only.

Anything wrong yields a ``refused`` reply with the reason (and the count of records it holds,
so the server sends the right ones next round); the client's state is never half-updated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..data import BatchStream, Example
from ..errors import EdgezoError
from ..runner import LossRunner, RuntimeOptions
from ..zo.directions import uniform
from ..zo.engine import EngineSettings
from ..zo.ledger import Ledger
from .model import GlobalModel, check_entry
from .protocol import REPLY, VERSION, Rejected, check_train_shape, client_token

BATCH_INPUTS = ["input_ids", "attention_mask", "labels"]  # a causal_lm bundle's batch


def split_examples(examples: list[Example], index: int, count: int) -> list[Example]:
    """Client ``index`` of ``count`` gets examples index, index + count, ... (a fixed rule)."""
    if not 0 <= index < count:
        raise EdgezoError(
            f"client index {index} is outside 0..{count - 1}",
            "give each client a partition id below the number of clients",
        )
    part = examples[index::count]
    if not part:
        raise EdgezoError(
            f"client {index} of {count} gets no examples ({len(examples)} in all)",
            "use fewer clients or more data",
        )
    return part


class FederationClient:
    """One device of the federation: its bundle, its examples, its copy of the global ledger."""

    def __init__(
        self,
        bundle: Bundle,
        client_id: str,
        train: list[Example],
        state_dir: str | Path | None = None,
        threads: int = 1,
    ):
        self.bundle = bundle
        self.id = client_id
        self.train = train
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.threads = threads
        self.model: GlobalModel | None = None
        self.federation = ""  # the server ledger's id this client's records belong to
        self.runner: LossRunner | None = None
        self.ledger: Ledger | None = None
        self.token = client_token(client_id)
        self.evaluations = 0  # training forwards run by this client
        if self.state_dir is not None and (self.state_dir / "ledger.jsonl").exists():
            self._reopen()

    @property
    def have(self) -> int:
        return 0 if self.model is None else self.model.rounds

    def stale(self) -> bool:
        """True when the ledger copy on disk holds other records than this object (another
        process, e.g. another simulation worker, answered for the same device meanwhile)."""
        if self.state_dir is None or not (self.state_dir / "ledger.jsonl").exists():
            return False
        return len(Ledger.read(self.state_dir / "ledger.jsonl").records) != self.have

    def _reopen(self) -> None:
        led = Ledger.read(self.state_dir / "ledger.jsonl", repair=True)
        if led.header.get("bundle") != self.bundle.fingerprint:
            return  # another bundle's state: start over from the server's ledger
        self._start(
            EngineSettings.from_dict(led.header["engine"]),
            led,
            str(led.header.get("federation", "")),
        )
        for rec in led.records:
            self.model.apply(rec)

    def _start(
        self, settings: EngineSettings, ledger: Ledger | None = None, federation: str = ""
    ) -> None:
        self.model = GlobalModel(self.bundle, settings)
        self.federation = federation
        self.runner = LossRunner(
            self.bundle.model_path,
            self.model.engine.params,
            BATCH_INPUTS,
            RuntimeOptions(threads=self.threads),
        )
        if ledger is None and self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path = self.state_dir / "ledger.jsonl"
            path.unlink(missing_ok=True)
            ledger = Ledger.create(
                path,
                {
                    "bundle": self.bundle.fingerprint,
                    "engine": settings.to_dict(),
                    "client": self.id,
                    "federation": federation,
                },
            )
        self.ledger = ledger

    def _reset(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        self.model = self.runner = self.ledger = None

    def reply(
        self, rnd: int, status: str = "ok", reason: str = "", **records: Any
    ) -> dict[str, Any]:
        return {
            "kind": REPLY,
            "version": VERSION,
            "bundle": self.bundle.fingerprint,
            "client": self.id,
            "round": rnd,
            "have": self.have,
            "theta": self.model.digest() if self.model is not None else "",
            "status": status,
            "reason": reason,
            **({"seeds": [], "g": [], "n": [], "loss": 0.0} | records),
        }

    def handle(self, ins: Any) -> dict[str, Any]:
        """Answer one instruction (never raises for bad input: it refuses with a reason)."""
        rnd = ins.get("round", -1) if isinstance(ins, dict) else -1
        rnd = rnd if isinstance(rnd, int) else -1
        try:
            ins = check_train_shape(ins)
            self._catch_up(ins)
            if ins["local_steps"] == 0:  # catch up only (the end of a federation)
                return self.reply(ins["round"])
            return self._train(ins)
        except Rejected as e:
            return self.reply(rnd, "refused", e.reason)
        except EdgezoError as e:
            return self.reply(rnd, "refused", e.what)

    def _catch_up(self, ins: dict[str, Any]) -> None:
        if ins["bundle"] != self.bundle.fingerprint:
            raise Rejected(
                f"the server's bundle {ins['bundle'][:16]}… is not this client's "
                f"{self.bundle.fingerprint[:16]}…"
            )
        try:
            settings = EngineSettings.from_dict(json.loads(ins["engine"]))
        except (ValueError, TypeError, EdgezoError) as e:
            raise Rejected(f"engine settings unreadable: {e}") from None
        if settings.estimator != "central" or settings.q != 1 or settings.optimizer != "sgd":
            raise Rejected("federation engine must be central / q=1 / sgd")
        if self.model is not None and (
            self.model.settings != settings or self.federation != ins["federation"]
        ):
            self._reset()  # state of another federation (or settings): start this one afresh
        if self.model is None:
            self._start(settings, federation=ins["federation"])
        since, entries = ins["since"], ins["entries"]
        if since > self.have:
            raise Rejected(
                f"ledger gap: this client holds {self.have} records, the "
                f"instruction starts at {since}"
            )
        for i, raw in enumerate(entries):
            step = since + i
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise Rejected(f"global record {step} is not JSON") from None
            if step < self.have:
                if rec != self.model.records[step]:
                    raise Rejected(f"global record {step} conflicts with this client's copy")
                continue
            check_entry(rec, step)
            if self.ledger is not None:  # a client without a state folder keeps it in memory
                self.ledger.append(rec)
            self.model.apply(rec)
        if entries and self.ledger is not None:
            self.ledger.sync()
        if self.model.digest() != ins["theta"]:
            self._reset()  # something is off with the local copy: rebuild from scratch
            raise Rejected(
                "tensors replayed from the ledger differ from the server's digest; "
                "local state dropped, send the whole ledger next round"
            )

    def _train(self, ins: dict[str, Any]) -> dict[str, Any]:
        rnd, pool = ins["round"], ins["pool"]
        lr, mu, tau, bs = ins["lr"], ins["mu"], ins["local_steps"], ins["batch_size"]
        if not pool:
            raise Rejected("empty seed pool")
        if not (math.isfinite(lr) and math.isfinite(mu) and mu > 0 and 1 <= tau and 1 <= bs):
            raise Rejected("lr/mu/local_steps/batch_size out of range")
        eng = self.model.engine
        seed = self.model.settings.seed
        stream = BatchStream(
            self.train, bs, self.token % (1 << 63), self.bundle.manifest.tokenizer.pad_token_id
        )
        theta = eng.params.master.copy()
        seeds, gs, ns, losses = [], [], [], []
        try:
            for t in range(tau):
                k = pool[min(len(pool) - 1, int(uniform(seed, rnd, self.token, t) * len(pool)))]
                batch = stream.batch(rnd * tau + t)
                rec = eng.step(k, lr, mu, lambda b=batch: self.runner.mean_loss(b))
                self.evaluations += len(rec["losses"])
                if rec["status"] != "ok":
                    continue  # a non-finite loss: this step is not reported
                seeds.append(k)
                gs.append(float(rec["g"][0]))
                ns.append(int(batch["input_ids"].shape[0]))
                losses.extend(rec["losses"])
        finally:
            eng.params.master[:] = theta  # back to the global θ, bit for bit
            eng.perturber.at_theta()
        loss = float(np.mean(losses)) if losses else float("nan")
        if not seeds:
            raise Rejected("every local step had a non-finite loss")
        return self.reply(rnd, seeds=seeds, g=gs, n=ns, loss=loss)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
