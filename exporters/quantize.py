"""Quantised bundles: int8 (dynamic) and int4 (``MatMulNBits``) frozen weights, trainable scales.

=======  =========================================================================================
scheme   what happens to the fp32 loss graph
=======  =========================================================================================
int8     ``onnxruntime.quantization.quantize_dynamic`` on ``MatMul`` only, int8 weights
         (``MatMulInteger`` + ``DynamicQuantizeLinear`` on the activations; per-tensor scales).
int4     ``MatMulNBitsQuantizer`` (ONNX Runtime's weight-only 4-bit ``MatMulNBits``, blocks of
         32/64/128 along the input dimension, asymmetric, accuracy level 0 by default).
=======  =========================================================================================

GPT-2's ``Conv1D`` layers export as ``Gemm`` (``addmm``), which ``MatMulNBitsQuantizer`` with
``op_types_to_quantize=("MatMul",)`` skips; :func:`gemm_to_matmul` first rewrites every ``Gemm``
with a constant weight into ``MatMul`` + ``Add`` (same arithmetic, measured identical loss), so
both schemes quantise them.

Only ``MatMul`` nodes whose weight is a constant initializer are quantised: a LoRA ``MatMul``
reads ``Transpose(graph input)`` and is left in fp32 by both quantisers, so LoRA over a
quantised frozen base keeps fp32 trainable tensors (checked after quantisation).

Before quantising, each weight initializer of a ``MatMul`` gets the name of the parameter it
came from (the legacy exporter names constant-folded, transposed weights ``onnx::MatMul_NNN``;
the node name ``/model/model/layers.0/self_attn/q_proj/MatMul`` gives
``model.layers.0.self_attn.q_proj.weight``), so scale inputs are named after their weight.

Trainable mode ``scales`` (int4 only): each ``MatMulNBits`` node's ``scales`` initializer
becomes a float32 graph input ``<weight>.scales`` (role ``scale``, ``positive``); the packed
4-bit weights and zero points stay frozen initializers. ONNX Runtime reads fed scales exactly
like baked ones at accuracy level 0; at accuracy level 4 it prepacks the scales at session
start and, with the scales fed at run time, silently returns zeros (measured on onnxruntime
1.32) — refused.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgezo.bundle import TensorSpec
from edgezo.errors import EdgezoError

SCHEMES = ("int8", "int4")
BLOCK_SIZES = (32, 64, 128)
#: Accuracy levels of ``MatMulNBits`` (0: unset/fp32 compute ... 4: int8 compute).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: Default tolerance on |quantised − fp32| / |fp32| of the ONNX loss: a quantisation error,
#: not an export bug, so it is much looser than the fp32 parity tolerance.
QUANT_RTOL = 0.10
SCALES_SUFFIX = ".scales"


def check_quant_args(quantize: str | None, mode: str, block_size: int, accuracy_level: int) -> None:
    """Refuse bad combinations before anything slow happens."""
    if quantize is not None and quantize not in SCHEMES:
        raise EdgezoError(
            f"unknown quantisation {quantize!r}", f"pass --quantize as one of: {', '.join(SCHEMES)}"
        )
    if block_size not in BLOCK_SIZES:
        raise EdgezoError(
            f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}",
            "pass --block-size 32, 64 or 128",
        )
    if accuracy_level not in ACCURACY_LEVELS:
        raise EdgezoError(
            f"accuracy level must be 0..4, got {accuracy_level!r}", "pass --accuracy-level 0"
        )
    if mode == "scales":
        if quantize != "int4":
            raise EdgezoError(
                "trainable mode 'scales' trains the int4 quantisation scales, so it needs "
                f"--precision int4 (got {quantize or 'no quantisation'})",
                "pass --precision int4 with --mode scales, or choose --mode lora/norms/full",
            )
        if accuracy_level != 0:
            raise EdgezoError(
                f"trainable scales need MatMulNBits accuracy level 0, got {accuracy_level}: at "
                "accuracy level 4 ONNX Runtime prepacks the scales and, with scales fed as graph "
                "inputs, silently returns zeros (other levels are not verified)",
                "pass --accuracy-level 0 with --mode scales (or train LoRA over the level-4 base)",
            )


@contextmanager
def quiet_quantizer():
    """The quantisers log one INFO/WARNING line per node on the root logger; silence them."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    loggers += [
        logging.getLogger(n)
        for n in list(logging.root.manager.loggerDict)
        if n.startswith("onnxruntime.quantization")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


