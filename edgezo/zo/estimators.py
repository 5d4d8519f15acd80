"""Zeroth-order gradient estimators: losses at perturbed points -> projected gradients.

An estimator evaluates the loss at a few perturbed points (through a :class:`Perturber` and an
``evaluate()`` callable) and returns, per direction i, a scalar g_i and the vector u_i it
belongs to, such that the gradient estimate is ĝ = (1/q) Σ_i g_i u_i. For most estimators
u_i = z(step, i); DAP's is its aligned direction. It never updates θ: the optimiser does. In
place, it leaves θ at its last evaluated point and says so (``Estimate.displacement``).

Every random choice (P3/P4's level and coin, DAP's sign) comes from
:func:`edgezo.zo.directions.uniform`, keyed by (seed, step, stream, i). During replay ``evaluate``
returns the losses recorded in the ledger, so the estimator's arithmetic (and, in place, the
perturbation sequence) is exactly that of the original run.

=========  ===================================================  =====================
name       projected gradient per direction                     forwards per step
=========  ===================================================  =====================
central    (f(θ+μz) − f(θ−μz)) / 2μ                             2q
onesided   (f(θ+μz) − f(θ)) / μ, one shared f(θ)                q + 1
mirrored   central, plus one shared f(θ) for the curvature         2q + 1
           c = (f(θ+μz) + f(θ−μz) − 2f(θ)) / μ² ≈ zᵀHz
fzoo       (f(θ+μz) − f(θ)) / σ, σ = RMS of the q differences  q + 1
dap        one-sided along z′ aligned with a sphere pilot       2q + 1
p4         D(μ₁) + (D(μ_{n+1}) − D(μ_n)) / p_n, n ~ schedule    ≈ 1 + q(3 − p₁)
p3         coin: 2·D(μ₁) or 2·(D(μ_{n+1}) − D(μ_n)) / p_n       ≈ 1 + 1.5q
svrg       one-sided at θ minus one-sided at the anchor θ̃       2q + 2; every period:
           (same batch and z) plus the anchor pass's estimate  (q_A + 1) × batches
=========  ===================================================  =====================

``evals_per_step`` is the expected count (exact except for P3/P4), ``max_evals_per_step`` the
most a step can cost (for hard budgets); the ledger records every evaluation's loss, so the
actual count of each step is ``len(record["losses"])``.

D(μ) = (f(θ + μz) − f(θ)) / μ. P3 and P4 (docs/concepts/literature.md §3) are unbiased for the
directional derivative; their μ_n are clamped at ``mu_floor`` and each clamp is counted in the
record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from .directions import uniform
from .perturb import Displacement, Perturber, Vector, plain

# streams of edgezo.zo.directions.uniform (part of the run's definition — never change them)
STREAM_LEVEL, STREAM_COIN, STREAM_SIGN = 1, 2, 3
MAX_LEVEL = 100_000
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class Estimate:
    g: list[float]  # projected gradient per direction index 0..q-1
    losses: list[float]  # every evaluation's mean loss, in evaluation order
    vectors: list[Vector] = field(default_factory=list)  # u_i the update moves along
    info: dict[str, Any] = field(default_factory=dict)  # extra ledger fields (JSON values)
    #: in place, θ is left at the last evaluated point θ ⊕ c·u: the optimiser undoes it
    displacement: Displacement | None = None
    #: per direction, the second difference (f₊ + f₋ − 2f₀)/μ² ≈ u_iᵀHu_i (``mirrored`` only)
    curvature: list[float] | None = None

    @property
    def finite(self) -> bool:
        """All losses finite and every g_i (and curvature) representable in the float32 update
        arithmetic."""
        return all(math.isfinite(x) for x in self.losses) and all(
            math.isfinite(x) and abs(x) < FLOAT32_MAX for x in (*self.g, *(self.curvature or ()))
        )

    @property
    def loss(self) -> float:
        """Training-loss proxy for progress reports: mean over the evaluations."""
        return sum(self.losses) / len(self.losses)


class CentralTwoPoint:
    """MeZO/SPSA: g_i = (f(θ + μz_i) − f(θ − μz_i)) / 2μ for q directions; 2q forwards."""

    name = "central"

    def __init__(self, q: int = 1, **_: Any):
        self.q = q

    @property
    def evals_per_step(self) -> float:
        return 2 * self.q

    max_evals_per_step = evals_per_step

    def estimate(
        self, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
    ) -> Estimate:
        g, losses, us = [], [], []
        for i in range(self.q):
            u = plain(step, i)
            perturber.to(u, mu)
            plus = evaluate()
            perturber.to(u, -mu)
            minus = evaluate()
            losses += [plus, minus]
            g.append((plus - minus) / (2.0 * mu))
            us.append(u)
        return Estimate(g, losses, us, displacement=perturber.release())


class OneSided:
    """g_i = (f(θ + μz_i) − f(θ)) / μ with one shared base evaluation; q + 1 forwards."""

    name = "onesided"

    def __init__(self, q: int = 1, **_: Any):
        self.q = q

    @property
    def evals_per_step(self) -> float:
        return self.q + 1

    max_evals_per_step = evals_per_step

    def estimate(
        self, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
    ) -> Estimate:
        diffs, losses, us = _one_sided_probes(self.q, step, mu, perturber, evaluate)
        g = [d / mu for d in diffs]
        return Estimate(g, losses, us, displacement=perturber.release())


class Mirrored:
    """Central two-point with a shared base: f(θ), then f(θ + μz_i) and f(θ − μz_i) for i < q;
    2q + 1 forwards.

    g_i = (f₊ − f₋) / 2μ as in ``central``; the base adds the second difference
    c_i = (f₊ + f₋ − 2f₀) / μ², an estimate of the curvature z_iᵀHz_i along the probe, which
    ``optimizer=hizoo`` turns into a diagonal preconditioner. At q = 2 it costs the default's
    5 forwards (one-sided q = 4) with half the directions.
    """

    name = "mirrored"

    def __init__(self, q: int = 1, **_: Any):
        self.q = q

    @property
    def evals_per_step(self) -> float:
        return 2 * self.q + 1

    max_evals_per_step = evals_per_step

    def estimate(
        self, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
    ) -> Estimate:
        perturber.at_theta()
        base = evaluate()
        g, losses, us, curv = [], [base], [], []
        for i in range(self.q):
            u = plain(step, i)
            perturber.to(u, mu)
            plus = evaluate()
            perturber.to(u, -mu)
            minus = evaluate()
            losses += [plus, minus]
            g.append((plus - minus) / (2.0 * mu))
            curv.append((plus + minus - 2.0 * base) / (mu * mu))
            us.append(u)
        return Estimate(g, losses, us, displacement=perturber.release(), curvature=curv)


def _one_sided_probes(
    q: int, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
) -> tuple[list[float], list[float], list[Vector]]:
    """f(θ), then f(θ + μz_i) for i < q: (the differences f_i − f(θ), every loss, the z_i)."""
    perturber.at_theta()
    base = evaluate()
    diffs, losses, us = [], [base], []
    for i in range(q):
        u = plain(step, i)
        perturber.to(u, mu)
        f = evaluate()
        losses.append(f)
        diffs.append(f - base)
        us.append(u)
    return diffs, losses, us


class Normalized:
    """FZOO-style one-sided steps normalised by the spread of the probe losses (§7):
    g_i = (f(θ + μz_i) − f(θ)) / σ, σ = √(mean_i (f(θ + μz_i) − f(θ))²); q + 1 forwards.

    (f_i − f_0) ≈ μ z_i·∇f and σ ≈ μ‖∇f‖ for unit-variance directions, so g_i ≈ z_i·∇f / ‖∇f‖:
    the step's size no longer follows the gradient's norm (large early, tiny on a plateau), and
    with plain SGD ``lr`` is about the length of a step in θ. The spread is taken about f(θ),
    not about the probes' own mean as in FZOO: with few probes their mean-centred spread can be
    ~0 while f_i − f_0 is not (two probes that agree), which makes a step unbounded; about f(θ),
    |g_i| ≤ √q always (q = 1: g = ±1, a step along ±z by the sign of the difference). σ = 0
    (every probe equal to f(θ)) gives g = 0, counted as ``flat`` in the record.
    """

    name = "fzoo"

    def __init__(self, q: int = 4, **_: Any):
        self.q = q

    @property
    def evals_per_step(self) -> float:
        return self.q + 1

    max_evals_per_step = evals_per_step

    def estimate(
        self, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
    ) -> Estimate:
        diffs, losses, us = _one_sided_probes(self.q, step, mu, perturber, evaluate)
        sigma = math.sqrt(math.fsum(d * d for d in diffs) / self.q)
        flat = not (sigma > 0 and math.isfinite(sigma))
        g = [0.0] * self.q if flat else [d / sigma for d in diffs]
        info = {"sigma": sigma if math.isfinite(sigma) else None, **({"flat": 1} if flat else {})}
        return Estimate(g, losses, us, info=info, displacement=perturber.release())


class DAP:
    """Directionally aligned perturbations (Ma & Huang, ICLR 2025; docs/concepts/literature.md §2).

    Per direction i: a pilot one-sided estimate g̃ = D_v(μ)·v from a sphere direction v (index
    q + i); then, on every tensor T whose pilot is non-negligible, the aligned direction
    z′_T = z_T − (g̃_Tᵀz_T / ‖g̃_T‖²) g̃_T + ξ g̃_T / ‖g̃_T‖ (ξ = ±1 seeded), which equals
    z_T + a_T v_T; and g_i = (f(θ + μz′) − f(θ)) / μ, the update moving along z′.
    One shared base, 2q + 1 forwards. Positive tensors are handled in log-space like every
    other move, so DAP works with them too.
    """

    name = "dap"
    TOL = 1e-12  # a tensor's pilot ‖g̃_T‖ at or below this is negligible: z′_T = z_T

    def __init__(self, q: int = 1, **_: Any):
        self.q = q

    @property
    def evals_per_step(self) -> float:
        return 2 * self.q + 1

    max_evals_per_step = evals_per_step

    def estimate(
        self, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
    ) -> Estimate:
        seed = perturber.dirs.seed
        perturber.at_theta()
        base = evaluate()
        g, losses, us, xis, aligned = [], [base], [], [], []
        for i in range(self.q):
            v = Vector(step, self.q + i, kind="sphere")
            perturber.to(v, mu)
            fp = evaluate()
            losses.append(fp)
            gp = (fp - base) / mu
            xi = 1.0 if uniform(seed, step, STREAM_SIGN, i) < 0.5 else -1.0
            u = self.aligned(perturber, plain(step, i), v, gp, xi)
            perturber.to(u, mu)
            f = evaluate()
            losses.append(f)
            g.append((f - base) / mu)
            us.append(u)
            xis.append(xi)
            aligned.append(sum(1 for k in u.extra[0][2] if k != 0.0) if u.extra else 0)
        info = {"xi": xis, "aligned_tensors": aligned}
        return Estimate(g, losses, us, info, displacement=perturber.release())

    @classmethod
    def aligned(cls, perturber: Perturber, z: Vector, v: Vector, gp: float, xi: float) -> Vector:
        """z′ = z + a_T·v per tensor for the pilot g̃ = gp·v (z itself if gp is not finite)."""
        if not math.isfinite(gp) or gp == 0.0:
            return z
        zv, vv = perturber.vectors.dots(z, v)
        sg = 1.0 if gp > 0 else -1.0
        coefs = []
        for dot, nn in zip(zv, vv, strict=True):
            norm = math.sqrt(nn)
            if abs(gp) * norm <= cls.TOL:
                coefs.append(0.0)
            else:  # g̃_T = gp·v_T: −(g̃ᵀz/‖g̃‖²)g̃ = −(vᵀz/‖v‖²)v;  ξ g̃/‖g̃‖ = ξ·sign(gp)·v/‖v‖
                coefs.append(-dot / nn + xi * sg / norm)
        return Vector(z.step, z.index, z.kind, ((v.kind or "", v.index, tuple(coefs)),))


# -- the unbiased multi-level estimators ------------------------------------------------------


def _hurwitz_tail(s: float, n: int, k: int = 12) -> float:
    """Σ_{j≥n} j^−s by Euler–Maclaurin after k explicit terms (relative error ≈ 1e-12)."""
    head = math.fsum(float(j) ** -s for j in range(n, n + k))
    m = float(n + k)
    tail = (
        m ** (1 - s) / (s - 1)
        + 0.5 * m**-s
        + s * m ** (-s - 1) / 12
        - s * (s + 1) * (s + 2) * m ** (-s - 3) / 720
        + s * (s + 1) * (s + 2) * (s + 3) * (s + 4) * m ** (-s - 5) / 30240
    )
    return head + tail


#: P3/P4 level distributions
SCHEDULES = ("geometric", "zipf")


@dataclass(frozen=True)
class LevelSchedule:
    """μ_n = μ₁·P(N ≥ n) and p_n = P(N = n), the variance-optimal pairing
    (docs/concepts/literature.md §3).

    geometric: P(N = n) = (1 − c) c^{n−1}, μ_n = μ₁ c^{n−1};
    zipf:      P(N = n) = n^{−s} / ζ(s),    μ_n = μ₁ Σ_{j≥n} j^{−s} / ζ(s).
    """

    kind: str = "geometric"  # geometric | zipf
    ratio: float = 0.5  # geometric c in (0, 1)
    zipf_s: float = 2.0  # zipf exponent s > 1

    def __post_init__(self) -> None:
        if self.kind == "geometric" and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"level_ratio must be in (0, 1), got {self.ratio}")
        if self.kind == "zipf" and not self.zipf_s > 1.0:
            raise ValueError(f"zipf_s must be > 1, got {self.zipf_s}")
        if self.kind not in SCHEDULES:
            raise ValueError(f"level_schedule must be geometric or zipf, got {self.kind!r}")

    def tail(self, n: int) -> float:
        """P(N ≥ n)."""
        if self.kind == "geometric":
            t = 1.0
            for _ in range(n - 1):  # repeated IEEE products: the same on every machine
                t *= self.ratio
            return t
        return _hurwitz_tail(self.zipf_s, n) / self._zeta

    @cached_property
    def _zeta(self) -> float:
        return _hurwitz_tail(self.zipf_s, 1)

    def p(self, n: int) -> float:
        if self.kind == "geometric":
            return (1.0 - self.ratio) * self.tail(n)
        return float(n) ** -self.zipf_s / self._zeta

    def sample(self, u: float) -> int:
        """The level n for a uniform u in [0, 1): inverse CDF, capped at ``MAX_LEVEL``."""
        n, cdf = 1, self.p(1)
        while u >= cdf and n < MAX_LEVEL:
            n += 1
            cdf += self.p(n)
        return n

    @property
    def p1(self) -> float:
        return self.p(1)


class _MultiLevel:
    """Shared machinery of P3/P4: one base f(θ), then per direction the D(μ) needed."""

    name = ""

    def __init__(
        self, q: int = 1, schedule: LevelSchedule | None = None, mu_floor: float = 1e-5, **_: Any
    ):
        self.q = q
        self.schedule = schedule or LevelSchedule()
        self.mu_floor = mu_floor

    def _mus(self, mu: float, n: int) -> tuple[float, float, int]:
        """(μ_n, μ_{n+1}) clamped at the floor, and how many were clamped."""
        a, b = mu * self.schedule.tail(n), mu * self.schedule.tail(n + 1)
        hits = (a < self.mu_floor) + (b < self.mu_floor)
        return max(a, self.mu_floor), max(b, self.mu_floor), hits

    def estimate(
        self, step: int, mu: float, perturber: Perturber, evaluate: Callable[[], float]
    ) -> Estimate:
        seed = perturber.dirs.seed
        perturber.at_theta()
        base = evaluate()
        losses = [base]
        cache: dict[float, float] = {}

        def D(u: Vector, m: float) -> float:  # noqa: N802 — the paper's name
            if m not in cache:
                perturber.to(u, m)
                f = evaluate()
                losses.append(f)
                cache[m] = (f - base) / m
            return cache[m]

        g, us, levels, hits_total, branches = [], [], [], 0, []
        for i in range(self.q):
            u = plain(step, i)
            cache.clear()
            n = self.schedule.sample(uniform(seed, step, STREAM_LEVEL, i))
            mn, mn1, hits = self._mus(mu, n)
            hits_total += hits
            branch = self._branch(seed, step, i)

            def far(u: Vector = u, mn: float = mn, mn1: float = mn1, n: int = n) -> float:
                # (D(μ_{n+1}) − D(μ_n)) / p_n; both clamped to the floor: no signal left, 0
                return 0.0 if mn == mn1 else (D(u, mn1) - D(u, mn)) / self.schedule.p(n)

            g.append(self._combine(branch, lambda u=u: D(u, mu), far))
            us.append(u)
            levels.append(n)
            branches.append(branch)
        info: dict[str, Any] = {"levels": levels, "mu_floor_hits": hits_total}
        if self.name == "p3":
            info["branches"] = branches
        return Estimate(g, losses, us, info, displacement=perturber.release())


class P4(_MultiLevel):
    """P4(n, z) = D(μ₁) + (D(μ_{n+1}) − D(μ_n)) / p_n: unbiased for ∇fᵀz."""

    name = "p4"

    def _branch(self, seed: int, step: int, i: int) -> str:
        return "both"

    def _combine(self, branch: str, near: Callable[[], float], far: Callable[[], float]) -> float:
        return near() + far()

    @property
    def evals_per_step(self) -> float:
        p1 = self.schedule.p1
        return 1 + self.q * (2 * p1 + 3 * (1 - p1))  # n = 1 reuses D(μ₁) (expected value)

    @property
    def max_evals_per_step(self) -> int:
        return 1 + 3 * self.q


class P3(_MultiLevel):
    """Fair coin: 2·D(μ₁), or 2·(D(μ_{n+1}) − D(μ_n)) / p_n — each branch taken with
    probability ½ is weighted by 2, so E = D(μ₁) + (D(0) − D(μ₁)) = ∇fᵀz."""

    name = "p3"

    def _branch(self, seed: int, step: int, i: int) -> str:
        return "near" if uniform(seed, step, STREAM_COIN, i) < 0.5 else "far"

    def _combine(self, branch: str, near: Callable[[], float], far: Callable[[], float]) -> float:
        return 2.0 * (near() if branch == "near" else far())  # each branch has probability ½

    @property
    def evals_per_step(self) -> float:
        return 1 + 1.5 * self.q  # expected value; the ledger records the actual count

    @property
    def max_evals_per_step(self) -> int:
        return 1 + 2 * self.q


# -- MeZO-SVRG: a control variate from an anchor pass ------------------------------------------

#: the anchor directions' index offset: v_k = z(anchor step, ANCHOR_INDEX + k), a stream apart
#: from every step's own z(step, i) (part of the run's definition — never change it)
ANCHOR_INDEX = 1 << 32

#: an anchor batch's loss at the current feed: ``anchor(j)`` for j < svrg_anchor_batches
AnchorLoss = Callable[[int], float]


class SVRG:
    """ZO-SVRG (docs/concepts/literature.md §10): one-sided probes with a control variate.

    Every ``svrg_period`` steps an *anchor pass* at the anchor θ̃ = θ (that step's) estimates
    the gradient of the loss F over a fixed anchor sample of the training set
    (``svrg_anchor_batches`` batches, ``anchor(j)`` each) along ``svrg_anchor_q`` directions
    v_k = z(step, ANCHOR_INDEX + k): F(θ̃), then F(θ̃ + μv_k), a_k = (F(θ̃ + μv_k) − F(θ̃)) / μ.
    That step moves along ĝ_A = (1/q_A) Σ_k a_k v_k alone: (q_A + 1)·batches forwards.

    Every other step, on its batch B and its q directions z_i, evaluates f_B at θ, θ + μz_i,
    θ̃ and θ̃ + μz_i (2q + 2 forwards): g_i = (f_B(θ + μz_i) − f_B(θ)) / μ and g̃_i the same at
    θ̃, and moves along

        ĝ = (1/q) Σ_i (g_i − g̃_i) z_i + ĝ_A,

    the step's estimate minus the same estimate at the anchor (same batch, same directions:
    their batch noise and most of their direction noise cancel while θ is near θ̃) plus the
    anchor's. The record's ``g`` holds the coefficients of the vectors [z_0 … z_{q−1},
    v_0 … v_{q_A−1}], scaled by (q + q_A) so that the optimisers' mean over them is ĝ.

    State (checkpointed with the optimiser's): θ̃ (one float32 buffer of θ's size), the
    anchor's step and its a_k. Every loss, the anchor's included, is in the record in
    evaluation order, so replay and resume rebuild it exactly. Needs a feed buffer (θ̃ ⊕ μz is
    evaluated beside θ): refused in place.
    """

    name = "svrg"
    wants_anchor = True

    def __init__(
        self,
        q: int = 1,
        svrg_period: int = 50,
        svrg_anchor_q: int = 8,
        svrg_anchor_batches: int = 16,
        dim: int = 0,
        **_: Any,
    ):
        self.q = q
        self.period = svrg_period
        self.anchor_q = svrg_anchor_q
        self.batches = svrg_anchor_batches
        self.theta = np.zeros(dim, dtype=np.float32)  # θ̃
        self.anchor_step = np.full(1, -1, dtype=np.int64)  # -1: no anchor yet
        self.anchor_g = np.zeros(svrg_anchor_q, dtype=np.float64)

    @property
    def anchor_evals(self) -> int:
        return (self.anchor_q + 1) * self.batches

    @property
    def evals_per_step(self) -> float:
        """The mean over a period: one anchor step and period − 1 steps of 2q + 2."""
        return (self.anchor_evals + (self.period - 1) * (2 * self.q + 2)) / self.period

    @property
    def max_evals_per_step(self) -> int:
        return max(self.anchor_evals, 2 * self.q + 2)

    def due(self, step: int) -> bool:
        a = int(self.anchor_step[0])
        return a < 0 or step - a >= self.period

    def anchor_vectors(self) -> list[Vector]:
        a = int(self.anchor_step[0])
        return [Vector(a, ANCHOR_INDEX + k) for k in range(self.anchor_q)]

    def state(self) -> dict[str, np.ndarray]:
        return {
            "svrg.anchor_theta": self.theta,
            "svrg.anchor_step": self.anchor_step,
            "svrg.anchor_g": self.anchor_g,
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.theta[:] = state["svrg.anchor_theta"]
        self.anchor_step[:] = state["svrg.anchor_step"]
        self.anchor_g[:] = state["svrg.anchor_g"]

    def estimate(
        self,
        step: int,
        mu: float,
        perturber: Perturber,
        evaluate: Callable[[], float],
        anchor: AnchorLoss | None = None,
    ) -> Estimate:
        if perturber.params.inplace or not hasattr(perturber, "to_from"):
            raise ValueError(
                "estimator svrg evaluates the anchor θ̃ beside θ and needs a feed buffer: "
                "set perturbation=copy (and no device perturbation)"
            )
        if self.due(step):
            return self._anchor_pass(step, mu, perturber, anchor)
        perturber.at_theta()
        base = evaluate()
        losses, g = [base], []
        zs = [plain(step, i) for i in range(self.q)]
        for u in zs:
            perturber.to(u, mu)
            f = evaluate()
            losses.append(f)
            g.append((f - base) / mu)
        perturber.to_from(self.theta, None)
        base_a = evaluate()
        losses.append(base_a)
        ga = []
        for u in zs:
            perturber.to_from(self.theta, u, mu)
            f = evaluate()
            losses.append(f)
            ga.append((f - base_a) / mu)
        perturber.at_theta()
        n = self.q + self.anchor_q
        coefs = [(a - b) * n / self.q for a, b in zip(g, ga, strict=True)]
        coefs += [float(x) * n / self.anchor_q for x in self.anchor_g]
        info = {"svrg_anchor": int(self.anchor_step[0])}
        return Estimate(coefs, losses, zs + self.anchor_vectors(), info=info)

    def _anchor_pass(
        self, step: int, mu: float, perturber: Perturber, anchor: AnchorLoss | None
    ) -> Estimate:
        if anchor is None:
            raise ValueError(
                "estimator svrg needs the anchor sample's losses (edgezo.train passes them); "
                "this caller (the learning-rate race, a federated client) has none: set --lr, "
                "or use estimator=onesided"
            )
        losses: list[float] = []

        def mean_loss() -> float:
            parts = [anchor(j) for j in range(self.batches)]
            losses.extend(parts)
            return math.fsum(parts) / self.batches

        perturber.at_theta()
        base = mean_loss()
        vs = [Vector(step, ANCHOR_INDEX + k) for k in range(self.anchor_q)]
        a = []
        for v in vs:
            perturber.to(v, mu)
            a.append((mean_loss() - base) / mu)
        perturber.at_theta()
        est = Estimate(list(a), losses, vs, info={"svrg_anchor": step, "anchor_loss": base})
        if est.finite:  # a non-finite pass keeps the old anchor (the step is skipped)
            np.copyto(self.theta, perturber.params.master)
            self.anchor_step[0] = step
            self.anchor_g[:] = a
        return est


ESTIMATORS = {
    "central": CentralTwoPoint,
    "onesided": OneSided,
    "mirrored": Mirrored,
    "fzoo": Normalized,
    "dap": DAP,
    "p3": P3,
    "p4": P4,
    "svrg": SVRG,
}
