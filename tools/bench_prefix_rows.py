"""ZO step time and memory with the frozen-prefix rows in memory vs memory-mapped from disk, as
the personal data set grows (300, 3,000, 10,000 examples), measured side by side.

For each size the sample notes (``edgezo/assets/notes.jsonl``) are replicated, each copy
perturbed (a number appended, so no two examples are the same tokens), into a data file. Then
fresh child processes, alternating:

- ``disk``: ``prefix_cache.cache_rows(..., max_mb=0.001, folder=...)``: the first child
  computes the rows and writes ``prefix_rows.bin`` (its prefix seconds are reported); the
  later ones find the file's key and map it. Before timing, the file's pages are dropped from
  the page cache (``posix_fadvise(DONTNEED)``), so the steps read from disk, not from memory;
- ``ram``: the rows held in memory as numpy arrays (copied from that same file: the values a
  RAM cache would compute, without computing them again).

Each child times ZO steps (q=1, Rademacher, LoRA on the suffix graph) on random batches drawn
over the whole data set (collating a batch is what reads its rows), and reports the median step,
its peak RSS (``VmHWM``) and its resident anonymous / file-backed memory at the end (file-backed
pages are the OS page cache of the mapping: reclaimable, unlike anonymous memory).

python tools/bench_prefix_rows.py --bundle BUNDLE [--sizes 300,3000,10000 --steps 12 --batch 4]

``--plan-check N``: instead, ``edgezo plan``'s estimate (dry run, ``--data``) against the
measured peak RSS (``VmHWM``) of real ``finetune`` runs over N examples (+ 60 held-out),
rows in memory and rows on disk, on the laptop-cpu profile with 2 threads, with the run's
held-out batch and vocabulary subset (the config defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_data(n: int, folder: Path) -> Path:
    """``n`` examples: the sample notes, each copy after the first with `` (k)`` appended."""
    from edgezo.data import read_jsonl
    from edgezo.defaults import asset

    notes = [rec["text"] for _, rec in read_jsonl(asset("notes.jsonl"))]
    path = folder / f"notes-{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            copy, text = divmod(i, len(notes))
            f.write(json.dumps({"text": notes[text] + (f" ({copy})" if copy else "")}) + "\n")
    return path


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict:
    from edgezo import prefix_cache
    from edgezo.bundle import load_bundle
    from edgezo.data import collate, is_stand_in, read_jsonl, tokenize_for
    from edgezo.runner import LossRunner, RuntimeOptions
    from edgezo.zo.engine import EngineSettings, choose_inplace

    bundle = load_bundle(args.bundle, verify=False)
    pad = bundle.manifest.tokenizer.pad_token_id
    examples = tokenize_for(bundle.manifest, read_jsonl(args.data), bundle.tokenizer(), 64)
    opts = RuntimeOptions(threads=args.threads)
    folder = Path(args.rows)
    t = time.perf_counter()
    (rows,), calls = prefix_cache.cache_rows(
        bundle, [examples], 16, pad, opts, max_mb=0.001, folder=folder
    )
    prefix_s = time.perf_counter() - t
    if args.child == "ram":  # the same rows, held in memory
        rows = [
            type(e)(
                e.input_ids,
                e.labels,
                e.line,
                e.target,
                {k: v if is_stand_in(v) else np.array(v) for k, v in e.features.items()},
            )
            for e in rows
        ]
        assert not prefix_cache.on_disk([rows])
    else:
        assert prefix_cache.on_disk([rows])
        fd = os.open(folder / prefix_cache.ROWS_FILE, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: the steps read the disk
        os.close(fd)
    settings = EngineSettings(
        seed=0,
        direction="rademacher",
        q=1,
        momentum=0.0,
        inplace=choose_inplace("auto", bundle.manifest.trainable_size * 4),
    )
    engine = bundle.engine(settings)
    runner = LossRunner(
        prefix_cache.suffix_path(bundle), engine.params, prefix_cache.suffix_inputs(bundle), opts
    )
    rng = np.random.default_rng(args.seed)
    steps = []
    for s in range(args.steps + 1):
        t = time.perf_counter()
        picked = [rows[i] for i in rng.choice(len(rows), size=args.batch, replace=False)]
        batch = collate(picked, pad)
        engine.step(s, 1e-6, 1e-3, lambda b=batch: runner.mean_loss(b))
        if s:  # the first is a warm-up
            steps.append(time.perf_counter() - t)
    return {
        "role": args.child,
        "examples": len(rows),
        "prefix_calls": calls,
        "prefix_s": prefix_s,
        "step_s": statistics.median(steps),
        "peak_rss_mb": _status("VmHWM"),
        "rss_anon_mb": _status("RssAnon"),
        "rss_file_mb": _status("RssFile"),
        "rows_mb": (folder / prefix_cache.ROWS_FILE).stat().st_size / 2**20,
    }


def run_child(args: argparse.Namespace, role: str, data: Path, rows: Path, seed: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        role,
        "--bundle",
        args.bundle,
        "--data",
        str(data),
        "--rows",
        str(rows),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
        "--seed",
        str(seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {role} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PLAN_CHILD = r"""
