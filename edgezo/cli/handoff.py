"""``edgezo handoff``: a run's trained tensors in the formats other runtimes load.

Runtime-side: PEFT, ONNX Runtime adapter, plain safetensors, and a merged Hugging Face folder
from a Hugging Face source are written with numpy and safetensors only (no torch); see
:mod:`exporters.handoff` for each format.
"""

from __future__ import annotations

from pathlib import Path

import click

from .errors import friendly_errors

FORMATS = ("peft", "hf", "onnx_adapter", "safetensors")


@click.command("handoff")
@click.option(
    "--run", "run_dir", default=None, type=click.Path(), help="run folder (its bundle and tensors)"
)
@click.option("--bundle", default=None, help="bundle folder (default: the run's)")
@click.option(
    "--tensors",
    default=None,
    type=click.Path(),
    help="trained.safetensors (default: the run's, else the bundle's initial values)",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="peft",
    show_default=True,
    help="peft: LoRA adapter folder; hf: merged Hugging Face model (any mode); onnx_adapter: "
    "ONNX Runtime / GenAI adapter (LoRA); safetensors: the tensors by name",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder to write")
@click.option("--overwrite", is_flag=True, help="replace an existing non-empty --out")
@click.option(
    "--genai-model",
    is_flag=True,
    help="onnx_adapter: also write a GenAI model folder built from the decoding graph "
    "(needs the onnx package)",
)
@friendly_errors
def handoff(run_dir, bundle, tensors, fmt, out, overwrite, genai_model):
    """Write a run's trained tensors for other runtimes (PEFT, Hugging Face, ONNX Runtime
    GenAI); see docs/guides/generate.md."""
    from exporters.handoff import handoff as write

    from ..generate import resolve

    b, tensors = resolve(bundle, tensors, run_dir)
    path = write(b.path, out, tensors, fmt, overwrite, genai_model)
    click.echo(f"wrote the {fmt} hand-off of {tensors or 'the initial tensors'} to {path}")
