"""Zeroth-order gradient estimators: losses at perturbed points -> projected gradients.

An estimator evaluates the loss at a few perturbed points (through a :class:`Perturber` and an
``evaluate()`` callable) and returns, per direction index i, the scalar g_i such that the
gradient estimate is ĝ = (1/q) Σ_i g_i z_i. It never touches θ: the optimiser does.

During replay ``evaluate`` returns the losses recorded in the ledger, so the estimator's
arithmetic (and, in place, the perturbation sequence) is exactly that of the original run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .perturb import Perturber


@dataclass
class Estimate:
    g: list[float]  # projected gradient per direction index 0..q-1
    losses: list[float]  # every evaluation's mean loss, in evaluation order

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in self.losses + self.g)

    @property
    def loss(self) -> float:
        """Training-loss proxy for progress reports: mean over the evaluations."""
        return sum(self.losses) / len(self.losses)


class CentralTwoPoint:
    """MeZO/SPSA: g_i = (f(θ + μz_i) − f(θ − μz_i)) / 2μ for q directions; 2q forwards."""

    name = "central"

    def __init__(self, q: int = 1):
        self.q = q

    @property
    def evals_per_step(self) -> int:
        return 2 * self.q

    def estimate(self, step: int, mu: float, perturber: Perturber,
                 evaluate: Callable[[], float]) -> Estimate:
        g, losses = [], []
        for i in range(self.q):
            perturber.to(step, i, mu)
            plus = evaluate()
            perturber.to(step, i, -mu)
            minus = evaluate()
            losses += [plus, minus]
            g.append((plus - minus) / (2.0 * mu))
        perturber.reset()
        return Estimate(g, losses)


ESTIMATORS = {"central": CentralTwoPoint}
