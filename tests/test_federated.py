"""Seed-federated ZO (edgezo.federated): 3 clients on the tiny Llama bundle.

Most tests run the protocol in process (edgezo.federated.loop, no Flower); one runs Flower's
simulation engine (Ray) in a subprocess and is skipped when flwr is not installed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgezo.bundle import load_bundle
from edgezo.defaults import default_data
from edgezo.errors import ConfigError
from edgezo.federated import FederationClient, FederationServer, FedSettings, split_examples
from edgezo.federated.loop import (
    HeldoutEval,
    fedavg_bytes,
    load_examples,
    run_rounds,
    sync_all,
)
from edgezo.federated.model import GlobalModel
from edgezo.federated.protocol import parse_drops, round_pool
from edgezo.zo.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
FED = FedSettings(
    rounds=5, local_steps=4, lr=1e-2, mu=1e-3, batch_size=8, pool_size=32, min_clients=1
)


@pytest.fixture(scope="module")
def bundle(make_bundle):
    return load_bundle(make_bundle("lora"))


@pytest.fixture(scope="module")
def data(bundle):
    train, held = default_data()
    return load_examples(bundle, str(train), 40), load_examples(bundle, str(held), 40)[:24]


def federation(bundle, data, tmp_path, fed=FED, n=3):
    server = FederationServer(bundle, fed, tmp_path / "ledger.jsonl", log=lambda _: None)
    clients = {
        f"c{i}": FederationClient(
            bundle, f"c{i}", split_examples(data[0], i, n), tmp_path / f"c{i}"
        )
        for i in range(n)
    }
    return server, clients


def test_three_clients_descend_and_replay_bit_identically(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path)
    evaluate = HeldoutEval(server.model, data[1])
    before = evaluate()
    reports = run_rounds(server, clients, FED.rounds, evaluate)
    losses = [r.heldout for r in reports]
    assert all(r.status == "ok" and r.accepted == 3 and not r.rejected for r in reports)
    assert losses[-1] < before - 0.05 and losses[-1] < losses[0]
    # only (seed, scalar, count) triples go up: a few hundred bytes, vs FedAvg's tensors
    assert max(max(r.up_bytes.values()) for r in reports) < 1000
    assert fedavg_bytes(bundle) == 4 * bundle.manifest.trainable_size
    # every client, caught up, holds exactly the server's tensors
    assert sync_all(server, clients) == {"c0": None, "c1": None, "c2": None}
    for c in clients.values():
        assert c.have == FED.rounds
        assert np.array_equal(c.model.master, server.model.master)
    # and so does anyone replaying the global ledger file on the bundle
    led = Ledger.read(tmp_path / "ledger.jsonl")
    fresh = GlobalModel(bundle, server.model.settings)
    for rec in led.records:
        fresh.apply(rec)
    assert np.array_equal(fresh.master, server.model.master)
    assert not np.array_equal(fresh.master, GlobalModel(bundle, fresh.settings).master)
    # a restarted client reopens its ledger copy from disk at the same θ
    again = FederationClient(bundle, "c0", clients["c0"].train, tmp_path / "c0")
    assert again.have == FED.rounds and np.array_equal(again.model.master, fresh.master)


def test_dropped_client_does_not_stall_and_catches_up(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path)
    sent = []
    orig = server.instructions

    def spy(cid, train=True):
        ins = orig(cid, train)
        sent.append((ins["round"], cid, ins["since"], len(ins["entries"])))
        return ins

    server.instructions = spy
    reports = run_rounds(server, clients, 4, drop=lambda r, c: c == "c2" and r in (1, 2))
    assert [r.accepted for r in reports] == [3, 2, 2, 3]
    assert all(r.status == "ok" for r in reports)
    assert reports[1].rejected == [("c2", "no reply (dropped out)")]
    assert (3, "c2", 0, 3) in sent  # c2 missed two rounds: it gets records 0, 1 and 2
    assert sync_all(server, clients)["c2"] is None
    assert np.array_equal(clients["c2"].model.master, server.model.master)


def _corrupt(kind):
    """A function reply -> the bad message the server receives instead of/besides it."""

    def bad(r, cid, reply):
        m = dict(reply)
        if kind == "bundle":
            m["bundle"] = "0" * 64
        elif kind == "nan":
            m["g"] = [float("nan")] + m["g"][1:]
        elif kind == "inf":
            m["g"] = [float("inf")] + m["g"][1:]
        elif kind == "huge":
            m["g"] = [1e39] + m["g"][1:]
        elif kind == "gap":
            m["have"] = m["have"] - 1
        elif kind == "seed":
            m["seeds"] = [m["seeds"][0] + 1] + m["seeds"][1:]
        elif kind == "lengths":
            m["n"] = m["n"][:-1]
        elif kind == "missing":
            del m["theta"]
        elif kind == "type":
            m["g"] = "1.0"
        elif kind == "digest":
            m["theta"] = "f" * 32
        elif kind == "too_many":
            m.update(seeds=m["seeds"] * 2, g=m["g"] * 2, n=m["n"] * 2)
        elif kind == "not_a_dict":
            m = [1, 2, 3]
        elif kind == "spoof":
            m["client"] = "c0" if cid != "c0" else "c1"
        return m

    return bad


REASONS = {
    "bundle": "bundle fingerprint",
    "nan": "non-finite",
    "inf": "non-finite",
    "huge": "beyond float32",
    "gap": "ledger gap",
    "seed": "not in this round's pool",
    "lengths": "malformed",
    "missing": "malformed: no 'theta'",
    "type": "malformed",
    "digest": "differ",
    "too_many": "at most",
    "not_a_dict": "malformed",
    "spoof": "came from",
}


def _records(path):
    return [
        {k: v for k, v in r.items() if k != "rejected"}
        for r in Ledger.read(path / "ledger.jsonl").records
    ]


@pytest.fixture(scope="module")
def honest(bundle, data, tmp_path_factory):
    """Two rounds of the honest federation: its ledger records and θ."""
    tmp = tmp_path_factory.mktemp("honest")
    server, clients = federation(bundle, data, tmp)
    run_rounds(server, clients, 2)
    return _records(tmp), server.model.master.copy()


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_bad_message_is_rejected_and_ledger_is_intact(bundle, data, honest, tmp_path, kind):
    server, clients = federation(bundle, data, tmp_path / "bad")
    bad = _corrupt(kind)
    # client c1 sends a bad message before its honest reply in round 1
    reports = run_rounds(
        server, clients, 2, tamper=lambda r, c, m: [bad(r, c, m), m] if (r, c) == (1, "c1") else [m]
    )
    assert reports[1].accepted == 3 and len(reports[1].rejected) == 1
    assert REASONS[kind] in reports[1].rejected[0][1]
    # the global ledger is exactly the honest federation's (but for the count of rejections)
    assert _records(tmp_path / "bad") == honest[0]
    assert np.array_equal(server.model.master, honest[1])


def test_replayed_and_stale_messages_are_rejected(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path)
    kept = {}

    def tamper(r, c, m):
        if c == "c0":
            kept[r] = m
        if (r, c) == (1, "c0"):
            return [m, m, kept[0]]  # a duplicate, and round 0's reply again
        return [m]

    reports = run_rounds(server, clients, 2, tamper=tamper)
    reasons = [why for _, why in reports[1].rejected]
    assert reports[1].accepted == 3 and len(reasons) == 2
    assert "already accepted" in reasons[0] and "stale or replayed" in reasons[1]


def test_nonfinite_replies_only_leave_an_empty_round(bundle, data, tmp_path):
    fed = FedSettings(**{**FED.to_dict(), "min_clients": 2})
    server, clients = federation(bundle, data, tmp_path, fed)
    before = server.model.master.copy()
    reports = run_rounds(
        server, clients, 1, tamper=lambda r, c, m: [_corrupt("nan")(r, c, m)] if c != "c0" else [m]
    )
    assert reports[0].status == "empty" and reports[0].accepted == 0
    rec = Ledger.read(tmp_path / "ledger.jsonl").records[0]
    assert rec["status"] == "empty" and rec["seeds"] == [] and rec["rejected"] == 2
    assert np.array_equal(server.model.master, before)


def test_client_refuses_bad_instructions_without_changing_state(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path)
    run_rounds(server, clients, 2)
    c = clients["c0"]
    state = (c.have, c.model.master.copy())
    server.begin_round()
    ins = server.instructions("c0")

    def refused(**change):
        reply = c.handle({**ins, **change})
        assert reply["status"] == "refused"
        assert (c.have, c.model.master.tolist()) == (state[0], state[1].tolist())
        return reply["reason"]

    assert "bundle" in refused(bundle="0" * 64)
    assert c.have < ins["round"]
    assert "ledger gap" in refused(since=ins["round"], entries=[])
    assert "malformed" in refused(since=0)  # entries no longer end at the round
    assert "malformed" in refused(lr="fast")
    engine = json.loads(ins["engine"])
    assert "central" in refused(engine=json.dumps({**engine, "estimator": "onesided"}))
    assert c.handle({**ins})["status"] == "ok"


def test_client_catch_up_rejects_a_corrupted_record(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path)
    run_rounds(server, clients, 2, drop=lambda r, c: c == "c2")
    server.begin_round()
    ins = server.instructions("c2")
    assert ins["since"] == 0 and len(ins["entries"]) == 2
    rec = json.loads(ins["entries"][1])
    rec["g"][0] *= 1.001  # altered in transit
    reply = clients["c2"].handle({**ins, "entries": [ins["entries"][0], json.dumps(rec)]})
    assert reply["status"] == "refused" and "digest" in reply["reason"]
    assert server.confirm(reply, "c2") is not None
    assert clients["c2"].have == 0  # local state dropped: rebuilt from the server next time
    assert clients["c2"].handle(ins)["status"] == "ok"


def test_client_state_of_another_federation_is_dropped(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path / "a")
    run_rounds(server, clients, 2)
    c0 = FederationClient(bundle, "c0", clients["c0"].train, tmp_path / "a" / "c0")
    assert c0.have == 1  # reopened from disk, at federation a's record 0
    other = FederationServer(bundle, FED, tmp_path / "b" / "ledger.jsonl", log=lambda _: None)
    assert other.federation_id != server.federation_id
    reports = run_rounds(other, {"c0": c0}, 1)
    assert reports[0].accepted == 1 and c0.have == 0 and c0.federation == other.federation_id


def test_client_without_a_state_folder(bundle, data, tmp_path):
    server = FederationServer(bundle, FED, tmp_path / "ledger.jsonl", log=lambda _: None)
    clients = {"m": FederationClient(bundle, "m", data[0][:20])}
    assert [r.accepted for r in run_rounds(server, clients, 2)] == [1, 1]
    assert sync_all(server, clients) == {"m": None}


def test_server_resumes_from_its_ledger(bundle, data, tmp_path):
    server, clients = federation(bundle, data, tmp_path)
    run_rounds(server, clients, 2)
    digest = server.model.digest()
    server.close()
    again = FederationServer(
        bundle, FED, tmp_path / "ledger.jsonl", resume=True, log=lambda _: None
    )
    assert again.ledger_rounds == 2 and again.model.digest() == digest


def test_server_lr_scales_the_global_step_and_replays(bundle, data, tmp_path):
    fed = FedSettings(**{**FED.to_dict(), "server_lr": 3.0})
    server, clients = federation(bundle, data, tmp_path, fed)
    run_rounds(server, clients, 2)
    recs = Ledger.read(tmp_path / "ledger.jsonl").records
    assert [r["lr"] for r in recs] == [3.0 * FED.lr] * 2
    assert sync_all(server, clients) == {"c0": None, "c1": None, "c2": None}
    with pytest.raises(ConfigError, match="server_lr"):
        FedSettings(server_lr=0.0)


def test_settings_and_pool():
    with pytest.raises(ConfigError, match="local_steps"):
        FedSettings(local_steps=0)
    with pytest.raises(ConfigError, match="unknown federation settings"):
        FedSettings.from_dict({"rounds": 2, "round": 3})
    with pytest.raises(ConfigError, match="PARTITION@ROUND"):
        parse_drops("2-1")
    assert parse_drops("2@1, 0@3") == {(2, 1), (0, 3)}
    p = round_pool(7, 3, 16)
    assert p == round_pool(7, 3, 16) and p == sorted(set(p)) and len(p) == 16
    assert p != round_pool(7, 4, 16)
    # golden: raw Philox words mod 2**31, stable across numpy versions (a change fails here)
    assert round_pool(7, 3, 4) == [440709149, 692782007, 1562463869, 1649928328]
    assert 8017413001857139639 % (1 << 31) in round_pool(7, 3, 4)


def test_cli_local_engine(make_bundle, tmp_path):
    from click.testing import CliRunner

    from edgezo.cli import main

    out = tmp_path / "fed"
    res = CliRunner().invoke(
        main,
        [
            "federate",
            "--bundle",
            str(make_bundle("lora")),
            "--engine",
            "local",
            "--rounds",
            "3",
            "--lr",
            "1e-2",
            "--mu",
            "1e-3",
            "--batch-size",
            "8",
            "--max-length",
            "40",
            "--drop",
            "1@1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "round 2: held-out loss" in res.output and "3/3 clients hold" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout"][-1] < summary["heldout_before"]
    assert summary["history"][1]["accepted"] == 2
    res = CliRunner().invoke(
        main,
        ["federate", "--bundle", str(make_bundle("lora")), "--engine", "local", "--out", str(out)],
    )
    assert res.exit_code == 2 and "already holds a federation" in res.output
    res = CliRunner().invoke(
        main,
        [  # the server restarts: one more round, clients catch up
            "federate",
            "--bundle",
            str(make_bundle("lora")),
            "--engine",
            "local",
            "--rounds",
            "4",
            "--lr",
            "1e-2",
            "--mu",
            "1e-3",
            "--batch-size",
            "8",
            "--max-length",
            "40",
            "--resume",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "round 3: held-out loss" in res.output and "round 2:" not in res.output
    assert "3/3 clients hold" in res.output
    assert len(Ledger.read(out / "ledger.jsonl").records) == 4
    app = tmp_path / "app"
    res = CliRunner().invoke(
        main,
        [
            "federate",
            "--bundle",
            str(make_bundle("lora")),
            "--write-flwr-app",
            str(app),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    conf = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert conf["components"]["serverapp"] == "edgezo.federated.flwr_app:server_app"
    assert conf["config"]["resume"] is False and conf["config"]["rounds"] == 5


def test_import_without_flower_and_without_torch(make_bundle):
    code = textwrap.dedent("""
        import sys
        sys.modules["flwr"] = None  # as if Flower were not installed
        import edgezo.federated, edgezo.cli
        from edgezo.errors import ConfigError
        from edgezo.federated.flower_apps import make_server_app
        try:
            make_server_app()
        except ConfigError as e:
            assert "pip install 'edgezo[federated]'" in e.fix, e.fix
        else:
            raise SystemExit("no error without flwr")
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_flower_simulation_three_clients_with_a_dropout(make_bundle, tmp_path):
    """Flower's simulation engine (Ray): 3 virtual SuperNodes, partition 2 fails in round 1."""
    pytest.importorskip("flwr", reason="Flower is not installed: pip install 'edgezo[federated]'")
    pytest.importorskip(
        "ray", reason="Flower's simulation needs Ray: pip install 'edgezo[federated]'"
    )
    train, held = default_data()
    cfg = {
        "bundle": str(make_bundle("lora")),
        "data": str(train),
        "eval-data": str(held),
        "out": str(tmp_path / "run"),
        "client-state": str(tmp_path / "clients"),
        "rounds": 3,
        "local-steps": 4,
        "lr": 1e-2,
        "mu": 1e-3,
        "batch-size": 8,
        "min-clients": 2,
        "max-length": 40,
        "drop": "2@1",
        "wait-s": 30.0,
    }
    code = textwrap.dedent(f"""
        import json
        from flwr.simulation import run_simulation
        from edgezo.federated.flower_apps import make_client_app, make_server_app
        cfg = json.loads({json.dumps(json.dumps(cfg))})
        run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                       num_supernodes=3, backend_config={{"client_resources":
                       {{"num_cpus": 1, "num_gpus": 0.0}}, "init_args": {{"num_cpus": 2}}}})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    hist = summary["history"]
    assert [h["accepted"] for h in hist] == [3, 2, 3], out[-3000:]
    assert "simulated dropout" in hist[1]["rejected"][0][1]
    assert summary["heldout"][-1] < summary["heldout_before"]
    assert len(summary["synced"]) == 3 and all(v is None for v in summary["synced"].values())
    ups = [b for h in hist for b in h["up_bytes"].values()]
    assert ups and max(ups) < 2000  # Flower's serialised reply: seeds and scalars only
    led = Ledger.read(tmp_path / "run" / "ledger.jsonl")
    assert [r["clients"] for r in led.records] == [3, 2, 3]
    assert all(math.isfinite(g) for r in led.records for g in r["g"])


def test_default_client_rates_follow_the_measurements():
    from edgezo.cli.federate import LORA_FA_ROUND_RATE, default_client_lr
    from edgezo.config import MODE_DEFAULTS

    # LoRA-FA: the measured global step per round, whatever the server lr
    for server_lr in (1.0, 3.0, 5.0):
        lr = default_client_lr("lora_fa", MODE_DEFAULTS["lora_fa"], server_lr)
        assert lr * server_lr == pytest.approx(LORA_FA_ROUND_RATE)
    assert default_client_lr("lora", MODE_DEFAULTS["lora"], 3.0) == 3e-3
    norms = MODE_DEFAULTS["norms"]
    assert default_client_lr("norms", norms, 3.0) == pytest.approx(
        norms["lr"] / (1 - norms["momentum"])
    )
