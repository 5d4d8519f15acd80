"""Vectors along which θ moves, and moving the evaluated point: feed = θ ⊕ c·u.

A :class:`Vector` names a direction without storing it: plain ``z(step, index)`` of the run's
kind, optionally plus per-tensor multiples of other regenerable directions (DAP's aligned
direction z′ = z + a_T·v on each tensor T). :class:`VectorSource` builds any chunk of it, so
estimators perturb along it and optimisers update along it by the same code, in training and
in replay. Where the run scales its vectors per value (``VectorSource.scale``: per-tensor μ
from ``mu_scale``, HiZOO's curvature preconditioner), every vector is s ⊙ u: the perturbation
on a value is μ·s·u and, since the projected gradient is measured along s ⊙ u, the step there
is s² times plain SGD's in expectation (a diagonal preconditioner S²).

``Perturber.to(u, c)`` makes ONNX Runtime's next run see θ ⊕ c·u, where ⊕ is + on ordinary
tensors and θ·exp(c·u) on tensors marked positive (:meth:`FlatParams.move`). With a separate
feed buffer (the default) this writes feed from the untouched master. In place
(``FlatParams.inplace``), θ itself is moved by the difference from where it stands. An
estimator ends with ``release()``: in place it leaves θ displaced and returns the
:data:`Displacement` (u, c), which the optimiser undoes — folded into its own pass over u where
it can (plain ZO-SGD), saving one pass over θ per step. Replay makes the same calls, so the
arithmetic is identical.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .directions import CHUNK, Directions
from .params import FlatParams


@dataclass(frozen=True)
class Vector:
    """u = z_kind(step, index) + Σ_k coefs_k[T] · z_kind_k(step, index_k) on each tensor T.

    ``kind`` None is the run's direction kind; ``extra`` holds (kind, index, one coefficient
    per trainable tensor in manifest order).
    """

    step: int
    index: int
    kind: str | None = None
    extra: tuple[tuple[str, int, tuple[float, ...]], ...] = ()


#: θ ⊕ c·u stands in place of θ: (u, c). Whoever holds one must undo it (optimisers do).
Displacement = tuple[Vector, float]


def plain(step: int, index: int) -> Vector:
    return Vector(step, index)


class VectorSource:
    """Chunks of :class:`Vector` s for one run: the run's directions plus other kinds on demand."""

    def __init__(self, params: FlatParams, directions: Directions):
        self.params = params
        self.dirs = directions
        self._kinds = {directions.kind: directions}
        n = min(CHUNK, max(params.dim, 1))
        self._buf = np.empty(n, dtype=np.float32)
        self._tmp = np.empty(n, dtype=np.float32)
        #: per-value factors s (float32, θ's size) or None: every vector is s ⊙ u. Set once by
        #: the engine from ``mu_scale`` (per tensor), and after each update by ``hizoo``.
        self.scale: np.ndarray | None = None

    def of(self, kind: str | None) -> Directions:
        kind = kind or self.dirs.kind
        if kind not in self._kinds:
            self._kinds[kind] = Directions(self.dirs.seed, self.dirs.dim, kind)
        return self._kinds[kind]

    @property
    def nchunks(self) -> int:
        return self.dirs.nchunks

    def chunk(
        self, u: Vector, c: int, out: np.ndarray | None = None, scaled: bool = True
    ) -> np.ndarray:
        """Values [c·CHUNK, ...) of u (into ``out``, by default a reused buffer); times the
        per-value ``scale`` where one is set, unless ``scaled`` is false (the raw direction)."""
        s = c * CHUNK
        e = min(self.params.dim, s + CHUNK)
        out = self._buf[: e - s] if out is None else out
        self.of(u.kind).chunk(u.step, u.index, c, out=out)
        for kind, index, coefs in u.extra:
            w = self.of(kind).chunk(u.step, index, c, out=self._tmp[: e - s])
            for (a, b), k in zip(self.params.offsets, coefs, strict=True):
                lo, hi = max(a, s), min(b, e)
                if lo < hi and k != 0.0:
                    w[lo - s : hi - s] *= np.float32(k)
                    out[lo - s : hi - s] += w[lo - s : hi - s]
        if scaled and self.scale is not None:
            out *= self.scale[s:e]
        return out

    def chunks(self, u: Vector) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, values) over u; ``values`` is a reused buffer."""
        for c in range(self.nchunks):
            yield c * CHUNK, self.chunk(u, c)

    def move(self, u: Vector, coef: float, x: np.ndarray, out: np.ndarray) -> None:
        """``out = x ⊕ float32(coef)·u`` chunk by chunk (``out`` may be ``x``)."""
        c32 = np.float32(coef)
        for s, v in self.chunks(u):
            v *= c32
            self.params.move(x, out, s, v)

    def dots(self, a: Vector, b: Vector) -> tuple[list[float], list[float]]:
        """Per tensor T: (aᵀb on T, bᵀb on T), float64 partial sums added by ``math.fsum``."""
        ab: list[list[float]] = [[] for _ in self.params.offsets]
        bb: list[list[float]] = [[] for _ in self.params.offsets]
        for c in range(self.nchunks):
            s = c * CHUNK
            e = min(self.params.dim, s + CHUNK)
            va = self.chunk(a, c).astype(np.float64)
            vb = self.chunk(b, c, out=np.empty(e - s, dtype=np.float32)).astype(np.float64)
            for t, (lo, hi) in enumerate(self.params.offsets):
                lo, hi = max(lo, s), min(hi, e)
                if lo < hi:
                    x, y = va[lo - s : hi - s], vb[lo - s : hi - s]
                    ab[t].append(float(np.dot(x, y)))
                    bb[t].append(float(np.dot(y, y)))
        return [math.fsum(p) for p in ab], [math.fsum(p) for p in bb]


class Perturber:
    def __init__(self, params: FlatParams, directions: Directions):
        self.params = params
        self.dirs = directions
        self.vectors = VectorSource(params, directions)
        self._at: Displacement | None = None  # (u, c) currently applied
        self._feed_stale = False

    def to(self, u: Vector, c: float) -> None:
        """Make the next run evaluate θ ⊕ c·u."""
        p = self.params
        if not p.inplace:
            self.vectors.move(u, c, p.master, p.feed)
            self._at = (u, c)
            self._feed_stale = True
            return
        if self._at is not None and self._at[0] != u:
            self._restore()
        cur = self._at[1] if self._at is not None else 0.0
        self.vectors.move(u, c - cur, p.master, p.master)
        self._at = (u, c)

    def reset(self) -> None:
        """Leave the perturbed point: θ is restored (in place); the feed is refreshed lazily."""
        self._restore()

    def release(self) -> Displacement | None:
        """Leave the perturbed point *without* restoring θ: in place, θ stays displaced by the
        returned (u, c), now owned by the caller, who must undo it; with a feed buffer θ was
        never moved, the feed is refreshed lazily, and the result is None."""
        if not self.params.inplace:
            self._restore()
            return None
        held, self._at = self._at, None
        return held

    def _restore(self) -> None:
        p = self.params
        if p.inplace and self._at is not None:
            u, c = self._at
            self.vectors.move(u, -c, p.master, p.master)
        elif not p.inplace:
            self._feed_stale = True
        self._at = None

    def to_from(self, base: np.ndarray, u: Vector | None, c: float = 0.0) -> None:
        """Make the next run evaluate ``base`` ⊕ c·u (``base`` itself for u None): a point other
        than θ, such as SVRG's anchor. Needs a feed buffer (not in place): θ is never moved."""
        p = self.params
        if p.inplace:
            raise ValueError("evaluating away from θ needs a feed buffer: perturbation=copy")
        self._restore()
        if u is None:
            np.copyto(p.feed, base)
        else:
            self.vectors.move(u, c, base, p.feed)
        self._feed_stale = True

    def at_theta(self) -> None:
        """Make the next run evaluate θ itself (held-out evaluation, a shared base point)."""
        self._restore()
        if self._feed_stale:
            self.params.sync_feed()
            self._feed_stale = False
