"""Seconds to generate 134.5M direction values (SmolLM2-135M's size) for each kind.

Generation streams over the direction chunk by chunk, as perturbation and update do. For
``sphere`` the one-off norm pass (first use of a key) is timed separately from a pass with the
scale cached. Wall and CPU seconds are both printed: on a shared machine, CPU seconds are the
fairer figure. Median over ``--repeat`` keys. ``cone`` (around a random float32 axis, as the
momentum would be) is timed as its two parts: the per-probe pass for ρ = ẑ·m̂ (an exact sum),
paid once per key (it includes the sphere's norm pass for that key), and a pass of values
with ρ known (a sphere chunk plus a scaled axis chunk); its per-step ‖m‖ pass is a second
exact sum of about the same cost as the ρ pass.

Usage::

    python tools/bench_directions.py [--values 134500000 --repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgezo.zo.directions import CONE, KINDS, ConeDirections, Directions


def _time(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=134_500_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(
        f"{'kind':<22}{'wall s':>10}{'cpu s':>10}   per {args.values / 1e6:.1f}M values "
        f"(median of {args.repeat})"
    )
    for kind in KINDS:
        d = Directions(seed=0, dim=args.values, kind=kind)
        rows: dict[str, list[tuple[float, float]]] = {kind: []}
        if kind == "sphere":
            rows = {"sphere (norm pass)": [], "sphere (values)": []}
        for r in range(args.repeat):
            if kind == "sphere":
                rows["sphere (norm pass)"].append(_time(lambda r=r, d=d: d.sphere_scale(r, 0)))
                rows["sphere (values)"].append(_time(lambda r=r, d=d: [0 for _ in d.chunks(r, 0)]))
            else:
                rows[kind].append(_time(lambda r=r, d=d: [0 for _ in d.chunks(r, 0)]))
        _print(rows)
    cone = ConeDirections(seed=0, dim=args.values, angle_deg=60.0)
    cone.bind(np.random.default_rng(0).standard_normal(args.values, dtype=np.float32))
    rows = {f"{CONE} (rho pass)": [], f"{CONE} (values)": []}
    for r in range(args.repeat):
        cone.begin(r)
        rows[f"{CONE} (rho pass)"].append(_time(lambda r=r: cone.coefs(r, 0)))
        rows[f"{CONE} (values)"].append(_time(lambda r=r: [0 for _ in cone.chunks(r, 0)]))
        cone.end()
    _print(rows)


def _print(rows: dict[str, list[tuple[float, float]]]) -> None:
    for name, ts in rows.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        print(f"{name:<22}{wall:>10.3f}{cpu:>10.3f}")


if __name__ == "__main__":
    main()
