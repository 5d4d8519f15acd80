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
result is the same loss — this is caching, not an approximation. The cache lives in memory:
``cache_rows`` stops (``CacheTooLarge``) once its estimate passes the caller's cap, and the run
then evaluates the full graph.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .data import Example, collate
from .runner import LossRunner, RuntimeOptions
from .zo.params import FlatParams

TEXT_INPUTS = ["input_ids", "attention_mask"]


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
) -> tuple[list[list[Example]], int]:
    """``sets`` of examples with their prefix rows attached; and the forward calls spent.

    With ``max_mb``, raises :class:`CacheTooLarge` as soon as the rows cached so far, scaled
    to all the examples' tokens, project past it (after the first batch when they do).
    """
    st = bundle.manifest.stages
    runner = LossRunner(bundle.path / st["prefix"], FlatParams([]), TEXT_INPUTS, options)
    names = tuple(st["cached"])
    axes = st.get("cached_sequence_axes") or {}
    total_tokens = sum(len(e.input_ids) for examples in sets for e in examples)
    done_bytes = done_tokens = 0
    out = []
    for examples in sets:
        rows: list[Example] = []
        for a in range(0, len(examples), batch_size):
            chunk = examples[a : a + batch_size]
            values = runner.outputs(collate(chunk, pad_id), names, heldout=False)
            new = [
                replace(
                    e,
                    features={
                        n: _own_length(v[i], axes.get(n, ()), len(e.input_ids))
                        for n, v in zip(names, values, strict=True)
                    },
                )
                for i, e in enumerate(chunk)
            ]
            rows += new
            done_bytes += sum(f.nbytes for e in new for f in e.features.values())
            done_tokens += sum(len(e.input_ids) for e in new)
            projected = done_bytes / max(done_tokens, 1) * total_tokens / 2**20
            if max_mb is not None and projected > max_mb:
                raise CacheTooLarge(projected, runner.forward_calls)
        out.append(rows)
    return out, runner.forward_calls


def rows_mb(sets: list[list[Example]]) -> float:
    """Memory held by the cached rows of ``sets``."""
    return (
        sum(f.nbytes for examples in sets for e in examples for f in (e.features or {}).values())
        / 2**20
    )


def _own_length(row: np.ndarray, axes, length: int) -> np.ndarray:
    """An example's row cut to its own length on the sequence axes (its batch was padded to
    the longest example; collate pads again to the longest of each training batch)."""
    index = tuple(slice(0, length) if k + 1 in axes else slice(None) for k in range(row.ndim))
    return np.ascontiguousarray(row[index])
