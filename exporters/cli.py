"""``python -m exporters``: export a model into an edgezo bundle: a causal LM (fp32, int8 or
int4), an encoder classifier (``--task classification``) or a causal LM scored on label words
(``--task prompt_classification``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgezo.cli.tasks import task_kwargs, task_options
from edgezo.errors import EdgezoError

from .architectures import MODES


def _targets(_ctx: click.Context, _param: click.Parameter, value: str | None):
    if value is None:
        return None
    return tuple(t.strip() for t in value.split(",") if t.strip())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Hugging Face model folder, or a .gguf file.")
@click.option("--gguf-file", default=None, help="GGUF file name inside the --model folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=None,
    help="Which tensors are trainable [default: lora; head for --task classification].",
)
@task_options
@click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lora-alpha", type=float, default=16.0, show_default=True)
@click.option(
    "--lora-targets",
    callback=_targets,
    default=None,
    help="Comma-separated linear layer names [default: the architecture's, "
    "q_proj,v_proj for Llama].",
)
@click.option(
    "--lora-layers",
    default=None,
    help="Blocks that get adapters: all, last:N, A-B or a comma list [default: all]. "
    "With last:N the blocks before them are a frozen prefix that training caches.",
)
@click.option(
    "--lora-freeze-a",
    is_flag=True,
    help="Train LoRA B only; A stays its seeded random value (LoRA-FA): fewer perturbed "
    "values and a steadier ZO run.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seeds LoRA A and the validation batches.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option(
    "--tolerance",
    type=float,
    default=1e-3,
    show_default=True,
    help="Largest accepted |ONNX - PyTorch| loss difference.",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Weights in model.onnx.data [default: when above 256 MiB].",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    default=None,
    help="Quantise the frozen MatMul weights: int8 (dynamic) or int4 (MatMulNBits) "
    "[default: fp32]. --mode scales trains the int4 scales.",
)
@click.option(
    "--block-size",
    type=click.Choice(["32", "64", "128"]),
    default="32",
    show_default=True,
    help="int4 block size.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=0,
    show_default=True,
    help="int4 MatMulNBits accuracy level (--mode scales needs 0).",
)
@click.option(
    "--quant-rtol",
    type=float,
    default=0.1,
    show_default=True,
    help="Largest accepted relative |quantised - fp32| ONNX loss difference.",
)
def main(
    model,
    gguf_file,
    out,
    mode,
    lora_rank,
    lora_alpha,
    lora_targets,
    lora_layers,
    lora_freeze_a,
    seed,
    overwrite,
    tolerance,
    external_data,
    quantize,
    block_size,
    accuracy_level,
    quant_rtol,
    task,
    labels,
    labels_from,
    head_init,
    template,
    label_words,
) -> None:
    """Export a model (Hugging Face folder or GGUF) into a validated edgezo bundle."""
    from . import export_bundle

    def export():
        quant = {}
        if task != "classification":
            quant = {
                "quantize": quantize,
                "block_size": int(block_size),
                "accuracy_level": accuracy_level,
                "quant_rtol": quant_rtol,
            }
        elif quantize:
            raise EdgezoError(
                "--quantize is not supported for --task classification yet",
                "export the classifier in fp32 (drop --quantize)",
            )
        return export_bundle(
            model,
            out,
            task=task,
            **task_kwargs(task, labels, labels_from, head_init, template, label_words),
            mode=mode,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            lora_layers=lora_layers,
            lora_freeze_a=lora_freeze_a,
            **({"gguf_file": gguf_file} if gguf_file else {}),
            seed=seed,
            overwrite=overwrite,
            tolerance=tolerance,
            external_data=external_data,
            **quant,
        )

    run(export)


def run(fn) -> None:
    """Run an export, printing an :class:`EdgezoError` without a traceback (exit status 2)."""
    try:
        fn()
    except EdgezoError as e:
        click.echo(f"error: {e.what}", err=True)
        if e.fix:
            click.echo(f"  fix: {e.fix}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; no bundle was written", err=True)
        sys.exit(130)
