"""Export precision (exporters/precision.py): int8 per-channel + smoothing, the aliases, the
CPU check, the manifest field."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from edgezo.bundle import Manifest, load_bundle
from edgezo.errors import BundleError, EdgezoError

pytest.importorskip("onnxruntime")


def ops(path) -> Counter:
    g = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in g.graph.node)


def test_int8_smooth_bundle(make_bundle):
    path = make_bundle("lora", precision="int8")
    m = load_bundle(path).manifest
    q = m.quantization
    assert m.precision == "int8" == q["precision"]
    assert q["per_channel"] is True and q["op"] == "DynamicQuantizeMatMul"
    # 2 layers x 7 projections + the LM head; the LoRA MatMuls (weight = graph input) stay fp32
    assert q["quantized_matmuls"] == ops(path)["DynamicQuantizeMatMul"] == 15
    assert q["smoothing_folded"] + q["smoothing_muls"] >= 1
    pv = q["parity_vs_fp32"]
    assert 0 < pv["max_rel_diff"] <= pv["rtol"]
    names = {s.name for s in m.trainable}
    g = onnx.load(str(path / "model.onnx"), load_external_data=False)
    inputs = {i.name: i.type.tensor_type.elem_type for i in g.graph.input}
    assert all(inputs[n] == onnx.TensorProto.FLOAT for n in names)


def test_quantize_int8_is_the_per_tensor_alias(make_bundle):
    m = load_bundle(make_bundle("lora", quantize="int8")).manifest
    assert m.precision == "int8-dynamic" == m.quantization["precision"]
    assert m.quantization["op"] == "MatMulInteger"


def test_smoothing_alone_is_exact(make_bundle):
    """The smoothing rewrite (X / s)(s W) with 8-bit rounding taken out equals the fp32 graph."""
    import onnxruntime as ort

    from exporters import precision

    path = make_bundle("lora", precision="int8")
    b = load_bundle(path)
    point = {k: v + np.float32(0.01) for k, v in b.initial_trainable().items()}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, int(b.manifest.architecture["vocab_size"]), (2, 7))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids, **point}
    g = onnx.load(str(path / "model.onnx"))
    inits = {t.name: t for t in g.graph.initializer}
    for n in g.graph.node:  # back to float MatMuls on the dequantised smoothed weights
        if n.op_type == "DynamicQuantizeMatMul":
            w = onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            w = w * onnx.numpy_helper.to_array(inits[n.input[2]])
            inits[n.input[1]].CopyFrom(onnx.numpy_helper.from_array(w, n.input[1]))
            n.CopyFrom(onnx.helper.make_node("MatMul", n.input[:2], n.output, name=n.name))
    dq = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    assert precision.SMOOTH_ALPHA == b.manifest.quantization["smoothing_alpha"]
    got = dq.run(["loss"], feed)[0]
    # the fp32 reference: the same weights without smoothing
    ref = make_bundle("lora")
    want = ort.InferenceSession(str(ref / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["loss"], feed
    )[0]
    # only the int8 rounding of the smoothed weights separates them
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_int8_is_deterministic(make_bundle, tiny_hf_dir, tmp_path):
    from exporters import export_causal_lm

    other = export_causal_lm(tiny_hf_dir, tmp_path / "b", precision="int8", progress=None)
    a = onnx.load(str(make_bundle("lora", precision="int8") / "model.onnx"))
    b = onnx.load(str(other / "model.onnx"))
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_prefix_scope_keeps_suffix_fp32(make_bundle):
    path = make_bundle(
        "lora", precision="int8", precision_scope="prefix", lora_layers="last:1", lora_freeze_a=True
    )
    b = load_bundle(path)
    q = b.manifest.quantization
    assert q["scope"] == "prefix" and q["quantized_matmuls"] == 7  # block 0 only
    assert b.manifest.stages is not None  # the frozen prefix is still cached exactly
    suffix = onnx.load(str(path / b.manifest.stages["suffix"]), load_external_data=False)
    assert not any(n.op_type == "DynamicQuantizeMatMul" for n in suffix.graph.node)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"precision": "int3"}, "unknown precision"),
        ({"precision": "int8", "quantize": "int4"}, "disagree"),
        ({"precision": "int4", "precision_scope": "prefix"}, "needs --precision int8"),
        ({"precision": "int8", "precision_scope": "middle"}, "unknown precision scope"),
        ({"mode": "scales", "precision": "int8"}, "needs --precision int4"),
    ],
)
def test_precision_refusals(tiny_hf_dir, tmp_path, kw, match):
    from exporters import export_causal_lm

    with pytest.raises(EdgezoError, match=match):
        export_causal_lm(tiny_hf_dir, tmp_path / "b", progress=None, **kw)
    assert not (tmp_path / "b").exists()


def test_int8_refused_without_vnni(tiny_hf_dir, tmp_path, monkeypatch):
    import exporters.precision as precision
    from exporters import export_causal_lm

    monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": {"sse4_2", "avx2"})
    with pytest.raises(EdgezoError, match="int8 dot-product") as e:
        export_causal_lm(tiny_hf_dir, tmp_path / "b", precision="int8", progress=None)
    assert "--precision fp32" in e.value.fix
    assert precision.int8_support({"avx512_vnni"})[0] is True
    assert precision.int8_support(set())[0] is False


def test_manifest_precision_field(make_bundle):
    d = load_bundle(make_bundle("lora", precision="int8")).manifest.to_json()
    d["precision"] = "int2"
    with pytest.raises(BundleError, match="precision"):
        Manifest.from_json(d)
    d["precision"] = None  # bundles written before the field
    assert Manifest.from_json(d).precision is None


def test_runtime_note_without_vnni(make_bundle, monkeypatch):
    import edgezo.runner as runner
    from edgezo.errors import EdgezoWarning
    from edgezo.train import BATCH_INPUTS
    from edgezo.zo.params import FlatParams

    path = make_bundle("lora", precision="int8")
    assert runner.precision_note(path, {"avx512_vnni"}) is None
    assert runner.precision_note(make_bundle("lora"), set()) is None  # fp32: nothing to say
    note = runner.precision_note(path, {"avx2"})
    assert "generic kernels" in note and "--precision fp32" in note
    monkeypatch.setattr(runner, "cpu_flags", lambda path="/proc/cpuinfo": {"avx2"})
    b = load_bundle(path)
    params = FlatParams(b.manifest.trainable, inplace=True)
    with pytest.warns(EdgezoWarning, match="generic kernels"):
        r = runner.LossRunner(b.model_path, params, BATCH_INPUTS)
    assert r.notes == [note]
