"""Scale study: the exporter and the runtime on real model configurations with random weights.

Nothing is downloaded: each model is built from its published ``config.json`` values (written
below) with random weights (``from_config``, seeded) and a small character tokenizer (the ids a
batch uses are random anyway). For each model, smallest first, and each precision (fp32, int8,
int4) it measures, every stage in a fresh child process:

- export: wall time and peak RSS (``VmHWM``) of ``exporters.export_causal_lm`` (LoRA r=8 on
  ``v_proj`` of the last four blocks, A frozen: the default recipe's layout);
- runtime, at batch 4×64 through ``tools/bench_step.py``'s own children (imported, not
  copied): forward time, ZO step time and the step ratio step / (evaluations × forward), peak
  RSS of fine-tuning vs inference;
- the frozen-prefix cache's bytes per example at 64 tokens
  (``edgezo.device.plan.prefix_row_widths``: the cached tensors but those the suffix reads only
  the shape of);
- ``edgezo plan`` (analytic) for jetson-orin-nano, jetson-orin-nx, raspberry-pi-5 and
  laptop-cpu at 4×64, and the plan against the measured fine-tuning peak on this machine.

It prints a Markdown table (date, machine, commit, command above it), which
``docs/benchmarks/scale.md`` holds.

python tools/scale_models.py [--models gemma-3-270m,qwen2.5-0.5b] [--precisions fp32,int8,int4]
    [--work /tmp/edgezo-scale] [--max-export-gb 13] [--decoder auto|on|off]

An export whose estimate (``exporters.memory.export_memory_estimate``: the fp32 weights times
the measured factor of its largest stage) passes ``--max-export-gb`` is skipped with the
reason, before its random weights are even built; an int4 or int8 one is exported streamed instead
(``exporters/stream.py``: one weight at a time) where that estimate fits. A model whose fp32
weights pass half the cap is written shard by shard (:func:`build_folder_streamed`).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (tools/bench_step.py: its measuring children)

#: published configurations (the fields that size the model), smallest first
CONFIGS: dict[str, dict] = {
    "gemma-3-270m": {
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
    },
    "llama-3.2-3b": {
        "model_type": "llama",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
    },
}
DEVICES = ("jetson-orin-nano", "jetson-orin-nx", "raspberry-pi-5", "laptop-cpu")
RECIPE = {"lora_targets": ["v_proj"], "lora_layers": "last:4", "lora_freeze_a": True}
BATCH, SEQ = 4, 64


def _config(name: str):
    from transformers import AutoConfig

    cfg = dict(CONFIGS[name])
    return AutoConfig.for_model(
        cfg.pop("model_type"), pad_token_id=0, eos_token_id=1, bos_token_id=None, **cfg
    )


def parameter_count(name: str) -> int:
    """Parameters of ``name`` (tied head once), counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(name))
    return sum(p.numel() for p in model.parameters())


def largest_parameter(name: str) -> int:
    """Values of ``name``'s largest parameter (the embedding, for these models)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(name))
    return max(p.numel() for p in model.parameters())


def build_folder(name: str, folder: Path, seed: int = 0) -> Path:
    """A Hugging Face folder of ``name``'s configuration with random weights (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def build_folder_streamed(name: str, folder: Path, seed: int = 0) -> Path:
    """:func:`build_folder` for a model whose fp32 weights do not fit in memory at once: each
    tensor is drawn from its own seed (``seed`` and a CRC of its name) and written with its
    block's other tensors to one safetensors shard (``model.safetensors.index.json`` lists
    them), so one block is held at a time. The values follow the Hugging Face initialisation
    of these families: N(0, ``initializer_range``²) for matrices, ones for norm weights, zeros
    for biases (not bitwise :func:`build_folder`'s draws)."""
    import zlib

    import torch
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM

    config = _config(name)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    std = float(getattr(config, "initializer_range", 0.02))
    shards: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for pname, p in shell.named_parameters():  # a tied head once, as save_pretrained writes it
        parts = pname.split(".")
        key = f"layers-{int(parts[2]):03d}" if parts[1:2] == ["layers"] else "rest"
        shards.setdefault(key, []).append((pname, tuple(p.shape)))
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, (_key, tensors) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        values = {}
        for pname, shape in tensors:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(pname.encode()))
            if len(shape) >= 2:
                values[pname] = torch.randn(shape, generator=gen) * std
            elif "norm" in pname:
                values[pname] = torch.ones(shape)
            else:
                values[pname] = torch.zeros(shape)
            weight_map[pname] = file
            total += values[pname].numel() * 4
        save_file(values, str(folder / file), metadata={"format": "pt"})
        del values
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\n":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)


