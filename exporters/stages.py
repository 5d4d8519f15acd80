"""Split a bundle's graph at its frozen prefix, so ZO steps evaluate only what they change.

When every trainable tensor sits late in the graph — a classification head over a frozen
encoder, or LoRA on a causal LM's last blocks (``--lora-layers last:N``) — most of each forward
recomputes values no perturbation can change. ``add_stages(bundle)`` cuts the graph in two:

    prefix.onnx   text inputs ──► the cached tensors (the mean-pooled embedding [batch, h]; the
                  hidden states entering the first adapted block [batch, sequence, h], ...)
    suffix.onnx   cached tensors + text inputs and labels + trainables ──► loss (, logits)

The cut is found, not declared (``find_cut``): the cached tensors are the *heavy* ones (their
values depend on the text and on a weight matrix) that trainable-dependent nodes read; masks,
position ids and shapes are cheap and recomputed in the suffix from the text inputs. The split
is only written when it is exact for per-example caching — every cached tensor is
``[batch, ...]`` and an axis changes with the padded length only by being that length (with
right padding and causal or masked attention an example's row is the same however its batch
was padded) — and when the suffix then reproduces the full graph's loss on a padded batch from
rows cached one example at a time and zero-padded again. The runtime (``edgezo.prefix_cache``)
computes each example's rows once per run and trains on the suffix.

``model.onnx`` stays in the bundle unchanged: evaluation, generation and ``compare`` use it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx import utils as onnx_utils

from edgezo.bundle import MANIFEST, Manifest, load_bundle, write_manifest
from edgezo.data import pad_rows
from edgezo.errors import BundleError

from .memory import release_memory
from .vocab_subset import add_vocab_graph

PREFIX, SUFFIX = "prefix.onnx", "suffix.onnx"
TOLERANCE = 1e-4
#: with activations quantised at run time (int8: one scale per tensor over the whole batch) an
#: example's rows and loss depend slightly on its batch-mates, in the full graph as in the split
#: one: the split is then checked to this relative tolerance instead (its own figure is
#: recorded as ``stages.split_max_diff``)
DYNAMIC_QUANT_RTOL = 5e-2
DYNAMIC_QUANT_OPS = ("DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear")
TEXT_INPUTS = ("input_ids", "attention_mask")
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


#: ops whose output depends on their input's shape only, never on its values
SHAPE_OPS = {"Shape", "Size"}


def find_cut(
    model: onnx.ModelProto, trainable: set[str], text: set[str]
) -> tuple[list[str], list[str]]:
    """(cached tensor names, graph inputs the suffix reads directly) of the frozen prefix cut.

    A tensor is *heavy* when its values depend both on the text inputs and on a weight matrix
    (a floating-point initializer of rank >= 2): the embeddings and every hidden state derived
    from them. The suffix is what the outputs need, walking back from them: through every
    node that depends on a trainable tensor, and through the cheap text-derived nodes (masks,
    position ids, rotary tables, shifted labels, shapes), which the suffix recomputes from
    the text inputs it reads directly; the walk stops at the heavy, trainable-free tensors —
    those are cached. ONNX graphs are sorted topologically, so one forward pass settles the
    dependencies.
    """
    g = model.graph
    weights = {t.name for t in g.initializer if len(t.dims) >= 2 and t.data_type in FLOAT_TYPES}
    initializers = {t.name for t in g.initializer}
    tainted, textual, weighty = set(trainable), set(text), set(weights)
    producer: dict[str, onnx.NodeProto] = {}
    for node in g.node:
        ins = [i for i in node.input if i]
        outs = [o for o in node.output if o]
        producer.update((o, node) for o in outs)
        if any(i in tainted for i in ins):
            tainted.update(outs)
        if node.op_type in SHAPE_OPS:
            continue
        if any(i in textual for i in ins):
            textual.update(outs)
        if any(i in weighty for i in ins):
            weighty.update(outs)
    heavy = (textual & weighty) - tainted
    graph_inputs = {i.name for i in g.input} - initializers
    order = {o: k for k, node in enumerate(g.node) for o in node.output}
    cached, direct, seen = set(), set(), set()
    stack = [o.name for o in g.output]
    while stack:
        name = stack.pop()
        if not name or name in seen or name in initializers:
            continue
        seen.add(name)
        if name in graph_inputs:
            if name not in trainable:
                direct.add(name)
        elif name in heavy:
            cached.add(name)
        else:
            stack += list(producer[name].input)
    inputs = [i.name for i in g.input]
    return (sorted(cached, key=order.__getitem__), sorted(direct, key=inputs.index))


def _contrib_value_info(node: onnx.NodeProto, known: dict) -> list[onnx.ValueInfoProto]:
    """The types of a contrib op's outputs, from its first input's: ``MatMulNBits`` keeps the
    input's shape with the last axis ``N``; another op gets the type and an unknown shape."""
    src = known.get(node.input[0]) if node.input else None
    if src is None or not src.type.tensor_type.elem_type:
        return []
    elem = src.type.tensor_type.elem_type
    shape = None
    if node.op_type == "MatMulNBits" and src.type.tensor_type.HasField("shape"):
        n_out = next(a.i for a in node.attribute if a.name == "N")
        dims = [d.dim_param or d.dim_value for d in src.type.tensor_type.shape.dim]
        shape = [d if d else None for d in dims[:-1]] + [n_out]
    return [helper.make_tensor_value_info(o, elem, shape) for o in node.output if o]


