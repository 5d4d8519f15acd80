"""Export precision: which arithmetic the frozen ``MatMul`` weights of a bundle run in.

============  ===============================================================================
precision     what happens to the fp32 loss graph (trainable tensors stay float32 inputs)
============  ===============================================================================
fp32          nothing
int8          per-channel int8 weights with SmoothQuant-style smoothing, activations quantised
              at run time (``DynamicQuantizeMatMul``: u8 x s8 GEMMs on VNNI). Calibrated on a
              few of the sample notes shipped with edgezo (deterministic).
int8-dynamic  ``onnxruntime.quantization.quantize_dynamic``: per-tensor int8 weights
              (``MatMulInteger``; the former ``--quantize int8``; less accurate than int8)
int4          ``MatMulNBits`` weight-only 4-bit (the former ``--quantize int4``; computes in
              fp32 at accuracy level 0: smaller, not faster, on 512-row batches)
============  ===============================================================================

``scope`` (int8 only): ``all`` quantises every frozen ``MatMul`` (the LM head included);
``prefix`` only those of the blocks before the first adapted block, so that the frozen prefix
the runtime caches runs in int8 and the suffix each ZO step evaluates stays fp32 (an example's
suffix loss then does not depend on its batch-mates through the run-time activation scale).

Smoothing (Xiao et al., SmoothQuant, with α = :data:`SMOOTH_ALPHA`): for every activation ``X``
read by quantised ``MatMul`` s, a per-input-channel factor ``s_k = max|X_k|^α / max|W_k|^(1-α)``
moves the activation's outlier channels into the weights: ``X W = (X / s)(s W)``. ``1 / s`` is
folded into the RMSNorm weight that produced ``X`` when nothing else reads ``X`` (the LoRA
branch of ``v_proj`` reads it too, so there it is a ``Mul`` node), else applied by a ``Mul``.
The weights ``s W`` are then quantised symmetrically per output column (scale = max|column| /
127).

int8 compute is fast on a CPU with int8 dot-product instructions (x86 VNNI: ``avx512_vnni``,
``avx_vnni`` or ``amx_int8``; Arm: ``asimddp``). On an x86 CPU without VNNI (AVX2) ONNX
Runtime's u8 × s8 kernels are still faster than fp32 (measured 1.6× on a 512-row GEMM) but sum
pairs of products in 16 bits with saturation, so full-range s8 weights give wrong results there:
the weights are then stored as u8 (``weights_format``, :data:`INT8_WEIGHTS`; chosen for the
exporting CPU unless ``--int8-weights`` says otherwise), and a bundle with s8 weights is refused
at load on such a CPU (``edgezo.runner.precision_note``). On a non-x86 CPU without a dot product
the export refuses int8 (:func:`check_precision_supported`) and a loaded bundle gets a note.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgezo.bundle import INT8_ACTIVATIONS, INT8_WEIGHTS, PRECISIONS
from edgezo.errors import EdgezoError
from edgezo.runner import (
    INT8_FLAGS,
    cpu_flags,
    int8_support,
    int8_weights_for,
    saturates_s8,
)

from .quantize import gemm_to_matmul, name_matmul_weights

#: ``--quantize`` (kept as an alias) → ``--precision``
QUANTIZE_ALIASES = {"int8": "int8-dynamic", "int4": "int4"}
#: the precision → the ``quantize_model`` scheme of :mod:`exporters.quantize`
__all__ = [
    "INT8_FLAGS",
    "INT8_WEIGHTS",
    "PRECISIONS",
    "SCOPES",
    "cpu_flags",
    "int8_support",
    "quantize_int8_smooth",
    "resolve_precision",
]
SCHEME = {"int8-dynamic": "int8", "int4": "int4"}
SCOPES = ("all", "prefix")
#: how int8 activations are quantised: ``dynamic`` (a scale per tensor from each batch's own
#: range, at run time) or ``static`` (a scale per tensor calibrated at export, then fixed)
ACTIVATIONS = INT8_ACTIVATIONS
#: the calibrated static range is widened by this factor (headroom for trained adapters)
STATIC_MARGIN = 1.0
SMOOTH_ALPHA = 0.5
CALIBRATION_NOTES = 8
CALIBRATION_TOKENS = 64
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def resolve_precision(precision: str | None, quantize: str | None) -> str:
    """The one precision of ``--precision`` and its alias ``--quantize``."""
    if quantize is not None and quantize not in QUANTIZE_ALIASES:
        raise EdgezoError(
            f"unknown quantisation {quantize!r}",
            f"pass --precision as one of: {', '.join(PRECISIONS)}",
        )
    alias = QUANTIZE_ALIASES.get(quantize) if quantize else None
    if precision is not None and precision not in PRECISIONS:
        raise EdgezoError(
            f"unknown precision {precision!r}",
            f"pass --precision as one of: {', '.join(PRECISIONS)}",
        )
    if precision is not None and alias is not None and precision != alias:
        raise EdgezoError(
            f"--precision {precision} and --quantize {quantize} (= --precision {alias}) disagree",
            "pass --precision only (--quantize is its older spelling)",
        )
    return precision or alias or "fp32"


def check_precision_supported(
    precision: str, flags: set[str] | None = None, int8_weights: str = "auto"
) -> str | None:
    """Refuse an int8 precision this CPU cannot run correctly or fast; return the int8 weight
    format to store (:data:`INT8_WEIGHTS`; ``auto``: :func:`int8_weights_for` this CPU), or None
    for a precision that is not int8."""
    if int8_weights != "auto" and int8_weights not in INT8_WEIGHTS:
        raise EdgezoError(
            f"unknown int8 weight format {int8_weights!r}",
            f"pass --int8-weights as one of: auto, {', '.join(INT8_WEIGHTS)}",
        )
    if not precision.startswith("int8"):
        if int8_weights != "auto":
            raise EdgezoError(
                f"--int8-weights {int8_weights} applies to --precision int8, not {precision}",
                "drop --int8-weights, or pass --precision int8",
            )
        return None
    flags = cpu_flags() if flags is None else flags
    if precision == "int8-dynamic" and int8_weights == "u8":
        raise EdgezoError(
            "--precision int8-dynamic stores s8 or s7 weights (onnxruntime's quantize_dynamic)",
            "pass --int8-weights auto, s8 or s7, or use --precision int8 --int8-weights u8",
        )
    if saturates_s8(flags):
        if int8_weights == "s8":
            raise EdgezoError(
                "--int8-weights s8 needs int8 dot-product instructions (VNNI): on this x86 CPU "
                "without them ONNX Runtime's u8 x s8 kernels saturate and the losses would be "
                "wrong",
                "pass --int8-weights auto (u8 here), or export on the machine that will run "
                "the bundle",
            )
        if int8_weights != "auto":
            return int8_weights
        return "s7" if precision == "int8-dynamic" else int8_weights_for(flags)
    ok, reason = int8_support(flags)
    if ok is False:
        raise EdgezoError(
            f"--precision {precision} computes in int8, but {reason}: ONNX Runtime would run "
            "it in generic kernels, which may be slower than fp32",
            "export with --precision fp32 (or int4 for a smaller bundle) on this machine",
        )
    return "s8" if int8_weights == "auto" else int8_weights


def layer_of(weight: str) -> int | None:
    m = _LAYER.search(weight)
    return int(m[1]) if m else None


def prefix_only(first_adapted: int) -> Callable[[str], bool]:
    """``keep(weight)`` for scope ``prefix``: the blocks before ``first_adapted`` only."""

    def keep(weight: str) -> bool:
        layer = layer_of(weight)
        return layer is not None and layer < first_adapted

    return keep


def calibration_feeds(
    tokenizer, vocab_size: int, trainables: dict[str, np.ndarray], notes: Path | None = None
) -> list[dict[str, np.ndarray]]:
    """One unpadded batch per note: the first :data:`CALIBRATION_NOTES` sample notes, cut to
    :data:`CALIBRATION_TOKENS` tokens, at the bundle's initial trainable values."""
    import json

    from edgezo.defaults import default_data

    path = notes or default_data()[0]
    feeds = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(feeds) == CALIBRATION_NOTES:
                break
            text = json.loads(line)["text"]
            ids = [i for i in tokenizer(text)["input_ids"] if 0 <= i < vocab_size]
            ids = ids[:CALIBRATION_TOKENS]
            if len(ids) < 2:
                continue
            x = np.asarray([ids], dtype=np.int64)
            feeds.append(
                {
                    "input_ids": x,
                    "attention_mask": np.ones_like(x),
                    "labels": x.copy(),
                    **trainables,
                }
            )
    if not feeds:
        raise EdgezoError(
            f"no calibration text in {path}", "the sample notes shipped with edgezo are missing"
        )
    return feeds


