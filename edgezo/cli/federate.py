"""``edgezo federate``: seed-federated personalisation of one bundle by N clients.

``--engine flower`` (default) runs Flower's simulation engine (Ray) with N virtual SuperNodes;
``--engine local`` runs the same protocol in this process without Flower. Each client gets the
examples ``i, i + N, ...`` of ``--data``; the server scores ``--eval-data`` after each round.
``--write-flwr-app DIR`` writes a Flower app folder for ``flwr run`` / SuperLink + SuperNodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import ConfigError

FLWR_APP = """\
# A Flower app that runs edgezo's seed federation (written by `edgezo federate --write-flwr-app`).
# Simulation:  flwr run {dir} local --stream     ("local": Flower's built-in simulation
#              connection; edgezo federate --engine flower does the same without flwr run)
# Deployment:  flower-superlink --insecure; per device: flower-supernode --insecure
#              --superlink 127.0.0.1:8000 --port 909N --node-config "partition-id=N
#              num-partitions={clients}"; a [superlink.NAME] connection with
#              address = "127.0.0.1:8000" and insecure = true in $FLWR_HOME/config.toml;
#              then flwr run {dir} NAME --stream (edgezo: docs/guides/federation.md)
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgezo-federation"
version = "0.1.0"
dependencies = ["edgezo[federated]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgezo"

[tool.flwr.app.components]
serverapp = "edgezo.federated.flwr_app:server_app"
clientapp = "edgezo.federated.flwr_app:client_app"

[tool.flwr.app.config]
{config}
"""


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, str) else repr(v)


#: LoRA-FA's measured rate of one round's global step (client lr × server lr): 2.0 beat 0.6 and
#: 0.2, and 6.0 rose again after round 3 (docs/benchmarks/federation.md)
LORA_FA_ROUND_RATE = 2.0


def default_client_lr(key: str, mode: dict, server_lr: float) -> float:
    """The clients' rate when --lr is not given; they take plain central ZO-SGD steps."""
    if key == "lora":
        return 3e-3  # measured with server lr 3 (docs/benchmarks/federation.md)
    if key == "lora_fa":
        return LORA_FA_ROUND_RATE / server_lr  # the measured global step, split
    return mode["lr"] / (1.0 - mode["momentum"])  # momentum's effective rate, unmeasured


@click.command("federate", context_settings={"show_default": True})
@click.option("--bundle", default=None, help="bundle folder (default: SmolLM2-135M LoRA)")
@click.option(
    "--data", default=None, help="JSONL data split across the clients (default: the sample notes)"
)
@click.option(
    "--eval-data",
    default=None,
    help="held-out JSONL the server scores each round (default: the sample held-out notes)",
)
@click.option("--clients", default=3, help="number of clients (virtual SuperNodes)")
@click.option("--rounds", default=5)
@click.option("--local-steps", default=4, help="local ZO steps per client per round")
@click.option(
    "--lr",
    type=float,
    default=None,
    help="default: 3e-3 for LoRA; LoRA-FA: 2.0 / --server-lr (both measured); other modes: "
    "their lr/(1-momentum)",
)
@click.option("--mu", type=float, default=None, help="default: per trainable mode")
@click.option(
    "--server-lr",
    type=float,
    default=None,
    help="global step = this × the weighted mean of the clients' local steps; "
    "default: the clients per round (their sum — each client walks its own seeds, "
    "so the federation moves as far as all their steps; 1: the plain mean)",
)
@click.option(
    "--clip", default=0.0, help="bound on each uploaded scalar |g| before aggregation (0: off)"
)
@click.option("--batch-size", default=4)
@click.option("--pool-size", default=64, help="candidate seeds offered per round")
@click.option("--fraction", default=1.0, help="share of clients sampled per round")
@click.option("--min-clients", default=1, help="fewer accepted replies: the round is empty")
@click.option("--seed", default=0)
@click.option("--max-length", default=64)
@click.option("--threads", default=1, help="ONNX Runtime threads per client")
@click.option(
    "--out",
    default="runs/federate",
    type=click.Path(),
    help="server folder: ledger.jsonl, metrics.jsonl, summary.json",
)
@click.option("--engine", type=click.Choice(["flower", "local"]), default="flower")
@click.option(
    "--resume",
    is_flag=True,
    help="continue the federation in --out (its ledger) up to --rounds rounds in all",
)
@click.option("--round-timeout", default=600.0, help="seconds a round waits for replies")
@click.option("--wait", default=60.0, help="seconds to wait for --min-clients nodes")
@click.option("--drop", default="", help="simulated dropouts: PARTITION@ROUND,...")
@click.option(
    "--write-flwr-app",
    "app_dir",
    default=None,
    type=click.Path(),
    help="write a Flower app folder with these settings for `flwr run`, and exit",
)
def federate(
    bundle,
    data,
    eval_data,
    clients,
    rounds,
    local_steps,
    lr,
    mu,
    server_lr,
    clip,
    batch_size,
    pool_size,
    fraction,
    min_clients,
    seed,
    max_length,
    threads,
    out,
    engine,
    resume,
    round_timeout,
    wait,
    drop,
    app_dir,
):
    """Personalise a bundle with N clients that exchange only seeds and scalars (FedKSeed)."""
    from ..bundle import load_bundle
    from ..config import MODE_DEFAULTS, recipe_key
    from ..defaults import default_data, ensure_default_bundle
    from ..federated.loop import fedavg_bytes

    b = load_bundle(bundle or ensure_default_bundle(click.echo))
    if b.manifest.task != "causal_lm":
        raise ConfigError(
            f"bundle task {b.manifest.task!r} is not supported by federate",
            "export a causal_lm bundle",
        )
    key = recipe_key(b.manifest.trainable_mode, b.manifest.lora)
    mode = MODE_DEFAULTS.get(key, MODE_DEFAULTS["lora"])
    mu = mode["mu"] if mu is None else mu
    # measured: the mean moves no further than one client (docs/benchmarks/federation.md)
    if server_lr is None:
        server_lr = float(max(1, round(clients * fraction)))
    if lr is None:
        lr = default_client_lr(key, mode, server_lr)
    if data is None:
        sample, sample_eval = default_data()
        data, eval_data = str(sample), eval_data or str(sample_eval)
    out = Path(out)
    if (out / "ledger.jsonl").exists() and not resume:
        raise ConfigError(
            f"{out} already holds a federation (ledger.jsonl)",
            f"continue it with --resume --out {out}, or choose another --out",
        )
    if resume and not (out / "ledger.jsonl").exists():
        raise ConfigError(
            f"--resume: {out} holds no federation (no ledger.jsonl)",
            "point --out at the federation's folder, or drop --resume",
        )
    cfg = {
        "bundle": str(Path(b.path).resolve()),
        "data": str(Path(data).resolve()),
        "eval-data": str(Path(eval_data).resolve()) if eval_data else "",
        "out": str(out.resolve()),
        "client-state": str((out / "clients").resolve()),
        "rounds": rounds,
        "local-steps": local_steps,
        "lr": lr,
        "mu": mu,
        "batch-size": batch_size,
        "pool-size": pool_size,
        "fraction": fraction,
        "min-clients": min_clients,
        "seed": seed,
        "max-length": max_length,
        "threads": threads,
        "drop": drop,
        "round-timeout-s": round_timeout,
        "wait-s": wait,
        "server-lr": server_lr,
        "resume": resume,
        "clip": clip,
    }
    from ..federated.flower_apps import fed_settings

    fed_settings({**cfg})  # every setting checked before anything starts
    if app_dir is not None:
        d = Path(app_dir)
        d.mkdir(parents=True, exist_ok=True)
        body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in cfg.items())
        (d / "pyproject.toml").write_text(FLWR_APP.format(dir=d, config=body, clients=clients))
        click.echo(f"Flower app written: {d / 'pyproject.toml'} (run it with: flwr run {d})")
        return
    fedavg = fedavg_bytes(b)
    click.echo(
        f"edgezo federate: {clients} clients, {rounds} rounds × {local_steps} local steps "
        f"(batch {batch_size}, lr {lr:g}, μ {mu:g}, server lr {server_lr:g}, pool "
        f"{pool_size}); engine {engine}"
    )
    click.echo(
        f"edgezo federate: FedAvg of the same {b.manifest.trainable_size:,} trainable "
        f"values would send {fedavg:,} B up and {fedavg:,} B down per client per round"
    )
    if engine == "flower":
        _run_flower(cfg, clients)
    else:
        _run_local(b, cfg, clients)
    summary = json.loads((out / "summary.json").read_text())
    held = [h for h in summary["heldout"] if h is not None]
    ups = [v for h in summary["history"] for v in h["up_bytes"].values()]
    if held and summary["heldout_before"] is not None:
        click.echo(
            f"edgezo federate: held-out loss {summary['heldout_before']:.4f} -> "
            f"{held[-1]:.4f} after {summary['rounds']} rounds"
        )
    if ups:
        click.echo(
            f"edgezo federate: upload per client per round: max {max(ups)} B "
            f"(FedAvg: {fedavg:,} B, {fedavg / max(ups):,.0f}x more); ledger "
            f"{out / 'ledger.jsonl'}"
        )