def typed(model: onnx.ModelProto, rounds: int = 8) -> onnx.ModelProto:
    """``model`` with onnx's shape inference run, the outputs of ONNX Runtime contrib ops
    typed too (onnx does not know them, so it types nothing downstream of them either: an int4
    graph's ``MatMulNBits``, which keeps the replaced ``MatMul``'s output name), and inference
    run again from there, until nothing more is learned."""
    for _ in range(rounds):
        model = onnx.shape_inference.infer_shapes(model)
        g = model.graph
        known = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
        known.update(
            (t.name, helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            for t in g.initializer
        )
        added = []
        for node in g.node:
            if node.domain in ("", "ai.onnx") or all(o in known for o in node.output if o):
                continue
            for info in _contrib_value_info(node, known):
                if info.name not in known:
                    known[info.name] = info
                    added.append(info)
        if not added:
            break
        g.value_info.extend(added)
    return model


def extract(
    model: onnx.ModelProto, out: Path, inputs: list[str], outputs: list[str]
) -> onnx.ModelProto:
    """Write the sub-graph of ``model`` from ``inputs`` to ``outputs`` to ``out``.

    ``model`` is loaded without its external data: the sub-graph's initializers keep pointing
    into the bundle's ``model.onnx.data`` (as the decoding graph's do), so no weight is read
    or written again (``onnx.utils.extract_model`` loads every weight and writes a second and
    a third copy of them: the largest memory peak of an export, 6.6x the fp32 weights for
    Qwen2.5-0.5B). Its shape inference runs on the graph alone."""
    inferred = typed(model)
    known = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input]}
    known |= {v.name for v in inferred.graph.output}
    missing = [n for n in [*inputs, *outputs] if n not in known]
    if missing:
        raise ValueError(f"the types of {', '.join(missing[:3])} cannot be inferred")
    sub = onnx_utils.Extractor(inferred).extract_model(inputs, outputs)
    onnx.save(sub, str(out))
    return sub


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sequence_axes(
    prefix, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, list[int]]:
    """Each cached tensor's sequence axes: it must be ``[batch, ...]``, and a trailing axis
    may change with the padded length only by being that length (so an example's row is its
    tensor cut to the example's own length on those axes)."""
    widths = [feed["input_ids"].shape[1] for feed in feeds]
    shapes = []
    for feed in feeds:
        outs = prefix.run(names, feed)
        batch = feed["input_ids"].shape[0]
        for n, o in zip(names, outs, strict=True):
            if o.ndim < 1 or o.shape[0] != batch:
                raise BundleError(
                    f"cached tensor {n} has shape {o.shape}, not [batch, ...]",
                    "this graph cannot be cached per example",
                )
        shapes.append([o.shape for o in outs])
    axes: dict[str, list[int]] = {}
    for j, n in enumerate(names):
        a, b = shapes[0][j], shapes[1][j]
        changed = [k for k in range(1, len(a)) if a[k] != b[k]]
        if any(a[k] != widths[0] or b[k] != widths[1] for k in changed):
            raise BundleError(
                f"cached tensor {n} changes shape with the sequence length in a "
                f"way that is not the length itself: {a} vs {b}",
                "this graph cannot be cached per example",
            )
        axes[n] = changed
    return axes


