"""The desktop side of edgezo: export a causal LM into a bundle the device runtime trains.

    from exporters import export_causal_lm
    export_causal_lm("path/to/hf-model", "bundles/my-lora", mode="lora")

or, for any task (``causal_lm``, ``classification``, ``prompt_classification``)::

    from exporters import export_bundle
    export_bundle(model="path/to/bert", out="bundles/topics", task="classification",
                  labels=["cooking", "fitness"], mode="head", head_init="zero")

or ``python -m exporters --model PATH --out DIR`` (``python -m exporters.default --out DIR`` for
SmolLM2-135M-Instruct with LoRA). Importing this package is cheap; torch and transformers are
imported on first use, with an install hint when missing.
"""

from __future__ import annotations

from pathlib import Path

from .architectures import Architecture, get_architecture, register, supported_model_types

__all__ = [
    "Architecture",
    "export_bundle",
    "export_causal_lm",
    "get_architecture",
    "register",
    "supported_model_types",
]


def export_causal_lm(model: str | Path, out: str | Path, **kw) -> Path:
    """Export a Hugging Face / GGUF causal LM into a validated bundle folder; returns ``out``.

    The keyword arguments (``mode``, ``lora_rank``, ``gguf_file``, ``quantize``, ...) and their
    defaults are :func:`exporters.export.export_causal_lm`'s; this wrapper only defers importing
    torch. Raises :class:`edgezo.errors.EdgezoError` (with the fix) when torch/transformers are
    missing, the architecture is unsupported, or validation fails; no partial bundle is ever
    left behind. ``quantize="int8"|"int4"`` writes a quantised bundle (``mode="scales"`` trains
    the int4 scales), see :mod:`exporters.quantize`.
    """
    from .deps import require_export_deps

    require_export_deps()
    from .export import export_causal_lm as _export

    return _export(model, out, **kw)


def export_bundle(model: str | Path, out: str | Path, task: str = "causal_lm", **kw) -> Path:
    """Export ``model`` into a validated bundle for ``task``; returns ``out``.

    ``task="classification"`` (an encoder, BERT family): ``labels=[...]``, ``mode`` one of
    head/lora/norms/full (default head), ``head_init`` zero/random. ``task=
    "prompt_classification"`` (a causal LM): ``labels``, ``template`` with ``{text}`` and one
    of ``label_words`` per label. ``task="causal_lm"``: as :func:`export_causal_lm`. See
    :func:`exporters.export.export_bundle`.
    """
    from .deps import require_export_deps

    require_export_deps()
    from .export import export_bundle as _export

    return _export(model, out, task=task, **kw)
