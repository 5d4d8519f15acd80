"""Training losses over a subset of the vocabulary (the bundle's ``stages.vocab`` graph).

The subset is every token id the training examples' labels hold plus the ``frequent`` lowest
ids (a BPE vocabulary numbers its tokens in merge order, most frequent first). It is a pure
function of the training data, the bundle and the setting, so a resumed run chooses the same
one; its size and digest go into the ledger header and a resume checks them.

The LM head's rows for it are gathered once from the bundle's weight file (memory-mapped,
never read whole) and bound to the vocabulary graph; a batch's labels are remapped to
positions in the subset. Held-out evaluation, generation and ``compare`` run the
whole-vocabulary graphs. docs/concepts/vocab-subset.md explains the choice and its cost.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Example
from .errors import BundleError

REEXPORT = "re-export the bundle with `edgezo export`"


def choose(train: list[Example], frequent: int, vocab: int) -> np.ndarray:
    """Sorted token ids: every label of ``train`` plus ``0 .. frequent - 1`` (within ``vocab``)."""
    labels = np.fromiter((t for e in train for t in e.labels if t >= 0), dtype=np.int64)
    if labels.size and int(labels.max()) >= vocab:
        raise BundleError(
            f"a training label is token {int(labels.max())}, outside the bundle's vocabulary "
            f"of {vocab}",
            "tokenise the data with the bundle's own tokenizer",
        )
    return np.union1d(labels, np.arange(min(frequent, vocab), dtype=np.int64))


def digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def read_rows(folder: Path, entry: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    """The head's rows ``ids`` as a contiguous float32 ``[len(ids), hidden]`` array, read
    through a memory map of the entry's file (only those rows become resident)."""
    folder = Path(folder)
    path = (folder / entry["rows_file"]).resolve()
    if folder.resolve() not in path.parents:
        raise BundleError(f"stages.vocab.rows_file leads outside the bundle ({path})", REEXPORT)
    a, b = (int(x) for x in entry["rows_shape"])
    offset = int(entry["rows_offset"])
    if not path.is_file() or path.stat().st_size < offset + a * b * 4:
        raise BundleError(
            f"{path.name} is shorter than the LM head the manifest places in it "
            f"({a} x {b} float32 at byte {offset})",
            REEXPORT,
        )
    mapped = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(a, b))
    if entry["rows_layout"] == "rows":
        out = np.ascontiguousarray(mapped[ids], dtype=np.float32)
    else:  # stored [hidden, vocab]
        out = np.ascontiguousarray(mapped[:, ids].T, dtype=np.float32)
    del mapped
    return out


def sample_rest(chosen: np.ndarray, vocab: int, n: int, seed: int) -> np.ndarray:
    """``n`` sorted ids drawn without replacement from the tokens not in ``chosen`` (seeded)."""
    rest = np.setdiff1d(np.arange(vocab, dtype=np.int64), chosen)
    if n >= len(rest):
        return rest
    return np.sort(np.random.default_rng([seed, 0x766F6361]).choice(rest, n, replace=False))


@dataclass
class VocabSubset:
    """The chosen ids (then the sampled stand-ins), their head rows, each row's log weight
    and the label remapping."""

    ids: np.ndarray
    rows: np.ndarray
    position: np.ndarray  # [vocab] -> position in ids, -1 when not chosen
    graph: Path
    input: str
    log_weights: np.ndarray | None = None  # [rows]: 0 for a chosen id, log w for a stand-in
    weights_input: str = "lm_head_log_weights"
    chosen: int = 0  # ids[:chosen] are chosen, ids[chosen:] sampled

    @classmethod
    def of(
        cls,
        folder: Path,
        entry: dict[str, Any],
        ids: np.ndarray,
        vocab: int,
        sampled: np.ndarray | None = None,
    ) -> VocabSubset:
        """``ids`` chosen, plus ``sampled`` stand-ins for every other token: each carries
        log((vocab − len(ids)) / len(sampled))."""
        sampled = np.zeros(0, dtype=np.int64) if sampled is None else sampled
        every = np.concatenate([ids, sampled])
        weights = np.zeros(len(every), dtype=np.float32)
        if len(sampled):
            weights[len(ids) :] = np.log((vocab - len(ids)) / len(sampled))
        position = np.full(vocab, -1, dtype=np.int64)
        position[ids] = np.arange(len(ids))
        return cls(
            ids=every,
            rows=read_rows(folder, entry, every),
            position=position,
            graph=Path(folder) / entry["graph"],
            input=entry["input"],
            log_weights=weights,
            weights_input=entry.get("weights_input", "lm_head_log_weights"),
            chosen=len(ids),
        )

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """Token labels as positions in the subset (ignored positions stay -100)."""
        keep = labels >= 0
        out = np.where(keep, self.position[np.where(keep, labels, 0)], -100)
        if np.any(out[keep] < 0):
            missing = sorted(set(labels[keep][out[keep] < 0].tolist()))[:5]
            raise BundleError(
                f"training labels {missing} are not in the vocabulary subset chosen from the "
                "training data",
                "this is a bug in edgezo; set vocab_subset=0 to train on the whole vocabulary",
            )
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "size": int(self.chosen),
            "sampled": int(len(self.ids) - self.chosen),
            "digest": digest(self.ids),
        }


def entry_of(bundle) -> dict[str, Any] | None:
    st = bundle.manifest.stages or {}
    v = st.get("vocab")
    return v if isinstance(v, dict) else None


def subset_for(
    bundle, train: list[Example], frequent: int, sample: int = 0, seed: int = 0
) -> VocabSubset | None:
    """The run's vocabulary subset (``frequent`` + the data's tokens, and ``sample`` seeded
    stand-ins for the rest), or None when the bundle has no vocabulary graph, ``frequent``
    is 0, or the rows would be the whole vocabulary."""
    entry = entry_of(bundle)
    vocab = bundle.manifest.vocab_size
    if entry is None or frequent <= 0 or vocab is None:
        return None
    ids = choose(train, frequent, vocab)
    sampled = sample_rest(ids, vocab, sample, seed) if sample > 0 else None
    if len(ids) + (0 if sampled is None else len(sampled)) >= vocab:
        return None
    return VocabSubset.of(bundle.path, entry, ids, vocab, sampled)
