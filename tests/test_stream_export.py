"""The streamed int4 export (``exporters/stream.py``, ``export_causal_lm(stream=True)``) writes
the bundle today's int4 export writes, without holding the fp32 weights (issue 17, "Scale").

For tiny Llama (tied head) and Qwen2 (biases) checkpoints: the same operators, bitwise the same
packed int4 weights, scales and zero points, and the same loss in ONNX Runtime; the zero-page
storage does not become resident when read; the streamed PyTorch forward equals the ordinary one.
"""

from __future__ import annotations

import hashlib
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
from exporters.stream import load_streamed, materialised, zero_storage  # noqa: E402
from tests.conftest import build_tiny_model, build_tiny_tokenizer  # noqa: E402

KW = {
    "mode": "lora",
    "lora_targets": ["v_proj"],
    "lora_layers": "last:1",
    "lora_freeze_a": True,
    "precision": "int4",
    "decoder": False,
    "progress": None,
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    tok = build_tiny_tokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    build_tiny_model(request.param, vocab_size=tok.get_vocab_size(), seed=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bundles(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-bundles")
    today = export_causal_lm(checkpoint, root / "today", **KW)
    streamed = export_causal_lm(checkpoint, root / "streamed", stream=True, **KW)
    return today, streamed


def _quantised_tensors(path) -> dict[str, str]:
    model = onnx.load(str(path / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for name in node.input[1:]:
                a = numpy_helper.to_array(inits[name])
                out[name] = hashlib.sha256(a.tobytes() + str(a.dtype).encode()).hexdigest()
    return out


def test_same_operators_and_packed_weights(bundles):
    today, streamed = bundles
    a = onnx.load(str(today / "model.onnx"), load_external_data=False)
    b = onnx.load(str(streamed / "model.onnx"), load_external_data=False)
    assert Counter(n.op_type for n in a.graph.node) == Counter(n.op_type for n in b.graph.node)
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    qa, qb = _quantised_tensors(today), _quantised_tensors(streamed)
    assert len(qa) >= 3 * 8  # every block's projections (and the head) are int4
    assert qa == qb  # same names, bitwise the same packing, scales and zero points
    attrs = {
        n.name: [(x.name, x.i) for x in n.attribute]
        for n in a.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert attrs == {
        n.name: [(x.name, x.i) for x in n.attribute]
        for n in b.graph.node
        if n.op_type == "MatMulNBits"
    }


def test_same_loss_in_onnx_runtime(bundles):
    today, streamed = bundles
    rng = np.random.default_rng(0)
    manifest = json.loads((today / "manifest.json").read_text())
    vocab = manifest["architecture"]["vocab_size"]
    ids = rng.integers(0, vocab, (3, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask, ids, -100)}
    for spec in manifest["trainable"]:
        feeds[spec["name"]] = rng.normal(0, 0.05, spec["shape"]).astype(np.float32)
    losses = []
    for bundle in bundles:
        sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        losses.append(sess.run(["loss"], feeds)[0])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    # and the streamed bundle's own validation recorded the same int4 loss
    q_today = manifest["quantization"]["parity_vs_fp32"]
    q_stream = json.loads((streamed / "manifest.json").read_text())["quantization"]
    assert q_stream["streamed"] is True
    np.testing.assert_allclose(
        q_stream["parity_vs_fp32"]["quantized_loss"], q_today["quantized_loss"], atol=1e-5
    )
    np.testing.assert_allclose(
        q_stream["parity_vs_fp32"]["fp32_loss"], q_today["fp32_loss"], atol=1e-4
    )


def test_streamed_bundle_loads_with_its_stages(bundles):
    _, streamed = bundles
    b = load_bundle(streamed)  # hashes verified
    assert b.manifest.precision == "int4"
    assert (streamed / "prefix.onnx").is_file() and (streamed / "suffix.onnx").is_file()


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_zero_storage_stays_non_resident():
    before = _rss_kib()
    t = zero_storage((64, 2**20))  # 256 MiB of fp32 zeros
    assert float(t.sum()) == 0.0  # every page read
    assert _rss_kib() - before < 16 * 1024  # page tables only, not 256 MiB
    small = zero_storage((3, 5))
    assert small.shape == (3, 5) and not bool(small.any())


def test_materialised_forward_is_the_ordinary_forward(checkpoint):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 11, 3, 7, 20, 4]])
    ordinary = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ordinary(input_ids=ids, labels=ids).loss
    streamed = load_streamed(checkpoint)
    model = streamed.loaded.model
    with torch.no_grad():
        zero = model(input_ids=ids, labels=ids).loss  # zero weights: another loss
        with materialised(streamed):
            got = model(input_ids=ids, labels=ids).loss
    assert float(got) == pytest.approx(float(want), abs=1e-6)
    assert float(zero) != pytest.approx(float(want), abs=1e-3)
    assert all(not bool(p.any()) for n, p in model.named_parameters())  # back to zero pages


def test_stream_refuses_what_it_does_not_export(checkpoint, tmp_path):
    with pytest.raises(EdgezoError, match="int4 or int8 only"):
        export_causal_lm(checkpoint, tmp_path / "a", stream=True, **{**KW, "precision": "fp32"})
    with pytest.raises(EdgezoError, match="lora only"):
        export_causal_lm(checkpoint, tmp_path / "b", stream=True, **{**KW, "mode": "norms"})


def test_refusal_of_a_3b_int4_export_names_the_streamed_one():
    from transformers import LlamaConfig

    from exporters.load import check_export_memory, parameter_sizes
    from exporters.memory import streamed_memory_estimate

    config = LlamaConfig(  # Llama 3.2 3B's sizes (nothing is allocated: the meta device)
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    params, largest = parameter_sizes(config)
    assert largest == 128256 * 3072  # the tied embedding
    streamed = streamed_memory_estimate(params, largest)
    # measured 7,375 MiB (docs/benchmarks/scale.md): the estimate within +10%
    assert 7375 * 2**20 <= streamed <= 1.1 * 7375 * 2**20
    with pytest.raises(EdgezoError, match="--stream") as e:
        check_export_memory(config, "llama-3b", "int4", False, available=13 * 2**30)
    assert "int4 quantisation" in str(e.value)
    # where even the streamed export would not fit, it is not offered
    with pytest.raises(EdgezoError) as e:
        check_export_memory(config, "llama-3b", "int4", False, available=4 * 2**30)
    assert "--stream" not in str(e.value)
