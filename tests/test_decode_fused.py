"""The fused decoding graph (``exporters/decode_fused.py``): the Llama family written with ONNX
Runtime's GroupQueryAttention and fused norms must give the traced graph's logits, the recompute
path's greedy tokens and GenAI's, in every trainable mode, and fewer nodes."""

import numpy as np
import onnx
import pytest
from conftest import (
    assert_kv_matches_recompute,
    build_tiny_model_from,
    build_tiny_tokenizer,
    genai_greedy,
    moved_trainables,
)

from edgezo.bundle import load_bundle
from edgezo.errors import EdgezoError
from edgezo.generate import TextGenerator

pytest.importorskip("torch")

#: head size 16: GroupQueryAttention's CPU kernel needs a multiple of 16 (the shared tiny
#: models have 8, so they keep the traced graph: test_traced_fallback_names_the_reason)
FUSED_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
#: variant -> (model_type, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "llama3": (  # Llama 3.1/3.2 RoPE scaling: the rotary tables come from the model's module
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "untied": ("llama", {"tie_word_embeddings": False}),  # its own lm_head weight
    "qwen2": ("qwen2", {"bos_token_id": 1}),  # biased q/k/v
    "qwen3": ("qwen3", {"bos_token_id": 1}),  # per-head q/k norms
    "smollm3": ("smollm3", {"bos_token_id": 1, "no_rope_layers": [1, 0]}),  # layer 1: no RoPE
    # Phi-3 / Phi-4-mini: packed qkv_proj and gate_up_proj, partial rotary (half the head; the
    # kernel's tables must be a multiple of 8 wide, so a head of 32)
    "phi3": ("phi3", {"bos_token_id": 1, "head_dim": 32, "partial_rotary_factor": 0.5}),
    # Gemma 3: a sliding layer (window 4 < the test sequences) and a global one, each with its
    # own RoPE, q/k norms, (1 + w) norms before and after attention and MLP, gelu-tanh,
    # sqrt(hidden) embedding scale
    "gemma3": (
        "gemma3_text",
        {
            "bos_token_id": 1,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
            },
            "query_pre_attn_scalar": 16,
        },
    ),
}


def _hf_dir(root, variant):
    from transformers import PreTrainedTokenizerFast

    folder = root / variant
    if not folder.exists():
        tok = build_tiny_tokenizer()
        hf_tok = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        )
        model_type, extra = VARIANTS[variant]
        settings = {"vocab_size": tok.get_vocab_size(), **FUSED_CONFIG, **extra}
        model = build_tiny_model_from(model_type, settings, seed=3)
        model.save_pretrained(folder)
        hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory):
    """``export(variant, mode="lora", **kw) -> bundle path``, each exported once."""
    from exporters import export_causal_lm

    root = tmp_path_factory.mktemp("fused")
    cache = {}

    def export(variant="llama", mode="lora", **kw):
        key = repr((variant, mode, sorted(kw.items())))
        if key not in cache:
            out = root / f"b{len(cache)}"
            cache[key] = export_causal_lm(
                _hf_dir(root, variant), out, mode=mode, progress=None, **kw
            )
        return cache[key]

    return export


