"""Trace the loss graph to ONNX and tidy the result.

The legacy TorchScript exporter (``dynamo=False``) is used: it keeps our input names and is
fast (measured on 2 CPU cores: the tiny test Llama in 0.3-0.8 s against ~10 s with
``dynamo=True``; SmolLM2-135M in ~15 s including the tidying below, a prototype ~35 s with
dynamo). Its constant folding stores every Linear weight pre-transposed, which duplicates a tied
embedding/LM head (+108 MiB for SmolLM2); :func:`dedupe_tied_head` turns the copy back into a
``Transpose`` of the embedding, which ONNX Runtime folds at session start (no run-time cost
measured), so the file carries the matrix once.

The dummy batch used for tracing is right-padded on purpose: Hugging Face skips building the
padding mask when the mask is all ones, and a tracer freezes that decision into the graph.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from edgezo.bundle import InputSpec, TensorSpec
from edgezo.errors import EdgezoError

from .loss import CausalLMLossGraph
from .memory import release_memory

OPSET = 21
BATCH_INPUTS = ("input_ids", "attention_mask", "labels")
#: graph outputs: ``loss`` for training, ``next_logits`` (logits at each example's last attended
#: position) for ``edgezo generate``
OUTPUTS = (("loss", ("batch",)), ("next_logits", ("batch", "vocab")))
EXTERNAL_DATA = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 256 * 2**20  # bytes of initializers above which weights go external


def batch_input_specs() -> list[InputSpec]:
    """The manifest's ``inputs``: three int64 ``[batch, sequence]`` tensors."""
    return [InputSpec(n, "int64", ("batch", "sequence")) for n in BATCH_INPUTS]


def output_specs() -> list[InputSpec]:
    """The manifest's ``outputs``: the per-example loss and the next-token logits."""
    return [InputSpec(n, "float32", shape) for n, shape in OUTPUTS]


