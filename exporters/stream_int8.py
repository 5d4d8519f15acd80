"""The smoothing int8 quantiser one weight at a time: the streamed int8 export's half of
``exporters/precision.py``.

:func:`exporters.precision.quantize_int8_smooth` works on the whole fp32 graph: it calibrates
with an ONNX Runtime session over that graph (each quantised ``MatMul`` input as an extra
output), then smooths and quantises every weight at once. The streamed export
(``exporters/stream.py``) never has that graph, so here:

1. **Calibration** comes from a streamed PyTorch forward (one module's weights resident at a
   time) over the same calibration batches (:func:`exporters.precision.calibration_feeds`):
   for every Linear, the per-input-channel min and max of its input and, read while its
   weight is in memory, the per-input-channel abs-max of that weight
   (:class:`LinearRanges`; ``exporters.stream.calibrate_linears``).
2. **Smoothing factors before any weight is attached.** The traced graph tells which
   ``MatMul`` s will be quantised (a weight read by that ``MatMul`` only: what
   ``attach_weights`` hands to ``quantize_matmul``) and which share an input (a group, as in
   ``quantize_int8_smooth``); each ``MatMul`` is mapped to its Linear by its node name
   (``/model/model/layers.0/self_attn/q_proj/MatMul``), so each group's factors ``s`` are
   known from the calibration alone (:func:`exporters.precision.smoothing_factors`).
3. **Each weight smoothed and quantised as it is attached** (:meth:`StreamedInt8.quantize`,
   in column chunks: bitwise the arithmetic of ``quantize_int8_smooth``), its row abs-max
   checked against the calibrated one (a wrong Linear would differ); a norm weight whose
   ``Mul`` alone produces a group's input is divided by ``s`` as it is attached
   (:meth:`StreamedInt8.transform`), other groups get a ``Mul`` by ``1 / s``
   (:meth:`StreamedInt8.finish`, which also writes the nodes' final inputs, the static
   activation scales and the manifest's ``quantization``).

The bundle is the one today's int8 export writes up to the calibration: PyTorch's activations
differ from ONNX Runtime's by float rounding (other kernels, other summation orders), so the
abs-max, the factors and the scales differ in the last bits and an int8 value where a weight
sits at a rounding boundary (``tests/test_stream_export.py`` states the tolerances).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgezo.errors import EdgezoError

from .precision import ACTIVATIONS, INT8_WEIGHTS, SMOOTH_ALPHA, STATIC_MARGIN, smoothing_factors
from .quantize import _NODE
from .weight_attach import FoldPlan

#: values per float64 temporary while a weight is quantised (128 MiB)
CHUNK_VALUES = 2**24


@dataclass
class LinearRanges:
    """What the calibration saw of one Linear: its input's per-channel min and max (float64)
    and its weight's per-input-channel abs-max (float32, as the ONNX weight's row max)."""

    low: np.ndarray
    high: np.ndarray
    weight_absmax: np.ndarray


def module_path(node: onnx.NodeProto) -> str | None:
    """The torch module (a path under the Hugging Face model) a traced ``MatMul`` belongs to:
    ``/model/model/layers.0/self_attn/q_proj/MatMul`` -> ``model.layers.0.self_attn.q_proj``;
    the loss graph's own head is ``/lm_head/MatMul`` -> ``lm_head``."""
    m = _NODE.match(node.name)
    return m["path"].replace("/", ".") if m else None


