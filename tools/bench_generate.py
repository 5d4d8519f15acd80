"""Tokens per second of ``edgezo generate`` (KV cache) on one or more bundles — e.g. the same
model with fp32, int8 and int4 decoding graphs — vs Hugging Face ``generate`` (KV cache, fp32)
vs edgezo's recompute path (the loss graph re-run per token), side by side.

Each measurement runs in its own child process (all methods alternate, ``--rounds`` times, in a
rotating order), with the same thread count for ONNX Runtime and PyTorch; a child loads its
model, warms up, then times ``--reps`` greedy generations of ``--new-tokens`` tokens from the
same prompt (prompt processing included) and reports the median. The parent prints the medians
over rounds, the ratios, and how many of the greedy tokens of each method agree with the
reference bundle's (the one named ``fp32``, else the first): the leading tokens two free-running
generations share, and, for each other bundle, how many of the reference's tokens are its own
top-1 choice when fed the reference's sequence (teacher-forced: one untimed child each).

    python tools/bench_generate.py --bundle /tmp/smollm2 --new-tokens 128 --threads 2
    python tools/bench_generate.py --bundle fp32=B-fp32 --bundle int8=B-int8 --bundle int4=B-int4

``--bundle`` is repeatable, ``NAME=PATH`` or a plain ``PATH`` (named after its decoder
precision). The recompute path and Hugging Face run once per round, on the reference bundle
(their model is the same for every bundle: the loss graph is fp32 whatever the decoder's
precision). A bundle needs a decoding graph (``edgezo export`` writes one; ``edgezo export
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
HF, RECOMPUTE = "hf_generate", "edgezo_recompute"


def forced(args: argparse.Namespace) -> dict:
    """How many of the reference's greedy tokens (``--tokens``, a JSON list) this bundle's
    decoding graph also picks, fed the reference's sequence token by token."""
    import numpy as np

    from edgezo.bundle import load_bundle
    from edgezo.generate import TextGenerator
    from edgezo.runner import RuntimeOptions

    ref = json.loads(Path(args.tokens).read_text())
    gen = TextGenerator(
        load_bundle(args.bundle, verify=False), RuntimeOptions(threads=args.threads)
    )
    logits = gen.decoder.start(gen.encode(PROMPT))
    same = 0
    for token in ref:
        same += int(np.argmax(logits)) == token
        logits = gen.decoder.step(token)
    return {"mode": "forced", "top1_agree": same, "of": len(ref)}


def child(args: argparse.Namespace) -> dict:
    if args.mode == "forced":
        return forced(args)
    if args.mode in ("kv", RECOMPUTE):
        from edgezo.bundle import load_bundle
        from edgezo.generate import TextGenerator
        from edgezo.runner import RuntimeOptions

        b = load_bundle(args.bundle, verify=False)
        gen = TextGenerator(b, RuntimeOptions(threads=args.threads), kv_cache=args.mode == "kv")
        gen.generate(PROMPT, 4)  # warm-up

        def once() -> list[int]:
            return gen.generate(PROMPT, args.new_tokens, max_length=4096).token_ids

    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        folder = hf_folder(args.bundle, args.hf_cache)
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