def dummy_batch(vocab_size: int, pad_token_id: int, generator: torch.Generator):
    """A right-padded 2×7 batch with some ignored labels, for tracing."""
    ids = torch.randint(0, vocab_size, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100
    return ids, mask, labels


def export_loss_graph(
    graph: CausalLMLossGraph,
    values: list[torch.Tensor],
    trainables: list[TensorSpec],
    path: Path,
    vocab_size: int,
    pad_token_id: int,
    generator: torch.Generator,
    tied_embedding: str | None = None,
    external_data: bool | None = None,
    progress: Callable[[str], None] = lambda _line: None,
    frozen_as_inputs: bool = True,
) -> list[str]:
    """Export ``graph`` to ``path`` (plus ``model.onnx.data`` when large); returns the files.

    ``tied_embedding``: the initializer name of an embedding the LM head shares (frozen only),
    whose transposed copy is removed. ``external_data``: ``None`` decides by size.
    ``frozen_as_inputs``: trace with the frozen weights as graph inputs and attach them
    afterwards one tensor at a time (:mod:`exporters.weight_attach`: the trace then holds no
    copy of them); ``False`` traces them as parameters (the tracer folds and serialises a copy
    of every weight), the way every bundle was exported before.
    """
    if frozen_as_inputs and isinstance(graph, CausalLMLossGraph):
        return _export_frozen_as_inputs(
            graph,
            values,
            trainables,
            path,
            vocab_size,
            pad_token_id,
            generator,
            tied_embedding,
            external_data,
            progress,
        )
    input_names = [*BATCH_INPUTS, *(s.name for s in trainables)]
    args = (*dummy_batch(vocab_size, pad_token_id, generator), list(values))
    raw_dir = path.parent / "_raw"  # a >2 GB graph comes out with scattered external files
    raw_dir.mkdir()
    raw = raw_dir / path.name
    _trace(graph, args, raw, input_names)
    release_memory()  # the tracer's graph and folded constants
    model = onnx.load(str(raw))
    shutil.rmtree(raw_dir)
    check_signature(model, trainables)
    if tied_embedding is not None:
        saved = dedupe_tied_head(model, tied_embedding)
        if saved:
            progress(f"tied LM head stored once ({saved / 2**20:.1f} MiB not duplicated)")
    files = save_model(model, path, external_data)
    del model
    release_memory()
    return files


def _trace(graph: torch.nn.Module, args: tuple, raw: Path, input_names: list[str]) -> None:
    """``torch.onnx.export`` of a loss graph to ``raw``: the batch inputs' axes dynamic, the
    loss and ``next_logits`` per row."""
    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in BATCH_INPUTS}
    dynamic_axes["loss"] = {0: "batch"}
    dynamic_axes["next_logits"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python branches
        torch.onnx.export(
            graph,
            args,
            str(raw),
            dynamo=False,
            input_names=input_names,
            output_names=[n for n, _ in OUTPUTS],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _export_frozen_as_inputs(
    graph: CausalLMLossGraph,
    values: list[torch.Tensor],
    trainables: list[TensorSpec],
    path: Path,
    vocab_size: int,
    pad_token_id: int,
    generator: torch.Generator,
    tied_embedding: str | None,
    external_data: bool | None,
    progress: Callable[[str], None],
) -> list[str]:
    """:func:`export_loss_graph` with every frozen parameter traced as a graph input, then
    attached as initializers (folded where the tracer would have folded it) and streamed into
    the external data file tensor by tensor."""
    from .weight_attach import attach_weights, externalize_rest

    trained = set(graph.names)
    frozen = [(n, p) for n, p in graph.model.named_parameters() if n not in trained]
    tracer = CausalLMLossGraph(
        graph.model, [*graph.names, *(n for n, _ in frozen)], graph.pass_position_ids
    ).eval()
    # the graph attribute is ``model``: frozen weights keep the names a parameter trace gives
    frozen_names = [f"model.{n}" for n, _ in frozen]
    input_names = [*BATCH_INPUTS, *(s.name for s in trainables), *frozen_names]
    args = (
        *dummy_batch(vocab_size, pad_token_id, generator),
        [*values, *(p.detach() for _, p in frozen)],
    )
    raw_dir = path.parent / "_raw"
    raw_dir.mkdir()
    raw = raw_dir / path.name
    _trace(tracer, args, raw, input_names)
    del tracer, args
    release_memory()
    model = onnx.load(str(raw))
    shutil.rmtree(raw_dir)
    tensors = dict(zip(frozen_names, (p for _, p in frozen), strict=True))
    weights = {n: (lambda t=t: t.detach().numpy()) for n, t in tensors.items()}
    frozen_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    own_bytes = sum(_init_nbytes(t) for t in model.graph.initializer)
    if external_data is None:
        external_data = frozen_bytes + own_bytes > EXTERNAL_DATA_THRESHOLD

    def keep_tied_head(node: onnx.NodeProto) -> bool:
        # the head reads the embedding through a Transpose that stays a node: one copy stored
        return (
            tied_embedding is not None
            and node.op_type == "Transpose"
            and list(node.input) == [tied_embedding]
        )

    data_path = path.parent / EXTERNAL_DATA if external_data else None
    count, nbytes = attach_weights(model, weights, data_path, keep_tied_head)
    check_signature(model, trainables)
    if tied_embedding is not None and any(keep_tied_head(n) for n in model.graph.node):
        emb = tensors.get(tied_embedding)
        if emb is not None:
            saved = emb.numel() * emb.element_size()
            progress(f"tied LM head stored once ({saved / 2**20:.1f} MiB not duplicated)")
    progress(f"attached {count} frozen weight tensors ({nbytes / 2**20:.1f} MiB) after the trace")
    if external_data:
        externalize_rest(model, data_path)
        onnx.save_model(model, str(path))
        files = [path.name, EXTERNAL_DATA]
    else:
        onnx.save_model(model, str(path))
        files = [path.name]
    del model
    release_memory()
    return files


def save_model(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> list[str]:
    """Save ``model`` to ``path`` (weights in ``model.onnx.data`` when ``external_data``, or,
    with ``None``, when above 256 MiB); returns the file names written."""
    nbytes = sum(_init_nbytes(t) for t in model.graph.initializer)
    if external_data is None:
        external_data = nbytes > EXTERNAL_DATA_THRESHOLD
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA,
            size_threshold=1024,
        )
        return [path.name, EXTERNAL_DATA]
    onnx.save_model(model, str(path))
    return [path.name]


def check_signature(model: onnx.ModelProto, trainables: list[TensorSpec]) -> None:
    """Graph inputs/outputs must be exactly the batch, then the trainables; output ``loss``."""
    expected = [(n, onnx.TensorProto.INT64, ("batch", "sequence")) for n in BATCH_INPUTS] + [
        (s.name, onnx.TensorProto.FLOAT, tuple(s.shape)) for s in trainables
    ]
    got = [(i.name, i.type.tensor_type.elem_type, _dims(i)) for i in model.graph.input]
    dropped = [s.name for s in trainables if s.name not in {g[0] for g in got}]
    if dropped:  # the tracer drops inputs the output does not depend on
        shown = ", ".join(dropped[:5]) + (
            f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        )
        raise EdgezoError(
            f"sensitivity check failed: the loss does not depend on trainable tensor(s) {shown} "
            "(the ONNX exporter dropped them from the graph as unused); no bundle was written",
            "choose other --lora-targets / --mode, or report the model if these tensors should "
            "matter",
        )
    if got != expected:
        diff = [(e, g) for e, g in zip(expected, got, strict=False) if e != g][:3]
        raise EdgezoError(
            f"the exported graph's inputs differ from the manifest: {len(got)} inputs vs "
            f"{len(expected)} expected; first differences (expected, got): {diff}",
            "this is an exporter bug; report it with the model you exported",
        )
    outs = [(o.name, o.type.tensor_type.elem_type, _dims(o)) for o in model.graph.output]
    if [(n, t, d[:1]) for n, t, d in outs] != [
        ("loss", onnx.TensorProto.FLOAT, ("batch",)),
        ("next_logits", onnx.TensorProto.FLOAT, ("batch",)),
    ] or len(outs[1][2]) != 2:
        raise EdgezoError(
            f"the exported graph's outputs are {outs}, expected float `loss` [batch] and "
            "float `next_logits` [batch, vocab]",
            "this is an exporter bug; report it with the model you exported",
        )


def dedupe_tied_head(model: onnx.ModelProto, embedding: str) -> int:
    """Replace a folded copy ``embeddingᵀ`` with a ``Transpose`` node; returns bytes saved."""
    inits = {t.name: t for t in model.graph.initializer}
    if embedding not in inits:
        return 0
    emb = numpy_helper.to_array(inits[embedding])
    if emb.ndim != 2:
        return 0
    saved = 0
    for t in list(model.graph.initializer):
        if tuple(t.dims) != emb.shape[::-1] or t.name == embedding:
            continue
        if not np.array_equal(numpy_helper.to_array(t), emb.T):
            continue
        model.graph.initializer.remove(t)
        node = helper.make_node(
            "Transpose", [embedding], [t.name], name=f"{t.name}_tied_head", perm=[1, 0]
        )
        model.graph.node.insert(0, node)
        saved += emb.nbytes
    return saved


def _dims(value_info: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def _init_nbytes(t: onnx.TensorProto) -> int:
    itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize
