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

from collections.abc import Callable
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


def export_causal_lm(
    model: str | Path,
    out: str | Path,
    mode: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_targets: list[str] | tuple[str, ...] | None = None,
    gguf_file: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    progress: Callable[[str], None] | None = print,
    external_data: bool | None = None,
    quantize: str | None = None,
    block_size: int = 32,
    accuracy_level: int = 0,
    quant_rtol: float = 0.1,
) -> Path:
    """Export a Hugging Face / GGUF causal LM into a validated bundle folder; returns ``out``.

    See :func:`exporters.export.export_causal_lm` for the arguments. Raises
    :class:`edgezo.errors.EdgezoError` (with the fix) when torch/transformers are missing, the
    architecture is unsupported, or validation fails; no partial bundle is ever left behind.
    ``quantize="int8"|"int4"`` writes a quantised bundle (``mode="scales"`` trains the int4
    scales), see :mod:`exporters.quantize`.
    """
    from .deps import require_export_deps

    require_export_deps()
    from .export import export_causal_lm as _export

    return _export(
        model,
        out,
        mode=mode,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        gguf_file=gguf_file,
        seed=seed,
        overwrite=overwrite,
        tolerance=tolerance,
        progress=progress,
        external_data=external_data,
        quantize=quantize,
        block_size=block_size,
        accuracy_level=accuracy_level,
        quant_rtol=quant_rtol,
    )


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
