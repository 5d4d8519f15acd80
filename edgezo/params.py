"""The trainable tensors as one flat float32 master vector, with per-tensor views.

Two buffers of the same layout exist:

- ``master``: the current trained values θ, only ever changed by optimiser updates;
- ``feed``: what ONNX Runtime reads. A perturbed point θ + c·z is written into ``feed``; the
  per-tensor views of ``feed`` are contiguous float32 slices, so ONNX Runtime reads them without
  a copy (bound once through IOBinding).

With ``inplace=True`` the two are the same buffer (MeZO's memory: nothing beyond inference).
Perturbations are then applied to θ itself and undone by the opposite step; in fp32 this leaves
≈1e-7 relative error per step. Runs stay deterministic and replay bit-exactly, because replay
performs the very same arithmetic (see ``edgezo.replay``).
"""

from __future__ import annotations

import numpy as np

from .bundle import TensorSpec
from .errors import CheckpointError


class FlatParams:
    def __init__(self, specs: list[TensorSpec], inplace: bool = False):
        self.specs = list(specs)
        self.offsets: list[tuple[int, int]] = []
        pos = 0
        for s in self.specs:
            self.offsets.append((pos, pos + s.size))
            pos += s.size
        self.dim = pos
        self.master = np.zeros(pos, dtype=np.float32)
        self.inplace = inplace
        self.feed = self.master if inplace else np.zeros(pos, dtype=np.float32)

    # -- views -------------------------------------------------------------------------------

    def views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Per-tensor views (no copies) into ``buf`` (``master`` or ``feed``)."""
        pairs = zip(self.specs, self.offsets, strict=True)
        return {s.name: buf[a:b].reshape(s.shape) for s, (a, b) in pairs}

    def feed_views(self) -> dict[str, np.ndarray]:
        return self.views(self.feed)

    def load(self, tensors: dict[str, np.ndarray], where: str = "tensors") -> None:
        """Copy named tensors into the master (and the feed)."""
        for s, (a, b) in zip(self.specs, self.offsets, strict=True):
            t = tensors.get(s.name)
            if t is None:
                raise CheckpointError(
                    f"{where} has no tensor {s.name!r}", "use the file written for this bundle"
                )
            if tuple(t.shape) != s.shape:
                raise CheckpointError(
                    f"{where}: {s.name} has shape {tuple(t.shape)}, the bundle says {s.shape}",
                    "use the file written for this bundle",
                )
            self.master[a:b] = np.asarray(t, dtype=np.float32).reshape(-1)
        self.sync_feed()

    def sync_feed(self) -> None:
        """Make ``feed`` equal to the master (evaluation at θ)."""
        if not self.inplace:
            np.copyto(self.feed, self.master)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the trained tensors by name."""
        return {k: v.copy() for k, v in self.views(self.master).items()}

    @property
    def nbytes(self) -> int:
        return self.master.nbytes * (1 if self.inplace else 2)
