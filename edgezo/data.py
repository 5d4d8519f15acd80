"""Training and evaluation data: JSONL lines tokenised with the bundle's tokenizer.

Each line is a JSON object, one of:

- ``{"text": ...}``: the loss is on every token;
- ``{"prompt": ..., "completion": ...}``: the loss is on the completion only;
- ``{"text": ..., "label": ...}``: classification data (``label`` a class name of the bundle
  or its integer id), for ``classification`` and ``prompt_classification`` bundles.

:func:`tokenize_for` picks the right tokenisation for a bundle's task and refuses data of the
other kind (label lines for a language-model bundle, label-less lines for a classifier).

Examples are truncated to ``max_length`` tokens and padded (right) to the longest in their
batch. The order of batches is a pure function of (seed, step) — :func:`shuffled`, its own
Philox stream, sorted from raw bits — so a resumed or replayed run sees exactly the batches the
uninterrupted one saw, on any machine and numpy version.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Manifest, TokenizerSpec
from .configio import show
from .errors import DataError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int  # 1-based line in its file, for messages
    target: int | None = None  # class id (classification tasks)
    # the example's rows of a bundle's cached frozen prefix (edgezo.prefix_cache); batches are then
    # these rows + labels instead of tokens
    features: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; every malformed line is reported with its number (and
    column), whatever the file holds: other encodings, broken JSON, deep nesting, wrong types."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", "check the path given to --data")
    records: list[tuple[int, dict]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            text = _decode_line(raw, path, n)
            if not text.strip():
                continue
            rec = _parse_line(text, path, n)
            _check_record(rec, path, n)
            records.append((n, rec))
    if not records:
        raise DataError(f"data file {path} holds no examples", "add JSONL lines to it")
    return records


ONE_OBJECT = 'write one JSON object per line, e.g. {"text": "..."}'


def _decode_line(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM at the start is fine
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{n}: byte {e.start + 1} of the line is not UTF-8 (0x{raw[e.start]:02x}): "
            "the file is in another encoding, or not text",
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or drop that line",
        ) from None


#: json.JSONDecodeError messages that deserve a hint
_JSON_HINTS = {
    "Invalid control character at": (
        "a string holds a raw control character (a tab or a line break?): write it as \\t or "
        "\\n, and keep each record on one line"
    ),
    "Unterminated string starting at": (
        'a string is not closed by a " on this line: keep each record on one line, and write '
        'a " inside a string as \\"'
    ),
    "Invalid \\escape": 'a backslash starts no valid escape: write a backslash as "\\\\"',
}


def _parse_line(text: str, path: Path, n: int) -> dict:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        where = (
            f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"
        )
        raise DataError(
            f"{path}:{n} is not valid JSON: {where}", _JSON_HINTS.get(e.msg, ONE_OBJECT)
        ) from None
    except RecursionError:
        raise DataError(
            f"{path}:{n} nests its JSON too deeply to read",
            'write flat records, e.g. {"text": "..."}',
        ) from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{n} is a JSON {_json_type(rec)}, not an object", ONE_OBJECT)
    return rec


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _check_record(rec: dict, path: Path, n: int) -> None:
    """The fields a record may carry have the right types."""
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise DataError(
                f'{path}:{n}: "text" must be a string, got a JSON {_json_type(rec["text"])}',
                'write {"text": "..."} (quote the text)',
            )
    elif "prompt" in rec and "completion" in rec:
        for key in ("prompt", "completion"):
            if not isinstance(rec[key], str):
                raise DataError(
                    f'{path}:{n}: "prompt" and "completion" must be strings, "{key}" is a '
                    f"JSON {_json_type(rec[key])}",
                    'write {"prompt": "...", "completion": "..."}',
                )
    else:
        keys = ", ".join(show(k) for k in list(rec)[:10]) or "none"
        raise DataError(
            f'{path}:{n} has neither "text" nor "prompt"+"completion" (keys: {keys})',
            'each line needs {"text": ...} or {"prompt": ..., "completion": ...}',
        )


def tokenize(
    records: Sequence[tuple[int, dict]],
    tokenizer,
    spec: TokenizerSpec,
    max_length: int,
    where: str = "data",
) -> list[Example]:
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
    """Right-padded int64 arrays input_ids, attention_mask, labels.

    ``labels`` is ``[batch, sequence]`` (token targets), or ``[batch]`` class ids for
    encoder-classification examples (whose token ``labels`` are empty).
    """
    if examples[0].features is not None:  # cached prefix rows (edgezo.prefix_cache)
        rows = {k: pad_rows([e.features[k] for e in examples]) for k in examples[0].features}
        return {**_collate_tokens(examples, pad_id), **rows}
    return _collate_tokens(examples, pad_id)


def stand_in(shape: Sequence[int], dtype) -> np.ndarray:
    """A cached row the suffix reads only the shape of (``stages.shape_only``): zeros of that
    shape that hold one element (every stride 0)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(shape))


