"""Training on a bundle's suffix graph, with each example's frozen-prefix rows computed once.

A bundle whose trainable tensors all sit late in the graph (a classification head over a
frozen encoder; LoRA on a causal LM's last blocks) carries a split of its graph
(``manifest.stages``, written by ``exporters/stages.py`` and checked there to reproduce the full
graph's loss): ``prefix.onnx`` maps an example's tokens to a few cached rows (its mean-pooled
embedding; the hidden states entering the first adapted block, one row per token) and
``suffix.onnx`` maps cached rows + text inputs and labels + trainables to the loss. No
perturbation can change the prefix, so a run computes every training and held-out example's
rows once (one forward pass over the data, counted and reported) and then evaluates only the
suffix: every ZO evaluation costs a head's (or the last blocks') arithmetic instead of the
whole model's. Rows are kept at the example's own length and zero-padded again per batch. The
result is the same loss — this is caching, not an approximation.

Where the rows live::

    projected rows <= cap (cache_prefix_mb)   in memory (numpy arrays per example)
    projected rows >  cap, a run folder       on disk: prefix_rows.bin (every example's rows,
                                              back to back), memory-mapped, so a batch reads
                                              its examples' rows only; prefix_rows.json
                                              (offsets, shapes, and the key below)
    projected rows >  cap, no folder          CacheTooLarge: the caller runs the full graph

The file is written atomically (``edgezo.atomic``: a temporary file renamed into place, the
index after the rows) and is keyed by the bundle's fingerprint, the cached tensors' names and
every example's tokens: a resumed run over the same bundle and data maps it again without one
prefix forward call; another bundle or other data rebuilds it.

Some cached tensors are read by the suffix only for their shape (``stages.shape_only``: the
traced graph asks a hidden state for its batch and sequence length); their rows are stand-ins
(``edgezo.data.stand_in``: zero-stride views, no memory, nothing written to the file). In the
default bundle three of the seven cached tensors are such, more than half the rows' bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import atomic
from .bundle import Bundle
from .data import Example, collate, is_stand_in, row_nbytes, stand_in
from .runner import LossRunner, RuntimeOptions
from .zo.params import FlatParams

TEXT_INPUTS = ["input_ids", "attention_mask"]
#: the run folder's files of rows cached on disk
ROWS_FILE, INDEX_FILE = "prefix_rows.bin", "prefix_rows.json"
ROWS_FORMAT = "edgezo-prefix-rows-2"


def available(bundle: Bundle) -> bool:
    return bool(bundle.manifest.stages)


def suffix_path(bundle: Bundle) -> Path:
    return bundle.path / bundle.manifest.stages["suffix"]


def suffix_inputs(bundle: Bundle) -> list[str]:
    st = bundle.manifest.stages
    return list(st["cached"]) + list(st["suffix_inputs"])


class CacheTooLarge(Exception):
    """The cached rows would pass the cap (``estimate_mb``: the projection that stopped it)."""

    def __init__(self, estimate_mb: float, forward_calls: int):
        super().__init__(f"~{estimate_mb:,.1f} MiB")
        self.estimate_mb = estimate_mb
        self.forward_calls = forward_calls  # spent before it stopped


def cache_rows(
    bundle: Bundle,
    sets: list[list[Example]],
    batch_size: int,
    pad_id: int,
    options: RuntimeOptions,
    max_mb: float | None = None,
    folder: Path | None = None,
) -> tuple[list[list[Example]], int]:
    """``sets`` of examples with their prefix rows attached; and the forward calls spent.

    With ``max_mb``, the rows stay in memory while the rows cached so far, scaled to all the
    examples' tokens, project within it. Past it they go to a memory-mapped file in
    ``folder`` (module docstring), or, without a folder, :class:`CacheTooLarge` is raised.
    A ``folder`` whose file already holds these rows (same key) is mapped without computing.
    """
    st = bundle.manifest.stages
    names = tuple(st["cached"])
    key = rows_key(bundle, names, sets)
    if folder is not None:
        mapped = _map_rows(Path(folder), key, sets)
        if mapped is not None:
            return mapped, 0
    runner = LossRunner(bundle.path / st["prefix"], FlatParams([]), TEXT_INPUTS, options)
    total_tokens = sum(len(e.input_ids) for examples in sets for e in examples)
    done_bytes = done_tokens = 0
    out: list[list[Example]] = [[] for _ in sets]
    batches = _row_batches(runner, sets, batch_size, pad_id, names, st)
    for k, new in batches:
        out[k] += new
        done_bytes += sum(row_nbytes(f) for e in new for f in e.features.values())
        done_tokens += sum(len(e.input_ids) for e in new)
        projected = done_bytes / max(done_tokens, 1) * total_tokens / 2**20
        if max_mb is not None and projected > max_mb:
            if folder is None:
                raise CacheTooLarge(projected, runner.forward_calls)
            _write_rows(Path(folder), key, names, out, batches)
            mapped = _map_rows(Path(folder), key, sets)
            if mapped is None:  # the file just written does not read back
                raise OSError(f"the prefix rows written to {folder / ROWS_FILE} do not read back")
            return mapped, runner.forward_calls
    return out, runner.forward_calls


def rows_key(bundle: Bundle, names: tuple[str, ...], sets: list[list[Example]]) -> str:
    """What cached rows depend on: the bundle (its fingerprint), the cached tensors, and every
    example's tokens, in order."""
    h = hashlib.sha256()
    h.update(json.dumps([ROWS_FORMAT, bundle.fingerprint, list(names)]).encode())
    for examples in sets:
        h.update(b"|set|")
        for e in examples:
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
            h.update(b";")
    return h.hexdigest()


