"""Attach a traced graph's frozen weights afterwards, one tensor at a time.

Tracing with the weights as parameters makes ``torch.onnx.export`` hold them three times: the
model, the tracer's constant-folded copy of every weight (a Linear's weight is stored
pre-transposed) and the serialised graph. Measured for Qwen2.5 0.5B: 3.2x its fp32 weights
(docs/benchmarks/scale.md), which puts 1B models past a 13 GB machine.

So the loss graph is traced with every frozen weight as a graph *input* (the tracer holds no
copy and serialises none), and :func:`attach_weights` then turns those inputs back into
initializers: the nodes that only depend on weights and constants (the ``Transpose`` of a
Linear weight, Gemma's ``1 + w`` norm scale ...), which the tracer would have folded, are
evaluated here with ONNX's reference implementation, one weight at a time, and each result is
appended to the external data file as soon as it is computed. The bundle gets the same
operators on the same values as a trace with folded parameters (tested:
``tests/test_export_memory.py``); only the generated names of folded tensors differ, and the
parameter trace's merging of initializers of equal value (each other use an ``Identity``
node) is not repeated: random weights have many (RMSNorm ones, zero biases: 118 small tensors
in Qwen2.5 0.5B, 0.1 MiB), a trained checkpoint hardly any.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgezo.errors import EdgezoError

#: initializers of fewer bytes stay inside ``model.onnx`` (``onnx.save_model``'s default)
INLINE_BELOW = 1024


class _DataFile:
    """Appends tensors to one external data file, as ``onnx.save_model`` lays them out."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = path.open("wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BELOW:
            return numpy_helper.from_array(array, name)
        t = onnx.TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        self.handle.write(memoryview(array).cast("B"))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.path.name),
            ("offset", self.offset),
            ("length", array.nbytes),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += array.nbytes
        return t

    def close(self) -> None:
        self.handle.close()


