"""Counter-based random directions, regenerable anywhere from (seed, step, index).

A direction z of dimension d is produced in fixed chunks of ``CHUNK`` values. Chunk ``c`` of the
direction for (seed, step, index) is derived from the raw 64-bit output of a Philox generator
with key ``(seed, step)`` and counter ``(0, 0, c, index)``. Philox is counter-based and its raw
stream is part of numpy's stability guarantee, and the chunking is fixed, so a direction does
not depend on the machine, the numpy version's sampling algorithms, the number of threads, or
which chunks were asked for first: any direction can be rebuilt years later from its key.

Kinds (all with E[z zᵀ] = I):

- ``rademacher``: ±1 entries from single random bits (constant magnitude, minimum variance).
- ``gaussian``: N(0, 1) by a 16-bit inverse-CDF table: each value is the midpoint quantile of
  one of 65,536 equiprobable bins, the table rescaled to unit variance exactly. About 4× faster
  than numpy's ziggurat, stable across numpy versions, tails truncated at ±4.4σ.
- ``sphere``: uniform on the sphere of radius √d (constant magnitude, the minimum-variance
  family): the ``gaussian`` direction of the same key times √d/‖g‖. Two chunked passes: the
  first counts how often each of the 65,536 table entries occurs (exact integers), from which
  ‖g‖² is summed with ``math.fsum`` (correctly rounded, so the scale is the same on every
  machine); the second looks the values up in the table scaled once by that float32 factor.
  The scale of the last few keys is cached, so perturbing and updating along the same
  direction pays the first pass once. E[zzᵀ] = I exactly: the entries are exchangeable and
  sign-symmetric with Σz² = d.

Speed (2 shared EPYC cores, 134.5M values, ``tools/bench_directions.py``): Rademacher ≈ 0.07 s,
Gaussian ≈ 0.25–0.33 s (Philox bits ≈ 0.13 s + table gather; the gather works on L2-sized
sub-blocks and uses ``mode="clip"``, which skips numpy's per-index bounds check and gives the
same values because a uint16 index is always inside the 65,536-entry table), sphere about the
same per pass plus a one-off norm pass per key.

History-guided kind (:class:`ConeDirections`, not a :class:`Directions` kind: it needs state):

- ``cone``: each direction lies on a cone of fixed half-angle φ around an axis that the run
  carries (the optimiser's momentum buffer m): u = √d·(cos φ·m̂ + sin φ·ẑ⊥), where ẑ⊥ is the
  ``sphere`` direction of the same key made orthogonal to m̂ and normalised. ‖u‖ = √d and
  cos(u, m̂) = cos φ. While m = 0 (the first step) it is the ``sphere`` direction itself. It is
  not isotropic (E[uuᵀ] ≠ I): it trades unbiasedness for probes that lean along the history.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

CHUNK = 1 << 20  # values per chunk; part of the direction's definition — never change it
KINDS = ("rademacher", "gaussian", "sphere")  # stateless kinds: Directions
CONE = "cone"  # the history-guided kind: ConeDirections
ALL_KINDS = (*KINDS, CONE)
_SCALE_CACHE = 64  # sphere scales kept per Directions object (≥ the q of a step, ×2)
_SMALL = 1 << 14  # directions up to this size skip the 65,536-entry histogram and table
_SUB = 1 << 16  # values per table-lookup sub-block (a multiple of 4: whole 64-bit words)
_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=1)
def _gaussian_table() -> np.ndarray:
    nd = statistics.NormalDist()
    t = np.array([nd.inv_cdf((k + 0.5) / 65536.0) for k in range(65536)], dtype=np.float64)
    t /= np.sqrt(np.mean(t * t))  # exactly unit variance over the 65,536 equiprobable bins
    return t.astype(np.float32)


def _philox(seed: int, step: int, index: int, chunk: int) -> np.random.Philox:
    key = np.array([seed & _MASK64, step & _MASK64], dtype=np.uint64)
    counter = np.array([0, 0, chunk, index], dtype=np.uint64)
    return np.random.Philox(key=key, counter=counter)


@lru_cache(maxsize=1)
def _table_squares() -> np.ndarray:
    return _gaussian_table().astype(np.float64) ** 2  # exact: a float32 squared fits


def _raw_bits(seed: int, step: int, index: int, chunk: int, words: int) -> np.ndarray:
    return _philox(seed, step, index, chunk).random_raw(words)


class Directions:
    """Generator of directions of dimension ``dim`` for one run seed.

    >>> d = Directions(seed=7, dim=10, kind="rademacher")
    >>> z = d.full(step=3, index=0)          # the same values on any machine, any time
    """

    def __init__(self, seed: int, dim: int, kind: str = "rademacher"):
        if kind == CONE:
            raise ValueError("the cone kind needs the run's history: build a ConeDirections")
        if kind not in KINDS:
            raise ValueError(f"direction kind must be one of {ALL_KINDS}, got {kind!r}")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.seed = int(seed)
        self.dim = int(dim)
        self.kind = kind
        self._scratch = np.empty(min(CHUNK, max(dim, 1)), dtype=np.float32)
        self._scales: OrderedDict[tuple[int, int], np.float32] = OrderedDict()
        self._scaled_table: tuple[tuple[int, int], np.ndarray] | None = None

    @property
    def nchunks(self) -> int:
        return (self.dim + CHUNK - 1) // CHUNK

    def _table_bits(self, step: int, index: int, c: int, n: int) -> np.ndarray:
        return _raw_bits(self.seed, step, index, c, (n + 3) // 4).view(np.uint16)[:n]

    def sphere_scale(self, step: int, index: int) -> np.float32:
        """√d/‖g‖ for the Gaussian direction g of this key (first pass of ``sphere``)."""
        key = (step, index)
        if key in self._scales:
            self._scales.move_to_end(key)
            return self._scales[key]
        if self.dim <= _SMALL:  # the same counts, without a 65,536-bin histogram
            nz, cnt = np.unique(self._table_bits(step, index, 0, self.dim), return_counts=True)
        else:
            counts = np.zeros(65536, dtype=np.int64)
            for c in range(self.nchunks):
                n = min(self.dim, (c + 1) * CHUNK) - c * CHUNK
                counts += np.bincount(self._table_bits(step, index, c, n), minlength=65536)
            nz = np.flatnonzero(counts)
            cnt = counts[nz]
        # Σ count_k · t_k² with each product rounded once and the sum correctly rounded: a
        # value independent of summation order, hence of the machine and of the chunking
        sq = math.fsum((cnt.astype(np.float64) * _table_squares()[nz]).tolist())
        scale = np.float32(math.sqrt(self.dim / sq)) if sq > 0 else np.float32(1.0)
        self._scales[key] = scale
        if len(self._scales) > _SCALE_CACHE:
            self._scales.popitem(last=False)
        return scale

    def chunk(self, step: int, index: int, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """Values [c*CHUNK, min(dim, (c+1)*CHUNK)) of direction (step, index)."""
        n = min(self.dim, (c + 1) * CHUNK) - c * CHUNK
        if n <= 0:
            raise IndexError(f"chunk {c} is outside a direction of dimension {self.dim}")
        if out is None:
            out = np.empty(n, dtype=np.float32)
        if self.kind == "rademacher":
            bits = _raw_bits(self.seed, step, index, c, (n + 63) // 64)
            b = np.unpackbits(bits.view(np.uint8), bitorder="little", count=n)
            np.multiply(b, 2, out=out, dtype=np.float32)
            out -= 1.0
        elif self.kind == "sphere" and n <= _SMALL:  # small: scale the values, not the table
            np.take(_gaussian_table(), self._table_bits(step, index, c, n), out=out, mode="clip")
            out *= self.sphere_scale(step, index)  # the same float32 products as via the table
        else:
            if self.kind == "gaussian":
                table = _gaussian_table()
            else:  # sphere: the Gaussian values times a per-key float32 scale (scaled table)
                key = (step, index)
                if self._scaled_table is None or self._scaled_table[0] != key:
                    self._scaled_table = (key, _gaussian_table() * self.sphere_scale(step, index))
                table = self._scaled_table[1]
            # Sub-blocks keep the bits, the index copy and the table in L2 (≈30% faster); one
            # Philox stream read in order gives the same bits as one call for the whole chunk.
            bg = _philox(self.seed, step, index, c)
            for s in range(0, n, _SUB):
                m = min(_SUB, n - s)
                bits = bg.random_raw((m + 3) // 4).view(np.uint16)[:m]
                np.take(table, bits, out=out[s : s + m], mode="clip")
        return out

    def chunks(self, step: int, index: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, end, values) over the direction; ``values`` is a reused buffer."""
        for c in range(self.nchunks):
            s = c * CHUNK
            e = min(self.dim, s + CHUNK)
            yield s, e, self.chunk(step, index, c, out=self._scratch[: e - s])

    def packed_bits(self, step: int, index: int) -> np.ndarray:
        """The raw form of a ``rademacher`` direction: ``ceil(dim / 8)`` bytes, value ``j`` is
        ``+1`` where bit ``j % 8`` (little-endian) of byte ``j // 8`` is set, else ``-1``.

        The same bits :meth:`chunk` expands (a full chunk is a whole number of bytes), so a
        device can expand them into bitwise the same direction (``edgezo.device_perturb``).
        """
        if self.kind != "rademacher":
            raise ValueError(f"packed_bits is the raw form of rademacher, not {self.kind}")
        parts = []
        for c in range(self.nchunks):
            n = min(self.dim, (c + 1) * CHUNK) - c * CHUNK
            words = _raw_bits(self.seed, step, index, c, (n + 63) // 64)
            parts.append(words.view(np.uint8)[: (n + 7) // 8])
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def table_indices(self, step: int, index: int) -> np.ndarray:
        """The raw form of a ``gaussian``/``sphere`` direction: one uint16 per value, the entry
        of :meth:`value_table` it takes (the bits :meth:`chunk` looks up)."""
        if self.kind == "rademacher":
            raise ValueError("table_indices is the raw form of gaussian and sphere directions")
        out = np.empty(self.dim, dtype=np.uint16)
        for c in range(self.nchunks):
            s = c * CHUNK
            e = min(self.dim, s + CHUNK)
            out[s:e] = self._table_bits(step, index, c, e - s)
        return out

    def value_table(self, step: int, index: int) -> np.ndarray:
        """The 65,536 float32 values :meth:`table_indices` index: the Gaussian table, times
        this key's float32 scale for ``sphere`` (the same products as :meth:`chunk`)."""
        if self.kind == "gaussian":
            return _gaussian_table()
        if self.kind == "sphere":
            return _gaussian_table() * self.sphere_scale(step, index)
        raise ValueError("value_table belongs to gaussian and sphere directions")

    def full(self, step: int, index: int) -> np.ndarray:
        """The whole direction as a new array (tests and small dims; large d: use chunks)."""
        z = np.empty(self.dim, dtype=np.float32)
        for s, e, v in self.chunks(step, index):
            z[s:e] = v
        return z

    def axpy(self, step: int, index: int, coef: float, x: np.ndarray, out: np.ndarray) -> None:
        """``out = x + float32(coef) * z`` chunk by chunk (``out`` may be ``x``)."""
        c = np.float32(coef)
        for s, e, v in self.chunks(step, index):
            v *= c
            np.add(x[s:e], v, out=out[s:e])


def exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """Σ a_i b_i of two float32 vectors, correctly rounded: each product is exact in float64
    (24 + 24 significant bits) and ``math.fsum`` sums them without error, so the value does not
    depend on the machine, the BLAS, the chunking or the order of the chunks."""
    parts = []
    for s in range(0, a.size, CHUNK):
        p = a[s : s + CHUNK].astype(np.float64)
        p *= b[s : s + CHUNK]
        parts.append(math.fsum(p.tolist()))
    return math.fsum(parts)


class ConeDirections:
    """Directions on a cone of half-angle φ around the run's history axis (kind ``cone``).

    ``u(step, i) = √d·(cos φ·m̂ + sin φ·ẑ⊥)`` with ẑ⊥ = (ẑ − (ẑ·m̂)m̂)/‖ẑ − (ẑ·m̂)m̂‖, ẑ the unit
    ``sphere`` direction of the key. Expanded, u = α·m + β·z with z the radius-√d sphere
    direction, ρ = ẑ·m̂, β = sin φ / √(1 − ρ²) and α = √d (cos φ − ρ β) / ‖m‖: the chunk of u is
    two float32 scalings of chunks already at hand, and α, β are two scalars per key.

    The axis m is *state*: the optimiser's momentum buffer, bound by the engine
    (:meth:`bind`), which a checkpoint saves and replay rebuilds step by step. Because m moves
    when the step's update is applied, a direction is only defined inside its step:
    :meth:`begin` fixes ‖m‖ for step t, each ρ is computed (one exact pass) the first time a
    key is asked for, and :meth:`end` closes the step; asking for another step's direction is
    an error instead of a silently different vector. The update must read each chunk of u
    before it writes the same chunk of m (the optimisers do, chunk by chunk). While m = 0 a
    direction is the sphere direction whether a step is open or not (the μ check at the start
    of a run perturbs along step 0's directions before step 0).

    m = 0, a non-finite ‖m‖ or a ẑ (numerically) parallel to m̂: u is the sphere direction
    itself, bit for bit (the fallback of the first step). ‖m‖ and ρ are correctly rounded
    sums (:func:`exact_dot`), so u is the same on every machine.
    """

    kind = CONE

    def __init__(self, seed: int, dim: int, angle_deg: float):
        if not 0.0 < angle_deg < 90.0:
            raise ValueError(f"cone angle must be in (0, 90) degrees, got {angle_deg!r}")
        self.base = Directions(seed, dim, "sphere")
        self.seed = self.base.seed
        self.dim = self.base.dim
        self.angle_deg = float(angle_deg)
        self.cos = math.cos(math.radians(angle_deg))
        self.sin = math.sin(math.radians(angle_deg))
        self.axis: np.ndarray | None = None
        self._step: int | None = None
        self._norm = 0.0
        self._coefs: dict[int, tuple[np.float32, np.float32] | None] = {}
        self._tmp = np.empty(min(CHUNK, max(dim, 1)), dtype=np.float32)
        self._scratch = np.empty(min(CHUNK, max(dim, 1)), dtype=np.float32)

    nchunks = Directions.nchunks

    def bind(self, axis: np.ndarray) -> None:
        """Use ``axis`` (a float32 vector of dimension d, read live) as the cone's axis."""
        if axis.dtype != np.float32 or axis.shape != (self.dim,):
            raise ValueError(f"the cone axis must be float32 of shape ({self.dim},)")
        self.axis = axis

    def begin(self, step: int) -> None:
        """Open step ``step``: its directions lean on the axis as it stands now."""
        if self.axis is None:
            raise RuntimeError("ConeDirections.begin before bind(axis)")
        self._step = int(step)
        self._coefs.clear()
        sq = exact_dot(self.axis, self.axis)
        self._norm = math.sqrt(sq) if math.isfinite(sq) else 0.0

    def end(self) -> None:
        """Close the step: the axis may now move; its directions are no longer defined."""
        self._step = None
        self._coefs.clear()

    def coefs(self, step: int, index: int) -> tuple[np.float32, np.float32] | None:
        """(α, β) of u = α·m + β·z for the key, or None where u is the sphere direction."""
        if self._step is None and self.axis is not None and not self.axis.any():
            return None  # no history yet: the sphere direction, whichever step is asked for
        if self._step != step:
            raise RuntimeError(
                f"cone direction of step {step} asked for while step {self._step} is open: "
                "its axis (the momentum) has moved since; directions are defined inside "
                "their step only"
            )
        if index in self._coefs:
            return self._coefs[index]
        co = None
        if self._norm > 0.0:
            parts = []  # z·m chunk by chunk: exact products, correctly rounded sum
            for s, e, v in self.base.chunks(step, index):
                p = v.astype(np.float64)
                p *= self.axis[s:e]
                parts.append(math.fsum(p.tolist()))
            zm = math.fsum(parts)
            rho = zm / (math.sqrt(self.dim) * self._norm)
            rest = 1.0 - rho * rho
            if math.isfinite(rho) and rest > 1e-12:
                beta = self.sin / math.sqrt(rest)
                alpha = math.sqrt(self.dim) * (self.cos - rho * beta) / self._norm
                co = (np.float32(alpha), np.float32(beta))
        self._coefs[index] = co
        return co

    def chunk(self, step: int, index: int, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """Values [c*CHUNK, min(dim, (c+1)*CHUNK)) of u(step, index): β·z + α·m."""
        co = self.coefs(step, index)
        out = self.base.chunk(step, index, c, out=out)
        if co is None:
            return out
        alpha, beta = co
        s = c * CHUNK
        t = self._tmp[: out.size]
        np.multiply(self.axis[s : s + out.size], alpha, out=t)
        out *= beta
        out += t
        return out

    chunks = Directions.chunks
    full = Directions.full
    axpy = Directions.axpy


def uniform(seed: int, step: int, stream: int, index: int) -> float:
    """A uniform float in [0, 1) keyed by (seed, step, stream, index), never global state.

    Philox with key (seed, step) and counter (1, stream, 0, index): word 0 = 1 keeps these
    draws apart from every direction's bits (word 0 = 0). Estimators use it for their discrete
    choices (P3/P4's level and coin, DAP's sign), so training and replay draw the same values.
    """
    key = np.array([seed & _MASK64, step & _MASK64], dtype=np.uint64)
    counter = np.array([1, stream & _MASK64, 0, index & _MASK64], dtype=np.uint64)
    raw = int(np.random.Philox(key=key, counter=counter).random_raw(1)[0])
    return (raw >> 11) * (1.0 / (1 << 53))
