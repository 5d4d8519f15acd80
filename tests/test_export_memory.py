"""The loss graph traced with the frozen weights as inputs and attached afterwards
(``exporters/weight_attach.py``) is the graph a parameter trace gives (issue 17, "Scale").

For each tiny causal LM family: the same operators, the same initializer values (only the
generated names of folded tensors differ), the same inputs and outputs, and bitwise the same
loss and logits in ONNX Runtime; with the weights inline and in external data.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from exporters.architectures import get_architecture  # noqa: E402
from exporters.loss import CausalLMLossGraph  # noqa: E402
from exporters.onnx_export import export_loss_graph  # noqa: E402
from exporters.trainables import LoraSettings, select_trainables  # noqa: E402
from tests.conftest import TINY_CONFIGS, TINY_ENCODERS, build_tiny_model, tiny_model_type  # noqa: E402

VOCAB = 61
CAUSAL = [k for k in TINY_CONFIGS if k not in TINY_ENCODERS]


def _export(key: str, folder, frozen_as_inputs: bool, external: bool, tied: bool, freeze_a):
    model = build_tiny_model(key, VOCAB, seed=3)
    for p in model.parameters():
        p.requires_grad_(False)
    arch = get_architecture(tiny_model_type(key))
    lora = LoraSettings(rank=2, alpha=4.0, targets=arch.lora_targets, freeze_a=freeze_a)
    specs = select_trainables(model, arch, "lora", lora, torch.Generator().manual_seed(1))
    params = dict(model.named_parameters())
    values = [params[s.name].detach().clone() for s in specs]
    graph = CausalLMLossGraph(model, [s.name for s in specs], arch.pass_position_ids).eval()
    emb = None
    if tied and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        emb = next(
            f"model.{n}"
            for n, p in model.named_parameters()
            if p is model.get_input_embeddings().weight
        )
    folder.mkdir()
    files = export_loss_graph(
        graph,
        values,
        specs,
        folder / "model.onnx",
        VOCAB,
        0,
        torch.Generator().manual_seed(5),
        tied_embedding=emb,
        external_data=external,
        frozen_as_inputs=frozen_as_inputs,
    )
    return folder / "model.onnx", files, specs, values


def _fingerprint(path):
    m = onnx.load(str(path))
    inits = Counter(
        (tuple(t.dims), t.data_type, hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest())
        for t in m.graph.initializer
    )
    ops = Counter((n.domain, n.op_type) for n in m.graph.node)
    io = (
        [(i.name, i.type.SerializeToString()) for i in m.graph.input],
        [(o.name, o.type.SerializeToString()) for o in m.graph.output],
    )
    return inits, ops, io


def _run(path, specs, values):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    labels = np.where(mask == 1, ids, -100)
    feeds = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for s, v in zip(specs, values, strict=True):  # a point where LoRA B is not zero
        feeds[s.name] = v.numpy() + rng.standard_normal(v.shape).astype(np.float32) * 0.1
    return sess.run(None, feeds)


@pytest.mark.parametrize("key", CAUSAL)
def test_frozen_as_inputs_gives_the_parameter_trace_graph(key, tmp_path):
    old, old_files, specs, values = _export(key, tmp_path / "old", False, False, True, True)
    new, new_files, _, _ = _export(key, tmp_path / "new", True, False, True, True)
    assert old_files == new_files == ["model.onnx"]
    f_old, f_new = _fingerprint(old), _fingerprint(new)
    assert f_new[2] == f_old[2], "graph inputs/outputs differ"
    assert f_new[1] == f_old[1], f"operators differ: {f_old[1] - f_new[1]} vs {f_new[1] - f_old[1]}"
    assert f_new[0] == f_old[0], "initializer values differ"
    for a, b in zip(_run(old, specs, values), _run(new, specs, values), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("key", ["llama", "gemma3_text"])
def test_external_data_and_untied_quantised_head(key, tmp_path):
    # tied=False: a quantised export keeps the head as its own folded initializer
    old, old_files, specs, values = _export(key, tmp_path / "old", False, True, False, False)
    new, new_files, _, _ = _export(key, tmp_path / "new", True, True, False, False)
    assert new_files == old_files == ["model.onnx", "model.onnx.data"]
    m = onnx.load(str(new), load_external_data=False)
    external = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "nothing went to the external data file"
    assert (tmp_path / "new" / "model.onnx.data").stat().st_size == (
        tmp_path / "old" / "model.onnx.data"
    ).stat().st_size
    assert _fingerprint(new) == _fingerprint(old)
    for a, b in zip(_run(old, specs, values), _run(new, specs, values), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_estimate_is_the_largest_stage_the_export_runs():
    from exporters.memory import STAGE_FACTORS, export_memory_estimate

    n = 10**9
    plain, stage, _ = export_memory_estimate(n, None, False)
    assert stage in ("loss graph trace", "validation")
    assert plain == int(n * 4 * STAGE_FACTORS[stage])
    with_decoder = export_memory_estimate(n, None, True)
    assert with_decoder[1].startswith("decoding graph") and with_decoder[0] > plain
    assert export_memory_estimate(n, "int8", False)[1] == "int8 quantisation"
    assert export_memory_estimate(n, "int4", False)[1] == "int4 quantisation"


def test_a_too_large_export_is_refused_with_the_model_the_estimate_and_the_fix():
    from transformers import AutoConfig

    from edgezo.errors import EdgezoError
    from exporters.load import check_export_memory, count_parameters

    config = AutoConfig.for_model("llama", **TINY_CONFIGS["llama"], vocab_size=VOCAB)
    n = count_parameters(config)
    assert n == sum(p.numel() for p in build_tiny_model("llama", VOCAB).parameters())
    # fits as int4 without a decoder in 3x the weights, not as fp32 with its decoder trace
    check_export_memory(config, "/models/tiny", "int4", False, available=n * 4 * 3)
    with pytest.raises(EdgezoError) as e:
        check_export_memory(config, "/models/tiny", None, True, available=n * 4 * 3)
    assert "/models/tiny (llama" in str(e.value) and "decoding graph" in str(e.value)
    assert "GiB to export as fp32" in str(e.value) and "--no-decoder" in e.value.fix
    with pytest.raises(EdgezoError) as e:
        check_export_memory(config, "/models/tiny", "int8", False, available=n * 4 * 6)
    assert "int8 quantisation" in str(e.value) and "--precision int4" in e.value.fix
