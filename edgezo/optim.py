"""Update rules applied to the flat master from projected gradients, and learning-rate schedules.

The update regenerates each direction chunk by chunk (never stored), so plain ZO-SGD needs no
memory beyond θ; momentum keeps one flat buffer of θ's size. All arithmetic is float32
elementwise with float32-cast coefficients, in a fixed order: identical on every machine, and
identical when :mod:`edgezo.replay` redoes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .directions import CHUNK, Directions
from .params import FlatParams


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


class ZOSGD:
    """θ ← θ(1 − ηλ) − η·m, m = β·m + (1/q)Σ g_i z_i (β = 0: plain ZO-SGD, no buffer).

    ``clip`` bounds each projected gradient g_i to [−clip, clip] before use.
    """

    def __init__(self, params: FlatParams, directions: Directions, momentum: float = 0.0,
                 weight_decay: float = 0.0, clip: float | None = None):
        self.params = params
        self.dirs = directions
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.clip = clip
        self.buf = np.zeros(params.dim, dtype=np.float32) if momentum > 0 else None

    def clipped(self, g: list[float]) -> list[float]:
        if self.clip is None:
            return list(g)
        return [min(self.clip, max(-self.clip, x)) for x in g]

    def update(self, step: int, g: list[float], lr: float) -> None:
        theta = self.params.master
        gs = self.clipped(g)
        q = len(gs)
        if self.weight_decay:
            theta *= np.float32(1.0 - lr * self.weight_decay)
        if self.buf is None:
            for i, gi in enumerate(gs):
                self.dirs.axpy(step, i, -lr * gi / q, theta, theta)
            return
        self.buf *= np.float32(self.momentum)
        for i, gi in enumerate(gs):
            self.dirs.axpy(step, i, gi / q, self.buf, self.buf)
        lr32 = np.float32(lr)
        for s in range(0, theta.size, CHUNK):  # chunked: no temporary of θ's size
            theta[s : s + CHUNK] -= lr32 * self.buf[s : s + CHUNK]

    # -- state for checkpoints ---------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.buf is None else {"optim.momentum": self.buf}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if self.buf is not None:
            self.buf[:] = state["optim.momentum"]

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.nbytes
