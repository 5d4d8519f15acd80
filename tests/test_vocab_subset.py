"""Training losses over a vocabulary subset (``stages.vocab``): the export writes and checks the
graph, the runtime's losses are the softmax restricted to the subset, held-out losses keep the
whole vocabulary, and a run records, resumes and refuses it consistently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from test_lm_stages import run  # noqa: E402

from edgezo import vocab_subset  # noqa: E402
from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.data import Example  # noqa: E402
from edgezo.errors import BundleError, EdgezoError  # noqa: E402
from edgezo.zo.ledger import Ledger  # noqa: E402
from exporters.vocab_subset import ROWS_INPUT, WEIGHTS_INPUT, find_head, vocab_graph  # noqa: E402


@pytest.fixture(scope="module")
def last1(make_bundle):
    return make_bundle("lora", lora_layers="last:1")


def test_the_export_writes_a_checked_vocabulary_graph(last1):
    b = load_bundle(last1)  # hashes of the graph and the rows file checked too
    v = b.manifest.stages["vocab"]
    assert {v["graph"], v["rows_file"]} <= set(b.manifest.files)
    assert v["input"] == ROWS_INPUT and v["rows_layout"] == "rows"
    assert v["rows_shape"] == [b.manifest.vocab_size, b.manifest.architecture["hidden_size"]]
    assert 0 <= v["split_max_diff"] <= 1e-4
    graph = onnx.load(str(last1 / v["graph"]))
    # the head weight is an input now, not a stored tensor
    assert ROWS_INPUT in {i.name for i in graph.graph.input}
    assert not any(b.manifest.vocab_size in i.dims for i in graph.graph.initializer)


def _reference_losses(tiny_hf_dir, batch, ids=None, log_weights=None):
    """Per-example mean NLL from the tiny torch model (LoRA B starts at zero, so θ0 is the
    base model), the softmax over all tokens or over ``ids`` (each logit plus its log
    weight)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    mask = torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
    labels = torch.tensor(batch["labels"])
    if ids is not None:
        logits = logits[..., torch.tensor(ids)]
        if log_weights is not None:
            logits = logits + torch.tensor(log_weights)
        position = torch.full((logits.shape[-1] * 1000,), -1, dtype=torch.long)
        position[torch.tensor(ids)] = torch.arange(len(ids))
        labels = torch.where(labels >= 0, position[labels.clamp(min=0)], -100)
    target, valid = labels[:, 1:], (labels[:, 1:] >= 0) & (mask[:, 1:] > 0)
    lp = torch.log_softmax(logits[:, :-1], -1)
    nll = -lp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return (nll.sum(-1) / valid.sum(-1)).numpy()


def test_training_losses_are_the_softmax_over_the_subset(last1, memo_data, tiny_hf_dir):
    from edgezo import prefix_cache
    from edgezo.data import collate, read_jsonl, tokenize_for
    from edgezo.runner import LossRunner, RuntimeOptions
    from edgezo.zo.params import FlatParams

    b = load_bundle(last1)
    m = b.manifest
    examples = tokenize_for(m, read_jsonl(memo_data[0]), b.tokenizer(), 64)[:4]
    batch = collate(examples, m.tokenizer.pad_token_id)
    subset = vocab_subset.subset_for(b, examples, frequent=3)
    assert subset is not None and len(subset.ids) < m.vocab_size
    params = FlatParams(m.trainable, b.initial_trainable())
    (rows,), _ = prefix_cache.cache_rows(
        b, [examples], 4, m.tokenizer.pad_token_id, RuntimeOptions(threads=1)
    )
    cached = collate(rows, m.tokenizer.pad_token_id)
    runner = LossRunner(
        prefix_cache.suffix_path(b),
        params,
        prefix_cache.suffix_inputs(b),
        RuntimeOptions(threads=1),
    )
    whole = runner.losses(cached)
    assert runner.use_vocab_subset(subset) is None
    part = runner.losses(cached)
    held = runner.losses(cached, heldout=True)
    np.testing.assert_allclose(whole, _reference_losses(tiny_hf_dir, batch), atol=1e-4)
    np.testing.assert_allclose(part, _reference_losses(tiny_hf_dir, batch, subset.ids), atol=1e-4)
    assert np.all(part < whole)  # a logsumexp over fewer tokens
    np.testing.assert_array_equal(held, whole)  # held-out keeps the whole vocabulary
    runner.use_whole_vocabulary()
    np.testing.assert_array_equal(runner.losses(cached), whole)

    # sampled stand-ins for the other tokens, each weighted by the share it stands for
    sampled = vocab_subset.subset_for(b, examples, frequent=3, sample=5, seed=0)
    rest = m.vocab_size - sampled.chosen
    assert len(sampled.ids) == sampled.chosen + 5 and sampled.chosen == len(subset.ids)
    np.testing.assert_allclose(sampled.log_weights[sampled.chosen :], np.log(rest / 5), rtol=1e-6)
    assert not np.any(sampled.log_weights[: sampled.chosen])
    assert sampled.describe() == vocab_subset.subset_for(b, examples, 3, 5, 0).describe()
    assert sampled.describe() != vocab_subset.subset_for(b, examples, 3, 5, 1).describe()
    assert runner.use_vocab_subset(sampled) is None
    np.testing.assert_allclose(
        runner.losses(cached),
        _reference_losses(tiny_hf_dir, batch, sampled.ids, sampled.log_weights),
        atol=1e-4,
    )


