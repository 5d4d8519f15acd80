"""`edgezo plan`'s memory estimate against the measured peak RSS of real fine-tuning runs.

For each case (batch × sequence length) it prints, side by side:

- plan's estimate calibrated by its dry run (what ``edgezo plan`` prints) and the analytic
  estimate without the dry run (what ``finetune --device`` checks before a run);
- the peak RSS (``ru_maxrss``) of a fresh child process running a few real ZO steps with
  ``edgezo.train.finetune`` on the same bundle, profile, batch and sequence length; every
  example is longer than the sequence length, so every batch has the planned shape, and
  held-out batches are of the same size;
- the estimate's error relative to the measurement (target: within ±20%).

Usage::

    python tools/bench_plan.py --bundle /tmp/smol-lora[,/tmp/smol-lora-int4] \
        --cases 4x64,16x64,16x128

The dry run measures at most ``edgezo.device.plan.CALIBRATION_TOKENS`` (1024) tokens: 16×128 is
estimated from a forward at 8×128, scaled. Without an int4 bundle in --bundle the int4 rows
say so instead of inventing numbers. The children never import torch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from edgezo.config import FinetuneConfig
from edgezo.train import finetune
kw = json.loads(sys.argv[1])
s = finetune(FinetuneConfig(**kw), log=lambda *a, **k: None, progress=False)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "steps": s.steps, "seconds": s.seconds}))
"""


def long_texts(n: int, words: int = 160) -> list[dict[str, str]]:
    from edgezo.defaults import default_data

    notes = [json.loads(x)["text"] for x in default_data()[0].read_text().splitlines() if x]
    pool = " ".join(notes).split()
    out = []
    for i in range(n):
        start = (i * 37) % max(1, len(pool) - words)
        out.append({"text": " ".join(pool[start : start + words])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="/tmp/smol-lora", help="bundle folders, comma-separated")
    ap.add_argument("--device", default="laptop-cpu")
    ap.add_argument("--cases", default="4x64,16x64,16x128", help="BATCHxSEQ, comma-separated")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgezo.bundle import load_bundle
    from edgezo.data import read_jsonl, tokenize_for
    from edgezo.device.plan import (
        make_plan,
        precision_of,
        run_settings,
        vocab_rows_for,
    )
    from edgezo.device.resolve import load_profile

    bundles = [load_bundle(b) for b in args.bundle.split(",")]
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    profile = load_profile(args.device).with_overrides(
        {
            "threads": args.threads,
            "max_batch_size": max(b for b, _ in cases),
            "max_seq_len": max(max(t for _, t in cases), load_profile(args.device).max_seq_len),
            "eval_budget": None,
            "time_budget_s": None,
        }
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prof_file = tmp / "profile.yaml"
        import yaml

        prof_file.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
        for bundle, (b, seq) in ((bn, c) for bn in bundles for c in cases):
            buffers, inplace = run_settings(bundle, None)
            train, held = tmp / f"train{b}x{seq}.jsonl", tmp / f"held{b}x{seq}.jsonl"
            words = 3 * seq
            train.write_text("".join(json.dumps(r) + "\n" for r in long_texts(4 * b, words)))
            held.write_text("".join(json.dumps(r) + "\n" for r in long_texts(b, words)))
            kw = dict(
                bundle=str(bundle.path),
                data=str(train),
                eval_data=str(held),
                out=str(tmp / f"run{len(rows)}"),
                steps=args.steps,
                batch_size=b,
                eval_batch_size=b,
                max_length=seq,
                eval_every=0,
                device=str(prof_file),
            )
            examples = tokenize_for(bundle.manifest, read_jsonl(train), bundle.tokenizer(), seq)
            calibrated = make_plan(  # a bundle with a prefix split: the cached run's phases
                bundle,
                profile,
                batch_size=b,
                max_length=seq,
                optim_buffers=buffers,
                inplace=inplace,
                dry_run=True,
                eval_batch=b,
                vocab_rows=vocab_rows_for(bundle, train=examples),
            )
            analytic = make_plan(
                bundle,
                profile,
                batch_size=b,
                max_length=seq,
                optim_buffers=buffers,
                inplace=inplace,
                dry_run=False,
            )
            r = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True
            )
            if r.returncode != 0:
                sys.exit(f"run at {b}x{seq} failed:\n{r.stderr[-2000:]}")
            measured = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
            rows.append((precision_of(bundle), f"{b}x{seq}", calibrated, analytic, measured))

    names = ", ".join(f"{b.path} ({b.manifest.trainable_mode}, {precision_of(b)})" for b in bundles)
    print(
        f"bundles {names}; profile {profile.name} "
        f"({args.threads} threads, arena {'on' if profile.cpu_arena else 'off'}), "
        f"{args.steps} ZO steps per run"
    )
    print(
        f"{'precision':9}  {'shape':>6}  {'plan (dry run)':>14}  {'analytic':>9}  "
        f"{'measured':>9}  {'error':>6}  {'analytic err':>12}"
    )
    for prec, shape, cal, ana, meas in rows:
        print(
            f"{prec:9}  {shape:>6}  {cal.peak_mb:10,.0f} MiB  {ana.peak_mb:5,.0f} MiB  "
            f"{meas:5,.0f} MiB  {(cal.peak_mb - meas) / meas:+6.1%}  "
            f"{(ana.peak_mb - meas) / meas:+12.1%}"
        )
    for b, seq in [] if any(r[0] == "int4" for r in rows) else cases:
        print(
            f"{'int4':9}  {f'{b}x{seq}':>6}  {'-':>14}  {'-':>9}  {'-':>9}  no int4 bundle "
            "exists yet (int4 export is a separate issue); not measured"
        )


if __name__ == "__main__":
    main()