#: the graph's own module scope (``/model/``) is dropped; the LM head, which the loss graph
#: applies itself, has the bare ``/lm_head/MatMul``
_NODE = re.compile(r"^/(?:model/)?(?P<path>.+)/MatMul$")


def name_matmul_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Rename ``MatMul`` weight initializers after their parameter; returns {old: new}.

    Only an initializer read by exactly one node, whose node name has the legacy exporter's
    ``/model/<module path>/MatMul`` form (or ``/lm_head/MatMul``), is renamed (others keep
    their name).
    """
    inits = {t.name: t for t in model.graph.initializer}
    taken = set(inits) | {i.name for i in model.graph.input}
    uses = Counter(name for node in model.graph.node for name in node.input)
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        old = node.input[1]
        m = _NODE.match(node.name)
        if old not in inits or uses[old] != 1 or m is None:
            continue
        new = m["path"].replace("/", ".") + ".weight"
        if new in taken:
            continue
        inits[old].name = new
        node.input[1] = new
        taken.add(new)
        renamed[old] = new
    return renamed


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, W, C)`` with a constant 2-D float ``W`` (alpha = beta = 1, no transA)
    as ``MatMul(A, W) + C`` in place (``transB``: ``W`` is stored transposed); returns how many.

    The ``MatMul`` node takes the ``Gemm``'s name with ``/Gemm`` → ``/MatMul``, so
    :func:`name_matmul_weights` names its weight after the module.
    """
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    count = 0
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Gemm" else None
        if (
            w is None
            or len(w.dims) != 2
            or w.data_type != onnx.TensorProto.FLOAT
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
            or (attrs.get("transB", 0) and uses[w.name] != 1)
        ):
            model.graph.node.append(node)
            continue
        if attrs.get("transB", 0):
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        name = re.sub(r"/Gemm(_\d+)?$", "/MatMul", node.name) if node.name else ""
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        model.graph.node.append(
            helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=name)
        )
        if has_bias:
            model.graph.node.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{name}_bias"
                )
            )
        count += 1
    return count


def quantizable_matmuls(model: onnx.ModelProto) -> int:
    """``MatMul`` nodes with a 2-D float initializer as weight (what both quantisers take)."""
    inits = {t.name: t for t in model.graph.initializer}
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
    )