def test_choose_and_remap():
    train = [Example((1, 2), (9, 5), 1), Example((1,), (-100, 7), 2)]
    ids = vocab_subset.choose(train, 3, vocab=20)
    assert ids.tolist() == [0, 1, 2, 5, 7, 9]
    s = vocab_subset.VocabSubset(ids, np.zeros((6, 2), np.float32), np.full(20, -1), Path("g"), "x")
    s.position[ids] = np.arange(6)
    assert s.labels(np.array([[9, -100, 0]])).tolist() == [[5, -100, 0]]
    with pytest.raises(BundleError) as e:
        s.labels(np.array([[4]]))
    assert "[4]" in e.value.what and "vocab_subset=0" in e.value.fix
    with pytest.raises(BundleError, match="outside the bundle's vocabulary"):
        vocab_subset.choose([Example((1,), (25,), 1)], 3, vocab=20)
    assert vocab_subset.digest(ids) == vocab_subset.digest(ids.copy())


def _toy_head(layout: str, vocab=7, hidden=3):
    """x [n, H] -> MatMul with the head -> LogSoftmax -> output; the head stored as the
    ``layout`` of an exporter (rows: [V, H] through a Transpose; columns: [H, V])."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(vocab, hidden)).astype(np.float32)
    nodes, inits = [], []
    if layout == "rows":
        inits.append(numpy_helper.from_array(w, "embed"))
        nodes.append(helper.make_node("Transpose", ["embed"], ["wt"], perm=[1, 0]))
        b = "wt"
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "head"))
        b = "head"
    nodes += [
        helper.make_node("MatMul", ["x", b], ["logits"], name="head_matmul"),
        helper.make_node("LogSoftmax", ["logits"], ["lp"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden])],
        [helper.make_tensor_value_info("lp", TensorProto.FLOAT, ["n", None])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_vocab_graph_takes_the_chosen_rows_in_either_layout(layout, tmp_path):
    model, w = _toy_head(layout)
    node, name, found = find_head(model, vocab=7)
    assert found == layout and node.name == "head_matmul"
    graph, weight, _ = vocab_graph(model, vocab=7)
    assert weight.name == name
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    ids = np.array([5, 0, 3])
    weights = np.array([0.0, np.log(3.0), 0.0], dtype=np.float32)
    got = ort.InferenceSession(graph.SerializeToString()).run(
        None, {"x": x, ROWS_INPUT: np.ascontiguousarray(w[ids]), WEIGHTS_INPUT: weights}
    )[0]
    logits = x @ w[ids].T + weights
    want = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the runtime gathers the same rows from either stored layout
    stored = w if layout == "rows" else np.ascontiguousarray(w.T)
    (tmp_path / "head.f32").write_bytes(b"\0" * 8 + stored.astype("<f4").tobytes())
    entry = {"rows_file": "head.f32", "rows_offset": 8, "rows_shape": list(stored.shape)}
    entry["rows_layout"] = layout
    np.testing.assert_array_equal(vocab_subset.read_rows(tmp_path, entry, ids), w[ids])


def test_a_quantised_or_missing_head_is_not_found():
    model, _ = _toy_head("rows")
    assert find_head(model, vocab=8) is None  # another vocabulary size
    model.graph.node[1].op_type = "MatMulNBits"
    assert find_head(model, vocab=7) is None


def test_rows_outside_the_bundle_or_short_are_refused(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "outside.f32").write_bytes(b"\0" * 64)
    entry = {"rows_file": "../outside.f32", "rows_offset": 0, "rows_shape": [4, 4]}
    entry["rows_layout"] = "rows"
    with pytest.raises(BundleError, match="outside the bundle"):
        vocab_subset.read_rows(tmp_path / "b", entry, np.array([0]))
    (tmp_path / "b" / "short.f32").write_bytes(b"\0" * 60)
    with pytest.raises(BundleError, match="shorter than the LM head"):
        vocab_subset.read_rows(tmp_path / "b", {**entry, "rows_file": "short.f32"}, np.array([0]))


def test_a_malformed_vocab_entry_is_refused_at_load(last1, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(last1, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["stages"]["vocab"]["rows_layout"] = "diagonal"
    manifest["stages"]["vocab"]["rows_shape"] = [3, 32]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgezoError) as e:
        load_bundle(bad)
    assert "stages.vocab.rows_layout" in e.value.what and "stages.vocab.rows_shape" in e.value.what


def test_a_run_trains_on_the_subset_records_it_and_resumes_exactly(last1, memo_data, tmp_path):
    said: list[str] = []
    sub = run(last1, memo_data, tmp_path / "sub", vocab_subset=3, vocab_sample=5, log=said.append)
    whole = run(last1, memo_data, tmp_path / "whole", vocab_subset=0)
    line = next(x for x in said if "training losses normalise over" in x)
    assert "of 52 tokens" in line and "5 sampled stand-ins" in line
    a = Ledger.read(tmp_path / "sub" / "ledger.jsonl")
    b = Ledger.read(tmp_path / "whole" / "ledger.jsonl")
    assert a.header["vocab_subset"]["size"] + 5 < 52 and "vocab_subset" not in b.header
    assert a.header["vocab_subset"]["sampled"] == 5
    assert sub.heldout_before == whole.heldout_before  # the same whole-vocabulary graph
    assert np.all(np.array(a.records[0]["losses"]) < np.array(b.records[0]["losses"]))
    assert sub.heldout_after < sub.heldout_before  # and it learns the full loss

    # killed after 6 steps and resumed: the same 12 steps as the uninterrupted run
    run(last1, memo_data, tmp_path / "split", vocab_subset=3, vocab_sample=5, steps=6)
    run(last1, memo_data, tmp_path / "split", vocab_subset=3, vocab_sample=5, steps=12, resume=True)
    c = Ledger.read(tmp_path / "split" / "ledger.jsonl")
    assert [r["losses"] for r in c.records] == [r["losses"] for r in a.records]

    # a run started on the whole vocabulary stays on it when resumed
    said.clear()
    run(
        last1, memo_data, tmp_path / "whole", vocab_subset=0, steps=14, resume=True, log=said.append
    )
    assert not any("normalise over" in x for x in said)


def test_a_resume_with_other_training_data_is_refused(last1, memo_data, tmp_path):
    train = tmp_path / "train.jsonl"
    shutil.copy(memo_data[0], train)
    run(last1, (train, memo_data[1]), tmp_path / "r", vocab_subset=3, vocab_sample=0, steps=4)
    # the file now holds tokens (digits) that the first session's subset does not
    train.write_text("".join(json.dumps({"text": f"room {n} at 9:{n}0"}) + "\n" for n in range(24)))
    with pytest.raises(EdgezoError) as e:
        run(
            last1,
            (train, memo_data[1]),
            tmp_path / "r",
            vocab_subset=3,
            vocab_sample=0,
            steps=6,
            resume=True,
        )
    assert "vocabulary subset" in e.value.what and "--out" in e.value.fix


def test_bench_vocab_subset_measures_both_side_by_side(last1, memo_data):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_vocab_subset import measure

    r = measure(last1, str(memo_data[0]), [0, 3], 4, 2, 2, 8, 1e-3, 1, sample=4)
    assert r["vocab"] == 52 and r["whole_ms"] > 0
    small, larger = r["subsets"]
    assert small["tokens"] < larger["tokens"] < 52
    for s in r["subsets"]:
        assert s["ms"] > 0 and s["loss_gap"] > 0  # fewer tokens: a lower log-sum-exp
        assert 0.5 < s["agreement"] <= 1.0 + 1e-6  # the slopes mostly agree
    assert larger["loss_gap"] < small["loss_gap"]  # more tokens: closer to the whole loss