def quantize_columns(
    w: np.ndarray, s: np.ndarray, weights_format: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8/u8 values, float32 per-column scales, float32 row abs-max of ``w``) of ``w * s``
    quantised symmetrically per output column, ``CHUNK_VALUES`` at a time: elementwise and
    per column, so bitwise what ``quantize_int8_smooth`` computes on the whole weight."""
    qmax = 63 if weights_format == "s7" else 127
    rows, cols = w.shape
    q = np.empty((rows, cols), np.uint8 if weights_format == "u8" else np.int8)
    scale = np.empty(cols, np.float32)
    row_max = np.zeros(rows, w.dtype)
    step = max(1, CHUNK_VALUES // max(rows, 1))
    for j in range(0, cols, step):
        part = w[:, j : j + step]
        np.maximum(row_max, np.abs(part).max(axis=1), out=row_max)
        ws = part * s[:, None]
        sc = np.abs(ws).max(axis=0) / qmax
        sc = np.where(sc > 0, sc, 1.0)
        qq = np.clip(np.rint(ws / sc), -qmax, qmax)
        q[:, j : j + step] = (qq + 128).astype(np.uint8) if weights_format == "u8" else qq
        scale[j : j + step] = sc.astype(np.float32)
        del ws, qq
    return q, scale, row_max


class StreamedInt8:
    """The smoothing int8 quantiser over a graph traced with its weights as inputs, applied
    while ``attach_weights`` attaches them (module docstring).

    ``sites``: what ``attach_weights`` hands to ``quantize_matmul`` ({weight value: MatMul});
    ``plan``: its :class:`exporters.weight_attach.FoldPlan`; ``ranges``: the calibration per
    module path; ``namer``: the ``MatMul`` with its weight renamed after its module (as
    ``name_matmul_weights`` names them); ``keep(weight name)``: the scope."""

    def __init__(
        self,
        traced: onnx.ModelProto,
        plan: FoldPlan,
        sites: Mapping[str, onnx.NodeProto],
        ranges: Mapping[str, LinearRanges],
        namer: Callable[[onnx.NodeProto], onnx.NodeProto],
        keep: Callable[[str], bool] = lambda _w: True,
        alpha: float = SMOOTH_ALPHA,
        weights_format: str = "s8",
        activations: str = "dynamic",
        calibration_batches: int = 0,
    ):
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
        g = traced.graph
        gemms = [n.name for n in g.node if n.op_type == "Gemm" and plan.derived & set(n.input)]
        if gemms:
            raise EdgezoError(
                f"the streamed int8 export quantises MatMul weights only; this graph reads "
                f"weights in Gemm nodes ({gemms[:2]}: GPT-2's Conv1D layers)",
                "export this model without --stream",
            )
        self.alpha, self.weights_format, self.activations = alpha, weights_format, activations
        self.calibration_batches = calibration_batches
        # the targets, in graph order, as quantize_int8_smooth selects them (its _targets)
        self.targets: list[onnx.NodeProto] = []
        self.qname: dict[str, str] = {}  # MatMul node name -> its renamed weight
        self.module: dict[str, str] = {}  # MatMul node name -> module path
        self.renamed: dict[str, onnx.NodeProto] = {}  # MatMul node name -> renamed MatMul
        missing = []
        for node in sites.values():
            self.renamed[node.name] = namer(node)
            name = self.renamed[node.name].input[1]
            if not keep(name):
                continue
            path = module_path(node)
            if path not in ranges:
                missing.append(node.name)
                continue
            self.targets.append(node)
            self.qname[node.name] = name
            self.module[node.name] = path
        if missing:
            raise EdgezoError(
                f"the streamed int8 export has no calibration for MatMul(s) {missing[:3]}: "
                "their node names name no Linear module of the model",
                "export this model without --stream",
            )
        order = {id(n): k for k, n in enumerate(g.node)}
        self.targets.sort(key=lambda n: order[id(n)])
        if not self.targets:
            raise EdgezoError(
                "nothing to quantise: no MatMul of this graph has a frozen weight in scope",
                "use --mode lora with --precision int8, or export in fp32",
            )
        self.groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.targets:
            self.groups[n.input[0]].append(n)
        self.factors: dict[str, np.ndarray] = {}  # group input -> s
        self.group_of: dict[str, str] = {}  # MatMul node name -> group input
        for x, nodes in self.groups.items():
            r = [ranges[self.module[n.name]] for n in nodes]
            lo, hi = r[0].low, r[0].high
            amax = np.maximum(np.abs(lo), np.abs(hi))
            wmax = np.max([lr.weight_absmax for lr in r], axis=0)
            self.factors[x] = smoothing_factors(amax, wmax, alpha)
            for n in nodes:
                self.group_of[n.name] = x
        first = {x: ranges[self.module[ns[0].name]] for x, ns in self.groups.items()}
        self.ranges = {x: (r.low, r.high) for x, r in first.items()}
        self.weight_absmax = {
            n.name: ranges[self.module[n.name]].weight_absmax for n in self.targets
        }
        # the norm weight each group's factors fold into, as quantize_int8_smooth picks it: the
        # last [channels] initializer read once by the Mul that alone feeds the group
        consumers: dict[str, int] = defaultdict(int)
        producer: dict[str, onnx.NodeProto] = {}
        uses: dict[str, int] = defaultdict(int)
        folded_ids = {id(n) for n in plan.foldable}
        for node in g.node:
            if id(node) in folded_ids:
                continue
            for i in node.input:
                consumers[i] += 1
                uses[i] += 1
            for o in node.output:
                producer[o] = node
        traced_inits = {t.name: t for t in g.initializer}
        self.fold_into: dict[str, str] = {}  # norm value -> group input
        self.const_fold: dict[str, str] = {}  # a traced initializer -> group input
        for x, nodes in self.groups.items():
            src = producer.get(x)
            if src is None or src.op_type != "Mul" or consumers[x] != len(nodes):
                continue
            pick = None
            for i in src.input:
                if plan.initializer(i) and plan.outside[i] == 1:
                    pick = ("weight", i)
                t = traced_inits.get(i)
                if t is not None and list(t.dims) == [len(self.factors[x])] and uses[i] == 1:
                    pick = ("const", i)
            if pick is not None:
                (self.fold_into if pick[0] == "weight" else self.const_fold)[pick[1]] = x
        self.folded: set[str] = set()  # groups whose factors went into their norm weight
        # the target outputs' types (graph tools cannot infer a contrib op's: extract_model)
        outs = {o for n in self.targets for o in n.output}
        known = {v.name for v in g.value_info} & outs
        self.value_info = []
        if known != outs:
            typed = onnx.shape_inference.infer_shapes(traced).graph.value_info
            self.value_info = [
                _copy(v, onnx.ValueInfoProto) for v in typed if v.name in outs - known
            ]
        self.quantised: set[str] = set()

    # -- the attach_weights callbacks ---------------------------------------------------------

    def quantize(
        self, node: onnx.NodeProto, weight: np.ndarray
    ) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]] | None:
        """``attach_weights``' ``quantize_matmul``: the weight of a target smoothed and
        quantised (the node's final inputs are written by :meth:`finish`); a weight out of
        scope stays fp32 under its module's name, as ``name_matmul_weights`` names it."""
        if node.name not in self.group_of:
            renamed = self.renamed.get(node.name)
            if renamed is None or renamed.input[1] == node.input[1]:
                return None
            return [renamed], [(renamed.input[1], weight)]
        name = self.qname[node.name]
        s = self.factors[self.group_of[node.name]]
        if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[0] != len(s):
            raise EdgezoError(
                f"the weight of {node.name} is {weight.dtype} {weight.shape}, its calibrated "
                f"Linear has {len(s)} input channels",
                "this is an exporter bug; report it, and export without --stream",
            )
        q, scale, row_max = quantize_columns(weight, s, self.weights_format)
        if not np.array_equal(row_max, self.weight_absmax[node.name]):
            raise EdgezoError(
                f"the weight of {node.name} is not the weight of the Linear "
                f"{self.module[node.name]} the calibration read",
                "this is an exporter bug; report it, and export without --stream",
            )
        tensors = [(f"{name}_int8", q), (f"{name}_scale", scale)]
        if self.weights_format == "u8":  # symmetric values stored offset by 128
            tensors.append((f"{name}_zero", np.full(q.shape[1], 128, np.uint8)))
        placeholder = helper.make_node(
            "DynamicQuantizeMatMul",
            [node.input[0], *(t for t, _ in tensors)],
            list(node.output),
            name=(node.name or name) + "_int8",
            domain="com.microsoft",
        )
        self.quantised.add(node.name)
        return [placeholder], tensors

    def transform(self, name: str, value: np.ndarray) -> np.ndarray:
        """``attach_weights``' ``transform``: a group's norm weight divided by its factors."""
        x = self.fold_into.get(name)
        if x is None:
            return value
        s = self.factors[x]
        if value.shape != (len(s),):
            return value  # not a per-channel scale: the group gets its Mul
        self.folded.add(x)
        return (np.asarray(value).astype(np.float64) / s).astype(np.float32)

    # -- after attach_weights -----------------------------------------------------------------

    def finish(self, model: onnx.ModelProto) -> dict:
        """The smoothing ``Mul`` s, static activation scales and final node inputs on the
        attached ``model`` (in place); returns the manifest's ``quantization``."""
        g = model.graph
        missing = [n.name for n in self.targets if n.name not in self.quantised]
        if missing:
            raise EdgezoError(
                f"the streamed int8 export did not quantise {missing[:3]}",
                "this is an exporter bug; report it, and export without --stream",
            )
        inits = {t.name: t for t in g.initializer}
        for name, x in self.const_fold.items():
            s = self.factors[x]
            w = numpy_helper.to_array(inits[name]).astype(np.float64) / s
            inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))
            self.folded.add(x)
        g.value_info.extend(self.value_info)
        producer = {o: k for k, node in enumerate(g.node) for o in node.output}
        new_nodes: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        smoothed: dict[str, str] = {}
        inserted = 0
        for x in self.groups:
            s = self.factors[x]
            after = producer.get(x, -1)
            if x in self.folded:
                xs = x
            else:
                xs = f"{x}_smoothed"
                inv = f"{x}_smooth_inv"
                g.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
                new_nodes[after].append(helper.make_node("Mul", [x, inv], [xs], name=f"{x}_smooth"))
                inserted += 1
            smoothed[x] = xs
            if self.activations == "static":
                lo, hi = self.ranges[x]
                lo_t = min(0.0, float(np.min(lo / s))) * STATIC_MARGIN
                hi_t = max(0.0, float(np.max(hi / s))) * STATIC_MARGIN
                x_scale = (hi_t - lo_t) / 255.0 if hi_t > lo_t else 1.0
                zero = int(np.clip(np.rint(-lo_t / x_scale), 0, 255))
                g.initializer.append(
                    numpy_helper.from_array(np.asarray(x_scale, np.float32), f"{xs}_act_scale")
                )
                g.initializer.append(
                    numpy_helper.from_array(np.asarray(zero, np.uint8), f"{xs}_act_zero")
                )
                new_nodes[after].append(
                    helper.make_node(
                        "QuantizeLinear",
                        [xs, f"{xs}_act_scale", f"{xs}_act_zero"],
                        [f"{xs}_u8"],
                        name=f"{xs}_quantize",
                    )
                )
        by_name = {(n.name or self.qname[n.name]) + "_int8": n for n in self.targets}
        for node in g.node:
            target = by_name.get(node.name)
            if target is None or node.op_type != "DynamicQuantizeMatMul":
                continue
            xs = smoothed[self.group_of[target.name]]
            weights = list(node.input[1:])
            if self.activations == "static":
                ins = [f"{xs}_u8", weights[0], f"{xs}_act_scale", weights[1], f"{xs}_act_zero"]
                node.op_type = "MatMulIntegerToFloat"
                del node.input[:]
                node.input.extend(ins + weights[2:])
            else:
                node.input[0] = xs
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(new_nodes.get(-1, []))
        for k, node in enumerate(nodes):
            g.node.append(node)
            g.node.extend(new_nodes.get(k, []))
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        info = {
            "scheme": "int8",
            "method": f"per-channel int8 weights with SmoothQuant smoothing (alpha {self.alpha}), "
            + (
                "activations quantised with calibrated fixed scales (QuantizeLinear + "
                "MatMulIntegerToFloat)"
                if self.activations == "static"
                else "activations quantised at run time (DynamicQuantizeMatMul)"
            )
            + "; calibrated by a streamed PyTorch forward, each weight quantised as it is "
            "attached (streamed export)",
            "activations": self.activations,
            "bits": 7 if self.weights_format == "s7" else 8,
            "weights_format": self.weights_format,
            "block_size": None,
            "accuracy_level": None,
            "symmetric": True,
            "per_channel": True,
            "smoothing_alpha": self.alpha,
            "smoothing_folded": len(self.folded),
            "smoothing_muls": inserted,
            "calibration_batches": self.calibration_batches,
            "calibration": "PyTorch, streamed one module at a time",
            "quantized_matmuls": len(self.targets),
            "gemm_rewritten": 0,
            "op": "MatMulIntegerToFloat"
            if self.activations == "static"
            else "DynamicQuantizeMatMul",
            "streamed": True,
        }
        if self.activations == "static":
            info["static_margin"] = STATIC_MARGIN
            info["static_activations"] = len(self.groups)
        return info


def _copy(message, cls):
    out = cls()
    out.CopyFrom(message)
    return out