def _targets(model: onnx.ModelProto, keep: Callable[[str], bool]) -> list[onnx.NodeProto]:
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for i in node.input:
            uses[i] += 1
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in inits
        and uses[n.input[1]] == 1
        and len(inits[n.input[1]].dims) == 2
        and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT
        and keep(n.input[1])
    ]


def activation_ranges(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """(min X_k, max X_k) per last-axis channel of each tensor in ``names`` over ``feeds``
    (the graph run with those tensors as extra outputs)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for n in names:
        if n not in present:
            probe.graph.output.append(
                helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
            )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    for feed in feeds:
        outs = sess.run(list(names), {k: v for k, v in feed.items() if k in wanted})
        for n, x in zip(names, outs, strict=True):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            lo, hi = x.min(axis=0), x.max(axis=0)
            lows[n] = np.minimum(lows[n], lo) if n in lows else lo
            highs[n] = np.maximum(highs[n], hi) if n in highs else hi
    return {n: (lows[n], highs[n]) for n in names}


def smoothing_factors(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_k = max|X_k|^alpha / max|W_k|^(1-alpha)`` per input channel (1 where either is 0),
    clipped to [1e-4, 1e4]; ``amax`` float64 (calibration), ``wmax`` float32 (the weights)."""
    s = np.where(
        (amax > 0) & (wmax > 0),
        np.power(np.maximum(amax, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1 - alpha),
        1.0,
    )
    return np.clip(s, 1e-4, 1e4)


def quantize_int8_smooth(
    model: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    keep: Callable[[str], bool] = lambda _w: True,
    alpha: float = SMOOTH_ALPHA,
    weights_format: str = "s8",
    activations: str = "dynamic",
) -> tuple[onnx.ModelProto, dict]:
    """Per-channel int8 ``DynamicQuantizeMatMul`` with smoothing on the frozen ``MatMul`` s
    whose weight name ``keep`` accepts; in place; returns (model, manifest ``quantization``).

    ``weights_format`` (:data:`INT8_WEIGHTS`): how the weights are stored for the CPU's int8
    kernels."""
    if activations not in ACTIVATIONS:
        raise EdgezoError(
            f"unknown int8 activation quantisation {activations!r}",
            f"pass --int8-activations as one of: {', '.join(ACTIVATIONS)}",
        )
    if weights_format not in INT8_WEIGHTS:
        raise EdgezoError(
            f"unknown int8 weight format {weights_format!r}",
            f"pass --int8-weights as one of: auto, {', '.join(INT8_WEIGHTS)}",
        )
    inputs = [i.name for i in model.graph.input]
    gemms = gemm_to_matmul(model)
    name_matmul_weights(model)
    targets = _targets(model, keep)
    if not targets:
        raise EdgezoError(
            "nothing to quantise: no MatMul of this graph has a frozen weight in scope (with "
            "--mode full every weight is a trainable graph input)",
            "use --mode lora or norms with --precision int8, or export in fp32",
        )
    g = model.graph
    # the outputs' types, for the graph tools that cannot infer a contrib op's (extract_model)
    outs = {o for n in targets for o in n.output}
    known = {v.name for v in g.value_info} & outs
    if known != outs:
        typed = onnx.shape_inference.infer_shapes(model).graph.value_info
        g.value_info.extend(v for v in typed if v.name in outs - known)
    inits = {t.name: t for t in g.initializer}
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in targets:
        groups[n.input[0]].append(n)
    ranges = activation_ranges(model, list(groups), feeds)
    static_ranges: dict[str, tuple[float, float]] = {}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    producer: dict[str, tuple[int, onnx.NodeProto]] = {}
    uses: dict[str, int] = defaultdict(int)
    for k, node in enumerate(g.node):
        for i in node.input:
            consumers[i].append(node)
            uses[i] += 1
        for o in node.output:
            producer[o] = (k, node)
    weights = {n.input[1]: numpy_helper.to_array(inits[n.input[1]]) for n in targets}
    folded = inserted = 0
    new_nodes: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # after node index
    for x, nodes in groups.items():
        lo, hi = ranges[x]
        amax = np.maximum(np.abs(lo), np.abs(hi))
        wmax = np.max([np.abs(weights[n.input[1]]).max(axis=1) for n in nodes], axis=0)
        s = smoothing_factors(amax, wmax, alpha)
        for n in nodes:
            weights[n.input[1]] = weights[n.input[1]] * s[:, None]
        after, src = producer.get(x, (-1, None))
        norm = None
        if src is not None and src.op_type == "Mul" and len(consumers[x]) == len(nodes):
            for i in src.input:
                t = inits.get(i)
                if t is not None and list(t.dims) == [len(s)] and uses[i] == 1:
                    norm = t
        if norm is not None:
            w = numpy_helper.to_array(norm).astype(np.float64) / s
            norm.CopyFrom(numpy_helper.from_array(w.astype(np.float32), norm.name))
            folded += 1
            xs = x
        else:
            xs = f"{x}_smoothed"
            inv = f"{x}_smooth_inv"
            g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
            mul = helper.make_node("Mul", [x, inv], [xs], name=f"{x}_smooth")
            new_nodes[after].append(mul)
            inserted += 1
        for n in nodes:
            n.input[0] = xs
        if activations == "static":  # the range of X / s, one scale for the whole tensor
            lo_t = min(0.0, float(np.min(lo / s))) * STATIC_MARGIN
            hi_t = max(0.0, float(np.max(hi / s))) * STATIC_MARGIN
            x_scale = (hi_t - lo_t) / 255.0 if hi_t > lo_t else 1.0
            zero = int(np.clip(np.rint(-lo_t / x_scale), 0, 255))
            static_ranges[xs] = (lo_t, hi_t)
            g.initializer.append(
                numpy_helper.from_array(np.asarray(x_scale, np.float32), f"{xs}_act_scale")
            )
            g.initializer.append(
                numpy_helper.from_array(np.asarray(zero, np.uint8), f"{xs}_act_zero")
            )
            quant = helper.make_node(
                "QuantizeLinear",
                [xs, f"{xs}_act_scale", f"{xs}_act_zero"],
                [f"{xs}_u8"],
                name=f"{xs}_quantize",
            )
            new_nodes[after].append(quant)
    # the quantised weights and the nodes, in graph order (a smoothing Mul right after the
    # node producing its input)
    qmax = 63 if weights_format == "s7" else 127
    for n in targets:
        name = n.input[1]
        w = weights[name]
        scale = np.abs(w).max(axis=0) / qmax
        scale = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(w / scale), -qmax, qmax)
        g.initializer.remove(inits[name])
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        inputs_q = [n.input[0], f"{name}_int8", f"{name}_scale"]
        if weights_format == "u8":  # symmetric values stored offset by 128 (zero point 128)
            g.initializer.append(numpy_helper.from_array((q + 128).astype(np.uint8), inputs_q[1]))
            zero = f"{name}_zero"
            g.initializer.append(numpy_helper.from_array(np.full(q.shape[1], 128, np.uint8), zero))
            inputs_q.append(zero)
        else:
            g.initializer.append(numpy_helper.from_array(q.astype(np.int8), inputs_q[1]))
        if activations == "static":
            xs = n.input[0]
            ins = [f"{xs}_u8", inputs_q[1], f"{xs}_act_scale", inputs_q[2], f"{xs}_act_zero"]
            dq = helper.make_node(
                "MatMulIntegerToFloat",
                ins + inputs_q[3:],  # the weights' zero point (u8)
                list(n.output),
                name=(n.name or name) + "_int8",
                domain="com.microsoft",
            )
        else:
            dq = helper.make_node(
                "DynamicQuantizeMatMul",
                inputs_q,
                list(n.output),
                name=(n.name or name) + "_int8",
                domain="com.microsoft",
            )
        n.CopyFrom(dq)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes.get(-1, []))
    for k, node in enumerate(nodes):
        g.node.append(node)
        g.node.extend(new_nodes.get(k, []))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    lost = [n for n in inputs if n not in {i.name for i in g.input}]
    if lost:
        raise EdgezoError(
            f"int8 quantisation lost graph inputs {lost}",
            "this is an exporter bug; report it with the model you exported",
        )
    info = {
        "scheme": "int8",
        "method": "per-channel int8 weights with SmoothQuant smoothing (alpha "
        f"{alpha}), "
        + (
            "activations quantised with calibrated fixed scales (QuantizeLinear + "
            "MatMulIntegerToFloat)"
            if activations == "static"
            else "activations quantised at run time (DynamicQuantizeMatMul)"
        ),
        "activations": activations,
        "bits": 7 if weights_format == "s7" else 8,
        "weights_format": weights_format,
        "block_size": None,
        "accuracy_level": None,
        "symmetric": True,
        "per_channel": True,
        "smoothing_alpha": alpha,
        "smoothing_folded": folded,
        "smoothing_muls": inserted,
        "calibration_batches": len(feeds),
        "quantized_matmuls": len(targets),
        "gemm_rewritten": gemms,
        "op": "MatMulIntegerToFloat" if activations == "static" else "DynamicQuantizeMatMul",
    }
    if activations == "static":
        info["static_margin"] = STATIC_MARGIN
        info["static_activations"] = len(static_ranges)
    return model, info
