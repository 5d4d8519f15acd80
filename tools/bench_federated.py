"""Seed-federated ZO vs FedAvg bytes, and the federation vs each client alone.

For one bundle and N clients (client i gets examples i, i+N, ... of --data):

- bytes per client per round: the seed federation's upload and download as measured (compact
  JSON of the protocol message, and Flower's serialised RecordDict of it when flwr is
  installed) next to FedAvg's, computed from the bundle's trainable tensors (float32 values,
  the same tensors both ways);
- held-out loss (--eval-data, scored at the global θ) after each round for the federation, and
  for each client training alone for the same number of rounds — the same local steps, hence
  the same number of its own forward evaluations (2·τ per round, central two-point).

    python tools/bench_federated.py                       # SmolLM2-135M LoRA default bundle
    python tools/bench_federated.py --bundle B --rounds 5 --local-steps 4 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.config import MODE_DEFAULTS, recipe_key  # noqa: E402
from edgezo.defaults import default_data, ensure_default_bundle  # noqa: E402
from edgezo.federated import (  # noqa: E402
    FederationClient,
    FederationServer,
    FedSettings,
    split_examples,
)
from edgezo.federated.loop import (  # noqa: E402
    HeldoutEval,
    fedavg_bytes,
    load_examples,
    run_rounds,
    sync_all,
)


def flower_bytes(msg: dict) -> int | None:
    """Serialized size of the message as the Flower adapters send it (None without flwr)."""
    try:
        from flwr.app import ConfigRecord, RecordDict

        from edgezo.federated.flower_apps import RECORD, record_bytes
    except ImportError:
        return None
    return record_bytes(RecordDict({RECORD: ConfigRecord(msg)}))


def run(
    bundle,
    fed: FedSettings,
    parts: dict[str, list],
    held: list,
    workdir: Path,
    threads: int,
    label: str,
):
    server = FederationServer(bundle, fed, workdir / label / "ledger.jsonl", log=lambda _: None)
    clients = {
        cid: FederationClient(bundle, cid, ex, workdir / label / cid, threads=threads)
        for cid, ex in parts.items()
    }
    evaluate = HeldoutEval(server.model, held, threads=threads)
    before = evaluate()
    replies: list[dict] = []
    orig = server.submit

    def keep(reply, sender=None):  # the last reply of each round, to size it for Flower
        replies.append(reply)
        return orig(reply, sender)

    server.submit = keep
    t0 = time.perf_counter()
    reports = run_rounds(
        server,
        clients,
        fed.rounds,
        evaluate,
        log=lambda line: print(f"  [{label}] {line}", flush=True),
    )
    seconds = time.perf_counter() - t0
    synced = sync_all(server, clients)
    evals = {cid: c.evaluations for cid, c in clients.items()}
    server.close()
    return before, reports, replies, synced, evals, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--eval-data", default=None)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--mu", type=float, default=None)
    ap.add_argument("--pool-size", type=int, default=64)
    ap.add_argument(
        "--server-lr",
        type=float,
        default=1.0,
        help="global step = server-lr × the mean of the clients' local steps",
    )
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=30, help="held-out examples scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-alone", action="store_true", help="skip the clients-alone runs")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args()

    bundle = load_bundle(a.bundle or ensure_default_bundle())
    mode = MODE_DEFAULTS.get(
        recipe_key(bundle.manifest.trainable_mode, bundle.manifest.lora), MODE_DEFAULTS["lora"]
    )
    lr = (
        a.lr
        if a.lr is not None
        # as edgezo federate's default
        else (
            3e-3
            if bundle.manifest.trainable_mode == "lora"
            else mode["lr"] / (1 - mode["momentum"])
        )
    )
    mu = a.mu if a.mu is not None else mode["mu"]
    sample, sample_eval = default_data()
    examples = load_examples(bundle, a.data or str(sample), a.max_length)
    held = load_examples(bundle, a.eval_data or str(sample_eval), a.max_length)[: a.heldout]
    parts = {f"client-{i}": split_examples(examples, i, a.clients) for i in range(a.clients)}
    fed = FedSettings(
        rounds=a.rounds,
        local_steps=a.local_steps,
        lr=lr,
        mu=mu,
        batch_size=a.batch_size,
        pool_size=a.pool_size,
        server_lr=a.server_lr,
    )
    n = bundle.manifest.trainable_size
    print(
        f"bundle {bundle.path} ({bundle.manifest.trainable_mode}, {n:,} trainable values); "
        f"{a.clients} clients × {len(parts['client-0'])} examples, {len(held)} held-out; "
        f"{a.rounds} rounds × {a.local_steps} local steps, batch {a.batch_size}, lr {lr:g}, "
        f"μ {mu:g}, pool {a.pool_size}, server lr {a.server_lr:g}, max length {a.max_length}",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    before, reports, replies, synced, evals, secs = run(
        bundle, fed, parts, held, work, a.threads, "federation"
    )
    ups = [b for r in reports for b in r.up_bytes.values()]
    downs = [b for r in reports for b in r.down_bytes.values()]
    proto = [b for b in (flower_bytes(m) for m in replies) if b is not None]
    avg = fedavg_bytes(bundle)
    print(f"\nbytes per client per round (measured over {len(ups)} replies):")
    print(
        f"  seed-ZO upload   JSON max {max(ups):,} B, mean {sum(ups) / len(ups):,.0f} B"
        + (f"; Flower RecordDict max {max(proto):,} B" if proto else "")
    )
    print(f"  seed-ZO download JSON max {max(downs):,} B, mean {sum(downs) / len(downs):,.0f} B")
    print(
        f"  FedAvg           {avg:,} B up and {avg:,} B down ({n:,} float32 values) "
        f"-> {avg / max(ups + proto):,.0f}x the seed-ZO upload"
    )
    same = sum(v is None for v in synced.values())
    print(
        f"  replay: {same}/{len(synced)} clients hold the server's tensors bit for bit; "
        f"forward evaluations per client: {sorted(set(evals.values()))}; {secs:.0f} s"
    )

    alone = {}
    solo = FedSettings(**{**fed.to_dict(), "server_lr": 1.0})  # one client: its own steps
    if not a.no_alone:
        for cid, ex in parts.items():
            b0, reps, _, _, ev, _ = run(
                bundle, solo, {cid: ex}, held, work, a.threads, f"{cid}-alone"
            )
            alone[cid] = (b0, [r.heldout for r in reps], ev[cid])
    fed_losses = [r.heldout for r in reports]
    print("\nheld-out loss after each round (equal forward evaluations per client):")
    head = "round  federation" + "".join(f"  {cid + ' alone':>15}" for cid in alone)
    print(head)
    print(f"{'0':>5}  {before:10.4f}" + "".join(f"  {v[0]:15.4f}" for v in alone.values()))
    for r, loss in enumerate(fed_losses, start=1):
        print(f"{r:>5}  {loss:10.4f}" + "".join(f"  {v[1][r - 1]:15.4f}" for v in alone.values()))
    if alone:
        best = min(v[1][-1] for v in alone.values())
        verdict = "at least as good as" if fed_losses[-1] <= best else "WORSE than"
        print(
            f"federation after {a.rounds} rounds: {fed_losses[-1]:.4f}, {verdict} the best "
            f"client alone ({best:.4f}) at {max(v[2] for v in alone.values())} forward "
            "evaluations each"
        )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "bundle": str(bundle.path),
                    "trainable_values": n,
                    "settings": fed.to_dict(),
                    "upload_json_max": max(ups),
                    "upload_flower_max": max(proto) if proto else None,
                    "download_json_max": max(downs),
                    "fedavg_bytes": avg,
                    "heldout_before": before,
                    "federation": fed_losses,
                    "alone": {c: v[1] for c, v in alone.items()},
                    "synced": synced,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
