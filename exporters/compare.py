"""Side-by-side check of a bundle: every available ONNX Runtime provider and PyTorch.

    python -m exporters.compare --bundle B [--model SRC] [--batch 8 --seq 64 --threads 2]

Runs the bundle's loss (at its initial tensors, or ``--tensors``) on the CPU provider and on
CUDA when ONNX Runtime has it, the same model at other precisions (``--with B2``), and, when
the source model is available (``--model`` or the manifest's ``architecture.source``),
PyTorch eager with the same trainable tensors in fp32, bf16 autocast and bf16 weights. Each
framework runs in its own child process, alternating rounds (``exporters.forward_bench``).
Prints the per-example loss parity (max |loss - first backend's loss|) and the median forward
time of each. For a quantised bundle the PyTorch reference is the fp32 model: the difference
is the quantisation error, not an export bug (it is labelled so).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from edgezo.errors import EdgezoError

from .forward_bench import TORCH_MODES

PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
#: PyTorch's modes: label, and whether the row is an fp32 reference of the parity check
TORCH_ROWS = {
    "fp32": "pytorch",
    "autocast": "pytorch bf16 autocast",
    "bf16": "pytorch bf16 weights",
}


def _precision(bundle) -> str:
    m = bundle.manifest
    return m.precision or (m.quantization or {}).get("scheme") or "fp32"


def compare(
    bundle: str | Path,
    model: str | Path | None = None,
    batch: int = 8,
    seq: int = 64,
    threads: int = 2,
    tensors: str | Path | None = None,
    repeats: int = 5,
    torch_reference: bool = True,
    echo=print,
    others: tuple[str | Path, ...] = (),
    torch_modes: tuple[str, ...] = TORCH_MODES,
) -> dict:
    """Run ``bundle`` on every available provider, ``others`` (the same model at other
    precisions) on the CPU provider, and PyTorch eager in ``torch_modes`` (fp32, bf16 autocast,
    bf16 weights); returns the figures::

        {"rows": [{"backend", "loss_mean", "max_abs_diff", "median_s", "speedup", "parity"}...],
         "parity_max_abs_diff": float, "notes": [...], "quantization": str | None}

    Each framework runs in its own child process, in alternating rounds
    (``exporters.forward_bench``), so that their thread pools do not slow each other.
    ``max_abs_diff`` is each row's max |per-example loss - the first row's|;
    ``parity_max_abs_diff`` the largest of the rows that compute what the bundle computes (its
    providers and the PyTorch fp32 reference); the other precisions' differences are their
    rounding, shown beside. ``echo`` prints the table (``None``: silent).
    """
    import onnxruntime as ort

    from edgezo.bundle import load_bundle

    from .forward_bench import Settings, Side, measure

    if batch < 1 or seq < 2 or threads < 1 or repeats < 1:
        raise EdgezoError(
            f"batch, seq, threads, repeats must be positive (seq >= 2), got {batch}, {seq}, "
            f"{threads}, {repeats}",
            "pass e.g. --batch 8 --seq 64 --threads 2",
        )
    b = load_bundle(bundle)
    m = b.manifest
    b.trainable_values(tensors)  # a bad --tensors file is refused here, with its fix
    tensors = str(tensors) if tensors is not None else None
    notes: list[str] = []
    sides: list[Side] = []
    parity: dict[str, bool] = {}
    available = ort.get_available_providers()
    for provider in PROVIDERS:
        if provider not in available:
            notes.append(f"{provider} not available in this onnxruntime")
            continue
        label = f"onnxruntime {provider}"
        sides.append(Side(label, "onnx", str(b.path), provider=provider, tensors=tensors))
        parity[label] = True
    for other in others:
        ob = load_bundle(other)
        if ob.manifest.architecture.get("source") != m.architecture.get("source") or [
            s.name for s in ob.manifest.trainable
        ] != [s.name for s in m.trainable]:
            raise EdgezoError(
                f"bundle {other} is not the same model and trainables as {bundle}",
                "pass --with bundles exported from the same model with the same --mode/LoRA",
            )
        label = f"onnxruntime CPU {_precision(ob)} ({Path(other).name})"
        sides.append(Side(label, "onnx", str(ob.path), tensors=tensors))
        parity[label] = False
    source = str(model) if model is not None else m.architecture.get("source")
    if not torch_reference:
        notes.append("PyTorch reference not requested")
    elif not source or not Path(source).exists():
        notes.append(f"PyTorch reference skipped: source model {source!r} not found (pass --model)")
    else:
        from .deps import require_export_deps

        require_export_deps()
        for mode in torch_modes:
            label = TORCH_ROWS[mode]
            if mode == "fp32" and m.quantization:
                label = "pytorch (fp32 reference)"
            sides.append(
                Side(label, "torch", str(b.path), mode=mode, source=source, tensors=tensors)
            )
            parity[label] = mode == "fp32"
    st = Settings(batch=batch, seq=seq, threads=threads)
    result = measure(sides, st, repeats, losses=True)
    rows = [r for r in result["rows"] if r.get("losses") and r.get("median_s")]
    for r in result["rows"]:
        if r not in rows:
            notes.append(f"{r['label']} failed: {r.get('error')}")
    if not rows:
        raise EdgezoError(
            "no backend could run the bundle: " + "; ".join(notes), "pip install onnxruntime"
        )
    first = np.asarray(rows[0]["losses"], dtype=np.float64)
    out_rows = []
    for r in rows:
        loss = np.asarray(r["losses"], dtype=np.float64)
        out_rows.append(
            {
                "backend": r["label"],
                "loss_mean": float(loss.mean()),
                "max_abs_diff": float(np.max(np.abs(loss - first))),
                "median_s": r["median_s"],
                "speedup": rows[0]["median_s"] / r["median_s"],
                "parity": parity[r["label"]],
            }
        )
    result = {
        "bundle": str(b.path),
        "batch": [batch, seq],
        "threads": threads,
        "quantization": (m.quantization or {}).get("scheme"),
        "precision": _precision(b),
        "rows": out_rows,
        "parity_max_abs_diff": max(r["max_abs_diff"] for r in out_rows if r["parity"]),
        "notes": notes,
    }
    if echo is not None:
        echo(format_table(result))
    return result


def format_table(result: dict) -> str:
    q = result["quantization"]
    lines = [
        f"bundle {result['bundle']} ({result.get('precision') or q or 'fp32'}), batch "
        f"{result['batch'][0]}x{result['batch'][1]}, {result['threads']} threads",
        f"{'backend':<42} {'mean loss':>10} {'max |diff|':>11} {'median s':>9} {'vs first':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['backend']:<42} {r['loss_mean']:>10.5f} {r['max_abs_diff']:>11.2e} "
            f"{r['median_s']:>9.4f} {r['speedup']:>7.2f}x"
            + ("" if r.get("parity", True) else "  (another precision: its rounding)")
        )
    lines.append(
        f"parity: max |loss difference| = {result['parity_max_abs_diff']:.2e}"
        + (" (includes the quantisation error vs the fp32 PyTorch model)" if q else "")
        + " (the bundle's providers and PyTorch fp32)"
    )
    lines.append(
        "each framework ran in its own process, in alternating rounds; 'vs first' > 1: faster"
    )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Source model [default: the manifest's].")
@click.option(
    "--tensors",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained tensors [default: the bundle's initial ones].",
)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seq", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch reference.")
@click.option(
    "--with",
    "others",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another bundle of the same model at another --precision, timed beside (repeatable).",
)
@click.option(
    "--torch-modes",
    default=",".join(TORCH_MODES),
    show_default=True,
    help="PyTorch eager modes: fp32, autocast (bf16 autocast), bf16 (bf16 weights).",
)
def main(bundle, model, tensors, batch, seq, threads, repeats, no_torch, others, torch_modes):
    """Parity and forward timings of a bundle on every provider, beside the same model at other
    precisions (--with) and PyTorch eager in fp32, bf16 autocast and bf16 weights, each
    framework in its own process."""
    from .cli import run

    modes = tuple(x.strip() for x in torch_modes.split(",") if x.strip())
    bad = [x for x in modes if x not in TORCH_MODES]
    if bad:
        raise click.BadParameter(
            f"{', '.join(bad)}: not among {', '.join(TORCH_MODES)}", param_hint="--torch-modes"
        )
    run(
        lambda: compare(
            bundle,
            model,
            batch,
            seq,
            threads,
            tensors,
            repeats,
            not no_torch,
            echo=click.echo,
            others=tuple(others),
            torch_modes=modes,
        )
    )


if __name__ == "__main__":
    main(prog_name="python -m exporters.compare")
