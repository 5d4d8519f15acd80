"""The streamed int8 export (``exporters/stream_int8.py``, ``export_causal_lm(precision="int8",
stream=True)``) writes the bundle today's int8 export writes, without the fp32 graph.

Today's export calibrates the smoothing with ONNX Runtime over the fp32 graph; the streamed one
with a streamed PyTorch forward. The two see the same activations up to float rounding (other
kernels and summation orders), so the smoothing factors, scales and folded norm weights agree
to ~1e-6 relative and an int8 value may differ by one step where a weight sits at a rounding
boundary; the ONNX Runtime losses agree to 1e-4 relative. The graph (operators, names, inputs,
node order) is the same.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.errors import EdgezoError  # noqa: E402
from exporters import export_causal_lm  # noqa: E402
from exporters.precision import smoothing_factors  # noqa: E402
from exporters.stream_int8 import quantize_columns  # noqa: E402
from tests.conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402

KW = {
    "mode": "lora",
    "lora_targets": ["v_proj"],
    "lora_layers": "last:1",
    "lora_freeze_a": True,
    "precision": "int8",
    "decoder": False,
    "progress": None,
}
#: (family, int8 activations, scope, weights): tied head + dynamic u8; biases + static, the
#: frozen prefix only, s8 weights
CASES = [("llama", "dynamic", "all", "u8"), ("qwen2", "static", "prefix", "s8")]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def bundles(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    family, activations, scope, weights = request.param
    folder = tmp_path_factory.mktemp(f"ckpt8-{family}")
    tok = build_tiny_tokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    build_tiny_model(family, vocab_size=tok.get_vocab_size(), seed=3).save_pretrained(folder)
    if weights == "s8":  # s8 is refused on an AVX2 CPU (it saturates there): s7 instead
        from edgezo.runner import cpu_flags, saturates_s8

        weights = "s7" if saturates_s8(cpu_flags()) else "s8"
    kw = {
        **KW,
        "int8_activations": activations,
        "precision_scope": scope,
        "int8_weights": weights,
    }
    root = tmp_path_factory.mktemp("stream8-bundles")
    today = export_causal_lm(folder, root / "today", **kw)
    streamed = export_causal_lm(folder, root / "streamed", stream=True, **kw)
    return today, streamed, folder


def _load(path):
    return onnx.load(str(path / "model.onnx"))


def _int8_tensors(model) -> dict[str, np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    ops = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    return {
        name: numpy_helper.to_array(inits[name])
        for n in model.graph.node
        if n.op_type in ops
        for name in n.input
        if name in inits
    }


def test_same_graph_and_quantised_weights(bundles):
    today, streamed, _ = bundles
    a, b = _load(today), _load(streamed)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]
    assert [list(n.input) for n in a.graph.node] == [list(n.input) for n in b.graph.node]
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    qa, qb = _int8_tensors(a), _int8_tensors(b)
    assert sorted(qa) == sorted(qb)
    n_int8 = sum(v.dtype in (np.int8, np.uint8) and v.ndim == 2 for v in qa.values())
    assert n_int8 >= 4  # several projections quantised
    values = changed = 0
    for name, x in qa.items():
        y = qb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype in (np.int8, np.uint8) and x.ndim == 2:
            d = np.abs(x.astype(np.int16) - y.astype(np.int16))
            assert d.max() <= 1, name  # one rounding step at most
            values += d.size
            changed += int((d > 0).sum())
        else:  # scales, zero points, static activation scales
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=0, err_msg=name)
    assert changed <= 1e-3 * values  # nearly every int8 value is bitwise the same
    # the smoothing folded into the norm weights, and the inserted 1/s, agree too
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert sorted(ia) == sorted(ib) or len(ia) == len(ib)
    small = [n for n, v in ia.items() if v.ndim == 1 and v.dtype == np.float32 and n in ib]
    assert small
    for name in small:
        np.testing.assert_allclose(ia[name], ib[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_same_manifest_and_loss(bundles):
    today, streamed, _ = bundles
    qa = json.loads((today / "manifest.json").read_text())["quantization"]
    qb = json.loads((streamed / "manifest.json").read_text())["quantization"]
    assert qb["streamed"] is True
    for key in (
        "scheme",
        "activations",
        "bits",
        "weights_format",
        "smoothing_folded",
        "smoothing_muls",
        "calibration_batches",
        "quantized_matmuls",
        "op",
        "scope",
    ):
        assert qa[key] == qb[key], key
    np.testing.assert_allclose(
        qb["parity_vs_fp32"]["quantized_loss"], qa["parity_vs_fp32"]["quantized_loss"], rtol=1e-4
    )
    manifest = json.loads((today / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, manifest["architecture"]["vocab_size"], (3, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask, ids, -100)}
    for spec in manifest["trainable"]:
        feeds[spec["name"]] = rng.normal(0, 0.05, spec["shape"]).astype(np.float32)
    losses = [
        ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            ["loss"], feeds
        )[0]
        for b in (today, streamed)
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    b = load_bundle(streamed)  # hashes verified
    assert b.manifest.precision == "int8"
    assert (streamed / "prefix.onnx").is_file() and (streamed / "suffix.onnx").is_file()


def test_quantize_columns_is_the_whole_weight_arithmetic(monkeypatch):
    import exporters.stream_int8 as s8

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.2, (48, 70)).astype(np.float32)
    w[:, 5] = 0.0  # a zero column: scale 1
    amax = np.abs(rng.normal(0, 3, 48)).astype(np.float64)
    s = smoothing_factors(amax, np.abs(w).max(axis=1), 0.5)
    monkeypatch.setattr(s8, "CHUNK_VALUES", 48 * 8)  # 9 chunks, the last one short
    for fmt, qmax in (("u8", 127), ("s8", 127), ("s7", 63)):
        q, scale, row_max = quantize_columns(w.T.copy().T, s, fmt)  # a strided view too
        ws = w * s[:, None]  # quantize_int8_smooth's own arithmetic on the whole weight
        want_scale = np.abs(ws).max(axis=0) / qmax
        want_scale = np.where(want_scale > 0, want_scale, 1.0)
        want = np.clip(np.rint(ws / want_scale), -qmax, qmax)
        want = (want + 128).astype(np.uint8) if fmt == "u8" else want.astype(np.int8)
        assert q.dtype == want.dtype and np.array_equal(q, want)
        assert np.array_equal(scale, want_scale.astype(np.float32))
        assert np.array_equal(row_max, np.abs(w).max(axis=1))


def test_stream_int8_refusals(bundles, tmp_path):
    _, _, folder = bundles
    with pytest.raises(EdgezoError, match="int4 or int8 only"):
        export_causal_lm(folder, tmp_path / "a", stream=True, **{**KW, "precision": "int8-dynamic"})


def test_refusal_of_a_1b_int8_export_names_the_streamed_one():
    from transformers import LlamaConfig

    from exporters.load import check_export_memory

    config = LlamaConfig(  # Llama 3.2 1B's sizes (nothing is allocated)
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with pytest.raises(EdgezoError) as e:
        check_export_memory(config, "llama-1b", "int8", False, available=13 * 2**30)
    assert "--precision int8 --stream" in str(e.value)
    assert "int8 quantisation" in str(e.value)


def test_streamed_calibration_ops(bundles):
    """Every quantised MatMul of the streamed bundle reads a smoothed input: the one its
    ordinary counterpart reads (a folded norm output, or ``<x>_smoothed``/``_u8``)."""
    today, streamed, _ = bundles
    a, b = _load(today), _load(streamed)
    ops = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")
    ins_a = Counter(n.input[0] for n in a.graph.node if n.op_type in ops)
    ins_b = Counter(n.input[0] for n in b.graph.node if n.op_type in ops)
    assert ins_a == ins_b and ins_a
