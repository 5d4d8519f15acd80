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
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
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

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.buf is None else {"optim.momentum": self.buf}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
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

    def state(self) -> dict[str, np.ndarray]:
        return {"optim.adam_m": self.m, "optim.adam_v": self.v, "optim.adam_t": self.t}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.m[:] = state["optim.adam_m"]
        self.v[:] = state["optim.adam_v"]
        self.t[:] = state["optim.adam_t"]


OPTIMIZERS = {"sgd": ZOSGD, "adam": ZOAdam, "sign": ZOSign}
