"""The bundle's forward at each precision vs PyTorch eager, side by side in one run.

    python tools/bench_forward.py --bundle fp32=B1 --bundle int8=B2 [--bundle ...]
        [--model SRC] [--batch 8 --seq 64 --threads 2 --repeats 5] [--suffix] [--profile]

Each ``--bundle LABEL=PATH`` (or just PATH: labelled by its manifest's precision) is timed on
its full ``model.onnx`` forward (and, with ``--suffix``, on its ``suffix.onnx`` fed the batch's
cached prefix rows — what a ZO step runs when the prefix cache is on); PyTorch eager runs the
source model's own forward with ``labels`` and the first bundle's LoRA under
``inference_mode`` in fp32, bf16 autocast and bf16 weights. ONNX Runtime and PyTorch each run
in their own child process, in alternating rounds (``exporters/forward_bench.py``); figures
are medians. Each model side's held-out loss on the sample held-out notes (at the bundle's
initial tensors) is printed against the first bundle's. ``--profile`` adds ONNX Runtime's share
of kernel time per op type; ``--probe`` whether the CPU provider has fp16/bf16 MatMul kernels.

``--quick`` (tests): 2x16 batch, 2 rounds, 8 held-out notes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.defaults import default_data  # noqa: E402
from exporters.forward_bench import (  # noqa: E402
    TORCH_MODES,
    Settings,
    Side,
    format_rows,
    measure,
    probe_cpu_half_kernels,
)


def sides_for(bundles: list[str], model: str | None, suffix: bool, torch: bool) -> list[Side]:
    sides = []
    first = None
    for entry in bundles:
        label, sep, path = entry.partition("=")
        if not sep:
            label, path = "", entry
        m = load_bundle(path, verify=False).manifest
        label = label or (m.precision or (m.quantization or {}).get("scheme") or "fp32")
        first = first or (path, m)
        sides.append(Side(f"edgezo {label}", "onnx", path))
        if suffix and m.stages:
            sides.append(Side(f"edgezo {label} suffix", "onnx", path, graph="suffix"))
    if torch and first:
        source = model or first[1].architecture.get("source")
        if source and Path(source).exists():
            for mode in TORCH_MODES:
                sides.append(Side(f"pytorch {mode}", "torch", first[0], mode=mode, source=source))
        else:
            print(f"note: PyTorch skipped: source model {source!r} not found (pass --model)")
    return sides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", required=True, help="[LABEL=]PATH, repeatable")
    p.add_argument("--model", default=None, help="PyTorch's source [default: the manifest's]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--heldout", default=None, help="held-out JSONL [default: the sample notes]")
    p.add_argument("--heldout-max", type=int, default=64)
    p.add_argument("--suffix", action="store_true", help="also time each bundle's suffix.onnx")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--profile", action="store_true", help="ONNX Runtime op-type shares")
    p.add_argument("--probe", action="store_true", help="CPU fp16/bf16 MatMul kernels")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--quick", action="store_true", help="a small run for tests")
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq, a.repeats, a.heldout_max = 2, 16, 2, 8
    st = Settings(
        batch=a.batch,
        seq=a.seq,
        threads=a.threads,
        heldout=a.heldout or str(default_data()[1]),
        heldout_max=a.heldout_max,
    )
    sides = sides_for(a.bundle, a.model, a.suffix, not a.no_torch)
    result = measure(sides, st, a.repeats, profile=a.profile, log=None)
    if a.probe:
        result["cpu_half_kernels"] = probe_cpu_half_kernels(a.threads)
    print(format_rows(result))
    for name, r in result.get("cpu_half_kernels", {}).items():
        print(f"CPU provider MatMul {name}: {r}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({r["label"]: r.get("median_s") for r in result["rows"]}))


if __name__ == "__main__":
    main()
