"""Training on a bundle's suffix graph, with each example's frozen-prefix rows computed once.

A bundle whose trainable tensors all sit at the end of the graph (a classification head over
a frozen encoder) carries a split of its graph (``manifest.stages``, written by
``exporters/stages.py`` and checked there to reproduce the full graph's loss): ``prefix.onnx``
maps an example's tokens to a few cached rows (e.g. its mean-pooled embedding) and
``suffix.onnx`` maps cached rows + labels + trainables to the loss. No perturbation can change
the prefix, so a run computes every training and held-out example's rows once (one forward
pass over the data, counted and reported) and then evaluates only the suffix: every ZO
evaluation costs a head's arithmetic instead of an encoder's. The result is the same loss —
this is caching, not an approximation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .bundle import Bundle
from .data import Example, collate
from .params import FlatParams
from .runner import LossRunner, RuntimeOptions

TEXT_INPUTS = ["input_ids", "attention_mask"]


def available(bundle: Bundle) -> bool:
    return bool(bundle.manifest.stages)


def suffix_path(bundle: Bundle) -> Path:
    return bundle.path / bundle.manifest.stages["suffix"]


def suffix_inputs(bundle: Bundle) -> list[str]:
    st = bundle.manifest.stages
    return list(st["cached"]) + list(st["suffix_inputs"])


def cache_rows(bundle: Bundle, sets: list[list[Example]], batch_size: int, pad_id: int,
               options: RuntimeOptions) -> tuple[list[list[Example]], int]:
    """``sets`` of examples with their prefix rows attached; and the forward calls spent."""
    st = bundle.manifest.stages
    runner = LossRunner(bundle.path / st["prefix"], FlatParams([]), TEXT_INPUTS, options)
    names = tuple(st["cached"])
    out = []
    for examples in sets:
        rows: list[Example] = []
        for a in range(0, len(examples), batch_size):
            chunk = examples[a : a + batch_size]
            values = runner.outputs(collate(chunk, pad_id), names, heldout=False)
            rows += [replace(e, features={n: v[i].copy() for n, v in zip(names, values,
                                                                          strict=True)})
                     for i, e in enumerate(chunk)]
        out.append(rows)
    return out, runner.forward_calls
