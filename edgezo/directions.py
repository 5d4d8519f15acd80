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
  one of 65,536 equiprobable bins, the table rescaled to unit variance exactly. About 3× faster
  than numpy's ziggurat, stable across numpy versions, tails truncated at ±4.4σ.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

CHUNK = 1 << 20  # values per chunk; part of the direction's definition — never change it
KINDS = ("rademacher", "gaussian")
_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=1)
def _gaussian_table() -> np.ndarray:
    nd = statistics.NormalDist()
    t = np.array([nd.inv_cdf((k + 0.5) / 65536.0) for k in range(65536)], dtype=np.float64)
    t /= np.sqrt(np.mean(t * t))  # exactly unit variance over the 65,536 equiprobable bins
    return t.astype(np.float32)


def _raw_bits(seed: int, step: int, index: int, chunk: int, words: int) -> np.ndarray:
    key = np.array([seed & _MASK64, step & _MASK64], dtype=np.uint64)
    counter = np.array([0, 0, chunk, index], dtype=np.uint64)
    return np.random.Philox(key=key, counter=counter).random_raw(words)


class Directions:
    """Generator of directions of dimension ``dim`` for one run seed.

    >>> d = Directions(seed=7, dim=10, kind="rademacher")
    >>> z = d.full(step=3, index=0)          # the same values on any machine, any time
    """

    def __init__(self, seed: int, dim: int, kind: str = "rademacher"):
        if kind not in KINDS:
            raise ValueError(f"direction kind must be one of {KINDS}, got {kind!r}")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.seed = int(seed)
        self.dim = int(dim)
        self.kind = kind
        self._scratch = np.empty(min(CHUNK, max(dim, 1)), dtype=np.float32)

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
        else:
            bits = _raw_bits(self.seed, step, index, c, (n + 3) // 4)
            np.take(_gaussian_table(), bits.view(np.uint16)[:n], out=out)
        return out

    def chunks(self, step: int, index: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, end, values) over the direction; ``values`` is a reused buffer."""
        for c in range((self.dim + CHUNK - 1) // CHUNK):
            s = c * CHUNK
            e = min(self.dim, s + CHUNK)
            yield s, e, self.chunk(step, index, c, out=self._scratch[: e - s])

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