def on_disk(sets: list[list[Example]]) -> bool:
    """Whether the cached rows of ``sets`` are memory-mapped from a run folder's file."""
    return any(
        isinstance(f, np.memmap)
        for examples in sets
        for e in examples[:1]
        for f in (e.features or {}).values()
    )


def _row_batches(
    runner: LossRunner,
    sets: list[list[Example]],
    batch_size: int,
    pad_id: int,
    names: tuple[str, ...],
    st: dict,
) -> Iterator[tuple[int, list[Example]]]:
    """(set index, examples with their rows) per prefix batch, in order."""
    axes = st.get("cached_sequence_axes") or {}
    shape_only = set(st.get("shape_only") or ())
    for k, examples in enumerate(sets):
        for a in range(0, len(examples), batch_size):
            chunk = examples[a : a + batch_size]
            values = runner.outputs(collate(chunk, pad_id), names, heldout=False)
            yield (
                k,
                [
                    replace(
                        e,
                        features={
                            n: _own_length(v[i], axes.get(n, ()), len(e.input_ids), n in shape_only)
                            for n, v in zip(names, values, strict=True)
                        },
                    )
                    for i, e in enumerate(chunk)
                ],
            )


def _write_rows(
    folder: Path,
    key: str,
    names: tuple[str, ...],
    done: list[list[Example]],
    rest: Iterator[tuple[int, list[Example]]],
) -> None:
    """Stream the rows computed so far (``done``) and the remaining batches (``rest``) into
    ``folder/prefix_rows.bin``, then write the index; both atomically."""
    entries: list[list[list]] = [[] for _ in done]
    dtypes: dict[str, str] = {}
    offset = 0

    def put(f, k: int, examples: list[Example]) -> None:
        nonlocal offset
        for e in examples:
            entry = []
            for n in names:
                row = e.features[n]
                dtypes.setdefault(n, row.dtype.str)
                if is_stand_in(row):  # its shape only (offset -1)
                    entry.append([-1, list(row.shape)])
                    continue
                row = np.ascontiguousarray(row)
                f.write(row.tobytes())
                entry.append([offset, list(row.shape)])
                offset += row.nbytes
            entries[k].append(entry)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for k, examples in enumerate(done):
                put(f, k, examples)
            done.clear()  # their memory is not needed any more
            for k, examples in rest:
                put(f, k, examples)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # an index never describes another file
    atomic.write_with(folder / ROWS_FILE, write)
    index = {
        "format": ROWS_FORMAT,
        "key": key,
        "names": list(names),
        "dtypes": dtypes,
        "bytes": offset,
        "examples": entries,
    }
    atomic.write_text(folder / INDEX_FILE, json.dumps(index, separators=(",", ":")))


def _map_rows(folder: Path, key: str, sets: list[list[Example]]) -> list[list[Example]] | None:
    """``sets`` with rows mapped from ``folder``'s file, or None when there is none for
    ``key`` (absent, stale, or not matching the examples)."""
    index_path, rows_path = folder / INDEX_FILE, folder / ROWS_FILE
    if not (index_path.is_file() and rows_path.is_file()):
        return None
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(index, dict)
        or index.get("format") != ROWS_FORMAT
        or index.get("key") != key
        or rows_path.stat().st_size != index.get("bytes")
        or [len(s) for s in index.get("examples", [])] != [len(s) for s in sets]
    ):
        return None
    names = index["names"]
    if index["bytes"] == 0:
        return None
    data = np.memmap(rows_path, dtype=np.uint8, mode="r")
    out = []
    for examples, entries in zip(sets, index["examples"], strict=True):
        rows = []
        for e, entry in zip(examples, entries, strict=True):
            features = {}
            for n, (offset, shape) in zip(names, entry, strict=True):
                dtype = np.dtype(index["dtypes"][n])
                if offset < 0:
                    features[n] = stand_in(shape, dtype)
                    continue
                count = int(np.prod(shape, dtype=np.int64))
                view = data[offset : offset + count * dtype.itemsize].view(dtype)
                features[n] = view.reshape(shape)
            rows.append(replace(e, features=features))
        out.append(rows)
    return out


def rows_mb(sets: list[list[Example]]) -> float:
    """Memory held by the cached rows of ``sets``."""
    return (
        sum(
            row_nbytes(f)
            for examples in sets
            for e in examples
            for f in (e.features or {}).values()
        )
        / 2**20
    )


def _own_length(row: np.ndarray, axes, length: int, shape_only: bool = False) -> np.ndarray:
    """An example's row cut to its own length on the sequence axes (its batch was padded to
    the longest example; collate pads again to the longest of each training batch); for a
    ``shape_only`` tensor a stand-in of that shape."""
    index = tuple(slice(0, length) if k + 1 in axes else slice(None) for k in range(row.ndim))
    if shape_only:
        return stand_in(row[index].shape, row.dtype)
    # always a copy: a contiguous slice would be a view that keeps the whole padded batch
    # output alive (measured on 1,060 notes: 48 MiB held beside their 129 MiB of rows)
    return row[index].copy()
