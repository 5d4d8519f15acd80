"""Update rules applied to the flat master from projected gradients, and learning-rate schedules.

The estimate is ĝ = (1/q) Σ_i g_i u_i, with g_i the (optionally clipped) projected gradients
and u_i the vectors the estimator names (:class:`edgezo.zo.perturb.Vector`, regenerated chunk by
chunk, never stored). Each rule then moves θ ← θ ⊕ δ, where ⊕ is + on ordinary tensors and
θ·exp(δ) on tensors marked positive (the multiplicative, log-space update of
docs/concepts/literature.md §4).

- ``sgd``: δ = −η ĝ (no buffer); with momentum β, m = β m + ĝ and δ = −η m (one flat buffer).
- ``adam``: m = β₁m + (1 − β₁)ĝ, v = β₂v + (1 − β₂)ĝ², δ = −η m̂ / (√v̂ + ε) with bias
  correction by the number of updates applied (two flat buffers and a counter).
- ``sign`` (ZO-signSGD): δ = −η sign(ĝ); with momentum, δ = −η sign(m) (Signum).
- ``hizoo``: ``sgd`` (with its momentum) whose directions are scaled per value by a diagonal
  curvature preconditioner, learnt from the ``mirrored`` estimator's second differences
  (:class:`ZOHiZOO`; docs/concepts/literature.md §9).

The momentum buffer (Adam's m) is also the axis of ``cone`` directions
(:class:`edgezo.zo.directions.ConeDirections`, read through ``history``), which are built
from it live: every update reads each chunk of the step's u_i before it writes that chunk of
the buffer.

Decoupled weight decay θ ← θ(1 − ηλ) touches ordinary tensors only (a scale has no natural
zero to decay to). All arithmetic is float32 elementwise with float32-cast coefficients, in a
fixed order: identical on every machine, and identical when :mod:`edgezo.zo.replay` redoes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .directions import CHUNK
from .params import FlatParams
from .perturb import Displacement, Vector, VectorSource

#: learning-rate schedule shapes
SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """lr(step) = base · warmup · decay; ``total`` steps for linear/cosine decay."""

    kind: str  # constant | linear | cosine
    base: float
    total: int
    warmup: int = 0
    final_fraction: float = 0.0  # linear/cosine decay to base * final_fraction

    def __call__(self, step: int) -> float:
        w = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.kind == "constant":
            d = 1.0
        else:
            span = max(1, self.total - self.warmup)
            t = min(1.0, max(0, step - self.warmup) / span)
            shape = 1.0 - t if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
            d = self.final_fraction + (1.0 - self.final_fraction) * shape
        return self.base * w * d


class _Base:
    def __init__(
        self,
        params: FlatParams,
        vectors: VectorSource,
        weight_decay: float = 0.0,
        clip: float | None = None,
    ):
        self.params = params
        self.vectors = vectors
        self.weight_decay = weight_decay
        self.clip = clip
        #: other stateful parts of the step (``svrg``'s anchor): their ``state()`` is saved
        #: and loaded with the optimiser's (checkpoints, rollbacks, the learning-rate race)
        self.companions: list = []

    def settle(self, displacement: Displacement | None) -> None:
        """Undo an estimator's in-place displacement: θ ← θ ⊕ (−c)·u."""
        if displacement is not None:
            u, c = displacement
            self.vectors.move(u, -c, self.params.master, self.params.master)

    def clipped(self, g: list[float]) -> list[float]:
        if self.clip is None:
            return list(g)
        return [min(self.clip, max(-self.clip, x)) for x in g]

    def _decay(self, lr: float) -> None:
        if self.weight_decay:
            self.params.scale_additive(self.params.master, 1.0 - lr * self.weight_decay)

    def _estimate_chunk(self, c: int, us: list[Vector], gs: list[float]) -> np.ndarray:
        """ĝ on chunk c: Σ_i float32(g_i / q) · u_i, summed in index order (a new array)."""
        q = len(gs)
        acc = None
        for u, gi in zip(us, gs, strict=True):
            v = self.vectors.chunk(u, c)
            v *= np.float32(gi / q)
            acc = v.copy() if acc is None else np.add(acc, v, out=acc)
        return acc

    def _chunk_ranges(self):
        for s in range(0, self.params.dim, CHUNK):
            yield s // CHUNK, s, min(self.params.dim, s + CHUNK)

    # -- state for checkpoints ---------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Every buffer to checkpoint: the rule's own and its companions'."""
        out = self.own_state()
        for c in self.companions:
            out.update(c.state())
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.load_own_state(state)
        for c in self.companions:
            c.load_state(state)

    def own_state(self) -> dict[str, np.ndarray]:
        return {}

    def load_own_state(self, state: dict[str, np.ndarray]) -> None:
        pass

    @property
    def history(self) -> np.ndarray | None:
        """A flat float32 vector summarising past estimates (``cone``'s axis), or None."""
        return None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.state().values())