def is_stand_in(row: np.ndarray) -> bool:
    return row.size > 1 and not any(row.strides)


def row_nbytes(row: np.ndarray) -> int:
    """The memory a cached row holds (a :func:`stand_in` none)."""
    return 0 if is_stand_in(row) else row.nbytes


def pad_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-example rows of a cached prefix, zero-padding every axis to the longest: the
    right padding of a batch, whose values no real position's loss reads. Stand-ins give a
    zero array of the batch's shape whose pages nothing writes."""
    shape = np.max([r.shape for r in rows], axis=0)
    if is_stand_in(rows[0]):
        return np.zeros((len(rows), *shape), dtype=rows[0].dtype)
    if all(r.shape == tuple(shape) for r in rows):
        return np.stack(rows)
    out = np.zeros((len(rows), *shape), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[(i, *(slice(0, k) for k in r.shape))] = r
    return out


def _collate_tokens(examples: Sequence[Example], pad_id: int) -> dict[str, np.ndarray]:
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = e.input_ids
        labels[i, : len(e.labels)] = e.labels
        mask[i, :n] = 1
    if not examples[0].labels:
        labels = np.array([e.target for e in examples], dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# -- classification ---------------------------------------------------------------------------


def tokenize_for(
    manifest: Manifest,
    records: Sequence[tuple[int, dict]],
    tokenizer,
    max_length: int,
    where: str = "data",
) -> list[Example]:
    """Tokenise ``records`` for the bundle's task (see the module docstring)."""
    if manifest.task == "causal_lm":
        labelled = next((n for n, r in records if "label" in r), None)
        if labelled is not None:
            raise DataError(
                f'{where}:{labelled} has a "label": that is classification data, but this '
                "bundle is a causal language model (task causal_lm), trained on text alone",
                'give it {"text": ...} or {"prompt": ..., "completion": ...} lines, or '
                "export a classification bundle (edgezo export --task classification --labels "
                "... or --task prompt_classification)",
            )
        return tokenize(records, tokenizer, manifest.tokenizer, max_length, where)
    labels = list(manifest.labels or [])
    targets = [(n, rec, class_id(rec, n, labels, manifest.task, where)) for n, rec in records]
    if manifest.task == "classification":
        return [
            _encoder_example(tokenizer, rec["text"], n, t, max_length, where)
            for n, rec, t in targets
        ]
    return [
        _prompt_example(tokenizer, manifest, rec["text"], n, t, max_length) for n, rec, t in targets
    ]


def label_names(path: str | Path) -> list[str]:
    """The label names of a ``{"text", "label"}`` JSONL file, in order of first appearance
    (for ``edgezo export --labels-from``; integer labels are refused: their names are unknown)."""
    names: list[str] = []
    for n, rec in read_jsonl(path):
        label = rec.get("label")
        if not isinstance(label, str):
            raise DataError(
                f"{path}:{n} has label {label!r}: --labels-from needs label names",
                "give the names with --labels instead",
            )
        if label not in names:
            names.append(label)
    return names


def class_id(rec: dict, n: int, labels: list[str], task: str, where: str) -> int:
    """The class id of one record: its label by name or by integer id."""
    if "label" not in rec or "text" not in rec:
        raise DataError(
            f'{where}:{n} has no "label" (keys: {", ".join(map(str, rec)) or "none"}), but '
            f"this bundle is a {task} bundle with labels {', '.join(labels)}",
            'give it {"text": ..., "label": ...} lines, or train a causal_lm bundle on plain text',
        )
    label = rec["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(
            f'{where}:{n}: "label" must be a class name or an integer id, got {label!r}',
            f"use one of: {', '.join(labels)}",
        )
    if isinstance(label, int):
        if 0 <= label < len(labels):
            return label
    elif label in labels:
        return labels.index(label)
    raise DataError(
        f"{where}:{n}: label {label!r} is not one of the bundle's labels: "
        f"{', '.join(f'{i}={name}' for i, name in enumerate(labels))}",
        "fix that line, or export a bundle whose --labels include it",
    )


def _encoder_example(
    tokenizer, text: str, n: int, target: int, max_length: int, where: str
) -> Example:
    """``[CLS] text [SEP]`` (the tokenizer's own special tokens); a long text keeps its last
    token (``[SEP]``) after truncation."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where}:{n}: "text" is empty', "fix or drop that line")
    ids = tokenizer.encode(text, add_special_tokens=True).ids
    if len(ids) > max_length:
        ids = ids[: max_length - 1] + ids[-1:]
    return Example(tuple(ids), (), n, target)


def _prompt_example(
    tokenizer, manifest: Manifest, text: str, n: int, target: int, max_length: int
) -> Example:
    """``[BOS] template(text) label_word₀``; the loss is on the label word's first token only.

    A prompt too long keeps its end (where the template's cue is): the first tokens of the
    text are dropped.
    """
    prompt = manifest.prompt or {}
    spec = manifest.tokenizer
    bos = [spec.bos_token_id] if spec.add_bos and spec.bos_token_id is not None else []
    body = tokenizer.encode(
        prompt["template"].replace("{text}", text), add_special_tokens=False
    ).ids
    body = body[max(0, len(body) - (max_length - 1 - len(bos))) :]
    word = int(prompt["label_token_ids"][target])
    ids = bos + body + [word]
    labels = [IGNORE] * (len(ids) - 1) + [word]
    return Example(tuple(ids), tuple(labels), n, target)


# -- data order: its own counter-based stream, shuffled from raw bits ---------------------------

#: Philox key word 1 of the data-order streams: the top bit set, which no direction's or
#: estimator draw's key (seed, step) has (steps stay below 2**63), then the purpose in bits
#: 56-62 and the epoch below. A separate key makes the stream independent of every direction.
_DATA_STREAM = 1 << 63
EPOCH_ORDER = 0  # purpose: the order of the examples in epoch e
HOLDOUT_SPLIT = 1  # purpose: which examples are held out
_MASK64 = (1 << 64) - 1


def shuffled(n: int, seed: int, purpose: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)``, a pure function of (seed, purpose, epoch) on every machine
    and numpy version.

    Each index gets one raw 64-bit word of Philox with key (seed, 2**63 | purpose << 56 |
    epoch) at counter 0 — raw Philox output is covered by numpy's stream-stability promise,
    ``Generator.permutation`` is not — and the indices are sorted by their words (a stable
    sort: ties, about n²/2**65 likely, keep index order).
    """
    if not 0 <= epoch < 1 << 56 or not 0 <= purpose < 1 << 7:
        raise ValueError(f"data-order epoch {epoch} / purpose {purpose} out of range")
    key = np.array([seed & _MASK64, _DATA_STREAM | purpose << 56 | epoch], dtype=np.uint64)
    words = np.random.Philox(key=key, counter=np.zeros(4, dtype=np.uint64)).random_raw(n)
    return np.argsort(np.asarray(words, dtype=np.uint64), kind="stable")


def split_holdout(
    examples: list[Example], fraction: float, seed: int, where: str = "data"
) -> tuple[list[Example], list[Example]]:
    """A seeded split into (train, held-out); both must be non-empty."""
    n = len(examples)
    k = int(round(n * fraction))
    if k < 1 or n - k < 1:
        raise DataError(
            f"{where} has {n} examples: too few to hold out {fraction:.0%} for evaluation "
            "and keep some for training",
            "add examples, pass a separate --eval-data file, or change holdout_fraction",
        )
    perm = shuffled(n, seed, HOLDOUT_SPLIT, 0)
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
            self._perms[epoch] = shuffled(len(self.examples), self.seed, EPOCH_ORDER, epoch)
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
