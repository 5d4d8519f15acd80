"""Declarative descriptions of the model families the exporter supports.

One small :class:`Architecture` per family, registered with :func:`register`. The export code
never branches on model names: everything family-specific it needs is a field here. Adding a
family means adding one description below plus a tiny test model (``TINY_CONFIGS`` in
``tests/conftest.py`` or ``ARCH_CONFIGS`` in ``tests/test_architectures.py``; a test fails if a
registered family has none).

Patterns are :mod:`fnmatch` globs over module names as they appear in the Hugging Face model's
``named_modules()`` (``model.layers.0.input_layernorm``).

Config attribute names (hidden size, layer count, heads, KV heads, vocabulary) come from
optimum's ``NormalizedConfigManager`` where it knows the ``model_type``; a description states
only what optimum lacks (``normalized_config``: Gemma 2/3, written once below in optimum's
shape). :func:`check_config` refuses a config the description does not cover (an unknown RoPE
scaling type, attention layer type or soft-capping) before any weight is read.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

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
    normalized_config: Any = None
    """An optimum ``NormalizedConfig`` class for the config's attribute names; ``None``: the one
    optimum's ``NormalizedConfigManager`` has for the ``model_type``."""
    rope_types: tuple[str, ...] = ("default",)
    """RoPE types (``rope_parameters``/``rope_scaling`` ``rope_type``) whose tables the traced
    graph reproduces at every length; another is refused by :func:`check_config`."""
    layer_types: tuple[str, ...] = ("full_attention",)
    """Attention layer types (``config.layer_types``) the description covers."""
    softcap_fields: tuple[str, ...] = ()
    """Config fields of logit soft-capping the description covers (Gemma 2); a model of another
    family with one set is refused. ``final_logit_softcapping`` is applied by the loss wrapper
    (``exporters.loss.CausalLMLossGraph``), which reads the logits off the head itself."""

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


def normalized_config(arch: Architecture, config: Any) -> Any:
    """``config`` seen through optimum's normalised attribute names (``.hidden_size``,
    ``.num_layers``, ``.num_attention_heads``, ``.vocab_size``; ``.num_key_value_heads`` for a
    grouped-query family)."""
    cls = arch.normalized_config
    if cls is None:
        from optimum.utils.normalized_config import NormalizedConfigManager

        cls = NormalizedConfigManager.get_normalized_config_class(str(config.model_type))
    return cls(config)


def config_sizes(arch: Architecture, config: Any) -> dict[str, int | None]:
    """The sizes a manifest and ``edgezo plan`` need, read through :func:`normalized_config`."""
    norm = normalized_config(arch, config)
    out: dict[str, int | None] = {}
    for key, attr in (
        ("hidden_size", "hidden_size"),
        ("num_layers", "num_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("num_key_value_heads", "num_key_value_heads"),
        ("vocab_size", "vocab_size"),
    ):
        try:
            value = getattr(norm, attr)
        except (AttributeError, KeyError):
            value = None
        out[key] = int(value) if isinstance(value, int) else None
    if out["num_key_value_heads"] is None:
        kv = getattr(config, "num_key_value_heads", None)
        out["num_key_value_heads"] = int(kv) if isinstance(kv, int) else out["num_attention_heads"]
    return out


def _rope_types(config: Any) -> list[tuple[str, str]]:
    """(where, rope_type) of every RoPE table the config describes (transformers 5:
    ``rope_parameters``, possibly one per attention layer type; older: ``rope_scaling``)."""
    found: list[tuple[str, str]] = []
    for field in ("rope_parameters", "rope_scaling"):
        value = getattr(config, field, None)
        if not isinstance(value, dict):
            continue
        nested = [(k, v) for k, v in value.items() if isinstance(v, dict)]
        for where, params in nested or [("", value)]:
            kind = params.get("rope_type", params.get("type", "default"))
            found.append((f"{field}{f'.{where}' if where else ''}.rope_type", str(kind)))
    return found


def check_config(arch: Architecture, config: Any, source: str) -> None:
    """Refuse a config whose fields the description does not cover (before any weight is
    read): an unknown RoPE type, attention layer type, or logit soft-capping."""
    model_type = str(config.model_type)
    where = f"{source} ({model_type}, {arch.family} family)"
    for field, kind in _rope_types(config):
        if kind not in arch.rope_types:
            raise EdgezoError(
                f"{where}: config field {field} = {kind!r} is not covered by the exporter's "
                f"{arch.family} description (it covers: {', '.join(arch.rope_types)})",
                f"export a model with one of those RoPE types, or add {kind!r} to rope_types "
                f"of {arch.family} in exporters/architectures.py once its traced RoPE table is "
                "checked to match PyTorch at every sequence length",
            )
    for kind in sorted(set(getattr(config, "layer_types", None) or ())):
        if kind not in arch.layer_types:
            raise EdgezoError(
                f"{where}: config field layer_types holds {kind!r}, which the exporter's "
                f"{arch.family} description does not cover (it covers: "
                f"{', '.join(arch.layer_types)})",
                f"add {kind!r} to layer_types of {arch.family} in exporters/architectures.py "
                "with a tiny test model that uses it",
            )
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, field, None) is not None and field not in arch.softcap_fields:
            raise EdgezoError(
                f"{where}: config field {field} is set, and the exporter's {arch.family} "
                "description does not cover logit soft-capping",
                f"set {field} to null in config.json if the model was not trained with it, "
                f"or add it to softcap_fields of {arch.family} in exporters/architectures.py",
            )
    try:
        sizes = config_sizes(arch, config)
    except KeyError as e:  # optimum knows no attribute names for this model_type
        raise EdgezoError(
            f"{where}: optimum has no normalised config for {model_type!r} ({e})",
            f"give the {arch.family} description a normalized_config in exporters/architectures.py",
        ) from None
    missing = [k for k in ("hidden_size", "num_layers", "vocab_size") if sizes[k] is None]
    if missing:
        raise EdgezoError(
            f"{where}: the config has no {', '.join(missing)} (read through optimum's "
            "normalised attribute names)",
            "check config.json, or give the description a normalized_config naming them",
        )


