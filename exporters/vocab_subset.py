"""A training suffix whose LM head computes only the rows of a chosen subset of the vocabulary.

A ZO step of the default layout (LoRA on the last blocks, a cached frozen prefix) spends about
half of each suffix evaluation in the LM head: a ``[tokens, hidden] x [hidden, vocab]`` matmul
over 49,152 tokens on SmolLM2, 262,144 on Gemma 3. The training loss does not need all of them
to point the step the right way: normalising the softmax over the tokens the training targets
use plus the most frequent ones gives a gradient within a few degrees of the whole
vocabulary's (docs/concepts/vocab-subset.md has the measurement), and ZO's random-direction
estimate is far noisier than that.

``add_vocab_graph(bundle_dir)`` writes ``suffix_vocab.onnx``: ``suffix.onnx`` with the head's
weight replaced by a graph input ``lm_head_rows`` ``[rows, hidden]`` (the chosen rows of the
head, in the order the runtime chose; its labels are remapped to positions in that order) and
a second input ``lm_head_log_weights`` ``[rows]`` added to the logits before the softmax (a
sampled row that stands for w tokens carries log w, so the normaliser estimates the whole
vocabulary's; a chosen row carries 0), and records in the manifest where the whole head's
rows are stored, so the runtime gathers its subset without ONNX (``edgezo.vocab_subset``)::

    stages.vocab = {"graph": "suffix_vocab.onnx", "input": "lm_head_rows",
                    "rows_file": "model.onnx.data", "rows_offset": 0, "rows_shape": [V, H],
                    "rows_layout": "rows" | "columns", "split_max_diff": ...}

``rows_layout`` "columns": the head is stored ``[H, V]`` (a pre-transposed weight). The graph is
written only for a plain float32 ``MatMul`` head (a quantised head keeps the whole-vocabulary
suffix), and only when, fed every row of the head, it reproduces ``suffix.onnx``'s loss.
Held-out evaluation, generation and ``compare`` keep the whole vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgezo.bundle import MANIFEST, Manifest, load_bundle, write_manifest
from edgezo.data import pad_rows

VOCAB_GRAPH = "suffix_vocab.onnx"
ROWS_INPUT = "lm_head_rows"
WEIGHTS_INPUT = "lm_head_log_weights"
#: the head's weight when the graph holds it inline (small models): raw little-endian float32
INLINE_ROWS_FILE = "lm_head.f32"
TOLERANCE = 1e-4


def find_head(model: onnx.ModelProto, vocab: int) -> tuple[onnx.NodeProto, str, str] | None:
    """``(MatMul node, weight initializer name, layout)`` of the LM head: the one float32
    ``MatMul`` whose second input is a ``[V, H]`` initializer through a ``Transpose``
    (layout "rows") or a ``[H, V]`` initializer (layout "columns"); None when there is no
    single such node (a quantised head, another vocabulary size)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        b = node.input[1]
        src = producer.get(b)
        if src is not None and src.op_type == "Transpose" and src.input[0] in inits:
            w = inits[src.input[0]]
            perm = [list(a.ints) for a in src.attribute if a.name == "perm"]
            if len(w.dims) == 2 and w.dims[0] == vocab and perm in ([], [[1, 0]]):
                found.append((node, w.name, "rows"))
        elif b in inits and len(inits[b].dims) == 2 and inits[b].dims[1] == vocab:
            found.append((node, b, "columns"))
    if len(found) != 1:
        return None
    node, name, layout = found[0]
    if inits[name].data_type != onnx.TensorProto.FLOAT:
        return None
    return node, name, layout


def vocab_graph(
    suffix: onnx.ModelProto, vocab: int
) -> tuple[onnx.ModelProto, onnx.TensorProto, str]:
    """``suffix`` with its head weight replaced by the input :data:`ROWS_INPUT` ``[rows, H]``;
    returns the graph, the replaced initializer (as stored: inline or external) and its
    layout. Raises ValueError when the head is not a plain float32 MatMul over the vocabulary."""
    head = find_head(suffix, vocab)
    if head is None:
        raise ValueError("the LM head is not one float32 MatMul over the vocabulary")
    node, name, layout = head
    model = onnx.ModelProto()
    model.CopyFrom(suffix)
    g = model.graph
    weight = next(i for i in g.initializer if i.name == name)
    hidden = int(weight.dims[1] if layout == "rows" else weight.dims[0])
    kept = [i for i in g.initializer if i.name != name]
    del g.initializer[:]
    g.initializer.extend(kept)
    if layout == "rows":  # Transpose(weight) -> Transpose(rows): the node stays
        for n in g.node:
            for k, x in enumerate(n.input):
                if x == name:
                    n.input[k] = ROWS_INPUT
    else:  # MatMul(x, weight [H, V]) -> MatMul(x, Transpose(rows))
        columns = f"{ROWS_INPUT}/Transpose_output_0"
        position = list(g.node).index(next(n for n in g.node if n.name == node.name))
        g.node.insert(position, helper.make_node("Transpose", [ROWS_INPUT], [columns], perm=[1, 0]))
        for n in g.node:
            for k, x in enumerate(n.input):
                if x == name:
                    n.input[k] = columns
    g.input.append(
        helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.FLOAT, ["vocab_rows", hidden])
    )
    # each row's log weight, added to its logit before the softmax: a row that stands for w
    # tokens of the vocabulary adds w·exp(logit) to the normaliser
    softmax = [n for n in g.node if n.op_type == "LogSoftmax"]
    if len(softmax) != 1:
        raise ValueError(f"the loss has {len(softmax)} LogSoftmax nodes, not one")
    weighted = f"{WEIGHTS_INPUT}/Add_output_0"
    position = list(g.node).index(softmax[0])
    g.node.insert(
        position, helper.make_node("Add", [softmax[0].input[0], WEIGHTS_INPUT], [weighted])
    )
    softmax[0].input[0] = weighted
    g.input.append(
        helper.make_tensor_value_info(WEIGHTS_INPUT, onnx.TensorProto.FLOAT, ["vocab_rows"])
    )
    # shapes inferred for the whole vocabulary would be wrong now
    del g.value_info[:]
    return model, weight, layout


