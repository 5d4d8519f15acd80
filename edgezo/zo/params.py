"""The trainable tensors as one flat float32 master vector, with per-tensor views.

Two buffers of the same layout exist:

- ``master``: the current trained values θ, only ever changed by optimiser updates;
- ``feed``: what ONNX Runtime reads. A perturbed point θ + c·z is written into ``feed``; the
  per-tensor views of ``feed`` are contiguous float32 slices, so ONNX Runtime reads them without
  a copy (bound once through IOBinding).

Tensors marked ``positive`` in the manifest (e.g. quantisation scales) live on the positive
orthant and are moved multiplicatively: where an additive tensor goes x → x + v, a positive one
goes x → x·exp(v) (:meth:`FlatParams.move`). Perturbations and updates are then steps in
log-space, so no step, however large, can make a scale ≤ 0 (docs/concepts/literature.md §4,
HoZO); the result is clipped to [smallest normal, largest] float32 so an underflowing exp
cannot reach 0 either.

With ``inplace=True`` the two are the same buffer (MeZO's memory: nothing beyond inference).
Perturbations are then applied to θ itself and undone by the opposite step; in fp32 this leaves
≈1e-7 relative error per step. Runs stay deterministic and replay bit-exactly, because replay
performs the very same arithmetic (see ``edgezo.zo.replay``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError


@dataclass(frozen=True)
class TensorSpec:
    """One trainable tensor: a graph input of the model and a slice of the flat master.

    ``role`` (``lora_a``, ``lora_b``, ``norm``, ``bias``, ``dense``, ``embedding``, ``scale``,
    ``head``) tells what the tensor is; ``positive`` tensors are moved multiplicatively.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    role: str = "dense"
    positive: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


_TINY = np.float32(np.finfo(np.float32).tiny)
_HUGE = np.float32(np.finfo(np.float32).max)


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
        self.positive = np.zeros(pos, dtype=bool)  # the positive mask
        for sp, (a, b) in zip(self.specs, self.offsets, strict=True):
            self.positive[a:b] = sp.positive
        self.positive_ranges = _merge(
            [o for sp, o in zip(self.specs, self.offsets, strict=True) if sp.positive]
        )

    # -- moving a vector: additive, or multiplicative on positive tensors ---------------------

    def pieces(self, s: int, e: int) -> list[tuple[int, int, bool]]:
        """[s, e) cut into (lo, hi, positive) runs."""
        out, pos = [], s
        for a, b in self.positive_ranges:
            if b <= s or a >= e:
                continue
            lo, hi = max(a, s), min(b, e)
            if lo > pos:
                out.append((pos, lo, False))
            out.append((lo, hi, True))
            pos = hi
        if pos < e:
            out.append((pos, e, False))
        return out

    def move(self, x: np.ndarray, out: np.ndarray, s: int, v: np.ndarray) -> None:
        """``out[s:e] = x[s:e] + v`` (``e = s + len(v)``), but ``x·exp(v)`` on positive tensors.

        ``out`` may be ``x``. Plain float32 elementwise arithmetic in a fixed order.
        """
        e = s + v.size
        if not self.positive_ranges:
            np.add(x[s:e], v, out=out[s:e])
            return
        for lo, hi, positive in self.pieces(s, e):
            w = v[lo - s : hi - s]
            if positive:
                with np.errstate(over="ignore", under="ignore"):  # clipped just below
                    np.exp(w, out=w)
                    np.multiply(x[lo:hi], w, out=out[lo:hi])
                # exp may underflow to 0 or overflow to inf on a huge step: stay strictly
                # positive and finite (the smallest normal float32 up to the largest)
                np.clip(out[lo:hi], _TINY, _HUGE, out=out[lo:hi])
            else:
                np.add(x[lo:hi], w, out=out[lo:hi])

    def scale_additive(self, x: np.ndarray, factor: float) -> None:
        """``x *= float32(factor)`` on the additive tensors only (weight decay)."""
        f = np.float32(factor)
        if not self.positive_ranges:
            x *= f
            return
        for lo, hi, positive in self.pieces(0, self.dim):
            if not positive:
                x[lo:hi] *= f

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
            if s.positive and not np.all(self.master[a:b] > 0):
                raise CheckpointError(
                    f"{where}: {s.name} is marked positive but holds values <= 0",
                    "export the bundle again (positive tensors must be strictly positive), "
                    "or unmark the tensor in the manifest",
                )
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


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out