def hf_folder(bundle: str, cache: str) -> Path:
    """The bundle's source model as an fp32 Hugging Face folder (a GGUF is converted once)."""
    m = json.loads((Path(bundle) / "manifest.json").read_text())
    src = Path(m["architecture"]["source"])
    if src.suffix != ".gguf":
        return src
    out = Path(cache)
    if not (out / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from exporters.load import load_causal_lm

        loaded = load_causal_lm(src.parent, src.name)
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
    return out


def decoder_precision(bundle: str) -> str | None:
    d = json.loads((Path(bundle) / "manifest.json").read_text()).get("decoder")
    return None if d is None else d.get("precision", "fp32")


def parse_bundles(values: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its decoder precision) -> {name: path}."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or Path(v).exists():
            path = v
            name = decoder_precision(v) or Path(v).name
        if decoder_precision(path) is None:
            raise SystemExit(
                f"bundle {path} has no decoding graph: add it with "
                f"`edgezo export --decoder-only --bundle {path}`"
            )
        if name in out:
            raise SystemExit(f"two bundles are named {name!r}: pass NAME=PATH for each")
        out[name] = path
    return out


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, action="append", help="[NAME=]PATH, repeatable")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed generations per child")
    ap.add_argument("--recompute-reps", type=int, default=1)
    ap.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    ap.add_argument("--no-recompute", action="store_true", help="skip the recompute path")
    ap.add_argument("--hf-cache", default="/tmp/edgezo-bench-hf-fp32")
    ap.add_argument("--mode", choices=("kv", HF, RECOMPUTE, "forced"), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.mode:
        args.bundle = args.bundle[0]
        print(json.dumps(child(args)))
        return
    bundles = parse_bundles(args.bundle)
    ref = "fp32" if "fp32" in bundles else next(iter(bundles))
    methods: dict[str, tuple[str, str]] = {f"kv:{n}": ("kv", p) for n, p in bundles.items()}
    if not args.no_hf:
        hf_folder(bundles[ref], args.hf_cache)  # convert once, outside the timed children
        methods[HF] = (HF, bundles[ref])
    if not args.no_recompute:
        methods[RECOMPUTE] = (RECOMPUTE, bundles[ref])
    names = list(methods)
    results: dict[str, list[dict]] = {m: [] for m in names}
    width = max(len(m) for m in names)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            mode, path = methods[name]
            reps = args.recompute_reps if mode == RECOMPUTE else args.reps
            cmd = [
                sys.executable,
                __file__,
                "--bundle",
                path,
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
            results[name].append(res)
            print(
                f"round {r + 1} {name:{width}s} {res['tok_per_s']:7.1f} tok/s "
                f"({len(res['tokens'])} tokens in {res['seconds']:.2f} s)",
                flush=True,
            )
    med = {m: statistics.median(x["tok_per_s"] for x in v) for m, v in results.items()}
    toks = {m: v[-1]["tokens"] for m, v in results.items()}
    print(f"\n{args.new_tokens} new tokens, {args.threads} threads, medians of {args.rounds}:")
    for m in names:
        rounds = ", ".join(f"{x['tok_per_s']:.1f}" for x in results[m])
        print(f"  {m:{width}s} {med[m]:7.1f} tok/s  (rounds: {rounds})")
    base = f"kv:{ref}"
    for n in bundles:
        kv = f"kv:{n}"
        parts = [f"{med[kv] / med[base]:.2f}x kv:{ref}"] if kv != base else []
        parts += [f"{med[kv] / med[m]:.2f}x {m}" for m in (HF, RECOMPUTE) if m in med]
        if parts:
            print(f"  {kv:{width}s} = " + ", ".join(parts))
    ref_toks = toks[base]
    print(f"  greedy tokens agreeing with {base} (leading tokens of {len(ref_toks)}):")
    for m in names:
        if m != base:
            print(f"    {m:{width}s} {agree(ref_toks, toks[m])}/{len(ref_toks)}")
    teacher: dict[str, dict] = {}
    others = [n for n in bundles if f"kv:{n}" != base]
    if others:
        tokens_file = Path(args.json or "bench_generate.json").with_suffix(".ref_tokens.json")
        tokens_file.write_text(json.dumps(ref_toks))
        print(f"  teacher-forced top-1 agreement with {base}'s tokens:")
        for n in others:
            cmd = [sys.executable, __file__, "--bundle", bundles[n], "--mode", "forced"]
            cmd += ["--tokens", str(tokens_file), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            teacher[n] = json.loads(out.strip().splitlines()[-1])
            print(f"    kv:{n:{width - 3}s} {teacher[n]['top1_agree']}/{teacher[n]['of']}")
        tokens_file.unlink()
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"median_tok_per_s": med, "bundles": bundles, "runs": results, "forced": teacher}
            )
        )


if __name__ == "__main__":
    main()
