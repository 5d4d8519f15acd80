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
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(TINY_CONFIGS[model_type])
    config = AutoConfig.for_model(
        settings.pop("model_type", model_type),
        vocab_size=vocab_size,
        pad_token_id=0,
        eos_token_id=1,
        **{"bos_token_id": None, **settings},
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
