"""Declarative descriptions of the model families the exporter supports.

One small :class:`Architecture` per family, registered with :func:`register`. The export code
never branches on model names: everything family-specific it needs is a field here. Adding a
family means adding one description below plus a tiny test model (``TINY_CONFIGS`` in
``tests/conftest.py`` or ``ARCH_CONFIGS`` in ``tests/test_architectures.py``; a test fails if a
registered family has none).

Patterns are :mod:`fnmatch` globs over module names as they appear in the Hugging Face model's
``named_modules()`` (``model.layers.0.input_layernorm``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from edgezo.bundle import TRAINABLE_MODES
from edgezo.errors import EdgezoError


@dataclass(frozen=True)
class Architecture:
    """What the exporter needs to know about one model family."""

    family: str
    """Short family name written into the manifest (``architecture.family``)."""
    model_types: tuple[str, ...]
    """Hugging Face ``config.model_type`` values handled by this description."""
    lora_targets: tuple[str, ...]
    """Default LoRA targets: last component of the ``nn.Linear`` module names."""
    norm_modules: tuple[str, ...]
    """Globs of normalisation modules; their weights (role ``norm``) and biases (``bias``)
    are what ``--mode norms`` trains."""
    embedding_modules: tuple[str, ...]
    """Globs of token/position embedding modules (role ``embedding`` in ``--mode full``)."""
    lora_excluded: tuple[str, ...] = ("lm_head",)
    """Linear modules never wrapped with LoRA even when named as a target."""
    task: str = "causal_lm"
    """``causal_lm`` (next-token loss; also ``prompt_classification``) or ``classification``
    (an encoder + a classification head over the mean-pooled last hidden states)."""
    head_modules: tuple[str, ...] = ()
    """Globs of the classification head (role ``head``): what ``--mode head`` trains, and
    trained along with ``lora``/``norms`` for a classification task."""
    pass_position_ids: bool = True
    """Whether the model's forward accepts ``position_ids`` (computed from the attention mask,
    so left and right padding both give padding-invariant losses)."""
    attn_implementation: str = "sdpa"
    """Attention kernel used while tracing; ``sdpa`` and ``eager`` both export."""
    no_effect_params: tuple[str, ...] = ()
    """Globs of parameters the loss provably does not depend on (a key-projection bias shifts
    every attention score of a query equally, which softmax cancels); ``--mode full`` leaves
    them frozen instead of failing the sensitivity check."""
    lora_fan_in_fan_out: bool = False
    """The LoRA targets store their weight as ``[in, out]`` (GPT-2's ``Conv1D``); written into
    a PEFT adapter config as ``fan_in_fan_out``."""

    def is_norm(self, module_name: str) -> bool:
        return _matches(module_name, self.norm_modules)

    def is_embedding(self, module_name: str) -> bool:
        return _matches(module_name, self.embedding_modules)

    def is_head(self, module_name: str) -> bool:
        return _matches(module_name, self.head_modules)

    def has_no_effect(self, param_name: str) -> bool:
        return _matches(param_name, self.no_effect_params)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


#: Trainable modes (see ``exporters/trainables.py``); ``scales`` (the int4 quantisation scales)
#: needs ``quantize="int4"`` (see ``exporters/quantize.py``); ``head`` (the classifier alone) is
#: for encoder classification.
MODES = TRAINABLE_MODES  # the bundle contract names them

_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Register ``arch`` for each of its ``model_types``; returns it (usable as a one-liner)."""
    for model_type in arch.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} is already registered")
        _REGISTRY[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    """The Hugging Face ``model_type`` values the exporter can export."""
    return sorted(_REGISTRY)


def registered_architectures() -> list[Architecture]:
    """Every registered description, once each."""
    seen: dict[str, Architecture] = {}
    for arch in _REGISTRY.values():
        seen.setdefault(arch.family, arch)
    return list(seen.values())


def get_architecture(model_type: str) -> Architecture:
    """The description for a Hugging Face ``model_type``; an :class:`EdgezoError` if unknown."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise EdgezoError(
            f"architecture {model_type!r} is not supported by the exporter; supported "
            f"model types: {', '.join(supported_model_types())}",
            "export a model of a supported architecture, or add a description for "
            f"{model_type!r} in exporters/architectures.py (with a tiny test model)",
        ) from None


# -- the families --------------------------------------------------------------------------------

LLAMA = register(
    Architecture(
        family="llama",
        model_types=("llama",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=(
            "model.layers.*.input_layernorm",
            "model.layers.*.post_attention_layernorm",
            "model.norm",
        ),
        embedding_modules=("model.embed_tokens",),
    )
)


QWEN2 = register(
    Architecture(
        family="qwen2",
        model_types=("qwen2",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=(
            "model.layers.*.input_layernorm",
            "model.layers.*.post_attention_layernorm",
            "model.norm",
        ),
        embedding_modules=("model.embed_tokens",),
    )
)

GPT2 = register(
    Architecture(
        family="gpt2",
        model_types=("gpt2",),
        lora_targets=("c_attn",),  # fused q/k/v Conv1D, PEFT's default for GPT-2
        norm_modules=("transformer.h.*.ln_1", "transformer.h.*.ln_2", "transformer.ln_f"),
        embedding_modules=("transformer.wte", "transformer.wpe"),
        lora_fan_in_fan_out=True,
    )
)

OPT = register(
    Architecture(
        family="opt",
        model_types=("opt",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=(
            "model.decoder.layers.*.self_attn_layer_norm",
            "model.decoder.layers.*.final_layer_norm",
            "model.decoder.final_layer_norm",
        ),
        embedding_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        no_effect_params=("model.decoder.layers.*.self_attn.k_proj.bias",),
    )
)

BERT = register(
    Architecture(
        family="bert",
        model_types=("bert",),
        lora_targets=("query", "value"),
        # "*" in front: the same globs fit a bare BertModel wrapped with a mean-pooling head
        # (stored under "bert.") and a BertForSequenceClassification
        norm_modules=("*embeddings.LayerNorm", "*encoder.layer.*.output.LayerNorm"),
        embedding_modules=(
            "*embeddings.word_embeddings",
            "*embeddings.position_embeddings",
            "*embeddings.token_type_embeddings",
        ),
        lora_excluded=("classifier",),
        task="classification",
        head_modules=("classifier",),
        pass_position_ids=False,
        no_effect_params=("*attention.self.key.bias",),
    )
)
