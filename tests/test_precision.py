"""Export precision (exporters/precision.py): int8 per-channel + smoothing, the aliases, the
CPU check, the manifest field."""

from __future__ import annotations

import json
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
            if len(n.input) > 3:  # u8 weights: their zero point
                w = w - onnx.numpy_helper.to_array(inits[n.input[3]]).astype(np.float32)
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


def test_int8_static_activations_bundle(make_bundle):
    """Calibrated fixed activation scales: one QuantizeLinear per quantised activation (q/k/v
    and gate/up share theirs) feeding MatMulIntegerToFloat; no run-time range."""
    path = make_bundle("lora", precision="int8", int8_activations="static")
    q = load_bundle(path).manifest.quantization
    counts = ops(path)
    assert q["activations"] == "static" and q["op"] == "MatMulIntegerToFloat"
    assert q["quantized_matmuls"] == counts["MatMulIntegerToFloat"] == 15
    assert "DynamicQuantizeMatMul" not in counts and "DynamicQuantizeLinear" not in counts
    # per block: q/k/v read one tensor, o one, gate/up one, down one; plus the head's input
    assert counts["QuantizeLinear"] == q["static_activations"] == 2 * 4 + 1
    assert 0 < q["parity_vs_fp32"]["max_rel_diff"] <= q["parity_vs_fp32"]["rtol"]
    g = onnx.load(str(path / "model.onnx"), load_external_data=False)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.graph.initializer}
    for n in g.graph.node:
        if n.op_type == "QuantizeLinear":
            scale, zero = inits[n.input[1]], inits[n.input[2]]
            assert scale.shape == () and scale > 0 and zero.dtype == np.uint8


def _losses(path, ids, mask):
    import onnxruntime as ort

    b = load_bundle(path)
    s = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = np.where(mask > 0, ids, -100)
    feed = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return s.run(["loss"], {**feed, **b.initial_trainable()})[0]


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_static_activations_make_an_example_independent_of_its_batch(make_bundle, activations):
    """With fixed scales an example's loss is the same alone and beside any batch-mate; with
    run-time scales the batch's range (here a batch-mate of other tokens) moves it."""
    path = make_bundle("lora", precision="int8", int8_activations=activations)
    vocab = int(load_bundle(path).manifest.architecture["vocab_size"])
    rng = np.random.default_rng(3)
    ids = rng.integers(0, vocab, (2, 9))
    ids[1] = rng.integers(0, vocab, 9)[::-1]
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # the batch-mate is padded
    alone = _losses(path, ids[:1], mask[:1])[0]
    beside = _losses(path, ids, mask)[0]
    if activations == "static":
        assert abs(alone - beside) <= 1e-5 * abs(alone)
    else:
        assert abs(alone - beside) > 1e-5 * abs(alone)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"precision": "int3"}, "unknown precision"),
        ({"precision": "int8", "quantize": "int4"}, "disagree"),
        ({"precision": "int4", "precision_scope": "prefix"}, "needs --precision int8"),
        ({"precision": "int8", "precision_scope": "middle"}, "unknown precision scope"),
        ({"mode": "scales", "precision": "int8"}, "needs --precision int4"),
        ({"precision": "int4", "int8_activations": "static"}, "applies to --precision int8"),
        ({"precision": "int8", "int8_activations": "fixed"}, "unknown int8 activation"),
    ],
)
def test_precision_refusals(tiny_hf_dir, tmp_path, kw, match):
    from exporters import export_causal_lm

    with pytest.raises(EdgezoError, match=match):
        export_causal_lm(tiny_hf_dir, tmp_path / "b", progress=None, **kw)
    assert not (tmp_path / "b").exists()


AVX2 = {"sse2", "sse4_2", "avx2"}  # an x86 CPU without VNNI: u8 x s8 kernels saturate
VNNI = {"sse2", "avx2", "avx512_vnni"}
ARM_NO_DOT = {"asimd", "fp"}


def test_int8_weights_chosen_for_the_cpu():
    from exporters import precision

    assert precision.saturates_s8(AVX2) and not precision.saturates_s8(VNNI)
    assert not precision.saturates_s8(ARM_NO_DOT) and not precision.saturates_s8(None)
    check = precision.check_precision_supported
    assert check("int8", VNNI) == "s8" and check("int8", AVX2) == "u8"
    assert check("int8", AVX2, "s7") == "s7" and check("int8", VNNI, "u8") == "u8"
    assert check("int8-dynamic", AVX2) == "s7" and check("int8-dynamic", VNNI) == "s8"
    assert check("fp32", AVX2) is None and check("int4", AVX2) is None
    with pytest.raises(EdgezoError, match="saturate") as e:
        check("int8", AVX2, "s8")
    assert "--int8-weights auto" in e.value.fix
    with pytest.raises(EdgezoError, match="int8 dot-product") as e:
        check("int8", ARM_NO_DOT)
    assert "--precision fp32" in e.value.fix
    with pytest.raises(EdgezoError, match="applies to --precision int8"):
        check("fp32", AVX2, "u8")
    with pytest.raises(EdgezoError, match="s8 or s7"):
        check("int8-dynamic", VNNI, "u8")
    with pytest.raises(EdgezoError, match="unknown int8 weight format"):
        check("int8", VNNI, "s9")
    assert precision.int8_support({"avx512_vnni"})[0] is True
    assert precision.int8_support(set())[0] is False


