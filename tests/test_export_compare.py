"""``exporters.compare``: a bundle on every available provider and on PyTorch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgezo.errors import EdgezoError  # noqa: E402
from exporters.compare import compare  # noqa: E402


def test_compare_fp32_lora(make_bundle):
    lines = []
    res = compare(make_bundle("lora"), batch=2, seq=12, threads=1, repeats=2, echo=lines.append)
    backends = [r["backend"] for r in res["rows"]]
    assert backends[0] == "onnxruntime CPUExecutionProvider"
    assert backends[-3:] == ["pytorch", "pytorch bf16 autocast", "pytorch bf16 weights"]
    assert res["parity_max_abs_diff"] < 1e-4
    assert all(r["median_s"] > 0 for r in res["rows"])
    rows = {r["backend"]: r for r in res["rows"]}
    # bf16 rounds: the same model, a loss near the fp32 one, outside the parity figure
    bf16 = rows["pytorch bf16 weights"]
    assert not bf16["parity"] and 0 < bf16["max_abs_diff"] < 0.1 * bf16["loss_mean"]
    assert "parity" in lines[0] and "CPUExecutionProvider" in lines[0]


def test_compare_other_precisions(make_bundle):
    res = compare(
        make_bundle("lora"),
        batch=2,
        seq=12,
        threads=1,
        repeats=1,
        echo=None,
        others=(make_bundle("lora", precision="int8"),),
        torch_modes=("fp32",),
    )
    rows = {r["backend"]: r for r in res["rows"]}
    int8 = next(r for k, r in rows.items() if k.startswith("onnxruntime CPU int8"))
    assert not int8["parity"] and 0 < int8["max_abs_diff"] < 0.1 * int8["loss_mean"]
    assert res["parity_max_abs_diff"] < 1e-4
    with pytest.raises(EdgezoError, match="not the same model"):
        compare(make_bundle("lora"), others=(make_bundle("norms"),), echo=None)


def test_compare_quantised_labels_the_reference(make_bundle):
    res = compare(
        make_bundle("scales", quantize="int4"), batch=2, seq=12, threads=1, repeats=1, echo=None
    )
    assert res["quantization"] == "int4"
    ref = next(r for r in res["rows"] if r["backend"] == "pytorch (fp32 reference)")
    assert 0 < res["parity_max_abs_diff"] < 0.1 * ref["loss_mean"]


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