import json, resource, sys
from edgezo.config import FinetuneConfig
from edgezo.train import finetune
s = finetune(FinetuneConfig(**json.loads(sys.argv[1])), log=lambda *a, **k: None, progress=False)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak = int(hwm[0].split()[1]) / 1024 if hwm else rss / 1024
print(json.dumps({"peak_mb": peak, "prefix_calls": s.prefix_forward_calls}))
"""


def plan_check(args: argparse.Namespace, n: int) -> None:
    import yaml

    from edgezo.bundle import load_bundle
    from edgezo.data import read_jsonl, tokenize_for
    from edgezo.device.plan import (
        make_plan,
        recipe_of,
        run_settings,
        vocab_rows_for,
    )
    from edgezo.device.resolve import load_profile

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, held = make_data(n, work), make_data(60, work)
    bundle = load_bundle(args.bundle)
    profile = load_profile("laptop-cpu").with_overrides(
        {"threads": args.threads, "eval_budget": None, "time_budget_s": None}
    )
    prof_file = work / "profile.yaml"
    prof_file.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
    sets = [
        tokenize_for(bundle.manifest, read_jsonl(f), bundle.tokenizer(), 64) for f in (train, held)
    ]
    lengths = [len(e.input_ids) for examples in sets for e in examples]
    eval_batch = recipe_of(bundle)["eval_batch_size"]
    vocab_rows = vocab_rows_for(bundle, train=sets[0])  # the config's defaults
    buffers, inplace = run_settings(bundle, None)
    print(
        f"bundle {args.bundle}: {n} + 60 examples, {sum(lengths):,} tokens; laptop-cpu, "
        f"{args.threads} threads, batch {args.batch}x64, 3 ZO steps"
    )
    for cap, where in ((1e6, "memory"), (1.0, "disk")):
        plan = make_plan(
            bundle,
            profile,
            batch_size=args.batch,
            max_length=64,
            optim_buffers=buffers,
            inplace=inplace,
            dry_run=True,
            data_lengths=lengths,
            cache_prefix_mb=cap,
            eval_batch=eval_batch,
            vocab_rows=vocab_rows,
        )
        kw = dict(
            bundle=args.bundle,
            data=str(train),
            eval_data=str(held),
            out=str(work / f"plan-run-{n}-{where}"),
            steps=3,
            batch_size=args.batch,
            max_length=64,
            eval_every=0,
            device=str(prof_file),
            cache_prefix_mb=cap,
            lr=1e-4,
            mu=1e-3,
        )
        import shutil

        shutil.rmtree(kw["out"], ignore_errors=True)
        r = subprocess.run(
            [sys.executable, "-c", PLAN_CHILD, json.dumps(kw)], capture_output=True, text=True
        )
        if r.returncode != 0:
            sys.exit(f"run failed:\n{r.stderr[-2000:]}")
        measured = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
        print(
            f"  rows in {where:6}: rows {plan.prefix_rows_mb:,.0f} MiB, plan {plan.peak_mb:,.0f} "
            f"MiB, measured {measured:,.0f} MiB, error {(plan.peak_mb - measured) / measured:+.1%}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--sizes", default="300,3000,10000")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="/tmp/edgezo-prefix-rows")
    p.add_argument("--plan-check", type=int, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.plan_check:
        plan_check(args, args.plan_check)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = []
    for n in (int(x) for x in args.sizes.split(",")):
        data = make_data(n, work)
        rows = work / f"rows-{n}"
        built = run_child(args, "disk", data, rows, 0)  # computes and writes the file
        got: dict[str, list[dict]] = {"disk": [], "ram": []}
        for r in range(args.rounds):
            for role in ("ram", "disk"):
                got[role].append(run_child(args, role, data, rows, r + 1))
        med = {
            role: {
                k: statistics.median(x[k] for x in v)
                for k in ("step_s", "peak_rss_mb", "rss_anon_mb", "rss_file_mb")
            }
            for role, v in got.items()
        }
        row = {
            "examples": n,
            "rows_mb": built["rows_mb"],
            "prefix_s": built["prefix_s"],
            "step_ram_s": med["ram"]["step_s"],
            "step_disk_s": med["disk"]["step_s"],
            "step_ratio": med["disk"]["step_s"] / med["ram"]["step_s"],
            "peak_rss_ram_mb": med["ram"]["peak_rss_mb"],
            "peak_rss_disk_mb": med["disk"]["peak_rss_mb"],
            "anon_disk_mb": med["disk"]["rss_anon_mb"],
            "file_disk_mb": med["disk"]["rss_file_mb"],
            "anon_ram_mb": med["ram"]["rss_anon_mb"],
        }
        table.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(
        "| examples | rows (MiB) | prefix once (s) | step, rows in RAM (s) "
        "| step, rows on disk (s) | disk/RAM | peak RSS RAM (MB) | peak RSS disk (MB) "
        "| disk: anon / file-backed at end (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['examples']:,} | {r['rows_mb']:,.0f} | {r['prefix_s']:.0f} "
            f"| {r['step_ram_s']:.3f} | {r['step_disk_s']:.3f} | {r['step_ratio']:.2f} "
            f"| {r['peak_rss_ram_mb']:,.0f} | {r['peak_rss_disk_mb']:,.0f} "
            f"| {r['anon_disk_mb']:,.0f} / {r['file_disk_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
