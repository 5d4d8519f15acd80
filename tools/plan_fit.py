"""`edgezo plan`'s analytic estimate against measured loss-forward peaks, side by side.

For each bundle, case (batch × sequence) and CPU-arena setting it runs, in a fresh child
process, what the plan's dry run runs (``edgezo.device.plan._probe``: load the session as a
run does, then three forwards at the shape) and prints the load peak, the steady-state
forward peak (high-water mark of the process, ``VmHWM``), and the plan's analytic estimate
(no dry run) with its error against max(load peak, forward peak). It is the data the
constants of ``edgezo/device/plan.py`` (``LOGIT_COPIES``, ``HEAD_WEIGHT_SHARE``) are fitted
to; docs/benchmarks/plan-memory.md holds its output. The children never import torch.

Usage::

    python tools/plan_fit.py --bundle A[,B] [--cases 1x64,4x64,8x64] [--arena on,off]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHILD = (
    "import json, sys; from edgezo.device.plan import _probe; "
    "print(json.dumps(_probe(sys.argv[1], sys.argv[2] == '1', int(sys.argv[3]), "
    "[json.loads(sys.argv[4])] * 3, False)))"
)


def measure(bundle: str, batch: int, seq: int, arena: bool, threads: int) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            bundle,
            "1" if arena else "0",
            str(threads),
            json.dumps([batch, seq]),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit(f"probe of {bundle} at {batch}x{seq} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from edgezo.bundle import load_bundle
    from edgezo.device.plan import MIB, estimate, precision_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="bundle folders, comma-separated")
    ap.add_argument("--cases", default="1x64,4x64,8x64", help="BATCHxSEQ, comma-separated")
    ap.add_argument("--arena", default="on,off", help="CPU arena settings: on, off or both")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    arenas = [a == "on" for a in args.arena.split(",")]
    print(
        f"{'bundle':28} {'prec':5} {'shape':>7} {'arena':5} {'loaded':>7} {'load pk':>7} "
        f"{'fwd pk':>7} {'measured':>8} {'plan':>7} {'error':>7}"
    )
    for path in args.bundle.split(","):
        b = load_bundle(path, verify=False)
        for arena in arenas:
            for batch, seq in cases:
                m = measure(path, batch, seq, arena, args.threads)
                fwd = max(m["forward_peaks"]) / MIB
                measured = max(m["load_peak"] / MIB, fwd)
                plan = estimate(
                    b,
                    device="-",
                    budget_mb=10**7,
                    batch_size=batch,
                    max_length=seq,
                    micro_batch=batch,
                    optim_buffers=0,
                    inplace=False,
                    cpu_arena=arena,
                ).peak_mb
                print(
                    f"{Path(path).name[-28:]:28} {precision_of(b):5} {batch:>3}x{seq:<3} "
                    f"{'on' if arena else 'off':5} {m['loaded'] / MIB:7,.0f} "
                    f"{m['load_peak'] / MIB:7,.0f} {fwd:7,.0f} {measured:8,.0f} {plan:7,.0f} "
                    f"{100 * (plan - measured) / measured:+6.1f}%",
                    flush=True,
                )


if __name__ == "__main__":
    main()