def test_int8_refused_on_arm_without_dot_product(tiny_hf_dir, tmp_path, monkeypatch):
    import exporters.precision as precision
    from exporters import export_causal_lm

    monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": ARM_NO_DOT)
    with pytest.raises(EdgezoError, match="int8 dot-product") as e:
        export_causal_lm(tiny_hf_dir, tmp_path / "b", precision="int8", progress=None)
    assert "--precision fp32" in e.value.fix
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("fmt", "dtype", "qmax"), [("u8", np.uint8, 127), ("s7", np.int8, 63)])
def test_int8_weight_formats(make_bundle, fmt, dtype, qmax):
    """u8 stores the symmetric values offset by a zero point of 128, s7 at most 63 in
    magnitude; both run correctly on every CPU and stay close to the fp32 graph."""
    import onnxruntime as ort

    path = make_bundle("lora", precision="int8", int8_weights=fmt)
    q = load_bundle(path).manifest.quantization
    assert q["weights_format"] == fmt and q["bits"] == (7 if fmt == "s7" else 8)
    g = onnx.load(str(path / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.graph.initializer}
    nodes = [n for n in g.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert nodes
    for n in nodes:
        w = inits[n.input[1]]
        assert w.dtype == dtype
        centred = w.astype(np.int32) - (128 if fmt == "u8" else 0)
        assert np.abs(centred).max() == qmax  # every column's largest weight at full scale
        assert (len(n.input) > 3) == (fmt == "u8")
        if fmt == "u8":
            assert (inits[n.input[3]] == 128).all()
    b = load_bundle(path)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, int(b.manifest.architecture["vocab_size"]), (2, 9))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    feed.update(b.initial_trainable())
    got = ort.InferenceSession(str(path / "model.onnx")).run(["loss"], feed)[0]
    ref = make_bundle("lora")
    want = ort.InferenceSession(str(ref / "model.onnx")).run(["loss"], feed)[0]
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_s8_weights_saturate_on_this_cpu_if_it_lacks_vnni():
    """The reason for ``weights_format``: on an x86 CPU without VNNI, ONNX Runtime's u8 x s8
    GEMM clips pair sums to 16 bits; u8 weights (zero point 128) are exact there. Where the CPU
    has VNNI (or is not x86) all three formats agree with float arithmetic."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgezo.runner import cpu_flags, saturates_s8

    rng = np.random.default_rng(0)
    m, k, n = 64, 256, 64
    # activations near u8 255 and weights near +-127: many pairs sum past 32,767
    x = rng.uniform(0.5, 1.0, (m, k)).astype(np.float32)
    w = (rng.uniform(0.5, 1.0, (k, n)) * rng.choice([-1.0, 1.0], (k, n))).astype(np.float32)
    ref = x.astype(np.float64) @ w
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127)

    def run(b: np.ndarray, zero: bool) -> np.ndarray:
        inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scale, "S")]
        ins = ["X", "B", "S"]
        if zero:
            inits.append(numpy_helper.from_array(np.full(n, 128, np.uint8), "Z"))
            ins.append("Z")
        node = helper.make_node("DynamicQuantizeMatMul", ins, ["Y"], domain="com.microsoft")
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
            inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        )
        return ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]

    def err(y: np.ndarray) -> float:
        return float(np.abs(y - ref).max() / np.abs(ref).max())

    u8 = err(run((q + 128).astype(np.uint8), True))
    s8 = err(run(q.astype(np.int8), False))
    assert u8 < 0.03
    if saturates_s8(cpu_flags()):
        assert s8 > 10 * u8, (s8, u8)
    else:
        assert s8 < 0.03


def test_manifest_precision_field(make_bundle):
    d = load_bundle(make_bundle("lora", precision="int8")).manifest.to_json()
    d["precision"] = "int2"
    with pytest.raises(BundleError, match="precision"):
        Manifest.from_json(d)
    d["precision"] = None  # bundles written before the field
    assert Manifest.from_json(d).precision is None


def test_runtime_checks_int8_weights_against_the_cpu(make_bundle, tmp_path, monkeypatch):
    import shutil

    import edgezo.runner as runner
    from edgezo.errors import EdgezoWarning
    from edgezo.train import BATCH_INPUTS
    from edgezo.zo.params import FlatParams

    built = make_bundle("lora", precision="int8", int8_weights="u8")
    assert runner.precision_note(built, AVX2) is None  # u8: exact everywhere
    assert runner.precision_note(make_bundle("lora"), AVX2) is None  # fp32: nothing to say
    # the same bundle as if its weights were full-range s8 (or written before the field)
    path = tmp_path / "s8"
    shutil.copytree(built, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["quantization"]["weights_format"] = "s8"
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert runner.precision_note(path, VNNI) is None
    with pytest.raises(BundleError, match="saturate") as e:
        runner.precision_note(path, AVX2)
    assert "--precision int8" in e.value.fix
    del manifest["quantization"]["weights_format"]  # older bundles: s8
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="saturate"):
        runner.precision_note(path, AVX2)
    note = runner.precision_note(path, ARM_NO_DOT)
    assert "generic kernels" in note and "--precision fp32" in note
    b = load_bundle(path)
    params = FlatParams(b.manifest.trainable, inplace=True)
    monkeypatch.setattr(runner, "cpu_flags", lambda path="/proc/cpuinfo": AVX2)
    with pytest.raises(BundleError, match="saturate"):
        runner.LossRunner(b.model_path, params, BATCH_INPUTS)
    monkeypatch.setattr(runner, "cpu_flags", lambda path="/proc/cpuinfo": ARM_NO_DOT)
    with pytest.warns(EdgezoWarning, match="generic kernels"):
        r = runner.LossRunner(b.model_path, params, BATCH_INPUTS)
    assert r.notes == [note]
