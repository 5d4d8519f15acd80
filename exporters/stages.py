"""Split a bundle's graph at its frozen prefix, so ZO steps evaluate only what they change.

When every trainable tensor sits at the end of the graph — a classification head over a frozen
encoder is the case that matters — most of each forward recomputes values no perturbation can
change. ``add_stages(bundle)`` cuts the graph in two:

    prefix.onnx   graph inputs ──► the cached tensors (e.g. the mean-pooled embedding [batch, h])
    suffix.onnx   cached tensors + the remaining inputs (labels) + trainables ──► loss, logits

The cut is found, not declared: a node is in the suffix when any of its inputs depends on a
trainable tensor; the cached tensors are what suffix nodes read from the rest. The split is
only written when it is exact for per-example caching — every cached tensor is ``[batch, ...]``
with trailing dimensions that do not change with the sequence length (so an example's row is
the same however its batch was padded) — and when the suffix then reproduces the full graph's
loss on a padded batch from rows cached one example at a time. The runtime (``edgezo.stages``)
computes each example's rows once per run and trains on the suffix.

``model.onnx`` stays in the bundle unchanged: evaluation, generation and ``compare`` use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import utils as onnx_utils

from edgezo.bundle import MANIFEST, Manifest, load_bundle, write_manifest
from edgezo.errors import BundleError

PREFIX, SUFFIX = "prefix.onnx", "suffix.onnx"
TOLERANCE = 1e-4
TEXT_INPUTS = ("input_ids", "attention_mask")


def find_cut(model: onnx.ModelProto, trainable: set[str], text: set[str]
             ) -> tuple[list[str], list[str]]:
    """(cached tensor names, graph inputs the suffix reads directly) of the frozen prefix cut.

    A node belongs to the suffix when an input depends on a trainable tensor, or when it does
    not depend on the text inputs at all (the labels' side of the loss). The cached tensors are
    the text-dependent, trainable-free tensors suffix nodes read. ONNX graphs are sorted
    topologically, so one pass over the nodes settles both dependencies.
    """
    g = model.graph
    initializers = {t.name for t in g.initializer}
    tainted, textual = set(trainable), set(text)
    suffix_reads: list[str] = []
    for node in g.node:
        ins = [i for i in node.input if i]
        outs = [o for o in node.output if o]
        if any(i in textual for i in ins):
            textual.update(outs)
        if any(i in tainted for i in ins):
            tainted.update(outs)
        if any(i in tainted for i in ins) or not any(i in textual for i in ins):
            suffix_reads += [i for i in ins if i not in tainted]
    graph_inputs = {i.name for i in g.input} - initializers
    seen, cached, direct = set(), [], []
    for name in suffix_reads:
        if name in seen or name in initializers:
            continue
        seen.add(name)
        if name in textual:
            cached.append(name)
        elif name in graph_inputs:
            direct.append(name)
    return cached, direct


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check_rows(prefix, names: list[str], feeds: list[dict[str, np.ndarray]]) -> None:
    """Every cached tensor is [batch, ...] with trailing dims independent of the padding."""
    shapes = []
    for feed in feeds:
        outs = prefix.run(names, feed)
        batch = next(iter(feed.values())).shape[0]
        for n, o in zip(names, outs, strict=True):
            if o.ndim < 1 or o.shape[0] != batch:
                raise BundleError(f"cached tensor {n} has shape {o.shape}, not [batch, ...]",
                                  "this graph cannot be cached per example")
        shapes.append([o.shape[1:] for o in outs])
    if any(s != shapes[0] for s in shapes):
        raise BundleError(f"cached tensors change shape with the sequence length: {shapes}",
                          "this graph cannot be cached per example")


def add_stages(bundle_dir: str | Path, log=print) -> dict[str, Any] | None:
    """Write prefix/suffix graphs into an exported bundle (classification tasks); returns the
    manifest's ``stages`` entry, or None (with the reason logged) when no exact cut exists."""
    folder = Path(bundle_dir)
    bundle = load_bundle(folder)
    m = bundle.manifest
    model = onnx.load(str(bundle.model_path), load_external_data=False)
    trainable = {s.name for s in m.trainable}
    text_inputs = [i.name for i in m.inputs if i.name in TEXT_INPUTS]
    cached, direct = find_cut(model, trainable, set(text_inputs))
    if not cached or set(cached) & set(text_inputs):
        log(f"edgezo export: no frozen prefix to cache (the trainable tensors read {cached})")
        return None
    onnx_utils.extract_model(str(bundle.model_path), str(folder / PREFIX), text_inputs, cached)
    onnx_utils.extract_model(str(bundle.model_path), str(folder / SUFFIX),
                             cached + direct + sorted(trainable),
                             [o.name for o in m.outputs])
    try:
        _verify(bundle, folder, cached, direct, text_inputs)
    except BundleError as e:
        (folder / PREFIX).unlink()
        (folder / SUFFIX).unlink()
        log(f"edgezo export: not caching the frozen prefix: {e.what}")
        return None
    prefix = onnx.load(str(folder / PREFIX), load_external_data=False)
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
              for o in prefix.graph.output}
    stages = {"prefix": PREFIX, "suffix": SUFFIX, "cached": cached, "suffix_inputs": direct,
              "cached_shapes": {n: shapes.get(n) for n in cached}}
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["stages"] = stages
    new = Manifest.from_json(manifest)
    write_manifest(folder, new, sorted(set(new.files) | {PREFIX, SUFFIX}))
    log(f"edgezo export: frozen prefix cached per example: {', '.join(cached)} "
        f"(the ZO loop runs {SUFFIX} only)")
    return stages


def _verify(bundle, folder: Path, cached: list[str], direct: list[str],
            text_inputs: list[str]) -> None:
    """The suffix on rows cached one example at a time == the full graph on a padded batch."""
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
    n_labels = len(m.labels or [0, 1])
    labels = rng.integers(0, n_labels, batch).astype(np.int64)
    values = bundle.initial_trainable()
    # a non-zero point, so that a zero-initialised head does not hide a wrong cut
    point = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in values.items()}
    text = {"input_ids": ids, "attention_mask": mask}
    if set(text_inputs) - set(text):
        raise BundleError(f"prefix inputs {text_inputs} are not text inputs",
                          "only text-input prefixes are cached")
    full = _session(bundle.model_path)
    prefix = _session(folder / PREFIX)
    suffix = _session(folder / SUFFIX)
    direct_feed = {"labels": labels} if direct == ["labels"] else None
    if direct_feed is None:
        raise BundleError(f"the suffix reads graph inputs {direct} besides labels",
                          "only label-reading suffixes are cached")
    _check_rows(prefix, cached, [{k: text[k] for k in text_inputs},
                                 {k: np.pad(text[k], ((0, 0), (0, 4))) for k in text_inputs}])
    rows = [prefix.run(cached, {k: text[k][i:i + 1, :lengths[i]] for k in text_inputs})
            for i in range(batch)]
    stacked = {n: np.concatenate([r[j] for r in rows]) for j, n in enumerate(cached)}
    want = full.run(["loss"], {**text, "labels": labels, **point})[0]
    got = suffix.run(["loss"], {**stacked, **direct_feed, **point})[0]
    diff = float(np.max(np.abs(want - got)))
    if not diff <= TOLERANCE:
        raise BundleError(f"the split graph's loss differs from the full graph's by {diff:.3g}",
                          "keep training on the full graph")


def main() -> None:  # pragma: no cover - a maintenance entry point
    import sys

    add_stages(sys.argv[1])


if __name__ == "__main__":  # pragma: no cover
    main()