def _rows_source(folder: Path, weight: onnx.TensorProto) -> tuple[str, int]:
    """(file, byte offset) of the head's float32 values inside the bundle; an inline weight is
    written to :data:`INLINE_ROWS_FILE` first."""
    if weight.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in weight.external_data}
        return info["location"], int(info.get("offset", 0))
    values = numpy_helper.to_array(weight).astype("<f4", copy=False)
    (folder / INLINE_ROWS_FILE).write_bytes(values.tobytes())
    return INLINE_ROWS_FILE, 0


def add_vocab_graph(bundle_dir: str | Path, log=print) -> dict[str, Any] | None:
    """Write :data:`VOCAB_GRAPH` into a bundle that has a frozen-prefix split and record it as
    the manifest's ``stages.vocab``; returns that entry, or None (reason logged)."""
    folder = Path(bundle_dir)
    bundle = load_bundle(folder)
    m = bundle.manifest
    vocab = m.vocab_size
    label_spec = next((i for i in m.inputs if i.name == "labels"), None)
    if m.stages is None or vocab is None or label_spec is None or len(label_spec.shape) != 2:
        return None  # not a causal LM with a cached prefix
    suffix = onnx.load(str(folder / m.stages["suffix"]), load_external_data=False)
    try:
        graph, weight, layout = vocab_graph(suffix, vocab)
    except ValueError as e:
        log(f"edgezo export: no vocabulary-subset training graph: {e}")
        return None
    rows_file, offset = _rows_source(folder, weight)
    onnx.save(graph, str(folder / VOCAB_GRAPH))
    entry = {
        "graph": VOCAB_GRAPH,
        "input": ROWS_INPUT,
        "weights_input": WEIGHTS_INPUT,
        "rows_file": rows_file,
        "rows_offset": offset,
        "rows_shape": [int(d) for d in weight.dims],
        "rows_layout": layout,
    }
    try:
        entry["split_max_diff"] = _verify(bundle, folder, entry)
    except (AssertionError, ValueError) as e:
        (folder / VOCAB_GRAPH).unlink()
        (folder / INLINE_ROWS_FILE).unlink(missing_ok=True)
        log(f"edgezo export: no vocabulary-subset training graph: {e}")
        return None
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["stages"]["vocab"] = entry
    new = Manifest.from_json(manifest)
    extra = {VOCAB_GRAPH} | ({INLINE_ROWS_FILE} if rows_file == INLINE_ROWS_FILE else set())
    write_manifest(folder, new, sorted(set(new.files) | extra))
    log(
        f"edgezo export: training graph with a vocabulary-subset LM head: {VOCAB_GRAPH} "
        "(held-out evaluation keeps the whole vocabulary)"
    )
    return entry


def _verify(bundle, folder: Path, entry: dict[str, Any]) -> float:
    """The vocabulary graph fed every head row (in a shuffled order, the labels remapped to
    it) reproduces the suffix's loss on a padded batch; returns the largest difference."""
    import onnxruntime as ort

    from edgezo.vocab_subset import read_rows

    m = bundle.manifest
    st = m.stages
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3]
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, m.vocab_size, n)
        mask[i, :n] = 1
    labels = np.where(mask == 1, ids, -100).astype(np.int64)
    point = {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
        for k, v in bundle.initial_trainable().items()
    }
    so = ort.SessionOptions()
    so.log_severity_level = 3

    def session(name: str):
        return ort.InferenceSession(str(folder / name), so, providers=["CPUExecutionProvider"])

    cached = list(st["cached"])
    prefix = session(st["prefix"])
    rows = [
        prefix.run(cached, {"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]})
        for i, n in enumerate(lengths)
    ]
    del prefix
    feed = {n: pad_rows([r[j][0] for r in rows]) for j, n in enumerate(cached)}
    direct = {"attention_mask": mask, "labels": labels}
    feed.update({k: direct[k] for k in st["suffix_inputs"]})
    want = session(st["suffix"]).run(["loss"], {**feed, **point})[0]
    order = rng.permutation(m.vocab_size)
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    head = read_rows(folder, entry, order)
    feed["labels"] = np.where(labels >= 0, position[np.maximum(labels, 0)], -100)
    weights = np.zeros(len(order), dtype=np.float32)
    got = session(entry["graph"]).run(
        ["loss"], {**feed, **point, entry["input"]: head, entry["weights_input"]: weights}
    )[0]
    diff = float(np.max(np.abs(want - got)))
    if not diff <= TOLERANCE:
        raise ValueError(
            f"fed every head row it differs from the suffix's loss by {diff:.3g} "
            f"(tolerance {TOLERANCE:g})"
        )
    return diff