class ZOSGD(_Base):
    """θ ← θ(1 − ηλ) ⊕ (−η·m), m = β·m + (1/q)Σ g_i u_i (β = 0: plain ZO-SGD, no buffer).

    ``clip`` bounds each projected gradient g_i to [−clip, clip] before use.
    """

    name = "sgd"

    def __init__(
        self,
        params: FlatParams,
        vectors: VectorSource,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        clip: float | None = None,
        **_: object,
    ):
        super().__init__(params, vectors, weight_decay, clip)
        self.momentum = momentum
        self.buf = np.zeros(params.dim, dtype=np.float32) if momentum > 0 else None
        self._scratch: np.ndarray | None = None  # q chunks of the step's directions

    def update(
        self,
        us: list[Vector],
        g: list[float],
        lr: float,
        displacement: Displacement | None = None,
    ) -> None:
        """θ ← θ − η·(1/q)Σ g_i u_i, after undoing ``displacement`` (θ ⊕ c·u in place).

        Plain ZO-SGD (no momentum, no weight decay) folds the undo into its move along the same
        u: one pass over θ instead of two. Training and replay both take this path, so replay
        stays bit-exact.
        """
        theta = self.params.master
        gs = self.clipped(g)
        q = len(gs)
        if self.buf is not None or self.weight_decay:
            self.settle(displacement)
            displacement = None
        self._decay(lr)
        if self.buf is None:
            for u, gi in zip(us, gs, strict=True):
                coef = -lr * gi / q
                if displacement is not None and displacement[0] == u:
                    coef -= displacement[1]
                    displacement = None
                self.vectors.move(u, coef, theta, theta)
            self.settle(displacement)
            return
        # Chunk by chunk: every u_i's chunk is read before the same chunk of m is written, so
        # a direction that leans on m (``cone``) sees the m of its step. Per value the float32
        # operations are m·β, then + (g_i/q)·u_i in index order, then the move: the same as
        # a whole-vector pass, bit for bit.
        beta, lr32 = np.float32(self.momentum), np.float32(lr)
        n = min(CHUNK, self.params.dim)
        if self._scratch is None or self._scratch.shape[0] < q:
            self._scratch = np.empty((q, n), dtype=np.float32)
        for c, s, e in self._chunk_ranges():
            vs = [self.vectors.chunk(u, c, out=self._scratch[i, : e - s]) for i, u in enumerate(us)]
            m = self.buf[s:e]
            m *= beta
            for v, gi in zip(vs, gs, strict=True):
                v *= np.float32(gi / q)
                m += v
            step = lr32 * m
            np.negative(step, out=step)
            self.params.move(theta, theta, s, step)

    @property
    def history(self) -> np.ndarray | None:
        """The momentum buffer (the ``cone`` directions' axis), None without momentum."""
        return self.buf

    def own_state(self) -> dict[str, np.ndarray]:
        return {} if self.buf is None else {"optim.momentum": self.buf}

    def load_own_state(self, state: dict[str, np.ndarray]) -> None:
        if self.buf is not None:
            self.buf[:] = state["optim.momentum"]


class ZOSign(ZOSGD):
    """ZO-signSGD: θ ⊕ (−η·sign(ĝ)); with momentum β, −η·sign(m), m = β·m + ĝ (Signum)."""

    name = "sign"

    def update(
        self,
        us: list[Vector],
        g: list[float],
        lr: float,
        displacement: Displacement | None = None,
    ) -> None:
        self.settle(displacement)
        theta = self.params.master
        gs = self.clipped(g)
        self._decay(lr)
        lr32 = np.float32(lr)
        for c, s, e in self._chunk_ranges():
            gh = self._estimate_chunk(c, us, gs)
            if self.buf is not None:
                m = self.buf[s:e]
                m *= np.float32(self.momentum)
                m += gh
                gh = m.copy()
            step = np.sign(gh)
            step *= -lr32
            self.params.move(theta, theta, s, step)


