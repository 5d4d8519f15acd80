"""``optimizer=hizoo`` and ``mu_scale`` against plain ZO-SGD on a quadratic, side by side.

f(θ) = ½ Σ_T λ_T ‖θ_T − t_T‖², two tensors of ``--size`` values each with curvatures
``--lams`` (default 1 and 0.01: a norm next to an adapter, in caricature), θ₀ = 0; ``--steps``
steps at each ``--lr``, median of ``--seeds`` seeds, μ = 1e-3, momentum 0.9, sphere directions.
Every method costs 5 forwards a step: ``sgd`` (one-sided, q = 4; the default recipe),
``sgd+mirrored`` (central with a base, q = 2: the estimator alone), ``hizoo`` (the same
estimator, pooled per tensor; the baseline estimate with its 20-update warm-up),
``hizoo-moment`` (the first version's estimate: ``hizoo_estimate=moment``, no warm-up) and
``mu_scale`` (one-sided q = 4 with the stiff tensor's factor set to √(λ_soft/λ_stiff), the
curvature ratio's square root: the factor a person who knew the curvatures would set).
Prints final losses (inf: diverged).

Usage::

    python tools/hizoo_quadratic.py [--size 16 --steps 300 --lr 0.003 0.01 0.03 0.1]
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np

from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.params import TensorSpec


def final_loss(method: str, size: int, lams, steps: int, lr: float, seed: int) -> float:
    specs = [TensorSpec("stiff", (size,)), TensorSpec("soft", (size,))]
    lam = np.repeat(np.asarray(lams, dtype=np.float64), size)
    target = np.random.default_rng(123).normal(size=2 * size)
    kw = {
        "sgd": {"estimator": "onesided", "q": 4},
        "sgd+mirrored": {"estimator": "mirrored", "q": 2},
        "hizoo": {"estimator": "mirrored", "q": 2, "optimizer": "hizoo"},
        "hizoo-moment": {
            "estimator": "mirrored",
            "q": 2,
            "optimizer": "hizoo",
            "hizoo_estimate": "moment",
            "hizoo_warmup": 0,
        },
        "mu_scale": {
            "estimator": "onesided",
            "q": 4,
            "mu_scale": f"stiff={math.sqrt(lams[1] / lams[0]):g}",
        },
    }[method]
    st = EngineSettings(seed=seed, direction="sphere", momentum=0.9, **kw)
    eng = ZOEngine(specs, lambda: {s.name: np.zeros(size, np.float32) for s in specs}, st)
    feed = eng.params.feed

    def loss() -> float:
        x = feed.astype(np.float64) - target
        return float(0.5 * np.sum(lam * x * x))

    with np.errstate(all="ignore"):
        for t in range(steps):
            eng.step(t, lr, 1e-3, loss)
        eng.perturber.at_theta()
        f = loss()
    return f if math.isfinite(f) and f < 1e30 else math.inf


METHODS = ("sgd", "sgd+mirrored", "hizoo", "hizoo-moment", "mu_scale")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--lams", type=float, nargs=2, default=[1.0, 0.01])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    start = final_loss("sgd", args.size, args.lams, 0, 0.0, 0)
    print(f"2 x {args.size} values, λ {args.lams}, {args.steps} steps, loss at θ₀ {start:.4f}")
    print(f"{'lr':>8}" + "".join(f"{m:>14}" for m in METHODS))
    for lr in args.lr:
        cells = []
        for m in METHODS:
            runs = [
                final_loss(m, args.size, args.lams, args.steps, lr, s) for s in range(args.seeds)
            ]
            cells.append(f"{statistics.median(runs):>14.4g}")
        print(f"{lr:>8g}" + "".join(cells))


if __name__ == "__main__":
    main()
