"""Side-by-side check of a bundle: every available ONNX Runtime provider and PyTorch.

    python -m exporters.compare --bundle B [--model SRC] [--batch 8 --seq 64 --threads 2]

Runs the bundle's loss (at its initial tensors, or ``--tensors``) on the CPU provider and on
CUDA when ONNX Runtime has it, and, when the source model is available (``--model`` or the
manifest's ``architecture.source``), the PyTorch reference with the same trainable tensors.
Prints the per-example loss parity (max |loss - first backend's loss|) and the median forward
time of each. For a quantised bundle the PyTorch reference is the fp32 model: the difference
is the quantisation error, not an export bug (it is labelled so).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from edgezo.errors import EdgezoError

PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


def _batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def _time(fn, repeats: int) -> tuple[Any, float]:
    out = fn()  # warm-up (session arenas, kernel selection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def ort_rows(
    bundle, tensors: dict[str, np.ndarray], feeds: dict, threads: int, repeats: int
) -> tuple[list[dict], list[str]]:
    import onnxruntime as ort

    rows, notes = [], []
    available = ort.get_available_providers()
    for provider in PROVIDERS:
        if provider not in available:
            notes.append(f"{provider} not available in this onnxruntime")
            continue
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            sess = ort.InferenceSession(str(bundle.model_path), opts, providers=[provider])
        except Exception as e:  # a provider listed but unusable (no driver ...)
            notes.append(f"{provider} failed to start: {type(e).__name__}: {e}")
            continue
        if provider not in sess.get_providers():
            notes.append(f"{provider} fell back to {sess.get_providers()}")
            continue
        all_feeds = {**feeds, **tensors}
        loss, median = _time(lambda s=sess, f=all_feeds: s.run(["loss"], f)[0], repeats)
        rows.append({"backend": f"onnxruntime {provider}", "loss": loss, "median_s": median})
    return rows, notes


def torch_row(
    bundle, source: str, tensors: dict[str, np.ndarray], feeds: dict, threads: int, repeats: int
) -> dict:
    import torch

    from .load import load_causal_lm
    from .lora import apply_lora
    from .loss import CausalLMLossGraph

    m = bundle.manifest
    loaded = load_causal_lm(source)  # a folder or a .gguf file
    model = loaded.model
    names = [s.name for s in m.trainable if s.role != "scale"]
    if m.trainable_mode == "lora":
        apply_lora(
            model,
            tuple(m.lora["targets"]),
            int(m.lora["rank"]),
            float(m.lora["alpha"]),
            torch.Generator().manual_seed(0),
            excluded=loaded.arch.lora_excluded,
        )
    graph = CausalLMLossGraph(model, names, loaded.arch.pass_position_ids).eval()
    values = [torch.from_numpy(np.ascontiguousarray(tensors[n])) for n in names]
    batch = [torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "labels")]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            loss, median = _time(lambda: graph(*batch, values)[0].numpy(), repeats)
    finally:
        torch.set_num_threads(before)
    label = "pytorch (fp32 reference)" if m.quantization else "pytorch"
    return {"backend": label, "loss": loss, "median_s": median}


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
) -> dict:
    """Run ``bundle`` on every available provider and on PyTorch; returns the figures::

        {"rows": [{"backend", "loss_mean", "max_abs_diff", "median_s", "speedup"}...],
         "parity_max_abs_diff": float, "notes": [...], "quantization": str | None}

    ``max_abs_diff`` is each backend's max |per-example loss - the first backend's|;
    ``parity_max_abs_diff`` the largest of them. ``echo`` prints the table (``None``: silent).
    """
    from edgezo.bundle import load_bundle

    from .handoff import load_tensors

    if batch < 1 or seq < 2 or threads < 1 or repeats < 1:
        raise EdgezoError(
            f"batch, seq, threads, repeats must be positive (seq >= 2), got {batch}, {seq}, "
            f"{threads}, {repeats}",
            "pass e.g. --batch 8 --seq 64 --threads 2",
        )
    b = load_bundle(bundle)
    m = b.manifest
    values = load_tensors(b, tensors)
    feeds = _batch(int(m.architecture["vocab_size"]), batch, seq)
    rows, notes = ort_rows(b, values, feeds, threads, repeats)
    source = str(model) if model is not None else m.architecture.get("source")
    if not torch_reference:
        notes.append("PyTorch reference not requested")
    elif not source or not Path(source).exists():
        notes.append(f"PyTorch reference skipped: source model {source!r} not found (pass --model)")
    else:
        from .deps import require_export_deps

        require_export_deps()
        rows.append(torch_row(b, source, values, feeds, threads, repeats))
    if not rows:
        raise EdgezoError(
            "no backend could run the bundle: " + "; ".join(notes), "pip install onnxruntime"
        )
    first = rows[0]["loss"].astype(np.float64)
    out_rows = []
    for r in rows:
        loss = r["loss"].astype(np.float64)
        out_rows.append(
            {
                "backend": r["backend"],
                "loss_mean": float(loss.mean()),
                "max_abs_diff": float(np.max(np.abs(loss - first))),
                "median_s": r["median_s"],
                "speedup": rows[0]["median_s"] / r["median_s"],
            }
        )
    result = {
        "bundle": str(b.path),
        "batch": [batch, seq],
        "threads": threads,
        "quantization": (m.quantization or {}).get("scheme"),
        "rows": out_rows,
        "parity_max_abs_diff": max(r["max_abs_diff"] for r in out_rows),
        "notes": notes,
    }
    if echo is not None:
        echo(format_table(result))
    return result


def format_table(result: dict) -> str:
    q = result["quantization"]
    lines = [
        f"bundle {result['bundle']} ({q or 'fp32'}), batch {result['batch'][0]}x"
        f"{result['batch'][1]}, {result['threads']} threads",
        f"{'backend':<42} {'mean loss':>10} {'max |diff|':>11} {'median s':>9} {'vs first':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['backend']:<42} {r['loss_mean']:>10.5f} {r['max_abs_diff']:>11.2e} "
            f"{r['median_s']:>9.4f} {r['speedup']:>7.2f}x"
        )
    lines.append(
        f"parity: max |loss difference| = {result['parity_max_abs_diff']:.2e}"
        + (" (includes the quantisation error vs the fp32 PyTorch model)" if q else "")
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
def main(bundle, model, tensors, batch, seq, threads, repeats, no_torch) -> None:
    """Parity and forward timings of a bundle on every provider and on PyTorch."""
    from .cli import run

    run(
        lambda: compare(
            bundle, model, batch, seq, threads, tensors, repeats, not no_torch, echo=click.echo
        )
    )


if __name__ == "__main__":
    main(prog_name="python -m exporters.compare")