class ZOAdam(_Base):
    """Adam on the ZO estimate: flat float32 m and v (2 × θ's bytes), bias-corrected."""

    name = "adam"

    def __init__(
        self,
        params: FlatParams,
        vectors: VectorSource,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float | None = None,
        **_: object,
    ):
        super().__init__(params, vectors, weight_decay, clip)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = np.zeros(params.dim, dtype=np.float32)
        self.v = np.zeros(params.dim, dtype=np.float32)
        self.t = np.zeros(1, dtype=np.int64)  # updates applied (skipped steps do not count)

    def update(
        self,
        us: list[Vector],
        g: list[float],
        lr: float,
        displacement: Displacement | None = None,
    ) -> None:
        self.settle(displacement)
        theta = self.params.master
        gs = self.clipped(g)
        self._decay(lr)
        self.t[0] += 1
        t = int(self.t[0])
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        c1, c2 = np.float32(1.0 - self.beta1), np.float32(1.0 - self.beta2)
        step_size = np.float32(lr / (1.0 - self.beta1**t))
        inv_bc2 = np.float32(1.0 / (1.0 - self.beta2**t))
        eps = np.float32(self.eps)
        for c, s, e in self._chunk_ranges():
            gh = self._estimate_chunk(c, us, gs)
            m, v = self.m[s:e], self.v[s:e]
            m *= b1
            m += c1 * gh
            v *= b2
            np.multiply(gh, gh, out=gh)
            v += c2 * gh
            den = v * inv_bc2
            np.sqrt(den, out=den)
            den += eps
            step = m * step_size
            np.divide(step, den, out=step)
            np.negative(step, out=step)
            self.params.move(theta, theta, s, step)

    @property
    def history(self) -> np.ndarray:
        """The first moment m (the ``cone`` directions' axis)."""
        return self.m

    def own_state(self) -> dict[str, np.ndarray]:
        return {"optim.adam_m": self.m, "optim.adam_v": self.v, "optim.adam_t": self.t}

    def load_own_state(self, state: dict[str, np.ndarray]) -> None:
        self.m[:] = state["optim.adam_m"]
        self.v[:] = state["optim.adam_v"]
        self.t[:] = state["optim.adam_t"]


#: ``hizoo_pool``: one curvature per value, or one per trainable tensor (its values' mean)
HIZOO_POOLS = ("tensor", "value")
#: ``hizoo_estimate``: ``baseline`` (the second difference minus its running mean, a
#: bias-corrected average and a warm-up) or ``moment`` (the first version's raw moment
#: estimate, its average started from the first step; kept so that its ledgers replay)
HIZOO_ESTIMATES = ("baseline", "moment")
#: the direction kinds whose squared entries carry the curvature's diagonal (Rademacher's are 1)
HIZOO_KINDS = ("gaussian", "sphere")


