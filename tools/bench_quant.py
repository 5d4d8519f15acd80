"""fp32 vs int8 vs int4 bundles of SmolLM2-135M-Instruct, measured side by side in one run.

For each bundle (LoRA r=8 on q_proj,v_proj over an fp32 / int8 / int4 base, and int4 with
trainable scales) it prints:

- forward time of the loss graph at batch 8x64, 2 threads: median over rounds, the bundles
  taking turns within each round (so a busy shared machine slows them alike), and the speed-up
  over fp32 (target: int8 >= 1.5x);
- bundle size (model files) and the quantised MatMul count;
- peak RSS of an inference-only child process (no torch) running one forward on that batch;
- held-out loss on ``edgezo/assets/notes_heldout.jsonl`` (``edgezo.evaluate.evaluate``);
- the export-time figure: relative |quantised - fp32| ONNX loss on the parity batch.

Usage::

    python tools/bench_quant.py [--out tools/out/bench_quant] [--rounds 7] [--block-size 32]

Bundles are exported once into ``--out`` and reused (``--reexport`` to rebuild). The timing
and memory children never import torch, like the runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "edgezo" / "assets" / "notes_heldout.jsonl"
VARIANTS = {  # name -> export_causal_lm arguments
    "fp32": {"mode": "lora"},
    "int8": {"mode": "lora", "quantize": "int8"},
    "int4": {"mode": "lora", "quantize": "int4"},
    "int4-scales": {"mode": "scales", "quantize": "int4"},
}

TIMING_CHILD = r"""
import json, statistics, sys, time
import numpy as np, onnxruntime as ort
from edgezo.bundle import load_bundle
from edgezo.evaluate import evaluate
paths, batch, seq, threads, rounds, heldout = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
sessions, feeds = {}, {}
for name, path in paths.items():
    b = load_bundle(path)
    vocab = int(b.manifest.architecture["vocab_size"])
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sessions[name] = ort.InferenceSession(str(b.model_path), opts,
                                          providers=["CPUExecutionProvider"])
    feeds[name] = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
                   **b.initial_trainable()}
    sessions[name].run(["loss"], feeds[name])  # warm-up
times = {n: [] for n in paths}
for _ in range(rounds):
    for name, sess in sessions.items():
        t = time.perf_counter()
        sess.run(["loss"], feeds[name])
        times[name].append(time.perf_counter() - t)
del sessions
out = {}
for name, path in paths.items():
    ev = evaluate(path, heldout, batch_size=8)
    out[name] = {"forward_s": statistics.median(times[name]), "forward_all_s": times[name],
                 "heldout_loss": ev["loss"], "heldout_examples": ev["examples"]}
print(json.dumps(out))
"""

RSS_CHILD = r"""
import json, resource, sys
import numpy as np, onnxruntime as ort
from edgezo.bundle import load_bundle
path, batch, seq, threads = json.loads(sys.argv[1])
b = load_bundle(path)
ids = np.random.default_rng(0).integers(0, int(b.manifest.architecture["vocab_size"]),
                                        size=(batch, seq), dtype=np.int64)
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
sess = ort.InferenceSession(str(b.model_path), opts, providers=["CPUExecutionProvider"])
sess.run(["loss"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
                    **b.initial_trainable()})
assert "torch" not in sys.modules
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child of the (large)
# exporting parent would report the parent's peak
try:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_mb": kb / 1024}))
"""


def export_all(out: Path, block_size: int, reexport: bool) -> dict[str, Path]:
    from exporters import export_causal_lm
    from exporters.default import DEFAULT_LORA, smollm2_gguf

    gguf = smollm2_gguf()
    paths = {}
    for name, kw in VARIANTS.items():
        path = out / name
        if reexport or not (path / "manifest.json").is_file():
            t = time.perf_counter()
            extra = {"block_size": block_size} if kw.get("quantize") == "int4" else {}
            lora = DEFAULT_LORA if kw["mode"] == "lora" else {}
            export_causal_lm(
                gguf.parent,
                path,
                gguf_file=gguf.name,
                overwrite=True,
                progress=lambda line, n=name: print(f"  [{n}] {line}", flush=True),
                **kw,
                **lora,
                **extra,
            )
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", flush=True)
        paths[name] = path
    return paths


def child(code: str, arg) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(arg)], capture_output=True, text=True, cwd=ROOT
    )
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "out" / "bench_quant")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--reexport", action="store_true")
    args = ap.parse_args()

    paths = export_all(args.out, args.block_size, args.reexport)
    str_paths = {n: str(p) for n, p in paths.items()}
    print(
        f"timing {args.rounds} rounds at {args.batch}x{args.seq}, {args.threads} threads "
        "(bundles take turns) + held-out loss ...",
        flush=True,
    )
    timing = child(
        TIMING_CHILD, [str_paths, args.batch, args.seq, args.threads, args.rounds, str(HELDOUT)]
    )
    rss = {
        n: child(RSS_CHILD, [p, args.batch, args.seq, args.threads])["peak_rss_mb"]
        for n, p in str_paths.items()
    }

    rows = []
    for name, path in paths.items():
        m = json.loads((path / "manifest.json").read_text())
        size = sum(f["bytes"] for k, f in m["files"].items() if k.startswith("model.onnx"))
        q = m.get("quantization") or {}
        rows.append(
            {
                "bundle": name,
                "forward_s": timing[name]["forward_s"],
                "speedup_vs_fp32": timing["fp32"]["forward_s"] / timing[name]["forward_s"],
                "model_mb": size / 2**20,
                "peak_rss_mb": rss[name],
                "heldout_loss": timing[name]["heldout_loss"],
                "quantized_matmuls": q.get("quantized_matmuls", 0),
                "export_rel_diff_vs_fp32": (q.get("parity_vs_fp32") or {}).get("max_rel_diff"),
                "trainable": f"{m['trainable_mode']} ({len(m['trainable'])} tensors)",
            }
        )
    print(
        f"\nSmolLM2-135M-Instruct, batch {args.batch}x{args.seq}, {args.threads} threads, "
        f"int4 block {args.block_size}, median of {args.rounds} rounds; held-out: "
        f"{timing['fp32']['heldout_examples']} examples of {HELDOUT.name}"
    )
    print(
        f"{'bundle':<12} {'fwd s':>7} {'vs fp32':>8} {'model MB':>9} {'RSS MB':>7} "
        f"{'heldout':>8} {'qMatMul':>7} {'rel diff':>9}  trainable"
    )
    for r in rows:
        rel = r["export_rel_diff_vs_fp32"]
        print(
            f"{r['bundle']:<12} {r['forward_s']:>7.3f} {r['speedup_vs_fp32']:>7.2f}x "
            f"{r['model_mb']:>9.1f} {r['peak_rss_mb']:>7.0f} {r['heldout_loss']:>8.4f} "
            f"{r['quantized_matmuls']:>7} {'-' if rel is None else f'{rel:.4f}':>9}  "
            f"{r['trainable']}"
        )
    int8 = next(r for r in rows if r["bundle"] == "int8")["speedup_vs_fp32"]
    print(
        f"target int8 >= 1.5x faster than fp32: {'met' if int8 >= 1.5 else 'NOT met'} ({int8:.2f}x)"
    )
    (args.out / "bench_quant.json").write_text(
        json.dumps(
            {"rows": rows, "timing": timing, "args": {k: str(v) for k, v in vars(args).items()}},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
