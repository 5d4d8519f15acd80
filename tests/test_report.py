"""`edgezo report`: the summary table and loss plot of a real (tiny) run folder."""

import json

import pytest
from click.testing import CliRunner

from edgezo.config import FinetuneConfig
from edgezo.errors import EdgezoError
from edgezo.report import load_report
from edgezo.train import finetune


@pytest.fixture(scope="module")
def run_dir(make_bundle, memo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    cfg = FinetuneConfig(
        bundle=str(make_bundle("lora")),
        data=str(memo_data[0]),
        eval_data=str(memo_data[1]),
        out=str(out),
        steps=12,
        batch_size=4,
        max_length=32,
        eval_every=4,
        lr=3e-3,
        mu=1e-2,
        threads=1,
    )
    finetune(cfg, log=lambda *a, **k: None, progress=False)
    # a second session: the seconds axis continues, the ledger grows
    finetune(
        FinetuneConfig(**{**cfg.__dict__, "steps": 16}),
        resume=True,
        log=lambda *a, **k: None,
        progress=False,
    )
    return out


def test_report_table_reads_the_run(run_dir):
    rep = load_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    table = rep.table()
    assert f"{summary['heldout_before']:.4f} -> {summary['heldout_after']:.4f}" in table
    assert summary["stop_reason"] in table and "lr changes in the ledger" in table
    assert rep.steps == list(range(1, 17)) and len(rep.lrs) == 16
    assert [e[0] for e in rep.evals][:2] == [0, 4] and rep.evals[-1][0] == 16
    assert all(b >= a for a, b in zip(rep.train_seconds, rep.train_seconds[1:], strict=False))


def test_report_cli_writes_png(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from edgezo.cli import main

    png = tmp_path / "loss.png"
    r = CliRunner().invoke(main, ["report", "--run", str(run_dir), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert "held-out loss before -> after" in r.output and f"plot: {png}" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib(run_dir, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from edgezo.report import plot

    assert plot(load_report(run_dir), run_dir / "x.png") is None
    assert not (run_dir / "x.png").exists()


def test_report_refuses_a_non_run(tmp_path):
    with pytest.raises(EdgezoError, match="not a run folder"):
        load_report(tmp_path)