def _run_flower(cfg: dict, clients: int) -> None:
    from ..federated.flower_apps import make_client_app, make_server_app, require_flwr

    require_flwr()
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not (Path(cfg["out"]) / "summary.json").exists():
        raise ConfigError(
            "the Flower simulation ended without a result (see its log above)",
            "run again with --engine local to check the setup without Ray",
        )


def _run_local(bundle, cfg: dict, clients: int) -> None:
    from ..federated.client import FederationClient, split_examples
    from ..federated.flower_apps import fed_settings
    from ..federated.loop import HeldoutEval, load_examples, run_rounds, sync_all, write_summary
    from ..federated.protocol import parse_drops
    from ..federated.server import FederationServer

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    fed = fed_settings(cfg)
    server = FederationServer(
        bundle, fed, out / "ledger.jsonl", log=click.echo, resume=bool(cfg["resume"])
    )
    examples = load_examples(bundle, cfg["data"], int(cfg["max-length"]))
    parts = {
        f"client-{i}": FederationClient(
            bundle,
            f"client-{i}",
            split_examples(examples, i, clients),
            Path(cfg["client-state"]) / f"client-{i}",
            threads=int(cfg["threads"]),
        )
        for i in range(clients)
    }
    evaluate = None
    if cfg["eval-data"]:
        evaluate = HeldoutEval(
            server.model, load_examples(bundle, cfg["eval-data"], int(cfg["max-length"]))
        )
    before = evaluate() if evaluate else None
    if before is not None:
        click.echo(f"edgezo federate: held-out loss before: {before:.4f}")
    drops = {(f"client-{p}", r) for p, r in parse_drops(cfg["drop"])}
    reports = run_rounds(
        server,
        parts,
        max(0, fed.rounds - server.ledger_rounds),
        evaluate,
        drop=lambda r, c: (c, r) in drops,
        log=click.echo,
    )
    synced = sync_all(server, parts)
    same = sum(v is None for v in synced.values())
    click.echo(
        f"edgezo federate: {same}/{len(synced)} clients hold the server's final tensors bit for bit"
    )
    write_summary(out, server, before, reports, synced)
    server.close()
