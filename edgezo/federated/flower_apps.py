"""Flower adapters: a ``ServerApp`` and a ``ClientApp`` (Message API) around the pure core.

Each protocol message travels as one ``ConfigRecord`` named ``"edgezo"`` inside the message's
``RecordDict``: ints, floats, strings and lists of them, no ``ArrayRecord`` — no tensor ever
crosses the wire. The server samples ``fraction`` of the connected nodes (at least
``min-clients``, waiting up to ``wait-s`` for them), gives each round ``round-timeout-s``
and goes on with the replies it has: a node that drops out, errs or times out simply
contributes nothing, and a bad reply is rejected by :class:`FederationServer` with a reason.

Configuration (``[tool.flwr.app.config]`` of a Flower app, ``--run-config``, or the dict given to
:func:`make_server_app` / :func:`make_client_app`); a node's ``--node-config`` overrides
``bundle``/``data`` and names its ``partition-id`` / ``num-partitions``:

    bundle, data, eval-data, out, client-state, rounds, local-steps, lr, mu, batch-size,
    pool-size, fraction, min-clients, seed, max-length, round-timeout-s, wait-s, threads,
    server-lr (global step = server-lr × the clients' weighted mean step), resume (continue the
    ledger in ``out`` up to ``rounds`` rounds in all), clip (bound on each uploaded |g|; 0: off),
    drop ("PID@ROUND,..." makes partition PID fail in ROUND: a simulated dropout)

``flwr`` is imported here only; ``pip install 'edgezo[federated]'`` provides it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..bundle import load_bundle
from ..errors import ConfigError
from .client import FederationClient, split_examples
from .loop import HeldoutEval, RoundReport, load_examples, write_summary
from .protocol import FedSettings, parse_drops
from .server import FederationServer

DEFAULTS: dict[str, Any] = {
    "bundle": "",
    "data": "",
    "eval-data": "",
    "out": "runs/federate",
    "client-state": "",
    "rounds": 5,
    "local-steps": 4,
    "lr": 1e-3,
    "mu": 1e-3,
    "batch-size": 4,
    "pool-size": 64,
    "fraction": 1.0,
    "min-clients": 1,
    "seed": 0,
    "max-length": 64,
    "round-timeout-s": 600.0,
    "wait-s": 60.0,
    "threads": 1,
    "drop": "",
    "server-lr": 1.0,
    "resume": False,
    "clip": 0.0,
}
RECORD = "edgezo"


def require_flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(
            "Flower (flwr) is not installed, so the federation cannot run",
            "pip install 'edgezo[federated]'",
        ) from None


def fed_settings(cfg: dict[str, Any]) -> FedSettings:
    return FedSettings(
        seed=int(cfg["seed"]),
        rounds=int(cfg["rounds"]),
        local_steps=int(cfg["local-steps"]),
        lr=float(cfg["lr"]),
        mu=float(cfg["mu"]),
        batch_size=int(cfg["batch-size"]),
        pool_size=int(cfg["pool-size"]),
        fraction=float(cfg["fraction"]),
        min_clients=int(cfg["min-clients"]),
        server_lr=float(cfg["server-lr"]),
        clip=float(cfg["clip"]) if float(cfg["clip"]) > 0 else None,
    )


def _merged(base: dict[str, Any], *more: Any) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    cfg.update(base)
    for m in more:
        cfg.update({k: v for k, v in dict(m or {}).items()})
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"partition-id", "num-partitions"})
    if unknown:
        raise ConfigError(
            f"unknown federation config keys: {unknown}", f"use only: {', '.join(sorted(DEFAULTS))}"
        )
    return cfg


def _send_and_receive(grid, chosen: list[str], msgs: list, timeout: float):
    """(node, reply) for the replies that arrive within ``timeout``, each matched to the node
    its instruction went to (an error reply the SuperLink writes for a vanished node names the
    SuperLink as its source)."""
    ids = list(grid.push_messages(msgs))
    owner = dict(zip(ids, chosen, strict=True))
    pending = set(ids)
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for rep in grid.pull_messages(list(pending)):
            mid = rep.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                yield owner[mid], rep
        if pending:
            time.sleep(0.5)


def _short(reason: str) -> str:
    """The last line of a remote traceback (the exception and its message)."""
    lines = [x.strip() for x in str(reason).splitlines() if x.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def record_bytes(content) -> int:
    """Serialized size of a message's RecordDict (Flower's protobuf), as sent on the wire."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


# -- server -----------------------------------------------------------------------------------


def make_server_app(config: dict[str, Any] | None = None):
    """A ``ServerApp`` running the seed federation (``config`` under the run config)."""
    require_flwr()
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        cfg = _merged(config or {}, context.run_config)
        run_server(grid, cfg, ConfigRecord, Message, RecordDict)

    return app


