"""Training and evaluation data: JSONL lines tokenised with the bundle's tokenizer.

Each line is a JSON object, one of:

- ``{"text": ...}``: the loss is on every token;
- ``{"prompt": ..., "completion": ...}``: the loss is on the completion only.

Examples are truncated to ``max_length`` tokens and padded (right) to the longest in their
batch. The order of batches is a pure function of (seed, step), so a resumed run sees exactly
the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import TokenizerSpec
from .errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int  # 1-based line in its file, for messages


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; every malformed line is reported with its number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", "check the path given to --data")
    records: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{n} is not valid JSON ({e.msg})",
                    'write one JSON object per line, e.g. {"text": "..."}',
                ) from None
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{n} is a JSON {type(rec).__name__}, not an object",
                    'write one JSON object per line, e.g. {"text": "..."}',
                )
            if "text" in rec:
                if not isinstance(rec["text"], str):
                    raise DataError(f"{path}:{n}: \"text\" must be a string", "fix that line")
            elif "prompt" in rec and "completion" in rec:
                if not (isinstance(rec["prompt"], str) and isinstance(rec["completion"], str)):
                    raise DataError(
                        f"{path}:{n}: \"prompt\" and \"completion\" must be strings",
                        "fix that line",
                    )
            else:
                raise DataError(
                    f"{path}:{n} has neither \"text\" nor \"prompt\"+\"completion\" "
                    f"(keys: {', '.join(map(str, rec)) or 'none'})",
                    'each line needs {"text": ...} or {"prompt": ..., "completion": ...}',
                )
            records.append((n, rec))
    if not records:
        raise DataError(f"data file {path} holds no examples", "add JSONL lines to it")
    return records


def tokenize(records: Sequence[tuple[int, dict]], tokenizer, spec: TokenizerSpec,
             max_length: int, where: str = "data") -> list[Example]:
    """Tokenise records; an example left with no token to learn from is an error."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}", "raise max_length")
    bos = [spec.bos_token_id] if spec.add_bos and spec.bos_token_id is not None else []
    eos = [spec.eos_token_id] if spec.eos_token_id is not None else []
    out: list[Example] = []
    for n, rec in records:
        if "text" in rec:
            body = tokenizer.encode(rec["text"], add_special_tokens=False).ids
            ids = bos + body + eos
            labels = [IGNORE] * len(bos) + body + eos
        else:
            p = tokenizer.encode(rec["prompt"], add_special_tokens=False).ids
            c = tokenizer.encode(rec["completion"], add_special_tokens=False).ids + eos
            ids = bos + p + c
            labels = [IGNORE] * (len(bos) + len(p)) + c
        ids, labels = ids[:max_length], labels[:max_length]
        # the loss predicts token t from tokens < t: position 0 is never a target
        if all(lab == IGNORE for lab in labels[1:]):
            raise DataError(
                f"{where}:{n}: no token left to learn from after truncation to {max_length} "
                "tokens (empty text, or a prompt that fills the whole length)",
                "shorten the prompt, raise --max-length, or drop that line",
            )
        out.append(Example(tuple(ids), tuple(labels), n))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays input_ids, attention_mask, labels."""
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = e.input_ids
        labels[i, :n] = e.labels
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def split_holdout(examples: list[Example], fraction: float, seed: int,
                  where: str = "data") -> tuple[list[Example], list[Example]]:
    """A seeded split into (train, held-out); both must be non-empty."""
    n = len(examples)
    k = int(round(n * fraction))
    if k < 1 or n - k < 1:
        raise DataError(
            f"{where} has {n} examples: too few to hold out {fraction:.0%} for evaluation "
            "and keep some for training",
            "add examples, pass a separate --eval-data file, or change holdout_fraction",
        )
    perm = np.random.Generator(np.random.Philox(key=[seed, 0xE7A1])).permutation(n)
    held = sorted(perm[:k].tolist())
    held_set = set(held)
    return [examples[i] for i in range(n) if i not in held_set], [examples[i] for i in held]


class BatchStream:
    """Batch ``t`` of an endless stream of seeded epoch permutations, by index."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}", "use a positive size")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            rng = np.random.Generator(np.random.Philox(key=[self.seed, epoch + 1]))
            self._perms[epoch] = rng.permutation(len(self.examples))
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.examples)
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(pos // n)[pos % n]))
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return collate([self.examples[i] for i in self.indices(step)], self.pad_id)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int):
    """The examples in order, in batches (the last one may be smaller)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size], pad_id)