def matmul_nbits(
    model: onnx.ModelProto,
    bits: int,
    block_size: int,
    accuracy_level: int,
    exclude: Sequence[str] = (),
) -> onnx.ModelProto:
    """ONNX Runtime's weight-only ``MatMulNBits`` (asymmetric) on the ``MatMul`` s with a
    constant weight, but the nodes named in ``exclude``; returns the quantised model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    return q.model.model


def matmul_nbits_one(
    node: onnx.NodeProto,
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    accuracy_level: int = 0,
) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]] | None:
    """One ``MatMul`` (``node``, its constant weight ``weight`` [K, N]) quantised to
    ``MatMulNBits`` on its own; returns (the nodes replacing ``node``, the new initializers as
    (name, array)), or None where the quantiser leaves it a ``MatMul``.

    The streamed export (``exporters/stream.py``) quantises each weight as it is attached, so
    the fp32 graph never exists whole. This runs :func:`matmul_nbits` (ONNX Runtime's
    ``MatMulNBitsQuantizer``, the step :func:`quantize_model` uses) on a one-node model that
    holds only this ``MatMul`` and its weight, so the packing, names and attributes are the
    ones the whole-graph quantiser gives the same node.
    """
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    k, n = weight.shape
    single = helper.make_node("MatMul", list(node.input), list(node.output), name=node.name)
    graph = helper.make_graph(
        [single],
        "one_matmul",
        [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight), node.input[1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with quiet_quantizer():
        out = matmul_nbits(model, bits, block_size, accuracy_level)
    if any(m.op_type == "MatMul" for m in out.graph.node):
        return None
    inits = [(t.name, numpy_helper.to_array(t).copy()) for t in out.graph.initializer]
    # copies: a node of ``out`` would keep all of ``out`` alive (protobuf messages share their
    # parent's memory), the fp32 weight included (measured: one weight's copy per MatMul)
    nodes = []
    for m in out.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(m)
        nodes.append(copy)
    return nodes, inits


def quantize_model(
    model: onnx.ModelProto,
    scheme: str,
    block_size: int = 32,
    accuracy_level: int = 0,
    reduce_range: bool = False,
) -> tuple[onnx.ModelProto, dict]:
    """Quantise the frozen ``MatMul`` weights of ``model``; returns (model, manifest dict).

    ``reduce_range`` (int8): 7-bit weights, which an x86 CPU without VNNI multiplies without
    saturation (``edgezo.runner.saturates_s8``).

    Raises :class:`EdgezoError` when no ``MatMul`` has a frozen weight (e.g. ``--mode full``,
    where every weight is a graph input) or when a graph input was lost.
    """
    inputs = [i.name for i in model.graph.input]
    gemms = gemm_to_matmul(model)
    name_matmul_weights(model)
    candidates = quantizable_matmuls(model)
    if candidates == 0:
        raise EdgezoError(
            "nothing to quantise: no MatMul of this graph has a frozen weight (with --mode full "
            "every weight is a trainable graph input)",
            "use --mode lora, norms or scales with --quantize, or export without --quantize",
        )
    with quiet_quantizer():
        if scheme == "int4":
            out = matmul_nbits(model, 4, block_size, accuracy_level)
            op = "MatMulNBits"
            info = {
                "scheme": "int4",
                "method": "onnxruntime MatMulNBitsQuantizer (weight-only, asymmetric)",
                "bits": 4,
                "block_size": block_size,
                "accuracy_level": accuracy_level,
                "symmetric": False,
            }
        elif scheme == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "q.onnx"
                quantize_dynamic(
                    model,
                    path,
                    op_types_to_quantize=["MatMul"],
                    weight_type=QuantType.QInt8,
                    per_channel=False,
                    reduce_range=reduce_range,
                    use_external_data_format=model.ByteSize() > 1_500_000_000,
                )
                out = onnx.load(str(path))
            op = "MatMulInteger"
            info = {
                "scheme": "int8",
                "method": "onnxruntime quantize_dynamic (weights int8 per tensor, activations "
                "quantised at run time)",
                "bits": 7 if reduce_range else 8,
                "weights_format": "s7" if reduce_range else "s8",
                "block_size": None,
                "accuracy_level": None,
                "symmetric": True,
            }
        else:  # pragma: no cover - check_quant_args refuses it first
            raise ValueError(scheme)
    count = sum(1 for n in out.graph.node if n.op_type == op)
    lost = [n for n in inputs if n not in {i.name for i in out.graph.input}]
    if lost or count == 0:
        raise EdgezoError(
            f"quantisation ({scheme}) produced {count} {op} nodes and lost graph inputs {lost}",
            "this is an exporter bug; report it with the model you exported",
        )
    info["quantized_matmuls"] = count
    info["gemm_rewritten"] = gemms
    info["op"] = op
    return out, info


def scales_to_inputs(model: onnx.ModelProto) -> tuple[list[TensorSpec], dict[str, np.ndarray]]:
    """Turn every ``MatMulNBits`` ``scales`` initializer into a float32 graph input.

    The input is named ``<weight>.scales`` after the node's packed weight
    (``model.layers.0.self_attn.q_proj.weight_Q4`` → ``model.layers.0.self_attn.q_proj.weight
    .scales``). Returns the trainable specs (role ``scale``, positive) and initial values.
    """
    inits = {t.name: t for t in model.graph.initializer}
    specs: list[TensorSpec] = []
    values: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        old = node.input[2]
        weight = re.sub(r"_Q\d+$", "", node.input[1])
        new = weight + SCALES_SUFFIX
        tensor = inits.pop(old)
        value = numpy_helper.to_array(tensor).astype(np.float32)
        if not np.all(value > 0) or not np.all(np.isfinite(value)):
            raise EdgezoError(
                f"quantisation scales of {weight} are not all positive and finite "
                f"(min {float(value.min()):.3g}), so they cannot be trained in log-space",
                "train LoRA over the int4 base (--mode lora --quantize int4) instead",
            )
        model.graph.initializer.remove(tensor)
        node.input[2] = new
        model.graph.input.append(
            helper.make_tensor_value_info(new, onnx.TensorProto.FLOAT, list(value.shape))
        )
        specs.append(TensorSpec(new, tuple(int(d) for d in value.shape), "float32", "scale", True))
        values[new] = np.ascontiguousarray(value)
    if not specs:
        raise EdgezoError(
            "no MatMulNBits node to train the scales of", "export with --quantize int4"
        )
    return specs, values


# -- the decoding graph's weight-only quantisation (``exporters/decode.py``) ------------------

#: ``--decoder-precision`` values and the bits of each quantised one
DECODER_BITS = {"int8": 8, "int4": 4}
#: ``MatMulNBits`` blocks of 32 along the input dimension (the finest the quantiser offers)
DECODER_BLOCK_SIZE = 32
#: accuracy level 4: the activations are quantised to int8 per block and the dot products run
#: in int8 — what pays for a one-token step (for 512-row GEMMs it does not: FACTS.md)
DECODER_ACCURACY_LEVEL = 4


def quantize_decoder(
    model: onnx.ModelProto,
    precision: str,
    block_size: int = DECODER_BLOCK_SIZE,
    accuracy_level: int = DECODER_ACCURACY_LEVEL,
) -> tuple[onnx.ModelProto, dict]:
    """Quantise the frozen ``MatMul`` weights of a decoding graph to weight-only ``MatMulNBits``
    (``precision`` ``int8`` or ``int4``); returns (model, the manifest's ``decoder.quantization``).

    Only a ``MatMul`` whose weight is a 2-D float initializer is quantised, so a trainable tensor
    (a graph input, read through ``Transpose``) is never touched; a frozen LoRA ``A`` stays fp32
    too (it is adapter state, and tiny). The untied LM head (its own ``[hidden, vocab]``
    initializer, see ``build_decoder``) is quantised like any other weight; the embedding
    ``Gather`` stays fp32. Every graph input keeps its name, dtype and shape (checked).
    """
    if precision not in DECODER_BITS:
        raise EdgezoError(
            f"unknown decoder precision {precision!r}",
            f"pass --decoder-precision as one of: fp32, {', '.join(DECODER_BITS)}",
        )
    before = {i.name: i.type.SerializeToString() for i in model.graph.input}
    name_matmul_weights(model)
    inits = {t.name: t for t in model.graph.initializer}
    exclude = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and "lora_" in n.name and n.input[1] in inits
    ]
    candidates = quantizable_matmuls(model) - len(exclude)
    if candidates <= 0:
        raise EdgezoError(
            "nothing to quantise in the decoding graph: no MatMul has a frozen weight (with "
            "--mode full every weight is a trainable graph input)",
            "export with --decoder-precision fp32",
        )
    with quiet_quantizer():
        out = matmul_nbits(model, DECODER_BITS[precision], block_size, accuracy_level, exclude)
    count = sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")
    after = {i.name: i.type.SerializeToString() for i in out.graph.input}
    changed = sorted(n for n in before if after.get(n) != before[n])
    if changed or count != candidates:
        raise EdgezoError(
            f"decoder quantisation ({precision}) made {count} MatMulNBits of {candidates} "
            f"frozen MatMuls and changed graph inputs {changed[:5]}",
            "this is an exporter bug; report it with the model you exported, or export with "
            "--decoder-precision fp32",
        )
    head = [n for n in out.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    info = {
        "op": "MatMulNBits",
        "method": "onnxruntime MatMulNBitsQuantizer (weight-only, asymmetric)",
        "bits": DECODER_BITS[precision],
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "symmetric": False,
        "quantized_matmuls": count,
        "lora_matmuls_kept_fp32": len(exclude),
        "head_quantized": bool(head),
    }
    return out, info