def add_stages(bundle_dir: str | Path, log=print) -> dict[str, Any] | None:
    """Write prefix/suffix graphs into an exported bundle; returns the manifest's ``stages``
    entry, or None (with the reason logged) when no exact cut exists."""
    folder = Path(bundle_dir)
    bundle = load_bundle(folder)
    m = bundle.manifest
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    trainable = {s.name for s in m.trainable}
    text_inputs = [i.name for i in m.inputs if i.name in TEXT_INPUTS]
    cached, direct = find_cut(model, trainable, set(text_inputs))
    if not cached:
        log(
            "edgezo export: no frozen prefix to cache (every text-dependent tensor depends on "
            "a trainable one)"
        )
        return None
    release_memory()  # what the export freed before, so the sessions below start from it
    try:
        extract(model, folder / PREFIX, text_inputs, cached)
        extract(
            model, folder / SUFFIX, cached + direct + sorted(trainable), [o.name for o in m.outputs]
        )
    except ValueError as e:  # a cut tensor whose type cannot be inferred
        for name in (PREFIX, SUFFIX):
            (folder / name).unlink(missing_ok=True)
        log(
            "edgezo export: not caching the frozen prefix: the graph cannot be cut there "
            f"({str(e)[:160]}); training runs the whole graph"
        )
        return None
    dynamic = any(n.op_type in DYNAMIC_QUANT_OPS for n in model.graph.node)
    shapes_only = shape_only(onnx.load(str(folder / SUFFIX), load_external_data=False), cached)
    try:
        axes, diff = _verify(bundle, folder, cached, direct, text_inputs, dynamic, shapes_only)
    except BundleError as e:
        (folder / PREFIX).unlink()
        (folder / SUFFIX).unlink()
        log(f"edgezo export: not caching the frozen prefix: {e.what}")
        return None
    prefix = onnx.load(str(folder / PREFIX), load_external_data=False)
    shapes = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in prefix.graph.output
    }
    stages = {
        "prefix": PREFIX,
        "suffix": SUFFIX,
        "cached": cached,
        "suffix_inputs": direct,
        "cached_shapes": {n: shapes.get(n) for n in cached},
        "cached_sequence_axes": axes,
        "shape_only": shapes_only,
        "split_max_diff": diff,
    }
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["stages"] = stages
    new = Manifest.from_json(manifest)
    write_manifest(folder, new, sorted(set(new.files) | {PREFIX, SUFFIX}))
    shown = ", ".join(cached[:4]) + (f" and {len(cached) - 4} more" if len(cached) > 4 else "")
    log(
        f"edgezo export: frozen prefix cached per example: {shown} (the ZO loop runs {SUFFIX} only)"
    )
    vocab = add_vocab_graph(folder, log=log)
    if vocab is not None:
        stages["vocab"] = vocab
    return stages


def shape_only(suffix: onnx.ModelProto, cached: list[str]) -> list[str]:
    """The cached tensors whose values the suffix never reads: every node that takes one is a
    ``Shape``/``Size`` (a hidden state the traced graph asks only for its batch and sequence
    length). The runtime keeps no rows for them, only their shape (``edgezo.prefix_cache``).
    A name a subgraph refers to counts as read."""
    readers: dict[str, set[str]] = defaultdict(set)

    def walk(graph: onnx.GraphProto, top: bool) -> None:
        for node in graph.node:
            for i in node.input:
                readers[i].add(node.op_type if top else "subgraph")
            for a in node.attribute:
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    walk(sub, False)
        for o in graph.output:
            readers[o.name].add("output")

    walk(suffix.graph, True)
    return [n for n in cached if readers[n] and readers[n] <= SHAPE_OPS]


def _verify(
    bundle,
    folder: Path,
    cached: list[str],
    direct: list[str],
    text_inputs: list[str],
    dynamic: bool = False,
    shapes_only: list[str] = (),
) -> tuple[dict[str, list[int]], float]:
    """The suffix on rows cached one example at a time (and re-padded) == the full graph on
    a padded batch (``dynamic``: within :data:`DYNAMIC_QUANT_RTOL` of it); returns the cached
    tensors' sequence axes and the largest difference. The ``shapes_only`` tensors are fed as
    NaN of their shape: a suffix that read them would fail the check."""
    rng = np.random.default_rng(0)
    m = bundle.manifest
    vocab = int(m.architecture.get("vocab_size") or 100)
    lengths = [5, 9, 3]
    batch = len(lengths)
    width = max(lengths)
    ids = np.zeros((batch, width), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    label_spec = next(i for i in m.inputs if i.name == "labels")
    if len(label_spec.shape) == 1:  # class ids
        labels = rng.integers(0, len(m.labels or [0, 1]), batch).astype(np.int64)
    else:  # token targets
        labels = np.where(mask == 1, ids, -100).astype(np.int64)
    values = bundle.initial_trainable()
    # a non-zero point, so that a zero-initialised head (or LoRA B) does not hide a wrong cut
    point = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in values.items()}
    text = {"input_ids": ids, "attention_mask": mask}
    if set(text_inputs) - set(text):
        raise BundleError(
            f"prefix inputs {text_inputs} are not text inputs",
            "only text-input prefixes are cached",
        )
    batch_inputs = {**text, "labels": labels}
    if set(direct) - set(batch_inputs):
        raise BundleError(
            f"the suffix reads graph inputs {direct}",
            "only suffixes reading text inputs and labels are cached",
        )
    # one session at a time: each holds its weights (the full graph all of them)
    want = _session(bundle.model_path).run(["loss"], {**batch_inputs, **point})[0]
    prefix = _session(folder / PREFIX)
    axes = sequence_axes(
        prefix,
        cached,
        [
            {k: text[k] for k in text_inputs},
            {k: np.pad(text[k], ((0, 0), (0, 4))) for k in text_inputs},
        ],
    )
    rows = [
        prefix.run(cached, {k: text[k][i : i + 1, : lengths[i]] for k in text_inputs})
        for i in range(batch)
    ]
    del prefix
    stacked = {n: pad_rows([r[j][0] for r in rows]) for j, n in enumerate(cached)}
    for n in shapes_only:
        stacked[n] = np.full_like(stacked[n], np.nan)
    got = _session(folder / SUFFIX).run(
        ["loss"], {**stacked, **{k: batch_inputs[k] for k in direct}, **point}
    )[0]
    diff = float(np.max(np.abs(want - got)))
    tolerance = DYNAMIC_QUANT_RTOL * float(np.max(np.abs(want))) if dynamic else TOLERANCE
    if not diff <= tolerance:
        raise BundleError(
            f"the split graph's loss differs from the full graph's by {diff:.3g} "
            f"(tolerance {tolerance:.3g})",
            "keep training on the full graph",
        )
    return axes, diff


def main() -> None:  # pragma: no cover - a maintenance entry point
    import sys

    add_stages(sys.argv[1])


if __name__ == "__main__":  # pragma: no cover
    main()
