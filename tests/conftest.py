"""Shared fixtures: a tiny random Llama with a character tokenizer, and bundles exported from it.

Both the exporter tests and the runtime tests use these. Nothing is downloaded. torch and
transformers are imported inside the fixtures only, so a device-only environment (no torch) can
still collect and run the runtime tests that do not need a bundle.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: Characters of the tiny tokenizer (after lowercasing); ids follow the special tokens.
TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?;:'\"-()\n"
TINY_SPECIAL = ("<pad>", "<eos>", "<unk>")

#: Tiny model configs per Hugging Face ``model_type``; every architecture registered in
#: ``exporters.architectures`` must have one (checked by a test).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "qwen2": {
        "bos_token_id": 1,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "gpt2": {
        "bos_token_id": 1,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 256,
        "tie_word_embeddings": True,
    },
    "opt": {
        "bos_token_id": 1,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 64,
        "word_embed_proj_dim": 32,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    # Llama 3.1/3.2 RoPE scaling (wavelength bands); "model_type" picks the config class when
    # the key is not one. original_max_position_embeddings 64 puts the 4 frequencies of a
    # head_dim 8 in every band (kept, smoothed, scaled)
    "llama3": {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen3": {  # per-head q/k RMSNorms
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "phi3": {  # fused qkv_proj / gate_up_proj; partial rotary as Phi-4-mini
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "original_max_position_embeddings": 256,
        "partial_rotary_factor": 0.75,
        "tie_word_embeddings": True,
    },
    "smollm3": {  # no RoPE in every 2nd layer here (every 4th in SmolLM3-3B)
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "no_rope_layer_interval": 2,
        "tie_word_embeddings": True,
    },
    # sliding-window (4 tokens: the test sequences are longer) and global layers; soft-capping
    # small enough to bend the tiny model's scores and logits
    "gemma2": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 8,
        "attn_logit_softcapping": 1.0,
        "final_logit_softcapping": 2.0,
        "tie_word_embeddings": True,
    },
    # Gemma 3 text: sliding and global layers with their own RoPE (global: linearly scaled, as
    # the 4B+ models), q/k norms, pre/post norms, sqrt(hidden) embedding scale, tied head
    "gemma3_text": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
        "query_pre_attn_scalar": 8,
        "tie_word_embeddings": True,
    },
    # an encoder (task classification): built by build_tiny_encoder, without a classifier,
    # like the sentence-transformers all-MiniLM-L6-v2
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
    },
}
#: TINY_CONFIGS entries that are encoders (build_tiny_encoder), not causal LMs
TINY_ENCODERS = ("bert",)


def build_tiny_tokenizer():
    """A character-level ``tokenizers.Tokenizer``: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    for ch in TINY_CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(TINY_SPECIAL))
    return tok


def tiny_model_type(key: str) -> str:
    """The Hugging Face ``model_type`` of a ``TINY_CONFIGS`` entry."""
    return str(TINY_CONFIGS[key].get("model_type", key))