def _gemma_normalized_config() -> Any:
    """Gemma 2 / Gemma 3 text, which optimum 2.3's manager lacks: the standard text names with
    grouped-query attention (what optimum has for Llama), in optimum's own shape."""
    from optimum.utils.normalized_config import NormalizedTextConfigWithGQA

    return NormalizedTextConfigWithGQA.with_args(allow_new=True)


# -- the families --------------------------------------------------------------------------------

_DECODER_NORMS = (
    "model.layers.*.input_layernorm",
    "model.layers.*.post_attention_layernorm",
    "model.norm",
)

#: RoPE types whose inverse frequencies do not depend on the sequence length (a traced graph
#: reproduces them at every length): plain, linear (position interpolation) and Llama 3.1/3.2's
#: wavelength-banded scaling
STATIC_ROPE = ("default", "linear", "llama3")

LLAMA = register(
    Architecture(
        family="llama",
        model_types=("llama",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=_DECODER_NORMS,
        embedding_modules=("model.embed_tokens",),
        rope_types=STATIC_ROPE,
    )
)


QWEN2 = register(
    Architecture(
        family="qwen2",
        model_types=("qwen2",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=_DECODER_NORMS,
        embedding_modules=("model.embed_tokens",),
    )
)

QWEN3 = register(
    Architecture(
        family="qwen3",
        model_types=("qwen3",),
        lora_targets=("q_proj", "v_proj"),
        # the per-head RMSNorms on queries and keys are norms too
        norm_modules=(
            *_DECODER_NORMS,
            "model.layers.*.self_attn.q_norm",
            "model.layers.*.self_attn.k_norm",
        ),
        embedding_modules=("model.embed_tokens",),
        rope_types=STATIC_ROPE,
    )
)

PHI3 = register(
    Architecture(
        family="phi3",
        model_types=("phi3",),
        # fused projections: one LoRA A/B pair on the fused [q; k; v] weight (PEFT's default
        # for Phi-3); gate_up_proj is the fused MLP input
        lora_targets=("qkv_proj",),
        norm_modules=_DECODER_NORMS,
        embedding_modules=("model.embed_tokens",),
        # not longrope (Phi-4-mini, Phi-3-128k): its table switches at a length, and the
        # tracer cannot export transformers' in-place switch (aten::copy); refused
        rope_types=STATIC_ROPE,
    )
)

SMOLLM3 = register(
    Architecture(
        family="smollm3",
        model_types=("smollm3",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=_DECODER_NORMS,  # NoPE every 4th layer is config (no_rope_layers)
        embedding_modules=("model.embed_tokens",),
        rope_types=STATIC_ROPE,
    )
)

_GEMMA_NORMS = (
    "model.layers.*.input_layernorm",
    "model.layers.*.post_attention_layernorm",
    "model.layers.*.pre_feedforward_layernorm",
    "model.layers.*.post_feedforward_layernorm",
    "model.norm",
)

GEMMA2 = register(
    Architecture(
        family="gemma2",
        model_types=("gemma2",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=_GEMMA_NORMS,
        embedding_modules=("model.embed_tokens",),  # scaled by sqrt(hidden) in its forward
        # transformers applies attention soft-capping in its eager kernel only
        attn_implementation="eager",
        normalized_config=_gemma_normalized_config(),
        layer_types=("full_attention", "sliding_attention"),
        softcap_fields=("attn_logit_softcapping", "final_logit_softcapping"),
    )
)

GEMMA3 = register(
    Architecture(
        family="gemma3",
        model_types=("gemma3_text",),
        lora_targets=("q_proj", "v_proj"),
        norm_modules=(
            *_GEMMA_NORMS,
            "model.layers.*.self_attn.q_norm",
            "model.layers.*.self_attn.k_norm",
        ),
        embedding_modules=("model.embed_tokens",),
        normalized_config=_gemma_normalized_config(),
        rope_types=STATIC_ROPE,
        layer_types=("full_attention", "sliding_attention"),
        # attention soft-capping (Gemma 2's) is off in Gemma 3 and not applied by its sdpa
        # kernel: refused if a config sets it
        softcap_fields=("final_logit_softcapping",),
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
