"""Hand trained tensors back to the desktop ecosystem.

``peft`` format (LoRA bundles): a PEFT adapter folder that ``peft.PeftModel.from_pretrained``
loads on top of the base model::

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, fan_in_fan_out
    adapter_model.safetensors    base_model.model.<name> for every LoRA tensor of the bundle

The bundle's LoRA tensors already carry PEFT's names without the ``base_model.model.`` prefix
(``model.layers.0.self_attn.q_proj.lora_A.weight``), PEFT's scaling ``lora_alpha / r`` is the
bundle's, and A is ``[r, in]``, B ``[out, r]`` as in PEFT (also for GPT-2's ``Conv1D``, where
PEFT's ``fan_in_fan_out`` refers to the base weight only).

``safetensors`` format (any mode): the trained tensors under their bundle names in one
``tensors.safetensors`` (Hugging Face state-dict keys for ``norms``/``full``, so
``model.load_state_dict(..., strict=False)`` takes them), plus a ``handoff.json`` describing
the bundle they belong to.

    python -m exporters.handoff --bundle B --tensors RUN/trained.safetensors --out DIR

Needs only numpy and safetensors (no torch, no peft) to write.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from edgezo.errors import EdgezoError

FORMATS = ("peft", "safetensors")
PEFT_PREFIX = "base_model.model."


def load_tensors(bundle, tensors: str | Path | None) -> dict[str, np.ndarray]:
    """The bundle's trainable tensors from ``tensors`` (or its initial values), checked."""
    return bundle.trainable_values(tensors)


def frozen_lora_a(bundle) -> dict[str, np.ndarray]:
    """The frozen ``lora_A`` tensors of a ``freeze_a`` bundle (LoRA-FA), which the exporter
    stored beside the trainable ones: an adapter needs both."""
    from safetensors.numpy import load_file

    from .trainables import FROZEN_LORA_A

    path = bundle.path / FROZEN_LORA_A
    if not path.is_file():
        raise EdgezoError(
            f"bundle {bundle.path} trains LoRA B alone and has no {FROZEN_LORA_A}",
            "re-export the bundle with --lora-freeze-a",
        )
    return load_file(str(path))


def peft_config(manifest) -> dict:
    """``adapter_config.json`` for a LoRA bundle."""
    from .architectures import get_architecture

    lora = manifest.lora or {}
    try:
        fan_in_fan_out = get_architecture(manifest.architecture["model_type"]).lora_fan_in_fan_out
    except EdgezoError:
        fan_in_fan_out = False
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": manifest.architecture.get("source"),
        "r": int(lora["rank"]),
        "lora_alpha": float(lora["alpha"]),
        "target_modules": list(lora["targets"]),
        "exclude_modules": ["lm_head"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        # adapters on some blocks only (--lora-layers): PEFT's own way to say which
        **({"layers_to_transform": list(lora["layers"])} if lora.get("layers") else {}),
    }


def handoff(
    bundle: str | Path,
    out: str | Path,
    tensors: str | Path | None = None,
    fmt: str = "peft",
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` (a safetensors file trained on ``bundle``; its initial values when
    ``None``) to the folder ``out`` as a PEFT adapter (``fmt="peft"``, LoRA bundles) or plain
    safetensors; returns ``out``. Raises :class:`EdgezoError` with the fix on bad input."""
    from safetensors.numpy import save_file

    from edgezo.bundle import load_bundle

    from .bundle_writer import staged_bundle

    if fmt not in FORMATS:
        raise EdgezoError(f"unknown format {fmt!r}", f"pass --format one of: {', '.join(FORMATS)}")
    b = load_bundle(bundle)
    m = b.manifest
    if fmt == "peft" and (m.trainable_mode != "lora" or not m.lora):
        raise EdgezoError(
            f"a PEFT adapter holds LoRA tensors; bundle {b.path} trains {m.trainable_mode!r}",
            "pass --format safetensors for norms/full/scales tensors",
        )
    values = load_tensors(b, tensors)
    if fmt == "peft" and m.lora.get("freeze_a"):
        values = {**frozen_lora_a(b), **values}
    meta = {
        "bundle": b.fingerprint,
        "bundle_path": str(b.path),
        "trainable_mode": m.trainable_mode,
        "model_type": str(m.architecture.get("model_type")),
        "source": str(m.architecture.get("source")),
    }
    with staged_bundle(Path(out), overwrite) as stage:
        if fmt == "peft":
            save_file(
                {PEFT_PREFIX + name: v for name, v in values.items()},
                str(stage / "adapter_model.safetensors"),
                metadata={"format": "pt"},
            )
            (stage / "adapter_config.json").write_text(json.dumps(peft_config(m), indent=2) + "\n")
        else:
            save_file(values, str(stage / "tensors.safetensors"), metadata={"format": "pt"})
            info = dict(
                meta,
                tensors=[
                    {"name": s.name, "shape": list(s.shape), "role": s.role, "positive": s.positive}
                    for s in m.trainable
                ],
                quantization=m.quantization,
            )
            (stage / "handoff.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--tensors",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained tensors (a run's trained.safetensors) [default: the bundle's initial ones].",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="peft", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
def main(bundle: Path, tensors: Path | None, out: Path, fmt: str, overwrite: bool) -> None:
    """Write trained tensors as a PEFT LoRA adapter folder, or as plain safetensors."""
    from .cli import run

    def go() -> None:
        path = handoff(bundle, out, tensors, fmt, overwrite)
        click.echo(f"wrote {fmt} hand-off to {path}")

    run(go)


if __name__ == "__main__":
    main(prog_name="python -m exporters.handoff")