def run_server(grid, cfg: dict[str, Any], ConfigRecord, Message, RecordDict) -> dict:  # noqa: N803
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    bundle = load_bundle(cfg["bundle"])
    fed = fed_settings(cfg)
    server = FederationServer(
        bundle, fed, out / "ledger.jsonl", log=log, resume=bool(cfg["resume"])
    )
    evaluate = None
    if cfg["eval-data"]:
        evaluate = HeldoutEval(
            server.model,
            load_examples(bundle, cfg["eval-data"], int(cfg["max-length"])),
            threads=int(cfg["threads"]),
        )
    deadline = time.monotonic() + float(cfg["wait-s"])
    while len(list(grid.get_node_ids())) < fed.min_clients and time.monotonic() < deadline:
        time.sleep(0.5)
    before = evaluate() if evaluate else None
    if before is not None:
        log(f"edgezo federate: held-out loss before: {before:.4f}")

    def exchange(train: bool) -> list[tuple[str, dict | None, str | None, int, int]]:
        nodes = [str(n) for n in grid.get_node_ids()]
        chosen = server.sample(nodes) if train else sorted(nodes)
        msgs, down = [], {}
        for cid in chosen:
            content = RecordDict({RECORD: ConfigRecord(server.instructions(cid, train))})
            down[cid] = record_bytes(content)
            msgs.append(
                Message(
                    content, dst_node_id=int(cid), message_type="train", group_id=str(server.round)
                )
            )
        got = []
        for cid, rep in _send_and_receive(grid, chosen, msgs, float(cfg["round-timeout-s"])):
            if rep.has_error():
                got.append((cid, None, f"client error: {_short(rep.error.reason)}", 0, down[cid]))
            elif str(rep.metadata.src_node_id) != cid:
                got.append(
                    (cid, None, f"reply came from node {rep.metadata.src_node_id}", 0, down[cid])
                )
            elif RECORD not in rep.content.config_records:
                got.append((cid, None, f"malformed: no {RECORD!r} record", 0, down[cid]))
            else:
                reply = {
                    k: (list(v) if isinstance(v, list) else v)
                    for k, v in rep.content.config_records[RECORD].items()
                }
                got.append((cid, reply, None, record_bytes(rep.content), down[cid]))
        for cid in set(chosen) - {g[0] for g in got}:
            got.append((cid, None, "no reply before the round timeout (dropped)", 0, down[cid]))
        return got

    reports = []
    for _ in range(max(0, fed.rounds - server.ledger_rounds)):  # rounds: the total, on resume
        r = server.begin_round()
        up, down = {}, {}
        for sender, reply, error, nup, ndown in exchange(train=True):
            down[sender] = ndown
            if error is not None:
                server.reject(sender, error)
                continue
            up[sender] = nup
            server.submit(reply, sender=sender)
        rec = server.finish_round()
        rep = RoundReport(
            r,
            rec["status"],
            rec["clients"],
            list(server.rejections),
            up,
            down,
            evaluate() if evaluate else None,
        )
        reports.append(rep)
        log(f"edgezo federate: {rep.line()}")

    server.begin_round()  # no training: every client catches up to the final θ
    synced = {}
    for sender, reply, error, _, _ in exchange(train=False):
        synced[sender] = error if error is not None else server.confirm(reply, sender)
    same = sum(v is None for v in synced.values())
    log(
        f"edgezo federate: {same}/{len(synced)} clients hold the server's final tensors bit "
        "for bit" + "".join(f"; {c}: {why}" for c, why in synced.items() if why)
    )
    summary = write_summary(out, server, before, reports, synced)
    server.close()
    return summary


# -- client -----------------------------------------------------------------------------------

_CLIENTS: dict[tuple, FederationClient] = {}  # per process (a Ray actor or a SuperNode)


def make_client_app(config: dict[str, Any] | None = None):
    """A ``ClientApp`` that answers the seed federation's instructions."""
    require_flwr()
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        cfg = _merged(config or {}, context.run_config, context.node_config)
        pid = int(cfg.get("partition-id", 0))
        count = int(cfg.get("num-partitions", 1))
        ins = msg.content.config_records.get(RECORD)
        rnd = ins.get("round", -1) if ins is not None else -1
        if (pid, rnd) in parse_drops(cfg["drop"]) and ins.get("local_steps", 0):
            raise RuntimeError(f"simulated dropout of partition {pid} in round {rnd}")
        client = _client(cfg, str(context.node_id), pid, count)
        reply = client.handle(
            {k: (list(v) if isinstance(v, list) else v) for k, v in (ins or {}).items()}
        )
        return Message(RecordDict({RECORD: ConfigRecord(reply)}), reply_to=msg)

    return app


def _client(cfg: dict[str, Any], node: str, pid: int, count: int) -> FederationClient:
    key = (node, cfg["bundle"], cfg["data"], pid, count, cfg["client-state"])
    if key in _CLIENTS and _CLIENTS[key].stale():
        _CLIENTS.pop(key).close()  # another worker process moved this node's state on
    if key not in _CLIENTS:
        bundle = load_bundle(cfg["bundle"])
        examples = load_examples(bundle, cfg["data"], int(cfg["max-length"]))
        state = Path(cfg["client-state"]) / f"node-{node}" if cfg["client-state"] else None
        _CLIENTS[key] = FederationClient(
            bundle,
            node,
            split_examples(examples, pid, count),
            state_dir=state,
            threads=int(cfg["threads"]),
        )
    return _CLIENTS[key]
