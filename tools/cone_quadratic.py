"""``direction=cone`` against ``sphere`` on a diagonal quadratic, side by side in one run.

f(θ) = ½ Σ_i λ_i (θ_i − t_i)², λ log-spaced from 1 to 0.01 (d = 256 by default), θ₀ = 0; the
default LM recipe's step (one-sided, q = 4, SGD momentum 0.9, μ = 1e-3) for ``--steps`` steps
at each ``--lr``, three seeds each. Prints the final loss of sphere and of cone at each
``--angles`` value, and cone / sphere ratios (below 1: cone is ahead); then the cosine of the
momentum (the cone's axis) with the true gradient, averaged over the steps — how well the
history points where the cone assumes it does. A run that diverges prints inf (and nan
cosines).

Usage::

    python tools/cone_quadratic.py [--dim 256 --steps 300 --lr 0.003 0.01 --angles 45 60 75 85]
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np

from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.params import TensorSpec


def final_loss(direction: str, dim: int, steps: int, lr: float, seed: int, angle: float) -> float:
    return run(direction, dim, steps, lr, seed, angle)[0]


def run(
    direction: str, dim: int, steps: int, lr: float, seed: int, angle: float
) -> tuple[float, float]:
    """(final loss, mean over the steps of the momentum's cosine with the true gradient)."""
    lam = np.geomspace(1.0, 0.01, dim)
    target = np.random.default_rng(123).normal(size=dim)
    settings = EngineSettings(
        seed=seed,
        direction=direction,
        estimator="onesided",
        q=4,
        momentum=0.9,
        cone_angle=angle,
    )
    eng = ZOEngine([TensorSpec("w", (dim,))], lambda: {"w": np.zeros(dim, np.float32)}, settings)
    feed = eng.params.feed

    def loss() -> float:
        x = feed.astype(np.float64) - target
        return float(0.5 * np.sum(lam * x * x))

    cosines = []
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for t in range(steps):
            eng.step(t, lr, 1e-3, loss)
            m = eng.optimizer.buf.astype(np.float64)
            g = lam * (eng.params.master.astype(np.float64) - target)
            cosines.append(float(m @ g / (np.linalg.norm(m) * np.linalg.norm(g))))
        eng.perturber.at_theta()
        f = loss()
    cos = statistics.fmean(cosines) if steps else math.nan
    return (f if math.isfinite(f) and f < 1e30 else math.inf), cos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.003, 0.01])
    ap.add_argument("--angles", type=float, nargs="+", default=[45.0, 60.0, 75.0, 85.0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    start = final_loss("sphere", args.dim, 0, 0.0, 0, 60.0)
    print(f"d={args.dim}, {args.steps} steps, loss at θ₀ {start:.4f}; median over seeds")
    head = "".join(f"{'cone ' + format(a, 'g'):>12}" for a in args.angles)
    print(f"{'lr':>8}{'sphere':>12}{head}   cone/sphere")
    seeds = range(args.seeds)
    aligned = []
    for lr in args.lr:
        out = {"sphere": [run("sphere", args.dim, args.steps, lr, s, 60.0) for s in seeds]}
        for a in args.angles:
            out[a] = [run("cone", args.dim, args.steps, lr, s, a) for s in seeds]
        med = {k: statistics.median(r[0] for r in v) for k, v in out.items()}
        aligned.append((lr, {k: statistics.median(r[1] for r in v) for k, v in out.items()}))
        cells = "".join(f"{med[a]:>12.4g}" for a in args.angles)
        ratios = " ".join(f"{med[a] / med['sphere']:.2f}" for a in args.angles)
        print(f"{lr:>8g}{med['sphere']:>12.4g}{cells}   {ratios}")
    print("cosine of the momentum with the true gradient, mean over the steps (median of seeds)")
    for lr, cos in aligned:
        cells = "".join(f"{cos[a]:>12.3f}" for a in args.angles)
        print(f"{lr:>8g}{cos['sphere']:>12.3f}{cells}")


if __name__ == "__main__":
    main()
