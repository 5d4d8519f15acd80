"""The fused decoding graph: Llama, Qwen2/3, SmolLM3, Gemma 3 and Phi-3 with ONNX Runtime kernels.

The traced decoding graph (:mod:`exporters.decode`, ``torch.onnx`` of the Hugging Face model
with a ``DynamicCache``) computes every shape at run time: SmolLM2-135M's has 7,722 nodes, of
which ~3,300 run per one-token step, and on a 2-core CPU those small kernels took more time
than the int8 weight matrices themselves. This module writes the same model as ~13 nodes a
layer, the way ONNX Runtime's own decoder graphs are built::

    input_ids ─► Gather(embedding) ─► x
    per layer:  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual add;
                Gemma: also the norms after attention and after the MLP)
                q, k, v = MatMul (+ bias) (+ LoRA: MatMul·MatMul·scale, Add); Phi-3's packed
                qkv_proj and gate_up_proj as they are (LoRA targets name them)
                (Qwen3: per-head RMSNorm of q and k; SmolLM3: no rotary in its NoPE layers)
                GroupQueryAttention(q, k, v, past, seqlens_k, total_length, cos, sin)
                    rotary embedding, causal mask, grouped KV heads, present = past ++ new
                o_proj; SkipSimplifiedLayerNormalization
                down(act(gate(h)) * up(h))    act: SiLU, or tanh-GELU (Gemma)
    last position ─► final norm ─► head (Gemm with transB on a tied, frozen embedding)

The inputs and outputs are the traced graph's (``input_ids``, ``attention_mask``,
``past_key_values.{i}.key/value`` ``[B, H_kv, P, D]``, the trainable tensors under their
names; ``logits`` ``[B, vocab]`` of the last position, ``present.{i}.key/value``), so the
runtime, the adapters and the hand-off do not know which graph they run.
:func:`exporters.decode.check_decoder` compares it with the loss graph like the traced one.

The rotary tables (cos/sin of every position up to :data:`MAX_POSITIONS`) are computed by the
model's own rotary module at export, so RoPE scaling (Llama 3.x, linear) is whatever
transformers computes; Gemma 3 gets one table per attention type. ``GroupQueryAttention``
reads the positions from the attention mask (``seqlens_k`` = attended tokens − 1), so a batch
must be unpadded (the runtime decodes one sequence at a time); a sliding-window layer passes
its window as the kernel's ``local_window_size``.

Which models: :func:`fused_support` says why a model is not supported (another family, a head
size that is not a multiple of 16, an activation other than SiLU or tanh-GELU, biased output
or MLP projections, soft-capped logits, a RoPE type other than :data:`ROPE_TYPES`); those keep
the traced graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .lora import LoraLinear
from .onnx_export import OPSET

#: families written by this module (``Architecture.family``)
FUSED_FAMILIES = ("llama", "qwen2", "qwen3", "smollm3", "gemma3", "phi3")
#: rotary table rows: positions beyond this are not reachable (the runtime caps the sequence
#: at ``decoder.max_positions``)
MAX_POSITIONS = 32768
MS = "com.microsoft"


#: ``config.hidden_act`` / ``hidden_activation`` values the graph writes
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
ROPE_TYPES = ("default", "llama3", "linear")


def _rope_types(config: Any) -> set[str]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not rope:
        return {"default"}
    tables = rope.values() if all(isinstance(v, dict) for v in rope.values()) else [rope]
    return {str(t.get("rope_type", t.get("type", "default"))) for t in tables}  # Gemma 3: per type


def _activation(config: Any) -> str:
    return str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"))


def fused_support(loaded: Any) -> str | None:
    """None when :func:`build_fused_decoder` can write ``loaded``'s decoding graph, else the
    reason it cannot (the traced graph is used then)."""
    family = loaded.arch.family
    if family not in FUSED_FAMILIES:
        return f"family {family} has no fused decoding graph"
    config = loaded.model.config
    if _activation(config) not in ACTIVATIONS:
        return f"activation {_activation(config)}"
    if getattr(config, "mlp_bias", False):
        return "biased MLP projections"
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not types <= {"full_attention", "sliding_attention"}:
        return f"attention layer types {sorted(types)}"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if getattr(config, "final_logit_softcapping", None):
        return "soft-capped logits"
    if not _rope_types(config) <= set(ROPE_TYPES):
        return f"RoPE types {sorted(_rope_types(config))}"
    body = loaded.model.model
    first = body.layers[0]
    if int(first.self_attn.head_dim) % 16:  # GroupQueryAttention's CPU kernel requires it
        return f"head size {first.self_attn.head_dim} is not a multiple of 16"
    if getattr(first.self_attn.o_proj, "bias", None) is not None:
        return "a biased output projection"
    rotary = int(int(first.self_attn.head_dim) * float(getattr(config, "partial_rotary_factor", 1)))
    if (rotary // 2) % 8:  # the kernel's rotary tables: a multiple of 8 wide
        return f"a rotary width of {rotary} (half of it must be a multiple of 8)"
    return None


class _Graph:
    """Nodes, initializers and inputs of the graph being written."""

    def __init__(self, trainable: dict[str, tuple[int, ...]]):
        self.trainable = trainable
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> list[str]:
        domain = MS if op in {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} else ""
        outs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def tensor(self, name: str, value: torch.Tensor, transpose: bool = False) -> str:
        """A parameter: its graph input when trainable (transposed by a node), else an
        initializer (transposed at export: the ``[in, out]`` layout of the loss graph's
        ``MatMul`` weights, byte-identical so the bundle stores it once)."""
        if name in self.trainable:
            if not transpose:
                return name
            return self.one("Transpose", [name], f"{name}/Transpose", perm=[1, 0])
        array = value.detach().float().numpy()
        return self.const(f"{name}_T" if transpose else name, array.T if transpose else array)


def _linear(g: _Graph, x: str, path: str, module: torch.nn.Module) -> str:
    """``x @ W.T (+ b) (+ (x @ A.T) @ B.T * scale)`` of an ``nn.Linear`` or a ``LoraLinear``."""
    w = g.tensor(f"{path}.weight", module.weight, transpose=True)
    y = g.one("MatMul", [x, w], f"{path}/MatMul")
    if isinstance(module, LoraLinear):
        a = g.tensor(f"{path}.lora_A.weight", module.lora_A.weight, transpose=True)
        b = g.tensor(f"{path}.lora_B.weight", module.lora_B.weight, transpose=True)
        ax = g.one("MatMul", [x, a], f"{path}/lora_A/MatMul")
        bax = g.one("MatMul", [ax, b], f"{path}/lora_B/MatMul")
        scale = g.const(f"{path}/lora_scale", np.array(module.scaling, np.float32))
        y = g.one("Add", [y, g.one("Mul", [bax, scale], f"{path}/lora_scale/Mul")], f"{path}/Add")
    if getattr(module, "bias", None) is not None:
        y = g.one("Add", [y, g.tensor(f"{path}.bias", module.bias)], f"{path}/bias/Add")
    return y


def _packable(g: _Graph, paths: list[str], modules: list[torch.nn.Module]) -> bool:
    """Whether these projections of the same input can be one ``MatMul``: frozen plain
    ``nn.Linear`` layers, all biased or none."""
    if any(isinstance(m, LoraLinear) for m in modules):
        return False
    names = [f"{p}.{leaf}" for p in paths for leaf in ("weight", "bias")]
    if any(n in g.trainable for n in names):
        return False
    return len({getattr(m, "bias", None) is None for m in modules}) == 1


def _qkv(p: str, attn: torch.nn.Module) -> tuple[list[str], list[torch.nn.Module]]:
    return [f"{p}.self_attn.{n}_proj" for n in "qkv"], [attn.q_proj, attn.k_proj, attn.v_proj]


def _packed_linear(g: _Graph, x: str, path: str, modules: list[torch.nn.Module]) -> str:
    """One ``MatMul`` of the concatenated ``[in, sum(out)]`` weights (+ the biases)."""
    w = np.concatenate([m.weight.detach().float().numpy().T for m in modules], axis=1)
    y = g.one("MatMul", [x, g.const(f"{path}.weight_T", w)], f"{path}/MatMul")
    if modules[0].bias is not None:
        b = np.concatenate([m.bias.detach().float().numpy() for m in modules])
        y = g.one("Add", [y, g.const(f"{path}.bias", b)], f"{path}/bias/Add")
    return y


def _eps(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _norm_weight(g: _Graph, path: str, norm: torch.nn.Module) -> str:
    """The norm's scale: its weight, or ``1 + weight`` for Gemma's RMSNorm (folded at export
    when frozen, an ``Add`` on the trainable input)."""
    name = f"{path}.weight"
    if not type(norm).__name__.startswith("Gemma"):
        return g.tensor(name, norm.weight)
    if name in g.trainable:
        one = g.const("one_f32", np.array(1.0, np.float32))
        return g.one("Add", [name, one], f"{path}/one_plus_weight")
    return g.const(f"{name}_plus_one", 1.0 + norm.weight.detach().float().numpy())


def _norm(g: _Graph, x: str, path: str, norm: torch.nn.Module) -> str:
    w = _norm_weight(g, path, norm)
    return g.one("SimplifiedLayerNormalization", [x, w], path, axis=-1, epsilon=_eps(norm))


def _skip_norm(g: _Graph, x: str, residual: str, path: str, norm) -> tuple[str, str]:
    """(norm(x + residual), x + residual) in one kernel."""
    w = _norm_weight(g, path, norm)
    out = g.node("SkipSimplifiedLayerNormalization", [x, residual, w], path, 4, epsilon=_eps(norm))
    return out[0], out[3]


def _head_norm(g: _Graph, x: str, path: str, norm: torch.nn.Module, heads: int, dim: int) -> str:
    """Qwen3's RMSNorm over each head's ``dim`` values of a ``[B, S, heads*dim]`` tensor."""
    split = g.const(f"{path}/shape_heads", np.array([0, 0, heads, dim], np.int64))
    merged = g.const(f"{path}/shape_merged", np.array([0, 0, heads * dim], np.int64))
    x4 = g.one("Reshape", [x, split], f"{path}/Reshape")
    n = _norm(g, x4, path, norm)
    return g.one("Reshape", [n, merged], f"{path}/Reshape_back")


def rotary_tables(
    model: torch.nn.Module, positions: int, layer_type: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``cos``/``sin`` ``[positions, head_dim/2]`` from the model's own rotary module (of
    ``layer_type``'s RoPE for a model with one per attention type: Gemma 3)."""
    rotary = model.model.rotary_emb
    dim = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        probe = torch.zeros(1, positions, dim)
        at = torch.arange(positions).unsqueeze(0)
        cos, sin = rotary(probe, at) if layer_type is None else rotary(probe, at, layer_type)
    half = cos.shape[-1] // 2  # head_dim / 2, or fewer with partial rotary (Phi-4-mini)
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def build_fused_decoder(
    loaded: Any, specs: list, past: tuple[int, int, int], precision: str = "fp32"
) -> tuple[onnx.ModelProto, int]:
    """The decoding graph of a Llama-family ``loaded`` model (see the module docstring);
    returns (model, rotary positions). ``precision`` fp32 keeps a tied, frozen head as the
    embedding read by ``Gemm(transB=1)`` (no folded copy); a quantised decoder gets the folded
    ``[hidden, vocab]`` copy as its own ``MatMul`` weight (``lm_head`` in the node's name), which
    :func:`exporters.quantize.quantize_decoder` quantises, and the frozen q/k/v and gate/up
    projections of a layer are packed into one ``MatMul`` each."""
    model = loaded.model
    body = model.model
    config = model.config
    layers, kv_heads, dim = past
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    trainable = {s.name: tuple(s.shape) for s in specs}
    g = _Graph(trainable)
    # a quantised decoder's weights are new bytes anyway: q/k/v and gate/up become one MatMul
    # each (fewer, wider kernels); fp32 keeps them separate, byte-shared with model.onnx.data
    pack = precision != "fp32"

    # the attention's lengths, from the mask: seqlens_k = attended − 1, total = mask width
    mask_sum = g.one("ReduceSum", ["attention_mask", g.const("axes_1", np.array([1]))], "mask_sum")
    seqlens = g.one("Sub", [mask_sum, g.const("one_i64", np.array(1, np.int64))], "seqlens_sub")
    seqlens = g.one("Cast", [seqlens], "seqlens_k", to=TensorProto.INT32)
    width = g.one("Shape", ["attention_mask"], "mask_shape")
    total = g.one("Gather", [width, g.const("index_1", np.array(1, np.int64))], "total_len", axis=0)
    total = g.one("Cast", [total], "total_sequence_length", to=TensorProto.INT32)
    positions = min(int(getattr(config, "max_position_embeddings", MAX_POSITIONS)), MAX_POSITIONS)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * layers)
    per_type = "sliding_attention" in (getattr(config, "rope_parameters", None) or {})
    tables: dict[str, tuple[str, str]] = {}
    for kind in dict.fromkeys(layer_types) if per_type else ["all"]:
        cos, sin = rotary_tables(model, positions, kind if per_type else None)
        tables[kind] = (g.const(f"rotary_cos_{kind}", cos), g.const(f"rotary_sin_{kind}", sin))
    activation = _activation(config)

    embed_module = body.embed_tokens
    embed_name = "model.embed_tokens.weight"
    embed = g.tensor(embed_name, embed_module.weight)
    x = g.one("Gather", [embed, "input_ids"], "model.embed_tokens/Gather", axis=0)
    scale = getattr(embed_module, "embed_scale", None)
    if scale is not None and float(scale) != 1.0:  # Gemma: sqrt(hidden)
        x = g.one("Mul", [x, g.const("embed_scale", np.array(float(scale), np.float32))], "emb_s")

    residual, pending = x, None
    outputs: list[str] = []
    for i, layer in enumerate(body.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        if pending is None:
            h = _norm(g, residual, f"{p}.input_layernorm", layer.input_layernorm)
        else:
            h, residual = _skip_norm(
                g, pending, residual, f"{p}.input_layernorm", layer.input_layernorm
            )
        if hasattr(attn, "qkv_proj"):  # Phi-3: one packed projection in the model itself
            q, k, v = _linear(g, h, f"{p}.self_attn.qkv_proj", attn.qkv_proj), "", ""
        elif pack and getattr(attn, "q_norm", None) is None and _packable(g, *_qkv(p, attn)):
            q, k, v = _packed_linear(g, h, f"{p}.self_attn.qkv_proj", _qkv(p, attn)[1]), "", ""
        else:
            q, k, v = (_linear(g, h, path, m) for path, m in zip(*_qkv(p, attn), strict=True))
        if getattr(attn, "q_norm", None) is not None:
            q = _head_norm(g, q, f"{p}.self_attn.q_norm", attn.q_norm, heads, dim)
            k = _head_norm(g, k, f"{p}.self_attn.k_norm", attn.k_norm, kv_heads, dim)
        past_kv = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        rope = bool(getattr(attn, "use_rope", True))  # SmolLM3: no RoPE in every 4th layer
        cos, sin = tables[layer_types[i] if per_type else "all"]
        window = getattr(attn, "sliding_window", None)  # this layer's, None: global
        softcap = getattr(attn, "attn_logit_softcapping", None)
        out = g.node(
            "GroupQueryAttention",
            [q, k, v, *past_kv, seqlens, total, *((cos, sin) if rope else ("", ""))],
            f"{p}.self_attn/GroupQueryAttention",
            3,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(attn.scaling),
            do_rotary=int(rope),
            rotary_interleaved=0,
            # the same window as Hugging Face's sliding mask (checked against the model in
            # tests/test_decode_fused.py: window - 1 there is wrong by one position)
            local_window_size=int(window) if window else -1,
            softcap=float(softcap or 0.0),
        )
        outputs += [out[1], out[2]]
        o = _linear(g, out[0], f"{p}.self_attn.o_proj", attn.o_proj)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: norms after attention and MLP
            o = _norm(g, o, f"{p}.post_attention_layernorm", layer.post_attention_layernorm)
            h, residual = _skip_norm(
                g, o, residual, f"{p}.pre_feedforward_layernorm", layer.pre_feedforward_layernorm
            )
        else:
            h, residual = _skip_norm(
                g, o, residual, f"{p}.post_attention_layernorm", layer.post_attention_layernorm
            )
        mlp = layer.mlp
        gu = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: [gate, up] packed in the model itself
            both = _linear(g, h, f"{p}.mlp.gate_up_proj", mlp.gate_up_proj)
            gate, up = g.node("Split", [both], f"{p}.mlp/Split", 2, axis=-1, num_outputs=2)
        elif pack and _packable(g, gu, [mlp.gate_proj, mlp.up_proj]):
            both = _packed_linear(g, h, f"{p}.mlp.gate_up_proj", [mlp.gate_proj, mlp.up_proj])
            gate, up = g.node("Split", [both], f"{p}.mlp/Split", 2, axis=-1, num_outputs=2)
        else:
            gate = _linear(g, h, gu[0], mlp.gate_proj)
            up = _linear(g, h, gu[1], mlp.up_proj)
        if activation == "silu":
            sig = g.one("Sigmoid", [gate], f"{p}.mlp/Sigmoid")
            act = g.one("Mul", [gate, sig], f"{p}.mlp/silu")
        else:  # gelu_pytorch_tanh
            act = g.one("Gelu", [gate], f"{p}.mlp/gelu", approximate="tanh")
        pending = _linear(
            g, g.one("Mul", [act, up], f"{p}.mlp/Mul"), f"{p}.mlp.down_proj", mlp.down_proj
        )
        if hasattr(layer, "post_feedforward_layernorm"):
            pending = _norm(
                g, pending, f"{p}.post_feedforward_layernorm", layer.post_feedforward_layernorm
            )

    last = g.one("Add", [pending, residual], "model.layers/residual_last") if pending else residual
    last = g.one(
        "Slice",
        [
            last,
            g.const("minus_1", np.array([-1])),
            g.const("int_max", np.array([2**62])),
            g.const("axes_1", np.array([1])),
        ],
        "last_position",
    )
    last = g.one("Reshape", [last, g.const("shape_rows", np.array([-1, hidden]))], "rows")
    last = _norm(g, last, "model.norm", body.norm)

    head = model.get_output_embeddings()
    tied = head.weight is embed_module.weight
    if tied and precision == "fp32":
        logits = g.one("Gemm", [last, embed], "lm_head/Gemm", transB=1)
    elif tied and embed_name not in trainable:
        folded = g.const("lm_head.weight_T", embed_module.weight.detach().float().numpy().T)
        logits = g.one("MatMul", [last, folded], "lm_head/MatMul")
    elif tied:  # a trainable tied embedding (--mode full) is the head too
        logits = g.one("Gemm", [last, embed], "lm_head/Gemm", transB=1)
    else:
        logits = _linear(g, last, "lm_head", head)

    rename = [("logits", logits)]
    for i in range(layers):
        rename += [(f"present.{i}.key", outputs[2 * i]), (f"present.{i}.value", outputs[2 * i + 1])]
    for new, old in rename:
        g.nodes.append(helper.make_node("Identity", [old], [new], name=f"{new}/Identity"))

    past_dims = ["batch", kv_heads, "past_sequence", dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch", "total_sequence"]
        ),
    ]
    for i in range(layers):
        for kv in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", TensorProto.FLOAT, past_dims
                )
            )
    for s in specs:
        inputs.append(helper.make_tensor_value_info(s.name, TensorProto.FLOAT, list(s.shape)))
    vocab = int(embed_module.weight.shape[0])
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab])]
    present_dims = ["batch", kv_heads, "total_sequence", dim]
    for i in range(layers):
        for kv in ("key", "value"):
            outs.append(
                helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT, present_dims)
            )
    graph = helper.make_graph(g.nodes, "edgezo_decoder_fused", inputs, outs, g.inits)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name="edgezo",
    )
    onnx_model.ir_version = 10
    return onnx_model, positions
