"""Moving the evaluated point: feed = θ + c·z(step, index).

``Perturber.to(step, index, c)`` makes ONNX Runtime's next run see θ + c·z. With a separate
feed buffer (the default) this writes feed from the untouched master. In place
(``FlatParams.inplace``), θ itself is moved by the difference from where it stands, and
``reset()`` moves it back; replay makes the same calls, so the arithmetic is identical.
"""

from __future__ import annotations

from .directions import Directions
from .params import FlatParams


class Perturber:
    def __init__(self, params: FlatParams, directions: Directions):
        self.params = params
        self.dirs = directions
        self._at: tuple[int, int, float] | None = None  # (step, index, c) currently applied
        self._feed_stale = False

    def to(self, step: int, index: int, c: float) -> None:
        p = self.params
        if not p.inplace:
            self.dirs.axpy(step, index, c, p.master, p.feed)
            self._at = (step, index, c)
            self._feed_stale = True
            return
        if self._at is not None and self._at[:2] != (step, index):
            self.reset()
        cur = self._at[2] if self._at is not None else 0.0
        self.dirs.axpy(step, index, c - cur, p.master, p.master)
        self._at = (step, index, c)

    def reset(self) -> None:
        """Leave the perturbed point: θ is restored (in place); the feed is refreshed lazily."""
        p = self.params
        if p.inplace and self._at is not None:
            step, index, c = self._at
            self.dirs.axpy(step, index, -c, p.master, p.master)
        elif not p.inplace:
            self._feed_stale = True
        self._at = None

    def at_theta(self) -> None:
        """Make the next run evaluate θ itself (held-out evaluation)."""
        self.reset()
        if self._feed_stale:
            self.params.sync_feed()
            self._feed_stale = False
