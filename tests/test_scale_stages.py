"""The frozen-prefix split of large and quantised bundles (issue 17, "Scale").

- An int4 graph's ``MatMulNBits`` keeps the replaced ``MatMul``'s output name, which onnx's
  shape inference cannot type: the cut used to fail there ("names were not found in
  value_infos") and an int4 LoRA-FA bundle on the last blocks got no split.
- The prefix and suffix graphs point into ``model.onnx.data`` instead of carrying a copy of
  the weights (the copy was the export's largest memory peak).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edgezo.bundle import load_bundle  # noqa: E402
from exporters.stages import PREFIX, SUFFIX, typed  # noqa: E402


def test_int4_lora_fa_bundle_gets_its_prefix_split(make_bundle):
    path = make_bundle("lora", quantize="int4", lora_layers="last:1", lora_freeze_a=True)
    m = load_bundle(path).manifest
    g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    nbits = {o for n in g.node if n.op_type == "MatMulNBits" for o in n.output}
    assert m.stages, "the int4 bundle was not split"
    cached = set(m.stages["cached"])
    assert cached & nbits, "no MatMulNBits output at the cut: the test misses the case"
    assert m.stages["split_max_diff"] <= 1e-4
    # the prefix's outputs carry the MatMulNBits outputs' type (float; the shape may stay
    # unknown past ops whose input shapes were not inferred)
    prefix = onnx.load(str(path / PREFIX), load_external_data=False).graph
    out = {o.name: o for o in prefix.output}
    for name in cached & nbits:
        assert out[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_infer_missing_types_a_matmulnbits_output():
    from onnx import TensorProto, helper

    node = helper.make_node(
        "MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=32, N=48, bits=4
    )
    relu = helper.make_node("Relu", ["y"], ["r"])
    neg = helper.make_node("Neg", ["r"], ["z"])
    graph = helper.make_graph(
        [node, relu, neg],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 32])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [
            helper.make_tensor("w", TensorProto.UINT8, [48, 1, 16], np.zeros(768, np.uint8)),
            helper.make_tensor("s", TensorProto.FLOAT, [48], np.ones(48, np.float32)),
        ],
    )
    ops = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = typed(helper.make_model(graph, opset_imports=ops))
    info = {v.name: v for v in model.graph.value_info}
    for name in ("y", "r"):  # MatMulNBits' output, and the standard op reading it
        dims = [d.dim_param or d.dim_value for d in info[name].type.tensor_type.shape.dim]
        assert info[name].type.tensor_type.elem_type == TensorProto.FLOAT
        assert dims == ["b", "t", 48]


def test_split_graphs_share_the_weights_file(make_bundle):
    # external data forced, as for any model above 256 MiB
    path = make_bundle("lora", lora_layers="last:1", lora_freeze_a=True, external_data=True)
    m = load_bundle(path).manifest
    assert m.stages
    for name in (PREFIX, SUFFIX):
        g = onnx.load(str(path / name), load_external_data=False).graph
        external = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, f"{name} carries its own weights"
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        assert locations == {"model.onnx.data"}
        # nothing above the external-data threshold (1 KiB) is stored in the graph itself
        assert not [t.name for t in g.initializer if len(t.raw_data) > 1024]