EXPORT_CHILD = r"""
import json, sys, time
from exporters import export_causal_lm
kw = json.loads(sys.argv[1])
t = time.perf_counter()
export_causal_lm(progress=None, overwrite=True, **kw)
peak = 0.0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) / 1024
print(json.dumps({"export_s": time.perf_counter() - t, "export_peak_mb": peak}))
"""


def export(folder: Path, out: Path, precision: str, decoder: bool, stream: bool = False) -> dict:
    kw = {"model": str(folder), "out": str(out), "mode": "lora", **RECIPE}
    if precision != "fp32":
        # --precision, not --quantize: the --quantize int8 alias is int8-dynamic
        # (quantize_dynamic); int8 here is the smoothing quantiser of exporters/precision.py
        kw["precision"] = precision
    elif not decoder:
        kw["decoder"] = False
    if stream:  # the streamed int4/int8 export (exporters/stream.py): no decoding graph
        kw.update(stream=True, decoder=False)
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_CHILD, json.dumps(kw)], capture_output=True, text=True
    )
    if proc.returncode != 0:  # an EdgezoError ends with its what line, then "  fix: ..."
        lines = [ln.strip() for ln in proc.stderr.strip().splitlines() if ln.strip()]
        tail = lines[-2:] if lines and lines[-1].startswith("fix:") else lines[-1:]
        return {"error": " ".join(tail)[:400]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def runtime(bundle: Path, steps: int = 6) -> dict:
    args = argparse.Namespace(
        bundle=str(bundle),
        batch=BATCH,
        seq=SEQ,
        threads=2,
        steps=steps,
        forwards=steps,
        q=1,
        direction="rademacher",
        momentum=0.0,
        perturbation="auto",
        child=None,
    )
    infer = bench_step.run_child(args, "infer")
    ft = bench_step.run_child(args, "finetune")
    return {
        "forward_s": ft["forward_s"],
        "step_s": ft["step_s"],
        "step_ratio": ft["step_s"] / (ft["evals_per_step"] * ft["forward_s"]),
        "rss_infer_mb": infer["peak_rss_mb"],
        "rss_finetune_mb": ft["peak_rss_mb"],
        "rss_ratio": ft["peak_rss_mb"] / infer["peak_rss_mb"],
    }


def plans(bundle_path: Path) -> dict:
    from edgezo.bundle import load_bundle
    from edgezo.device.plan import make_plan, prefix_row_bytes, prefix_row_widths, run_settings
    from edgezo.device.resolve import load_profile

    b = load_bundle(bundle_path, verify=False)
    buffers, inplace = run_settings(b, None)
    widths = prefix_row_widths(b, 2)
    out = {"prefix_bytes_per_example": prefix_row_bytes(widths, [SEQ]) if widths else None}
    for dev in DEVICES:
        p = make_plan(
            b,
            load_profile(dev),
            batch_size=BATCH,
            max_length=SEQ,
            optim_buffers=buffers,
            inplace=inplace,
            dry_run=False,
        )
        out[dev] = {"peak_mb": p.peak_mb, "fits": p.fits, "budget_mb": p.budget_mb}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CONFIGS))
    p.add_argument("--precisions", default="fp32,int8,int4")
    p.add_argument("--work", default="/tmp/edgezo-scale")
    p.add_argument(
        "--max-export-gb",
        type=float,
        default=13.0,
        help="skip an export whose estimate (the fp32 weights x the measured factor of its "
        "largest stage, exporters.memory.export_memory_estimate) would pass this (peak RSS)",
    )
    p.add_argument(
        "--decoder",
        choices=("auto", "on", "off"),
        default="auto",
        help="fp32 exports: build the decoding graph (on), or only where its trace fits "
        "--max-export-gb (auto); the rows' runtime figures do not use it",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=6,
        help="ZO steps and separately timed forwards per runtime measurement (medians)",
    )
    p.add_argument(
        "--skip-export",
        action="store_true",
        help="measure the bundles already under --work (exported by an earlier run) again",
    )
    args = p.parse_args()
    work = Path(args.work)
    rows = []
    from exporters.memory import export_memory_estimate, streamed_memory_estimate

    cap = args.max_export_gb * 2**30
    for name in args.models.split(","):
        n = parameter_count(name)
        folder = None
        for precision in args.precisions.split(","):
            quant = None if precision == "fp32" else precision
            decoder = precision == "fp32" and args.decoder != "off"
            if decoder and args.decoder == "auto":
                decoder = export_memory_estimate(n, None, True)[0] <= cap
            need, stage, factor = export_memory_estimate(n, quant, decoder)
            stream = False
            if quant in ("int4", "int8"):
                streamed = streamed_memory_estimate(n, largest_parameter(name), quant)
                if need > cap and streamed <= cap:
                    stream = True  # the streamed export holds one weight at a time
                    need, stage = streamed, f"streamed {quant} export"
                    factor = round(streamed / (4 * n), 2)
            if need > cap:
                rows.append(
                    {
                        "model": name,
                        "params": n,
                        "precision": precision,
                        "skipped": f"{name} {precision} export needs ~{need / 2**30:.1f} GiB "
                        f"(its {stage}: fp32 weights x {factor:g}) > {args.max_export_gb:g} GB",
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            if folder is None:  # a model of fp32 weights past half the cap: written shard-wise
                build = build_folder_streamed if n * 4 * 2 > cap else build_folder
                folder = build(name, work / name / "hf")
            out = work / name / precision
            row = {
                "model": name,
                "params": n,
                "precision": precision,
                "decoder": decoder,
                "streamed": stream,
            }
            if args.skip_export and (out / "manifest.json").is_file():
                row.update(export_s=float("nan"), export_peak_mb=float("nan"))
            else:
                row.update(export(folder, out, precision, decoder, stream))
            if "error" not in row:
                row.update(runtime(out, args.steps))
                row.update(plans(out))
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print()
    print(
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine "
        f"{platform.machine()} {platform.node()}, 2 threads; commit {commit}; command: "
        f"python tools/scale_models.py --models {args.models} --precisions {args.precisions}"
    )
    print()
    head = [
        "model",
        "params",
        "prec",
        "export s",
        "export peak MB",
        "fwd 4x64 s",
        "ZO step s",
        "step ratio",
        "RSS infer MB",
        "RSS fine-tune MB",
        "RSS ratio",
        "prefix KiB/example",
        *(f"plan {d} MB" for d in DEVICES),
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            print(
                f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {r.get('precision', '')} | "
                f"not measured: {why} |" + " |" * (len(head) - 4)
            )
            continue
        plan_cells = [
            f"{r[d]['peak_mb']:,.0f} {'fits' if r[d]['fits'] else 'NO'} (of {r[d]['budget_mb']:,})"
            for d in DEVICES
        ]
        pre = r["prefix_bytes_per_example"]
        print(
            "| "
            + " | ".join(
                [
                    r["model"],
                    f"{r['params'] / 1e6:,.0f}M",
                    r["precision"],
                    f"{r['export_s']:.0f}",
                    f"{r['export_peak_mb']:,.0f}",
                    f"{r['forward_s']:.3f}",
                    f"{r['step_s']:.3f}",
                    f"{r['step_ratio']:.3f}",
                    f"{r['rss_infer_mb']:,.0f}",
                    f"{r['rss_finetune_mb']:,.0f}",
                    f"{r['rss_ratio']:.3f}",
                    "-" if pre is None else f"{pre / 1024:,.0f}",
                    *plan_cells,
                ]
            )
            + " |"
        )


if __name__ == "__main__":
    main()