class ZOHiZOO(ZOSGD):
    """ZO-SGD (momentum β as ``sgd``) preconditioned by a diagonal curvature estimate.

    Each step's ``mirrored`` probes give, per direction u_i = s ⊙ z_i, the second difference
    c_i ≈ u_iᵀHu_i. For a Gaussian z, E[c·(z_j² − 1)/2] = (SHS)_jj; for the sphere of radius √d,
    E[c·w_j] = (SHS)_jj with w_j = (d+2)(z_j² − 1)/(2d) + 1/d. Divided by s_j² that is an
    estimate of H_jj from the step's own forwards, pooled to one value per tensor with
    ``hizoo_pool=tensor`` (the default).

    ``hizoo_estimate=baseline`` (the default) subtracts a baseline b from c before weighting:
    (c − b)·w_j + b·E[w_j] has the same expectation for any b fixed before the step's
    directions (E[w_j] = 1/d on the sphere, 0 for Gaussians). b is the bend the current
    average predicts at the current scale, Σ_j s_j² ĥ_j (before the first estimate, the running
    mean of the past bends; the first step only sets that). This drops the term that made the
    first version useless: c itself is ≈ tr(SHS) ± its spread, and c·w_j carries the whole
    trace into every value's estimate (on the LM task, per probe, a per-tensor noise 88–109×
    the mean curvature, against 16–19× with a baseline; c's spread is 0.16 of its mean). The
    average h is an exponential moving average (decay ``hizoo_beta``) with Adam's bias
    correction; for the first ``hizoo_warmup`` updates the preconditioner stays 1; and each
    tensor's curvature is shrunk towards the mean by its noise before use (:meth:`_shrunk`).
    After that the scale of the next step's vectors is

        s_j = m_j · clip(√(h̄ / h_j), 1/M, M),   h̄ = the mean of h over all values,

    with m the run's fixed per-tensor scales (``mu_scale``) and M = ``hizoo_max_scale``
    (h_j ≤ h̄/M² gets M; ``baseline`` uses the shrunk |h̃|). h̄ is the trace estimate (Σ_j w_j = 1
    on the sphere: the mean of the pooled estimates is c/d), so no single step's noise can
    switch the preconditioner off. The perturbation on value j is μ·s_j and its expected step
    s_j² times plain SGD's: a Newton-like H⁻¹ step relative to the mean curvature, so ``lr``
    keeps its meaning for a value of mean curvature. While h̄ ≤ 0 the preconditioner is 1.

    ``hizoo_estimate=moment`` is the first version (no baseline, h started at the first
    step's mean estimate, no bias correction or warm-up), kept for its ledgers.

    State: the momentum, h, the update count, the bends' running mean and, per tensor, the
    estimates' running second moment; all of it is a function of the
    recorded losses, so replay and resume rebuild it exactly.
    """

    name = "hizoo"
    wants_curvature = True  # the engine hands it the estimate's second differences

    def __init__(
        self,
        params: FlatParams,
        vectors: VectorSource,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        clip: float | None = None,
        hizoo_beta: float = 0.99,
        hizoo_pool: str = "tensor",
        hizoo_max_scale: float = 4.0,
        hizoo_estimate: str = "baseline",
        hizoo_warmup: int = 0,
        direction: str = "sphere",
        **_: object,
    ):
        super().__init__(params, vectors, momentum, weight_decay, clip)
        if direction not in HIZOO_KINDS:
            raise ValueError(f"hizoo needs gaussian or sphere directions, got {direction!r}")
        if hizoo_pool not in HIZOO_POOLS:
            raise ValueError(f"hizoo_pool must be one of {HIZOO_POOLS}, got {hizoo_pool!r}")
        if hizoo_estimate not in HIZOO_ESTIMATES:
            raise ValueError(
                f"hizoo_estimate must be one of {HIZOO_ESTIMATES}, got {hizoo_estimate!r}"
            )
        self.beta = hizoo_beta
        self.pool = hizoo_pool
        self.max_scale = hizoo_max_scale
        self.estimate_kind = hizoo_estimate
        self.warmup = int(hizoo_warmup)
        self.kind = direction
        self.base = None if vectors.scale is None else vectors.scale.copy()
        self.h = np.zeros(params.dim, dtype=np.float32)
        self.t = np.zeros(1, dtype=np.int64)
        #: the baseline's running (bias-uncorrected) average of the second differences
        self.cbar = np.zeros(1, dtype=np.float64)
        #: per tensor, the running average of its estimates' mean square (their noise)
        self.m2 = np.zeros(len(params.offsets), dtype=np.float64)
        ones = np.ones(params.dim, dtype=np.float32)
        vectors.scale = ones if self.base is None else self.base.copy()
        self._rescale()

    def update(
        self,
        us: list[Vector],
        g: list[float],
        lr: float,
        displacement: Displacement | None = None,
        curvature: list[float] | None = None,
    ) -> None:
        if curvature is None or len(curvature) != len(g):
            raise ValueError(
                "optimizer hizoo needs the estimator's second differences: use estimator=mirrored"
            )
        super().update(us, g, lr, displacement)  # moves along this step's s ⊙ z_i
        self._observe(us, curvature)

    def _weights(self, z: np.ndarray) -> np.ndarray:
        """w(z) with E[c·w(z_j)] = (SHS)_jj for c = zᵀ(SHS)z (float32, in place on z)."""
        z *= z
        z -= np.float32(1.0)
        if self.kind == "gaussian":
            z *= np.float32(0.5)
        else:  # sphere of radius √d
            d = self.params.dim
            z *= np.float32((d + 2) / (2.0 * d))
            z += np.float32(1.0 / d)
        return z

    @property
    def _mean_weight(self) -> float:
        """E[w(z_j)]: 1/d on the sphere, 0 for Gaussian directions."""
        return 0.0 if self.kind == "gaussian" else 1.0 / self.params.dim

    def _updates(self) -> int:
        """How many estimates h holds (``baseline``: the first step only sets the baseline)."""
        t = int(self.t[0])
        return t - 1 if self.estimate_kind == "baseline" else t

    def _corrected(self, x, n: int):
        """A bias-corrected moving average after n updates."""
        return x / (1.0 - self.beta**n) if self.beta > 0 and n > 0 else x

    def _baseline(self) -> float:
        """b, fixed before the step's directions: the bend the current average predicts for
        the current scale, Σ_j s_j² ĥ_j, once h holds an estimate; before that the running
        mean of the past bends (0 at the very first step)."""
        t, n = int(self.t[0]), self._updates()
        if self.estimate_kind != "baseline" or t == 0:
            return 0.0
        if n < 1:
            return float(self._corrected(self.cbar[0], t))
        s2 = self.vectors.scale.astype(np.float64) ** 2
        return _fsum_blocks(s2 * self._corrected(self.h.astype(np.float64), n))

    def _observe(self, us: list[Vector], curvature: list[float]) -> None:
        q = len(us)
        b = self._baseline()
        est = np.zeros(self.params.dim, dtype=np.float32)
        for c, s, e in self._chunk_ranges():
            part = est[s:e]
            for u, ci in zip(us, curvature, strict=True):
                w = self._weights(self.vectors.chunk(u, c, scaled=False))
                w *= np.float32((ci - b) / q)
                part += w
            if b:
                part += np.float32(b * self._mean_weight)
            part /= self.vectors.scale[s:e] * self.vectors.scale[s:e]  # SHS -> H
        if self.pool == "tensor":
            for a, b_ in self.params.offsets:
                est[a:b_] = np.float32(_mean(est[a:b_]))
        if self.estimate_kind == "baseline":
            if self.t[0] > 0:  # the first step has no baseline yet: it sets b only
                for k, (a, b_) in enumerate(self.params.offsets):
                    sq = _mean(est[a:b_].astype(np.float64) ** 2)
                    self.m2[k] = self.beta * self.m2[k] + (1.0 - self.beta) * sq
                self.h *= np.float32(self.beta)
                est *= np.float32(1.0 - self.beta)
                self.h += est
            self.cbar[0] = self.beta * self.cbar[0] + (1.0 - self.beta) * math.fsum(curvature) / q
        elif self.t[0] == 0:
            # the prior: every value at the first step's mean curvature (for sphere directions
            # without mu_scale exactly c̄/d = the trace estimate over d), so the preconditioner
            # starts at 1 and each later step moves it by a (1 − β) share only
            self.h[:] = np.float32(_mean(est))
        else:
            self.h *= np.float32(self.beta)
            est *= np.float32(1.0 - self.beta)
            self.h += est
        self.t[0] += 1
        self._rescale()

    def _shrunk(self, n: int) -> tuple[np.ndarray, float]:
        """(h̃, h̄): each tensor's bias-corrected curvature pulled towards the mean h̄ by its
        noise — h̃ = |h̄ + (ĥ − h̄)·max(0, 1 − (2se)²/(ĥ − h̄)²)|, se² the variance of the
        moving average (the estimates' spread, from their second moment, times the average's
        variance factor (1 − β)(1 − β²ⁿ) / ((1 + β)(1 − βⁿ)²)). A difference within two
        standard errors is dropped, a clear one kept almost whole; a curvature that comes out
        negative counts by its size (a flat tensor is not one whose estimate is noise below
        zero)."""
        hh = self._corrected(self.h.astype(np.float64), n)
        mean = _mean(hh)
        if self.beta > 0:
            kappa = (1 - self.beta) * (1 - self.beta ** (2 * n))
            kappa /= (1 + self.beta) * (1 - self.beta**n) ** 2
        else:
            kappa = 1.0
        out = np.empty_like(hh)
        for k, (a, b) in enumerate(self.params.offsets):
            part = hh[a:b]
            var = max(0.0, float(self._corrected(self.m2[k], n)) - _mean(part * part))
            se2 = 4.0 * var * kappa  # (2 standard errors)²
            dev = part - mean
            d2 = dev * dev
            keep = np.where(d2 > se2, 1.0 - se2 / np.where(d2 > 0, d2, 1.0), 0.0)
            out[a:b] = np.abs(mean + dev * keep)
        return out, mean

    def _rescale(self) -> None:
        """vectors.scale ← b ⊙ clip(√(h̄/h), 1/M, M) (1 while h̄ ≤ 0 or warming up);
        ``baseline`` uses the shrunk h̃ (:meth:`_shrunk`)."""
        scale = self.vectors.scale
        t = int(self.t[0])
        if self.estimate_kind == "baseline":
            n = self._updates()
            if n < 1 or t < self.warmup:
                scale[:] = 1.0
            else:
                h, mean = self._shrunk(n)
                if not mean > 0.0:
                    scale[:] = 1.0
                else:
                    m = self.max_scale
                    f = np.sqrt(mean / np.maximum(h, mean / (m * m)))
                    scale[:] = np.clip(f, 1.0 / m, m).astype(np.float32)
            if self.base is not None:
                scale *= self.base
            return
        mean = _mean(self.h) if t > 0 else 0.0
        if not mean > 0.0 or t < self.warmup:
            scale[:] = 1.0
        else:  # (bias correction: h̄/h is unchanged by the common factor 1/(1 − βᵗ))
            m2 = np.float32(self.max_scale * self.max_scale)
            np.maximum(self.h, np.float32(mean) / m2, out=scale)  # ≤ 0 and tiny: the bound M
            np.divide(np.float32(mean), scale, out=scale)
            np.sqrt(scale, out=scale)
            np.clip(scale, np.float32(1.0 / self.max_scale), np.float32(self.max_scale), out=scale)
        if self.base is not None:
            scale *= self.base

    @property
    def curvature(self) -> np.ndarray:
        """The current curvature average per value (bias-corrected for ``baseline``)."""
        if self.estimate_kind == "baseline":
            return self._corrected(self.h.astype(np.float64), self._updates())
        return self.h.copy()

    @property
    def preconditioner(self) -> np.ndarray:
        """The current per-value factors clip(√(h̄/h), 1/M, M) (without ``mu_scale``)."""
        s = self.vectors.scale
        return s.copy() if self.base is None else s / self.base

    def own_state(self) -> dict[str, np.ndarray]:
        out = {**super().own_state(), "optim.hizoo_h": self.h, "optim.hizoo_t": self.t}
        if self.estimate_kind == "baseline":
            out["optim.hizoo_cbar"] = self.cbar
            out["optim.hizoo_m2"] = self.m2
        return out

    def load_own_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_own_state(state)
        self.h[:] = state["optim.hizoo_h"]
        self.t[:] = state["optim.hizoo_t"]
        if self.estimate_kind == "baseline":
            self.cbar[:] = state["optim.hizoo_cbar"]
            self.m2[:] = state["optim.hizoo_m2"]
        self._rescale()


def _fsum_blocks(x: np.ndarray) -> float:
    """Σ x (float64), summed in fixed 1M-value blocks and added by ``math.fsum``."""
    return math.fsum(float(np.sum(x[i : i + CHUNK])) for i in range(0, x.size, CHUNK))


def _mean(x: np.ndarray) -> float:
    """The mean of a float32 array, summed in float64 in fixed 1M-value blocks (deterministic)."""
    if x.size == 0:
        return 0.0
    parts = [float(np.sum(x[i : i + CHUNK], dtype=np.float64)) for i in range(0, x.size, CHUNK)]
    return math.fsum(parts) / x.size


OPTIMIZERS = {"sgd": ZOSGD, "adam": ZOAdam, "sign": ZOSign, "hizoo": ZOHiZOO}