def build_tiny_model(model_type: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of a ``TINY_CONFIGS`` entry, initialised from an explicit
    generator."""
    settings = dict(TINY_CONFIGS[model_type])
    return build_tiny_model_from(
        settings.pop("model_type", model_type), {"vocab_size": vocab_size, **settings}, seed
    )


def build_tiny_model_from(model_type: str, settings: dict[str, Any], seed: int = 0):
    """A tiny random causal LM of ``model_type`` with config ``settings`` (pad 0, eos 1)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, pad_token_id=0, eos_token_id=1, **{"bos_token_id": None, **settings}
    )
    with torch.random.fork_rng(devices=[]):  # from_config draws from the global generator
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights (and biases): around their usual values
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            else:
                std = 0.5 if "embed" in name else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def build_tiny_encoder(model_type: str, vocab_size: int, seed: int = 0):
    """A tiny random encoder (``AutoModel``, e.g. ``BertModel``) from ``TINY_CONFIGS``."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, pad_token_id=0, **TINY_CONFIGS[model_type]
    )
    with torch.random.fork_rng(devices=[]):
        model = AutoModel.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``BertModel`` (no classifier) + the character tokenizer with
    ``[CLS]``/``[SEP]``-style special tokens (``<cls>``/``<sep>``) added around each text."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = build_tiny_tokenizer()
    tok.add_special_tokens(["<cls>", "<sep>"])
    cls, sep = tok.token_to_id("<cls>"), tok.token_to_id("<sep>")
    tok.post_processor = processors.TemplateProcessing(
        single="<cls> $A <sep>", special_tokens=[("<cls>", cls), ("<sep>", sep)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="<cls>",
        sep_token="<sep>",
    ).save_pretrained(folder)
    build_tiny_encoder("bert", tok.get_vocab_size()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``LlamaForCausalLM`` + character tokenizer saved with ``save_pretrained``.

    hidden 32, 2 layers, 4 heads (2 KV heads), intermediate 64, tied embeddings; the vocabulary
    (52 tokens) is lowercase letters, digits, space, punctuation, newline and
    ``<pad>``/``<eos>``/``<unk>``.
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    model = build_tiny_model("llama", vocab_size=tok.get_vocab_size())
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_bundle(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_bundle(mode="lora", **kw) -> Path``: a bundle of the tiny model, exported once per
    distinct ``(mode, kw)`` in the session (``kw`` as for ``exporters.export_causal_lm``)."""
    pytest.importorskip("onnx")
    from exporters import export_causal_lm

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("bundles")

    def make(mode: str = "lora", **kw: Any) -> Path:
        key = repr((mode, sorted(kw.items())))
        if key not in cache:
            out = root / f"{mode}-{len(cache)}"
            cache[key] = export_causal_lm(tiny_hf_dir, out, mode=mode, progress=None, **kw)
        return cache[key]

    return make


MEMO = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "we bake bread on sunday.",
    "pepper likes long walks.",
    "the fjord is cold today.",
    "tea with honey at nine.",
]


