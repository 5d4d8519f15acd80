"""Tokens per second of ``edgezo generate`` (KV cache) vs Hugging Face ``generate`` (KV cache,
fp32) vs edgezo's recompute path (the loss graph re-run per token), side by side.

Each measurement runs in its own child process (the three alternate, ``--rounds`` times, in a
rotating order), with the same thread count for ONNX Runtime and PyTorch; a child loads its
model, warms up, then times ``--reps`` greedy generations of ``--new-tokens`` tokens from the
same prompt (prompt processing included) and reports the median. The parent prints the medians
over rounds, the ratios, and whether the three produced the same greedy tokens.

    python tools/bench_generate.py --bundle /tmp/smollm2 --new-tokens 128 --threads 2

The bundle needs a decoding graph (``edgezo export`` writes one; ``edgezo export
--decoder-only --bundle B`` adds it). Hugging Face loads the bundle's source model; a GGUF
source is dequantised once into an fp32 folder (``--hf-cache``) so each child loads quickly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The weather in Paris today is"
MODES = ("edgezo_kv", "hf_generate", "edgezo_recompute")


def child(args: argparse.Namespace) -> dict:
    if args.mode.startswith("edgezo"):
        from edgezo.bundle import load_bundle
        from edgezo.generate import TextGenerator
        from edgezo.runner import RuntimeOptions

        b = load_bundle(args.bundle, verify=False)
        gen = TextGenerator(
            b, RuntimeOptions(threads=args.threads), kv_cache=args.mode == "edgezo_kv"
        )
        gen.generate(PROMPT, 4)  # warm-up

        def once() -> list[int]:
            return gen.generate(PROMPT, args.new_tokens, max_length=4096).token_ids

    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        folder = hf_folder(args)
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.tensor([tok(PROMPT, add_special_tokens=False).input_ids])
        mask = torch.ones_like(ids)

        def once() -> list[int]:
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tok.pad_token_id or tok.eos_token_id,
                )
            new = out[0, ids.shape[1] :].tolist()
            eos = tok.eos_token_id
            return new[: new.index(eos)] if eos in new else new

        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    times, tokens = [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        tokens = once()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"mode": args.mode, "seconds": sec, "tokens": tokens, "tok_per_s": len(tokens) / sec}


def hf_folder(args: argparse.Namespace) -> Path:
    """The bundle's source model as an fp32 Hugging Face folder (a GGUF is converted once)."""
    m = json.loads((Path(args.bundle) / "manifest.json").read_text())
    src = Path(m["architecture"]["source"])
    if src.suffix != ".gguf":
        return src
    out = Path(args.hf_cache)
    if not (out / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from exporters.load import load_causal_lm

        loaded = load_causal_lm(src.parent, src.name)
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed generations per child")
    ap.add_argument("--recompute-reps", type=int, default=1)
    ap.add_argument("--hf-cache", default="/tmp/edgezo-bench-hf-fp32")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    hf_folder(args)  # convert once, outside the timed children
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        for mode in order:
            reps = args.recompute_reps if mode == "edgezo_recompute" else args.reps
            cmd = [
                sys.executable,
                __file__,
                "--bundle",
                args.bundle,
                "--new-tokens",
                str(args.new_tokens),
                "--threads",
                str(args.threads),
                "--reps",
                str(reps),
                "--hf-cache",
                args.hf_cache,
                "--mode",
                mode,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            results[mode].append(res)
            print(
                f"round {r + 1} {mode:17s} {res['tok_per_s']:7.1f} tok/s "
                f"({len(res['tokens'])} tokens in {res['seconds']:.2f} s)",
                flush=True,
            )
    med = {m: statistics.median(x["tok_per_s"] for x in v) for m, v in results.items()}
    toks = {m: v[-1]["tokens"] for m, v in results.items()}
    print(f"\n{args.new_tokens} new tokens, {args.threads} threads, medians of {args.rounds}:")
    for m in MODES:
        print(f"  {m:17s} {med[m]:7.1f} tok/s")
    print(f"  edgezo KV / HF generate      {med['edgezo_kv'] / med['hf_generate']:.2f}x")
    print(f"  edgezo KV / edgezo recompute {med['edgezo_kv'] / med['edgezo_recompute']:.2f}x")

    def agree(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    kv = toks["edgezo_kv"]
    print(
        f"  greedy tokens equal to edgezo KV: HF {agree(kv, toks['hf_generate'])}/{len(kv)}, "
        f"recompute {agree(kv, toks['edgezo_recompute'])}/{len(kv)}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"median_tok_per_s": med, "runs": results}))


if __name__ == "__main__":
    main()
