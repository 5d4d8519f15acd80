"""Side-by-side cost of one ZO evaluation on two bundles' frozen-prefix suffixes.

Each bundle's prefix rows are computed once for the same examples; the two suffix sessions
then evaluate the same batches in alternating rounds, in one process, so the ratio is measured
under the same machine load. It prints the median milliseconds per batch of each, their ratio,
and the largest difference between the two bundles' per-example losses (bundles exported with
the same seed and settings should agree).

python tools/bench_suffix.py BUNDLE_A BUNDLE_B [--batch-size 4] [--rounds 6]
(e.g. the default bundle exported before and after a change of the loss graph)
"""

from __future__ import annotations

import time

import click
import numpy as np

from edgezo import prefix_cache
from edgezo.bundle import load_bundle
from edgezo.data import collate, read_jsonl, tokenize_for
from edgezo.defaults import asset
from edgezo.errors import EdgezoError
from edgezo.runner import LossRunner, RuntimeOptions
from edgezo.zo.params import FlatParams


def suffix_runner(path: str, data: str, batch_size: int, batches: int, threads: int):
    """(runner, its batches) for a bundle whose suffix exists."""
    bundle = load_bundle(path)
    if not prefix_cache.available(bundle):
        raise EdgezoError(
            f"bundle {path} has no frozen-prefix suffix",
            "export it with --lora-layers last:N (or a head-mode classifier)",
        )
    pad = bundle.manifest.tokenizer.pad_token_id
    examples = tokenize_for(bundle.manifest, read_jsonl(data), bundle.tokenizer(), 64)[
        : batch_size * batches
    ]
    opts = RuntimeOptions(threads=threads)
    (rows,), _ = prefix_cache.cache_rows(bundle, [examples], 16, pad, opts)
    params = FlatParams(list(bundle.manifest.trainable))
    params.load(bundle.initial_trainable())
    runner = LossRunner(
        prefix_cache.suffix_path(bundle), params, prefix_cache.suffix_inputs(bundle), opts
    )
    return runner, [
        collate(rows[i * batch_size : (i + 1) * batch_size], pad)
        for i in range(len(rows) // batch_size)
    ]


@click.command()
@click.argument("bundle_a")
@click.argument("bundle_b")
@click.option("--data", default=str(asset("notes.jsonl")), show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--batches", default=8, show_default=True)
@click.option(
    "--rounds",
    default=6,
    show_default=True,
    help="alternating rounds; the first is a warm-up and not counted",
)
@click.option("--threads", default=2, show_default=True)
def main(bundle_a, bundle_b, data, batch_size, batches, rounds, threads):
    runs = [
        (p, *suffix_runner(p, data, batch_size, batches, threads)) for p in (bundle_a, bundle_b)
    ]
    times: dict[str, list[float]] = {p: [] for p, _, _ in runs}
    losses: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for path, runner, batch_list in runs:
            t = time.perf_counter()
            out = [runner.losses(b) for b in batch_list]
            times[path].append((time.perf_counter() - t) / len(batch_list) * 1000)
            losses[path] = np.concatenate(out)
    med = {p: float(np.median(t[1:] if len(t) > 1 else t)) for p, t in times.items()}
    for p in (bundle_a, bundle_b):
        click.echo(
            f"{p}: {med[p]:.1f} ms per batch of {batch_size} (median of "
            f"{max(rounds - 1, 1)} rounds × {len(runs[0][2])} batches)"
        )
    click.echo(
        f"ratio A/B: {med[bundle_a] / med[bundle_b]:.2f}; max |loss A - loss B| = "
        f"{float(np.abs(losses[bundle_a] - losses[bundle_b]).max()):.2e}"
    )


if __name__ == "__main__":
    main()
