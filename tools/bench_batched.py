"""Is one grouped ONNX Runtime call over G LoRA parameter sets faster than G separate calls?

Issue #4 item 4. Exports a causal LM's LoRA loss graph twice from the same loaded weights
(:func:`exporters.batched.export_pair`): the normal graph a bundle holds, and the grouped
graph (batch tiled G times, LoRA tensors with a leading group dim, batched MatMul on the LoRA
path). For each G it first checks that the grouped losses equal the G separate calls' losses
(``--atol``), then times the two, interleaved in one process (ABBA order, ``--rounds`` times:
the machine is shared and noisy, so both sides see the same noise), and reports medians per
loss evaluation (one evaluation = one parameter set on the whole batch) and the ratio.

Usage::

    python tools/bench_batched.py                      # SmolLM2-135M (GGUF), G 2 4, 8x64
    python tools/bench_batched.py --tiny               # a small random Llama, same protocol
    python tools/bench_batched.py --model DIR [--gguf FILE] --groups 2 4 8 --threads 2

Exports go to ``--out`` (default tools/out/bench_batched/<model>), rewritten each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
    tie_word_embeddings=True,
)


def tiny_llama(folder: Path) -> Path:
    """A small random Llama (``TINY``) with a word-level tokenizer, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, TINY["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=None, **TINY)
        )
    model.save_pretrained(folder)
    return folder


def session(path: Path, threads: int):
    """An ONNX Runtime CPU session set up as edgezo's runner sets it up."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def perturbed_sets(
    init: dict[str, np.ndarray], groups: int, rng: np.random.Generator, mu: float = 1e-2
) -> list[dict[str, np.ndarray]]:
    """G parameter sets: a shared trained-like point (B ~ N(0, 0.02²)) ± μ·Rademacher."""
    base = {
        k: (v if ".lora_A." in k else rng.normal(0, 0.02, v.shape)).astype(np.float32)
        for k, v in init.items()
    }
    return [
        {k: (v + mu * rng.choice([-1.0, 1.0], v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(groups)
    ]


def bench(normal, grouped, batch, sets, rounds: int) -> dict[str, float]:
    """Seconds per evaluation: G separate calls vs one grouped call, interleaved ABBA."""
    from exporters.batched import grouped_feeds

    feeds = grouped_feeds(batch, sets)
    separate_feeds = [{**batch, **s} for s in sets]

    def separate() -> float:
        t = time.perf_counter()
        for f in separate_feeds:
            normal.run(["loss"], f)
        return (time.perf_counter() - t) / len(sets)

    def together() -> float:
        t = time.perf_counter()
        grouped.run(["loss"], feeds)
        return (time.perf_counter() - t) / len(sets)

    separate(), together()  # warm-up: arena growth, first-run allocations
    a, b = [], []
    for r in range(rounds):
        order = (separate, together) if r % 2 == 0 else (together, separate)
        for fn in order:
            (a if fn is separate else b).append(fn())
    med_a, med_b = statistics.median(a), statistics.median(b)
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "separate_s": med_a,
        "grouped_s": med_b,
        "speedup": med_a / med_b,
        "speedup_per_round_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or GGUF folder (default SmolLM2)")
    ap.add_argument("--gguf", default=None, help="GGUF file name inside --model")
    ap.add_argument("--tiny", action="store_true", help="a small random Llama instead")
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from exporters.batched import check_grouped_parity, export_pair

    if args.tiny:
        name = "tiny-llama"
    elif args.model:
        name = Path(args.model).name
    else:
        name = "smollm2-135m"
    out = Path(args.out or f"tools/out/bench_batched/{name}")
    out.mkdir(parents=True, exist_ok=True)
    model, gguf = args.model, args.gguf
    if args.tiny:
        model = tiny_llama(out / "hf")
    elif model is None:
        from exporters.default import smollm2_gguf

        path = smollm2_gguf()
        model, gguf = path.parent, path.name
    t = time.perf_counter()
    normal_path, grouped_path, specs, init, info = export_pair(Path(model), out, gguf)
    print(
        f"exported normal + grouped graphs of {name} ({len(specs)} LoRA tensors, "
        f"{sum(v.size for v in init.values()):,} values) in {time.perf_counter() - t:.0f} s"
    )

    normal, grouped = session(normal_path, args.threads), session(grouped_path, args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, info["vocab_size"], (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    rows = []
    print(
        f"{name}: batch {args.batch}x{args.seq}, {args.threads} threads, {args.rounds} "
        f"interleaved rounds; seconds per evaluation (one parameter set, whole batch)"
    )
    print(
        f"{'G':>3} {'max|diff|':>10} {'separate':>10} {'grouped':>10} {'speedup':>8} "
        f"{'per-round min..max':>20}"
    )
    for g in args.groups:
        sets = perturbed_sets(init, g, rng)
        diff = check_grouped_parity(grouped, normal, batch, sets, args.atol)
        res = {
            "model": name,
            "groups": g,
            "batch": args.batch,
            "seq": args.seq,
            "threads": args.threads,
            "max_abs_diff": diff,
            **bench(normal, grouped, batch, sets, args.rounds),
        }
        rows.append(res)
        print(
            f"{g:>3} {diff:>10.2e} {res['separate_s']:>10.4f} {res['grouped_s']:>10.4f} "
            f"{res['speedup']:>8.3f} {res['speedup_min']:>9.3f}..{res['speedup_max']:.3f}"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
