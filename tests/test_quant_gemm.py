"""GPT-2's Conv1D layers export as ``Gemm``: both quantisers must still quantise them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402

from edgezo.bundle import load_bundle  # noqa: E402
from exporters import export_causal_lm  # noqa: E402
from exporters.quantize import gemm_to_matmul  # noqa: E402

#: 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) + the LM head
GPT2_LINEARS = 9


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2-q")
    tok = build_tiny_tokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    build_tiny_model("gpt2", tok.get_vocab_size()).save_pretrained(folder)
    return folder


def ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run(model: onnx.ModelProto | Path, feeds: dict) -> np.ndarray:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(["loss"], feeds)[0]


def test_gemm_rewrite_keeps_the_loss(gpt2_dir, tmp_path):
    out = export_causal_lm(gpt2_dir, tmp_path / "fp32", mode="norms", progress=None)
    path = out / "model.onnx"
    assert ops(path)["Gemm"] == 8  # every Conv1D of the two blocks
    b = load_bundle(out)
    ids = np.array([[5, 9, 14, 3, 22, 7, 30, 11]])
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "labels": ids,
        **b.initial_trainable(),
    }
    model = onnx.load(str(path))
    assert gemm_to_matmul(model) == 8
    assert Counter(n.op_type for n in model.graph.node)["Gemm"] == 0
    np.testing.assert_allclose(run(model, feeds), run(path, feeds), rtol=1e-6)


@pytest.mark.parametrize(("scheme", "op"), [("int4", "MatMulNBits"), ("int8", "MatMulInteger")])
def test_gpt2_conv1d_layers_are_quantised(gpt2_dir, tmp_path, scheme, op):
    out = export_causal_lm(gpt2_dir, tmp_path / scheme, mode="lora", quantize=scheme, progress=None)
    counts = ops(out / "model.onnx")
    q = load_bundle(out).manifest.quantization
    assert counts["Gemm"] == 0
    assert counts[op] == q["quantized_matmuls"] == GPT2_LINEARS
    assert q["gemm_rewritten"] == 6  # the LoRA-wrapped c_attn base runs as a MatMul already
    assert q["parity_vs_fp32"]["max_rel_diff"] <= 0.1


def test_gpt2_int4_scales(gpt2_dir, tmp_path):
    out = export_causal_lm(gpt2_dir, tmp_path / "s", mode="scales", quantize="int4", progress=None)
    m = load_bundle(out).manifest
    names = [s.name for s in m.trainable]
    assert len(names) == GPT2_LINEARS and all(s.positive for s in m.trainable)
    assert "transformer.h.0.mlp.c_fc.weight.scales" in names
    assert m.quantization["fed_scales_exact"] is True
