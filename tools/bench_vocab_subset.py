"""What a vocabulary-subset training loss saves, and how far it turns the step.

For one bundle with a vocabulary-subset suffix (``stages.vocab``), on the same batches of the
training data, in alternating rounds in one process:

- **ms per batch** of a training-loss evaluation over the whole vocabulary and over the subset
  ``vocab_subset=N`` would choose (every token of the training data plus the N lowest ids),
  for each N given (plus ``--sample`` seeded stand-ins for the other tokens, as
  ``vocab_sample``), and the ratio;
- **directional agreement**: for random unit directions z of the trainable values, the
  finite-difference slopes (f(θ+μz) − f(θ))/μ of the whole and the subset loss on one batch;
  Σ s_w s_s / √(Σ s_w² Σ s_s²) over the directions estimates the cosine between the two
  losses' gradients (the quantity a ZO step follows), forward passes only;
- the mean gap between the two losses (the subset's is lower: a log-sum-exp over fewer tokens).

python tools/bench_vocab_subset.py [--bundle DIR] [--subsets 0,4096,8192,16384] [--sample 2048]
    [--batch-size 4] [--batches 6] [--rounds 5] [--directions 24] [--mu 1e-3] [--quick]
"""

from __future__ import annotations

import time

import click
import numpy as np

from edgezo import prefix_cache, vocab_subset
from edgezo.bundle import load_bundle
from edgezo.data import collate, read_jsonl, tokenize_for
from edgezo.defaults import asset, default_bundle_dir
from edgezo.errors import EdgezoError
from edgezo.runner import LossRunner, RuntimeOptions
from edgezo.zo.params import FlatParams


def measure(
    bundle_dir, data, subsets, batch_size, batches, rounds, directions, mu, threads, sample=0
):
    bundle = load_bundle(bundle_dir)
    if vocab_subset.entry_of(bundle) is None:
        raise EdgezoError(
            f"bundle {bundle_dir} has no vocabulary-subset suffix (stages.vocab)",
            "re-export it with this edgezo (a causal LM with --lora-layers last:N)",
        )
    m = bundle.manifest
    pad = m.tokenizer.pad_token_id
    train = tokenize_for(m, read_jsonl(data), bundle.tokenizer(), 64)
    used = train[: batch_size * batches]
    opts = RuntimeOptions(threads=threads)
    (rows,), _ = prefix_cache.cache_rows(bundle, [used], 16, pad, opts)
    feed = [collate(rows[i * batch_size : (i + 1) * batch_size], pad) for i in range(batches)]
    params = FlatParams(list(m.trainable))
    params.load(bundle.initial_trainable())
    params.sync_feed()
    suffix = prefix_cache.suffix_path(bundle)
    inputs = prefix_cache.suffix_inputs(bundle)
    whole = LossRunner(suffix, params, inputs, opts)
    runners = {}
    for n in subsets:
        # N = 0 here: the training data's tokens alone (the runtime's vocab_subset=0 is "off")
        ids = vocab_subset.choose(train, n, m.vocab_size)
        if len(ids) >= m.vocab_size:
            raise EdgezoError(f"vocab_subset={n} covers the whole vocabulary", "give smaller N")
        rest = vocab_subset.sample_rest(ids, m.vocab_size, sample, 0) if sample else None
        entry = vocab_subset.entry_of(bundle)
        s = vocab_subset.VocabSubset.of(bundle.path, entry, ids, m.vocab_size, rest)
        r = LossRunner(suffix, params, inputs, opts)
        r.use_vocab_subset(s)
        runners[n] = (r, len(s.ids))
    times = {"whole": [], **{n: [] for n in subsets}}
    gaps = {n: [] for n in subsets}
    for _ in range(rounds):
        for b in feed:
            t = time.perf_counter()
            w = whole.losses(b)
            times["whole"].append(time.perf_counter() - t)
            for n, (r, _) in runners.items():
                t = time.perf_counter()
                x = r.losses(b)
                times[n].append(time.perf_counter() - t)
                gaps[n].append(float(np.mean(w - x)))
    # directional agreement on the first batch
    rng = np.random.default_rng(0)
    theta = params.master.copy()
    base = {"whole": whole.mean_loss(feed[0])}
    base.update({n: r.mean_loss(feed[0]) for n, (r, _) in runners.items()})
    slopes = {k: [] for k in base}
    for _ in range(directions):
        z = rng.standard_normal(theta.size).astype(np.float32)
        z /= np.linalg.norm(z)
        params.master[:] = theta + mu * z
        params.sync_feed()
        slopes["whole"].append((whole.mean_loss(feed[0]) - base["whole"]) / mu)
        for n, (r, _) in runners.items():
            slopes[n].append((r.mean_loss(feed[0]) - base[n]) / mu)
    params.master[:] = theta
    params.sync_feed()
    sw = np.array(slopes["whole"])
    out = {
        "whole_ms": 1e3 * float(np.median(times["whole"])),
        "vocab": m.vocab_size,
        "subsets": [],
    }
    for n, (_, size) in runners.items():
        ss = np.array(slopes[n])
        ms = 1e3 * float(np.median(times[n]))
        out["subsets"].append(
            {
                "N": n,
                "tokens": size,
                "ms": ms,
                "speedup": out["whole_ms"] / ms,
                "agreement": float(sw @ ss / np.sqrt((sw @ sw) * (ss @ ss))),
                "loss_gap": float(np.mean(gaps[n])),
            }
        )
    return out


@click.command()
@click.option("--bundle", default=None, help="default: the default bundle")
@click.option("--data", default=str(asset("notes.jsonl")), show_default=True)
@click.option("--subsets", default="0,4096,8192,16384", show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--batches", default=6, show_default=True)
@click.option("--rounds", default=5, show_default=True)
@click.option("--directions", default=24, show_default=True)
@click.option("--mu", default=1e-3, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option(
    "--sample",
    default=2048,
    show_default=True,
    help="stand-ins for the other tokens (vocab_sample)",
)
@click.option("--quick", is_flag=True, help="2 batches, 2 rounds, 6 directions (for tests)")
def main(
    bundle, data, subsets, batch_size, batches, rounds, directions, mu, threads, sample, quick
):
    if quick:
        batches, rounds, directions = 2, 2, 6
    ns = [int(x) for x in subsets.split(",") if x.strip()]
    r = measure(
        bundle or default_bundle_dir(),
        data,
        ns,
        batch_size,
        batches,
        rounds,
        directions,
        mu,
        threads,
        sample,
    )
    print(
        f"whole vocabulary ({r['vocab']:,} tokens): {r['whole_ms']:.1f} ms "
        f"per batch of {batch_size}"
    )
    print("| vocab_subset N | head rows | ms per batch | speed-up | agreement | loss gap |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in r["subsets"]:
        print(
            f"| {s['N']:,} | {s['tokens']:,} | {s['ms']:.1f} | {s['speedup']:.2f}x | "
            f"{s['agreement']:.4f} | {s['loss_gap']:.3f} |"
        )


if __name__ == "__main__":
    main()
