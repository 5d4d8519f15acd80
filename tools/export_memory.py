"""Per-stage peak memory of one export: the high-water mark of resident memory (``VmHWM``)
between two of the exporter's progress lines, reset after each (``/proc/self/clear_refs``).

Run it as its own process (the peak is the process's): ::

    python tools/export_memory.py --model HF_DIR --out BUNDLE [--quantize int4]
        [--trace params|inputs] [--no-decoder] [--stream] [--json stages.json]

``--trace params`` traces the frozen weights as parameters (how every bundle was exported
before ``exporters/weight_attach.py``), ``inputs`` (default) as graph inputs attached
afterwards. The LoRA layout is the default recipe's (LoRA-FA r=8 on ``v_proj`` of the last
four blocks), as ``tools/scale_models.py`` exports it.
"""

from __future__ import annotations

import argparse
import functools
import json
import time


def _hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quantize", default=None)
    p.add_argument("--precision", default=None, help="fp32, int8 (smoothing), int8-dynamic or int4")
    p.add_argument("--trace", choices=("params", "inputs"), default="inputs")
    p.add_argument("--no-decoder", action="store_true")
    p.add_argument(
        "--stream",
        action="store_true",
        help="the streamed export (exporters/stream.py): int4 unless --precision int8",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import exporters.export as export_module
    from exporters import export_causal_lm

    if args.trace == "params":
        export_module.export_loss_graph = functools.partial(
            export_module.export_loss_graph, frozen_as_inputs=False
        )
    stages = []
    t0 = last = time.perf_counter()

    def progress(line: str) -> None:
        nonlocal last
        now = time.perf_counter()
        stages.append({"until": line[:90], "peak_mb": round(_hwm_mb()), "s": round(now - last, 1)})
        print(f"{stages[-1]['peak_mb']:>7,} MiB {now - last:7.1f} s  | {line}", flush=True)
        last = now
        _reset()

    _reset()
    kw = {"lora_targets": ["v_proj"], "lora_layers": "last:4", "lora_freeze_a": True}
    if args.no_decoder or args.stream:
        kw["decoder"] = False
    if args.stream:
        kw["stream"] = True
        if args.precision != "int8":
            args.quantize, args.precision = "int4", None
    if args.precision is not None:
        kw["precision"] = args.precision
    export_causal_lm(
        args.model,
        args.out,
        mode="lora",
        quantize=args.quantize,
        overwrite=True,
        progress=progress,
        **kw,
    )
    progress("(end)")
    total = max(s["peak_mb"] for s in stages)
    print(f"export peak {total:,} MiB in {time.perf_counter() - t0:.0f} s (trace: {args.trace})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trace": args.trace, "peak_mb": total, "stages": stages}, f, indent=1)


if __name__ == "__main__":
    main()