@pytest.fixture(scope="module")
def memo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, held-out) JSONL of short notes: 24 training lines, 6 held-out."""
    d = tmp_path_factory.mktemp("memo")
    train = d / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in MEMO * 4))
    held = d / "held.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in MEMO))
    return train, held


#: Gemma 3 tensor names of llama.cpp's GGUF files (``gguf`` package: MODEL_ARCH.GEMMA3)
TINY_GGUF_CHARS = "abcdefghijklmnopqrstuvwxyz.,!?'"


def quantize_q4_k(data):
    """``data [rows, k·256]`` float32 as GGUF Q4_K blocks (uint8 ``[rows, k·144]``): per 256
    values an fp16 scale and min, 8 sub-blocks of 32 with 6-bit scales/mins, 4-bit values. A
    plain min/max fit (llama.cpp searches better ones); the ``gguf`` package reads it back but
    cannot write Q4_K."""
    import numpy as np

    rows, cols = data.shape
    x = data.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(axis=2), 0.0)
    scale = (x.max(axis=2) - lo) / 15.0
    mins = -lo
    d = np.maximum(scale.max(axis=1, keepdims=True) / 63.0, 1e-12)
    dmin = np.maximum(mins.max(axis=1, keepdims=True) / 63.0, 1e-12)
    sc = np.clip(np.rint(scale / d), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / dmin), 0, 63).astype(np.uint8)
    eff = (d * sc)[..., None]
    q = np.where(eff > 0, np.rint((x + (dmin * mn)[..., None]) / np.where(eff > 0, eff, 1)), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # pairs of sub-blocks
    blocks = np.concatenate(
        [
            d.astype(np.float16).view(np.uint8),
            dmin.astype(np.float16).view(np.uint8),
            packed,
            nibbles,
        ],
        axis=1,
    )
    return blocks.reshape(rows, cols // 256 * 144)


def tiny_gemma3_for_gguf(seed: int = 0, hidden: int = 32):
    """(model, config settings, vocabulary) of the tiny Gemma 3 that
    :func:`write_tiny_gemma3_gguf` writes (the GGUF carries the sliding window, not the layer
    pattern or per-type RoPE, which transformers derives from its defaults)."""
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *TINY_GGUF_CHARS]
    cfg = {**TINY_CONFIGS["gemma3_text"]}
    if hidden != 32:
        cfg.update(hidden_size=hidden, intermediate_size=hidden, head_dim=hidden // 4)
    cfg.pop("layer_types")
    cfg.pop("rope_parameters")
    model = build_tiny_model_from(
        "gemma3_text", {**cfg, "vocab_size": len(vocab), "bos_token_id": 2}, seed
    )
    return model, cfg, vocab


def write_tiny_gemma3_gguf(
    path: Path, qtype: str = "Q8_0", seed: int = 0, hidden: int = 32
) -> Path:
    """A tiny random Gemma 3 (``gemma3_text``: 2 layers) written as llama.cpp writes one:
    ``gemma3.*`` metadata, a sentencepiece vocabulary (``▁`` + characters), norm weights stored
    as ``1 + w`` (F32), the 2-D weights as ``qtype``: ``Q8_0``, ``Q4_0``, ``Q5_0`` (the
    ``gguf`` package's quantisers), ``Q4_K_M`` (:func:`quantize_q4_k` where a row holds whole
    256-blocks, as llama.cpp, Q8_0 elsewhere; llama.cpp's Q4_K_M also puts some tensors in
    Q6_K, which nothing here can write), or ``Q8_1`` (zero bytes: a type the gguf package
    cannot dequantise). ``hidden`` 256 gives Q4_K rows. Returns ``path``."""
    import gguf
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    model, cfg, vocab = tiny_gemma3_for_gguf(seed, hidden)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny-gemma3")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(cfg["sliding_window"])
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab)
    writer.add_token_scores([-float(i) for i in range(len(vocab))])
    writer.add_token_types([3, 3, 3, 2] + [1] * (len(vocab) - 4))
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg["num_hidden_layers"])
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: a GGUF without output.weight is read as tied
        base = name.removesuffix(".weight")
        gname = names.get_name(base)
        if gname is None:
            raise KeyError(f"no GGUF name for {name}")
        data = p.detach().to(torch.float32).numpy()
        if "norm" in base:  # llama.cpp stores Gemma norms as 1 + w (transformers subtracts 1)
            writer.add_tensor(f"{gname}.weight", (data + 1.0).astype(np.float32))
            continue
        if qtype == "Q4_K_M" and data.shape[-1] % 256 == 0:
            qt, q = GGMLQuantizationType.Q4_K, quantize_q4_k(data)
        elif qtype == "Q8_1":
            qt = GGMLQuantizationType.Q8_1
            block_elems, block_bytes = GGML_QUANT_SIZES[qt]
            q = np.zeros((data.shape[0], data.shape[1] // block_elems * block_bytes), np.uint8)
        else:
            qt = GGMLQuantizationType["Q8_0" if qtype == "Q4_K_M" else qtype]
            q = gguf.quants.quantize(data, qt)
        writer.add_tensor(f"{gname}.weight", q, raw_shape=q.shape, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def moved_trainables(bundle, seed: int = 0, scale: float = 0.3) -> dict:
    """A bundle's trainable tensors away from the initial point (LoRA B starts at zero)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in bundle.initial_trainable().items()
    }


#: the prompts the decoding tests compare the KV-cache path with recomputation on
DECODE_PROMPTS = ["the cat", "a", "we bake bread on sunday. the dog"]


def assert_kv_matches_recompute(kv, full, bundle) -> None:
    """Greedy tokens of the KV-cache generator ``kv`` equal those of the recompute path
    ``full`` at moved trainables, for each of :data:`DECODE_PROMPTS`, including a sequence
    that outgrows ``max_length`` (re-read from its last tokens, as recompute does)."""
    values = moved_trainables(bundle)
    for g in (kv, full):
        g.params.load(values)
    for prompt in DECODE_PROMPTS:
        a, c = kv.generate(prompt, 40), full.generate(prompt, 40)
        assert a.token_ids == c.token_ids and len(a.token_ids) > 10
        a, c = kv.generate(prompt, 30, max_length=8), full.generate(prompt, 30, max_length=8)
        assert a.token_ids == c.token_ids


def genai_greedy(og, model, adapters, ids: list[int], new_tokens: int, eos: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after ``ids`` with the adapter ``personal`` active,
    cut before the first ``eos``."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.set_active_adapter(adapters, "personal")
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out[: out.index(eos)] if eos in out else out
