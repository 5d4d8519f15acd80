"""``exporters.compare``: a bundle on every available provider and on PyTorch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from exporters.compare import compare  # noqa: E402


def test_compare_fp32_lora(make_bundle):
    lines = []
    res = compare(make_bundle("lora"), batch=2, seq=12, threads=1, repeats=2, echo=lines.append)
    backends = [r["backend"] for r in res["rows"]]
    assert backends[0] == "onnxruntime CPUExecutionProvider" and backends[-1] == "pytorch"
    assert res["parity_max_abs_diff"] < 1e-4
    assert all(r["median_s"] > 0 for r in res["rows"])
    assert "parity" in lines[0] and "CPUExecutionProvider" in lines[0]


def test_compare_quantised_labels_the_reference(make_bundle):
    res = compare(
        make_bundle("scales", quantize="int4"), batch=2, seq=12, threads=1, repeats=1, echo=None
    )
    assert res["quantization"] == "int4"
    assert res["rows"][-1]["backend"] == "pytorch (fp32 reference)"
    assert 0 < res["parity_max_abs_diff"] < 0.1 * res["rows"][-1]["loss_mean"]


def test_compare_without_source(make_bundle, tmp_path):
    res = compare(
        make_bundle("norms"),
        model=tmp_path / "gone",
        batch=1,
        seq=8,
        threads=1,
        repeats=1,
        echo=None,
    )
    assert len(res["rows"]) >= 1 and res["parity_max_abs_diff"] == 0.0
    assert any("PyTorch reference skipped" in n for n in res["notes"])


def test_compare_cli(make_bundle):
    from click.testing import CliRunner

    from exporters.compare import main

    res = CliRunner().invoke(
        main,
        [
            "--bundle",
            str(make_bundle("norms")),
            "--batch",
            "1",
            "--seq",
            "8",
            "--repeats",
            "1",
            "--no-torch",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "CPUExecutionProvider" in res.output and "parity" in res.output
    bad = CliRunner().invoke(main, ["--bundle", "/nonexistent/bundle"])
    assert bad.exit_code == 2 and "fix:" in bad.output


def test_edgezo_compare_command(make_bundle):
    from click.testing import CliRunner

    from edgezo.cli import main as edgezo_main

    r = CliRunner().invoke(
        edgezo_main,
        [
            "compare",
            "--bundle",
            str(make_bundle("lora")),
            "--batch",
            "2",
            "--seq",
            "8",
            "--repeats",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "onnxruntime CPUExecutionProvider" in r.output and "parity" in r.output