def _evaluate(
    node: onnx.NodeProto, values: list[np.ndarray | None], opset: int
) -> list[np.ndarray]:
    """The outputs of one node on constant inputs (ONNX's numpy reference implementation)."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in zip(names, values, strict=True)
        if v is not None
    ]
    outs = [f"out{i}" for i in range(len(node.output))]
    single = helper.make_node(node.op_type, names, outs, domain=node.domain or "")
    single.attribute.extend(node.attribute)
    model = helper.make_model(
        helper.make_graph(
            [single], "fold", inputs, [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
        ),
        opset_imports=[helper.make_opsetid(node.domain or "", opset)],
    )
    feeds = {n: v for n, v in zip(names, values, strict=True) if v is not None}
    return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]


class FoldPlan:
    """Which nodes of a graph traced with its weights as inputs are folded, and who reads
    each value computed from a weight (:func:`fold_plan`)."""

    def __init__(
        self,
        weight_inputs: list[str],
        foldable: list[onnx.NodeProto],
        derived: set[str],
        outside: Counter,
        readers: Counter,
    ):
        self.weight_inputs = weight_inputs
        self.foldable = foldable  # in graph order
        self.derived = derived  # the weights and every value computed from them only
        self.outside = outside  # derived value -> readers outside the folding (+ graph outputs)
        self.readers = readers  # derived value -> folded nodes reading it

    def initializer(self, name: str) -> bool:
        """Whether ``name`` becomes an initializer of the attached graph."""
        return name in self.derived and self.outside[name] > 0


def fold_plan(
    model: onnx.ModelProto,
    weight_names,
    keep_unfolded: Callable[[onnx.NodeProto], bool] = lambda _node: False,
) -> FoldPlan:
    """The folding :func:`attach_weights` does on ``model`` for the weights ``weight_names``
    (nothing is evaluated): every node whose inputs are all weights, initializers or
    constants, at least one of them a weight, unless ``keep_unfolded(node)``."""
    graph = model.graph
    weight_inputs = [i.name for i in graph.input if i.name in weight_names]
    constant = {t.name for t in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    derived = set(weight_inputs)  # values computed from at least one weight
    foldable: list[onnx.NodeProto] = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if (
            ins
            and node.op_type != "Constant"
            and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            )
            and any(i in derived for i in ins)
            and all(i in derived or i in constant for i in ins)
            and not keep_unfolded(node)
        ):
            foldable.append(node)
            derived.update(node.output)
    folded_ids = {id(n) for n in foldable}
    # which derived values something outside the folding reads (they become initializers)
    outside = Counter(
        i for n in graph.node if id(n) not in folded_ids for i in n.input if i in derived
    )
    outside.update(o.name for o in graph.output if o.name in derived)
    readers = Counter(i for n in foldable for i in n.input if i in derived)
    return FoldPlan(weight_inputs, foldable, derived, outside, readers)


def attach_weights(
    model: onnx.ModelProto,
    weights: Mapping[str, Callable[[], np.ndarray]],
    data_path: Path | None,
    keep_unfolded: Callable[[onnx.NodeProto], bool] = lambda _node: False,
    quantize_matmul: Callable[
        [onnx.NodeProto, np.ndarray],
        tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]] | None,
    ]
    | None = None,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> tuple[int, int]:
    """Turn the graph inputs named in ``weights`` into initializers; returns (tensors
    written, bytes written).

    ``weights`` maps an input name to a function returning its value (so a weight is read
    when it is needed, and can be dropped right after). Every node whose inputs are all
    weights, initializers or constants, at least one of them a weight, is evaluated and
    replaced by its outputs (what the tracer's constant folding does), unless
    ``keep_unfolded(node)`` (:func:`fold_plan`). The initializers are appended to
    ``data_path`` (the external data file, created) when given, else stored inline. Graph
    inputs not in ``weights`` stay inputs.

    ``quantize_matmul(node, weight)``: a value that only one ``MatMul`` reads, as its weight
    (input 1), is handed to it instead of being stored; it returns the nodes that replace the
    ``MatMul`` and their initializers (``MatMulNBits``: the streamed int4 export,
    ``exporters/stream.py``), or None to store the weight as it is.

    ``transform(name, value)``: every other value about to become an initializer is stored
    as what it returns (the streamed int8 export divides a norm weight by its smoothing
    factors there); the folding downstream of it still sees the original value.
    """
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    plan = fold_plan(model, weights, keep_unfolded)
    weight_inputs, foldable, derived = plan.weight_inputs, plan.foldable, plan.derived
    outside, readers = plan.outside, plan.readers
    if not weight_inputs:
        return 0, 0
    folded_ids = {id(n) for n in foldable}
    # values read by one MatMul only, as its weight: quantised as they are emitted
    matmul_sites = _matmul_sites(graph, plan) if quantize_matmul is not None else {}
    replaced: dict[int, list[onnx.NodeProto]] = {}

    inits = {t.name: t for t in graph.initializer}
    const_nodes = {o: n for n in graph.node if n.op_type == "Constant" for o in n.output}
    data = _DataFile(data_path) if data_path is not None else None
    written = nbytes = 0
    held: dict[str, np.ndarray] = {}
    new_inits: list[onnx.TensorProto] = []

    def emit(name: str, value: np.ndarray) -> None:
        nonlocal written, nbytes
        site = matmul_sites.get(name)
        if site is not None:
            done = quantize_matmul(site, value)
            if done is not None:
                nodes, tensors = done
                replaced[id(site)] = nodes
                for t_name, t_value in tensors:
                    store(t_name, t_value)
                return
        store(name, transform(name, value) if transform is not None else value)

    def store(name: str, value: np.ndarray) -> None:
        nonlocal written, nbytes
        t = data.tensor(name, value) if data else numpy_helper.from_array(value, name)
        new_inits.append(t)
        written += 1
        nbytes += value.nbytes

    def value_of(name: str) -> np.ndarray:
        if name in held:
            return held[name]
        if name in weights:
            return np.asarray(weights[name]())
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return _constant_value(const_nodes[name])

    def release(name: str) -> None:
        readers[name] -= 1
        if readers[name] <= 0:
            held.pop(name, None)

    try:
        for name in weight_inputs:  # weights something reads directly
            if outside[name]:
                emit(name, value_of(name))
        for node in foldable:
            args = [value_of(i) if i else None for i in node.input]
            results = _evaluate(node, args, opset)
            del args
            for i in node.input:
                if i in derived:
                    release(i)
            for out, value in zip(node.output, results, strict=True):
                if outside[out]:
                    emit(out, value)
                if readers[out] > 0:
                    held[out] = value
            del results
    finally:
        if data is not None:
            data.close()
    if held:
        raise EdgezoError(
            f"folding the frozen weights left {len(held)} values unread: {sorted(held)[:3]}",
            "this is an exporter bug; report it with the model you exported",
        )
    keep_nodes = [
        m for n in graph.node if id(n) not in folded_ids for m in replaced.get(id(n), [n])
    ]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    kept_inputs = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.initializer.extend(new_inits)
    _drop_unused_constants(graph)
    return written, nbytes


def _matmul_sites(graph: onnx.GraphProto, plan: FoldPlan) -> dict[str, onnx.NodeProto]:
    """Derived values that one ``MatMul`` alone reads, as its weight -> that ``MatMul``."""
    folded_ids = {id(n) for n in plan.foldable}
    graph_outputs = {o.name for o in graph.output}
    return {
        n.input[1]: n
        for n in graph.node
        if id(n) not in folded_ids
        and n.op_type == "MatMul"
        and len(n.input) == 2
        and plan.outside[n.input[1]] == 1
        and n.input[1] not in graph_outputs
        and n.input[0] != n.input[1]
    }


def matmul_sites(model: onnx.ModelProto, weight_names) -> dict[str, onnx.NodeProto]:
    """What :func:`attach_weights` hands to ``quantize_matmul``: {weight value: its MatMul}."""
    return _matmul_sites(model.graph, fold_plan(model, weight_names))


def externalize_rest(model: onnx.ModelProto, data_path: Path) -> None:
    """Append the graph's remaining inline initializers of ``INLINE_BELOW`` bytes or more
    (the traced buffers: rotary tables, masks) to ``data_path``, as ``onnx.save_model``
    would have."""
    with data_path.open("ab") as handle:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or _nbytes(t) < INLINE_BELOW:
                continue
            array = np.ascontiguousarray(numpy_helper.to_array(t))
            offset = handle.tell()
            handle.write(memoryview(array).cast("B"))
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(field)
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (
                ("location", data_path.name),
                ("offset", offset),
                ("length", array.nbytes),
            ):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(helper.get_attribute_value(a))
        if a.name in ("value_floats", "value_ints"):
            return np.array(list(helper.get_attribute_value(a)))
    raise EdgezoError(
        f"Constant node {node.name!r} has no value this exporter reads",
        "this is an exporter bug; report it with the model you exported",
    )


def _drop_unused_constants(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in used]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)


def _nbytes(t: onnx.TensorProto) -> int:
    itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize
