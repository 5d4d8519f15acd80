"""Quantised bundles (int8 dynamic, int4 MatMulNBits) and the int4 ``scales`` trainable mode."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.errors import EdgezoError  # noqa: E402
from exporters import export_causal_lm  # noqa: E402

BATCH = np.array([[5, 9, 14, 3, 22, 7, 30, 11, 4, 17, 8, 25]], dtype=np.int64)


def ops(bundle: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node)


def loss(model: Path | bytes, trainable: dict[str, np.ndarray]) -> np.ndarray:
    src = str(model) if isinstance(model, Path) else model
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": BATCH, "attention_mask": np.ones_like(BATCH), "labels": BATCH}
    names = {i.name for i in sess.get_inputs()}
    feeds.update({k: v for k, v in trainable.items() if k in names})
    return sess.run(["loss"], feeds)[0]


def graph_inputs(bundle: Path) -> list[str]:
    return [i.name for i in onnx.load(str(bundle / "model.onnx")).graph.input]


# -- int4 / int8 with LoRA and norms ------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "op"), [("int4", "MatMulNBits"), ("int8", "MatMulInteger")])
def test_lora_over_quantised_base(make_bundle, scheme, op):
    path = make_bundle("lora", quantize=scheme)
    bundle = load_bundle(path)
    m = bundle.manifest
    q = m.quantization
    bits = {"s7": 7, "s8": 8}.get(q.get("weights_format"), 4)  # int8: s7 where s8 saturates
    assert q["scheme"] == scheme and q["bits"] == (4 if scheme == "int4" else bits)
    assert q["op"] == op
    # 2 layers x 7 projections + the (untied in the graph) LM head
    assert q["quantized_matmuls"] == ops(path)[op] == 15
    if scheme == "int4":
        assert q["block_size"] == 32 and q["accuracy_level"] == 0
    # a quantisation error, recorded and bounded by the separate relative tolerance
    pv = q["parity_vs_fp32"]
    assert 0 < pv["max_rel_diff"] <= pv["rtol"] == 0.1
    assert m.parity["max_abs_diff"] < 1e-4  # the fp32 graph vs PyTorch, as for fp32 bundles
    # LoRA tensors stay fp32 graph inputs and their MatMuls stay fp32 MatMuls
    assert graph_inputs(path) == ["input_ids", "attention_mask", "labels"] + [
        s.name for s in m.trainable
    ]
    assert {s.role for s in m.trainable} == {"lora_a", "lora_b"}
    assert not any(s.positive for s in m.trainable)
    g = onnx.load(str(path / "model.onnx")).graph
    lora_nodes = [n for n in g.node if "lora_" in n.name and n.op_type not in ("Transpose",)]
    assert lora_nodes and {n.op_type for n in lora_nodes} == {"MatMul"}
    # and they move the loss
    values = bundle.initial_trainable()
    base = loss(path / "model.onnx", values)
    name = "model.layers.1.self_attn.v_proj.lora_B.weight"
    moved = dict(values, **{name: np.full_like(values[name], 0.05)})
    assert loss(path / "model.onnx", moved)[0] != base[0]


def test_int8_norms_inputs_survive(make_bundle):
    path = make_bundle("norms", quantize="int8")
    m = load_bundle(path).manifest
    assert graph_inputs(path)[3:] == [s.name for s in m.trainable]
    assert ops(path)["MatMulInteger"] == 15 and ops(path)["DynamicQuantizeLinear"] > 0


def test_quantised_loss_close_to_fp32(make_bundle):
    """(Sizes are measured on SmolLM2 by tools/bench_quant.py: on the tiny model the graph
    itself outweighs the weights.)"""
    fp32 = make_bundle("lora")
    for scheme in ("int8", "int4"):
        q = make_bundle("lora", quantize=scheme)
        values = load_bundle(q).initial_trainable()
        a, b = loss(fp32 / "model.onnx", values), loss(q / "model.onnx", values)
        assert abs(float(a[0] - b[0])) / abs(float(a[0])) < 0.1


@pytest.mark.parametrize("block_size", [64, 128])
def test_int4_block_sizes(make_bundle, block_size):
    m = load_bundle(make_bundle("norms", quantize="int4", block_size=block_size)).manifest
    assert m.quantization["block_size"] == block_size
    g = onnx.load(str(make_bundle("norms", quantize="int4", block_size=block_size) / "model.onnx"))
    blocks = {
        a.i
        for n in g.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "block_size"
    }
    assert blocks == {block_size}


# -- int4 scales ---------------------------------------------------------------------------------


def test_scales_mode_bundle(make_bundle):
    path = make_bundle("scales", quantize="int4")
    bundle = load_bundle(path)
    m = bundle.manifest
    assert m.trainable_mode == "scales"
    assert len(m.trainable) == 15 == m.quantization["quantized_matmuls"]
    assert all(s.role == "scale" and s.positive and s.dtype == "float32" for s in m.trainable)
    names = [s.name for s in m.trainable]
    assert names[0] == "model.layers.0.self_attn.q_proj.weight.scales"
    assert "lm_head.weight.scales" in names
    assert m.quantization["fed_scales_exact"] is True
    assert m.parity["sensitivity_min_change"] > 0  # every scale tensor moves the loss
    values = bundle.initial_trainable()
    assert all(np.all(values[n] > 0) for n in names)
    g = onnx.load(str(path / "model.onnx")).graph
    inits = {t.name: t for t in g.initializer}
    assert not set(names) & set(inits)
    for n in g.node:
        if n.op_type == "MatMulNBits":
            assert n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.UINT8
            assert n.input[2] in names
            assert dict((a.name, a.i) for a in n.attribute).get("accuracy_level", 0) == 0


def bake(path: Path, values: dict[str, np.ndarray]) -> bytes:
    """The same graph with the scales as initializers (what the quantiser wrote)."""
    model = onnx.load(str(path / "model.onnx"))
    for inp in list(model.graph.input):
        if inp.name in values:
            model.graph.input.remove(inp)
            model.graph.initializer.append(numpy_helper.from_array(values[inp.name], inp.name))
    return model.SerializeToString()


def test_fed_scales_equal_baked_scales_exactly(make_bundle):
    path = make_bundle("scales", quantize="int4")
    values = load_bundle(path).initial_trainable()
    fed = loss(path / "model.onnx", values)
    baked = loss(bake(path, values), {})
    assert np.array_equal(fed, baked)  # bitwise, accuracy level 0
    # perturbing one scale changes the loss; perturbing it back restores it exactly
    name = "model.layers.0.mlp.down_proj.weight.scales"
    moved = dict(values, **{name: values[name] * np.float32(1.5)})
    assert loss(path / "model.onnx", moved)[0] != fed[0]
    assert np.array_equal(loss(bake(path, moved), {}), loss(path / "model.onnx", moved))


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "scales"}, "needs --precision int4"),
        ({"mode": "scales", "quantize": "int8"}, "needs --precision int4"),
        ({"mode": "scales", "quantize": "int4", "accuracy_level": 4}, "silently returns zeros"),
        ({"quantize": "int3"}, "unknown quantisation"),
        ({"quantize": "int4", "block_size": 48}, "block size must be"),
        ({"mode": "full", "quantize": "int8"}, "nothing to quantise"),
    ],
)
def test_quant_refusals(tiny_hf_dir, tmp_path, kw, match):
    out = tmp_path / "out"
    with pytest.raises(EdgezoError, match=match) as e:
        export_causal_lm(tiny_hf_dir, out, progress=None, **kw)
    assert e.value.fix
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_quant_tolerance_failure_is_clean(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EdgezoError, match="quantisation changes the loss too much"):
        export_causal_lm(tiny_hf_dir, out, quantize="int4", quant_rtol=0.0, progress=None)
    assert not out.exists()


def test_cli_quantize(tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    from exporters.cli import main

    out = tmp_path / "cli"
    args = ["--model", str(tiny_hf_dir), "--out", str(out), "--mode", "scales"]
    res = CliRunner().invoke(main, [*args, "--quantize", "int4", "--block-size", "64"])
    assert res.exit_code == 0, res.output
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["scheme"] == "int4" and q["block_size"] == 64
    bad = CliRunner().invoke(main, [*args[:3], str(tmp_path / "x"), "--mode", "scales"])
    assert bad.exit_code == 2 and "fix:" in bad.output


def test_a_scales_bundle_finetunes_on_its_measured_recipe(make_bundle, memo_data, tmp_path):
    """No lr, μ or momentum to guess: the ``scales`` recipe fills them (docs/benchmarks)."""
    from edgezo.config import FinetuneConfig
    from edgezo.train import finetune

    cfg = FinetuneConfig(
        bundle=str(make_bundle("scales", quantize="int4")),
        data=str(memo_data[0]),
        eval_data=str(memo_data[1]),
        out=str(tmp_path / "run"),
        steps=3,
        max_length=32,
        eval_every=0,
    )
    s = finetune(cfg, log=lambda *a: None, progress=False)
    assert s.steps == 3 and s.stop_reason == "completed"
    used = FinetuneConfig.load(str(tmp_path / "run" / "config.yaml"))
    assert (used.lr, used.momentum, used.estimator, used.q) == (3e-3, 0.0, "central", 1)


def test_int4_with_a_frozen_prefix_exports_with_the_cache(tiny_hf_dir, tmp_path):
    """onnx's shape inference does not know MatMulNBits; the cut types its outputs itself
    (exporters.stages.typed), so an int4 graph gets its prefix/suffix split too."""
    lines: list[str] = []
    out = export_causal_lm(
        tiny_hf_dir,
        tmp_path / "b",
        quantize="int4",
        lora_layers="last:1",
        lora_targets=("v_proj",),
        lora_freeze_a=True,
        progress=lines.append,
    )
    m = load_bundle(out).manifest
    assert m.stages is not None and m.lora["layers"] == [1]
    assert any("frozen prefix cached per example" in x for x in lines), lines
    assert (out / "prefix.onnx").exists() and (out / "suffix.onnx").exists()