def _op_counts(path):
    m = onnx.load(str(path), load_external_data=False)
    counts = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts, len(m.graph.node)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_greedy_equals_recompute(fused_export, variant):
    b = load_bundle(fused_export(variant))
    d = b.manifest.decoder
    assert d["kind"] == "fused" and d["max_positions"] == 128
    assert d["parity_vs_loss_graph"]["max_abs_logit_diff"] < 1e-4
    counts, _ = _op_counts(b.path / d["graph"])
    assert counts["GroupQueryAttention"] == 2
    if variant == "qwen3":  # q/k norms: per-head RMSNorm before the rotary embedding
        assert counts["SimplifiedLayerNormalization"] >= 2 * 2 + 2
    m = onnx.load(str(b.path / d["graph"]), load_external_data=False)
    rotary = [
        next(a.i for a in n.attribute if a.name == "do_rotary")
        for n in m.graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    assert rotary == ([1, 0] if variant == "smollm3" else [1, 1])
    assert ("Gemm" in counts) == (variant != "untied")  # a tied head reads the embedding
    assert_kv_matches_recompute(TextGenerator(b), TextGenerator(b, kv_cache=False), b)


@pytest.mark.parametrize(
    "variant,mode",
    # gemma3 norms: trainable (1 + w) norms, q/k norms included
    [("llama", "norms"), ("llama", "full"), ("llama", "lora_fa"), ("gemma3", "norms")],
)
def test_fused_logits_equal_traced_in_every_mode(fused_export, variant, mode):
    """The fused and traced graphs of one bundle, fed moved tensors, give the same logits over
    a prompt and several cached steps (past the sliding window); the fused one has a fraction
    of the nodes."""
    import onnxruntime as ort

    kw = {"lora_freeze_a": True, "lora_layers": "last:1"} if mode == "lora_fa" else {}
    mode = "lora" if mode == "lora_fa" else mode
    fused = load_bundle(fused_export(variant, mode, **kw))
    traced = load_bundle(fused_export(variant, mode, decoder_fused=False, **kw))
    assert fused.manifest.decoder["kind"] == "fused"
    assert traced.manifest.decoder["kind"] == "traced"
    _, n_fused = _op_counts(fused.path / "decoder.onnx")
    _, n_traced = _op_counts(traced.path / "decoder.onnx")
    assert n_fused * 3 < n_traced
    values = moved_trainables(fused, seed=1, scale=0.2)
    d = fused.manifest.decoder
    sessions = [
        ort.InferenceSession(str(b.path / "decoder.onnx"), providers=["CPUExecutionProvider"])
        for b in (fused, traced)
    ]
    ids = np.array([[5, 9, 13, 2, 7, 21, 30]], np.int64)
    pasts = [
        {
            f"past_key_values.{i}.{kv}": np.zeros(
                (1, d["num_kv_heads"], 0, d["head_dim"]), np.float32
            )
            for i in range(d["num_layers"])
            for kv in ("key", "value")
        }
        for _ in sessions
    ]
    for start, end in [(0, 4), (4, 5), (5, 6), (6, 7)]:
        outs = []
        for s, past in zip(sessions, pasts, strict=True):
            out = s.run(
                None,
                {
                    "input_ids": ids[:, start:end],
                    "attention_mask": np.ones((1, end), np.int64),
                    **past,
                    **values,
                },
            )
            names = [o.name for o in s.get_outputs()]
            past.clear()
            past.update(
                {
                    n.replace("present", "past_key_values"): v
                    for n, v in zip(names[1:], out[1:], strict=True)
                }
            )
            outs.append(out)
        np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-4)
        for a, c in zip(outs[0][1:], outs[1][1:], strict=True):
            np.testing.assert_allclose(a, c, atol=1e-4)


def test_fused_int8_packs_frozen_projections(fused_export):
    """A quantised fused decoder packs q/k/v and gate/up of layers without adapters into one
    MatMulNBits each, keeps the LoRA layer's projections apart, and stays close to fp32."""
    b = load_bundle(
        fused_export(
            "llama", lora_layers="last:1", lora_targets=("v_proj",), decoder_precision="int8"
        )
    )
    d = b.manifest.decoder
    assert d["kind"] == "fused" and d["precision"] == "int8"
    m = onnx.load(str(b.path / "decoder.onnx"), load_external_data=False)
    nbits = [n.name for n in m.graph.node if n.op_type == "MatMulNBits"]
    # layer 0: qkv + o + gate_up + down = 4; layer 1 (LoRA on v): q, k, v, o, gate_up, down = 6;
    # the head: 1
    assert len(nbits) == 11, nbits
    assert any("qkv_proj" in n for n in nbits) and any("lm_head" in n for n in nbits)
    assert d["parity_vs_loss_graph"]["top1_agree"] >= 3
    g = TextGenerator(b)
    g.params.load(moved_trainables(b))
    assert len(g.generate("the cat", 12).token_ids) > 0


def test_traced_fallback_names_the_reason(make_bundle, tiny_hf_dir, tmp_path):
    """The shared tiny llama has head size 8: it keeps the traced graph; requiring the fused
    one is refused with the reason."""
    from exporters import export_causal_lm

    b = load_bundle(make_bundle("lora"))
    assert b.manifest.decoder["kind"] == "traced"
    with pytest.raises(EdgezoError, match="head size 8 is not a multiple of 16"):
        export_causal_lm(
            tiny_hf_dir, tmp_path / "x", mode="lora", progress=None, decoder_fused=True
        )


def test_fused_genai_greedy_tokens(fused_export, tmp_path):
    """GenAI runs the fused graph (with the adapter file) to the same greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    from edgezo.zo.checkpoint import save_tensors_atomic
    from exporters.handoff import ADAPTER_FILE, GENAI_DIR, handoff

    path = fused_export("llama", lora_freeze_a=True)
    b = load_bundle(path)
    values = moved_trainables(b)
    save_tensors_atomic(tmp_path / "trained.safetensors", values, {"bundle": b.fingerprint})
    out = handoff(
        path,
        tmp_path / "genai",
        tmp_path / "trained.safetensors",
        fmt="onnx_adapter",
        genai_model=True,
    )
    model = og.Model(str(out / GENAI_DIR))
    adapters = og.Adapters(model)
    adapters.load(str(out / ADAPTER_FILE), "personal")
    ours = TextGenerator(b)
    ours.params.load(values)
    eos = b.manifest.tokenizer.eos_token_id
    for prompt in ("the cat", "we bake bread on sunday."):
        ids = ours.encode(prompt)
        want = ours.generate(prompt, 24).token_ids
        theirs = genai_greedy(og, model, adapters, ids, 24, eos)
        assert theirs == want and len(want) > 5
