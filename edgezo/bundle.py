"""The bundle: the contract between the desktop exporter and the on-device runtime.

A bundle is a folder::

    manifest.json          versioned description of everything below, with sha256 of each file
    model.onnx (+ .data)   forward-only graph: batch inputs + one input per trainable tensor
                           -> ``loss`` [batch] (per-example mean over valid tokens)
    trainable.safetensors  initial values of the trainable tensors
    tokenizer.json         Hugging Face ``tokenizers`` file (text tasks)

The exporter writes it with :func:`write_manifest`; the runtime opens it with
:func:`load_bundle`, which treats the folder as untrusted input: the manifest must have the
right shape and types in every field, every path it names (and every external-data file the
ONNX graphs name) must stay inside the folder and be among the files it hashes, every file
must match its size and sha256, and the trainable tensors must match the manifest. Each
failure is a :class:`~edgezo.errors.BundleError` naming the field or file and the fix. Nothing
is unpickled. Every field and check: docs/reference/bundle-format.md.

A bundle's identity (:attr:`Bundle.fingerprint`, recorded by ledgers, checkpoints and trained
tensors) hashes the whole manifest, the files' hashes included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np

from . import atomic
from .configio import Problems, from_dict, show
from .errors import BundleError, CheckpointError, EdgezoWarning
from .zo.params import TensorSpec

if TYPE_CHECKING:
    from .zo.engine import EngineSettings, ZOEngine
    from .zo.ledger import Ledger

FORMAT = "edgezo-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REEXPORT = "re-export the bundle with `edgezo export` (a manifest is never edited by hand)"
MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is kilobytes; this bounds a hostile one
#: initial trainable values beyond this magnitude are refused: no exported model has them,
#: and a ZO step on them is meaningless (or overflows float32)
MAX_ABS_INITIAL = 1e6
#: ``fp2-`` + 16 hex digits of sha256 over the canonical manifest (version 2); version 1
#: (edgezo 0.1) was 16 bare hex digits over the files' hashes alone
FINGERPRINT_PREFIX = "fp2-"
_LEGACY_FINGERPRINT = re.compile(r"[0-9a-f]{16}")

ROLES = ("lora_a", "lora_b", "norm", "bias", "dense", "embedding", "scale", "head")
#: ``causal_lm``: per-example mean next-token loss; ``classification``: an encoder with a
#: classification head (``labels`` [batch] -> ``loss`` [batch], ``logits`` [batch, n_labels]);
#: ``prompt_classification``: a causal LM graph scored on one label word per class after a
#: prompt template (the manifest's ``prompt``), MeZO-style.
TASKS = ("causal_lm", "classification", "prompt_classification")
#: which tensors a bundle exposes as trainable graph inputs (the manifest's ``trainable_mode``):
#: LoRA adapters, norm weights and biases, every weight, int4 quantisation scales, a
#: classification head
TRAINABLE_MODES = ("lora", "norms", "full", "scales", "head")
#: the frozen weights' arithmetic (``exporters/precision.py`` and docs/guides/precision.md)
PRECISIONS = ("fp32", "int8", "int8-dynamic", "int4")
#: the decoding graph's frozen weights (``decoder.precision``): fp32, or weight-only int8/int4
#: ``MatMulNBits`` (``exporters/decode.py``)
DECODER_PRECISIONS = ("fp32", "int8", "int4")
#: how an int8 bundle stores its frozen weights (manifest ``quantization.weights_format``):
#: ``s8`` full-range signed (VNNI, AMX, Arm dot product), ``u8`` the same values offset by 128
#: (exact on every CPU: a u8 × u8 kernel), ``s7`` signed with at most 63 in magnitude
INT8_WEIGHTS = ("s8", "u8", "s7")
#: how int8 quantises the activations its ``MatMul`` s read (``quantization.activations``;
#: absent in bundles written before it existed: dynamic)
INT8_ACTIVATIONS = ("dynamic", "static")
DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "float16": np.float16}
#: architecture entries the runtime reads as sizes (each optional; null allowed)
ARCH_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "intermediate_size",
    "max_position_embeddings",
    "num_parameters",
)


@dataclass(frozen=True)
class InputSpec:
    """One batch input (``input_ids`` ...): symbolic dims are strings such as ``"batch"``."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class TokenizerSpec:
    file: str = "tokenizer.json"
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    add_bos: bool = False


@dataclass
class Manifest:
    task: str
    architecture: dict[str, Any]
    trainable_mode: str
    inputs: list[InputSpec]
    trainable: list[TensorSpec]
    outputs: list[InputSpec] = field(
        default_factory=lambda: [InputSpec("loss", "float32", ("batch",))]
    )
    tokenizer: TokenizerSpec | None = None
    lora: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    precision: str | None = None
    """The frozen weights' arithmetic (one of :data:`PRECISIONS`; ``exporters/precision.py``);
    null in bundles written before it was recorded (fp32, or see ``quantization``)."""
    labels: list[str] | None = None
    """Classification tasks: the ordered class names (class id = position)."""
    prompt: dict[str, Any] | None = None
    """``prompt_classification``: ``template`` (with ``{text}``), ``label_words`` and their
    first tokens ``label_token_ids``, one per entry of ``labels``."""
    stages: dict[str, Any] | None = None
    """Optional frozen-prefix split (``exporters/stages.py``): ``prefix``/``suffix`` graph
    files, the ``cached`` tensor names and the ``suffix_inputs`` read from the batch."""
    parity: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] | None = None
    """Optional KV-cache decoding graph for ``edgezo generate`` (``exporters/decode.py``):
    ``graph`` and ``files``, ``num_layers``/``num_kv_heads``/``head_dim`` of the past,
    ``precision`` (:data:`DECODER_PRECISIONS`; absent: fp32) and its ``quantization``, parity,
    and ``chat`` (the chat template rendered around one message: ``prefix``/``suffix``). Left
    out of the fingerprint, so adding it to a bundle keeps its runs replayable."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [_spec_dict(s) for s in self.inputs]
        d["outputs"] = [_spec_dict(s) for s in self.outputs]
        d["trainable"] = [_spec_dict(s) for s in self.trainable]
        if d["decoder"] is None:  # absent, not null: older manifests keep their exact JSON
            del d["decoder"]
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = MANIFEST) -> Manifest:
        """A checked manifest from its JSON value: every field of the wrong type or value is
        reported at once (:class:`BundleError`). A new optional field is added by declaring
        it above with a default (and, if the runtime reads it, a check in :meth:`validate`)."""
        if not isinstance(d, dict):
            kind = {list: "list", str: "string", type(None): "null", bool: "boolean"}
            raise BundleError(
                f"{where} holds a JSON {kind.get(type(d), 'number')}, not an edgezo manifest "
                "(an object)",
                REEXPORT,
            )
        if d.get("format") != FORMAT:
            raise BundleError(
                f"{where} is not an edgezo bundle manifest (format={show(d.get('format'))})",
                "point --bundle at a folder written by `edgezo export`",
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise BundleError(
                f"{where} has bundle format version {show(version)}; this edgezo reads version "
                f"{FORMAT_VERSION}",
                "re-export the model with the `edgezo export` of this edgezo version, or "
                "install the edgezo version that wrote the bundle",
            )
        manifest = from_dict(cls, d, where=where, error=BundleError, fix=REEXPORT)
        manifest.validate(where)
        return manifest

    def validate(self, where: str = MANIFEST) -> None:
        """The values the runtime relies on (types are checked when loading): every problem
        at once, as one :class:`BundleError`."""
        p = Problems(where, BundleError, REEXPORT)
        _check_task(self, p)
        _check_specs(self, p)
        _check_tokenizer(self, p)
        _check_files(self, p)
        _check_extras(self, p)
        p.check()

    def check_task(self, where: str = MANIFEST) -> None:
        """The task is known and carries what it needs (labels, prompt)."""
        p = Problems(where, BundleError, REEXPORT)
        _check_task(self, p)
        p.check()

    @property
    def trainable_size(self) -> int:
        return sum(s.size for s in self.trainable)

    @property
    def vocab_size(self) -> int | None:
        v = self.architecture.get("vocab_size")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def paths(self) -> dict[str, str]:
        """Every file the runtime opens by a name from the manifest: ``{field: path}``."""
        out = {"model": "model.onnx", "trainable": "trainable.safetensors"}
        if self.tokenizer is not None:
            out["tokenizer.file"] = self.tokenizer.file
        for key in ("prefix", "suffix"):
            if self.stages and isinstance(self.stages.get(key), str):
                out[f"stages.{key}"] = self.stages[key]
        vocab = (self.stages or {}).get("vocab")
        for key in ("graph", "rows_file"):
            if isinstance(vocab, dict) and isinstance(vocab.get(key), str):
                out[f"stages.vocab.{key}"] = vocab[key]
        if self.decoder and isinstance(self.decoder.get("graph"), str):
            out["decoder.graph"] = self.decoder["graph"]
        return out

    def decoder_files(self) -> set[str]:
        """The files of the decoding graph (not covered by the fingerprint)."""
        d = self.decoder or {}
        files = d.get("files")
        return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


# -- the checks of Manifest.validate ----------------------------------------------------------


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_task(m: Manifest, p: Problems) -> None:
    if m.task not in TASKS:
        p.add("task", f"is {show(m.task)}; this edgezo knows {', '.join(TASKS)}", REEXPORT)
        return
    if m.task != "causal_lm":
        if not m.labels:
            p.add("labels", f"are missing: a {m.task} bundle names its classes", REEXPORT)
        elif len(set(m.labels)) != len(m.labels) or not all(s.strip() for s in m.labels):
            p.add("labels", "must be distinct, non-empty names", REEXPORT)
    if m.task == "prompt_classification":
        prompt = m.prompt or {}
        ids = prompt.get("label_token_ids")
        template = prompt.get("template")
        if not isinstance(template, str) or "{text}" not in template:
            p.add("prompt.template", "must be a string holding {text}", REEXPORT)
        if not isinstance(ids, list) or len(ids) != len(m.labels or []):
            p.add("prompt.label_token_ids", "must hold one token id per label", REEXPORT)
        elif not all(_int(i) and i >= 0 for i in ids):
            p.add("prompt.label_token_ids", "must be non-negative integers", REEXPORT)
        elif m.vocab_size is not None and max(ids, default=0) >= m.vocab_size:
            p.add(
                "prompt.label_token_ids",
                f"holds {max(ids)}, outside the vocabulary ({m.vocab_size} tokens)",
                REEXPORT,
            )


def _check_specs(m: Manifest, p: Problems) -> None:
    names = set()
    for i, s in enumerate(m.trainable):
        at = f"trainable[{i}]"
        if not s.name or s.name in names:
            p.add(f"{at}.name", f"{show(s.name)} is empty or repeated", REEXPORT)
        names.add(s.name)
        if s.dtype != "float32":
            p.add(f"{at}.dtype", f"is {show(s.dtype)}: trainable tensors are float32", REEXPORT)
        if s.role not in ROLES:
            p.add(f"{at}.role", f"is {show(s.role)}, not one of {', '.join(ROLES)}", REEXPORT)
        if any(d < 1 for d in s.shape) or len(s.shape) > 8:
            p.add(f"{at}.shape", f"is {list(s.shape)}: dimensions must be >= 1", REEXPORT)
    if not m.trainable:
        p.add("trainable", "is empty: the bundle has nothing to train", REEXPORT)
    for group in ("inputs", "outputs"):
        for i, s in enumerate(getattr(m, group)):
            if s.dtype not in DTYPES:
                p.add(f"{group}[{i}].dtype", f"is {show(s.dtype)}", f"use one of {list(DTYPES)}")
    if "loss" not in {o.name for o in m.outputs}:
        p.add("outputs", "have no 'loss'", REEXPORT)


def _check_tokenizer(m: Manifest, p: Problems) -> None:
    t = m.tokenizer
    if t is None:
        return
    if t.pad_token_id is None:
        p.add("tokenizer.pad_token_id", "is null: batches are padded with it", REEXPORT)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(t, key)
        if v is None:
            continue
        if v < 0 or (m.vocab_size is not None and v >= m.vocab_size):
            p.add(
                f"tokenizer.{key}",
                f"is {v}, outside the vocabulary (0 .. {(m.vocab_size or 0) - 1})",
                REEXPORT,
            )
    if t.add_bos and t.bos_token_id is None:
        p.add("tokenizer.add_bos", "is true but bos_token_id is null", REEXPORT)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_files(m: Manifest, p: Problems) -> None:
    for name, info in m.files.items():
        where = f"files[{show(name)}]"
        problem = unsafe_name(name)
        if problem:
            p.add(where, problem, REEXPORT)
        if not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            p.add(f"{where}.sha256", "must be 64 lowercase hex digits", REEXPORT)
        size = info.get("bytes")
        if not _int(size) or size < 0:
            p.add(f"{where}.bytes", f"is {show(size)}, not a byte count", REEXPORT)
    for key, name in m.paths().items():
        problem = unsafe_name(name)
        if problem:
            p.add(key, problem, REEXPORT)


def _check_vocab(v: Any, vocab: int | None, p: Problems) -> None:
    """``stages.vocab``: the vocabulary-subset training graph (``exporters/vocab_subset.py``)."""
    if not isinstance(v, dict):
        p.add("stages.vocab", "must be a mapping", REEXPORT)
        return
    for key in ("graph", "input", "rows_file"):
        if not isinstance(v.get(key), str):
            p.add(f"stages.vocab.{key}", "must be a name", REEXPORT)
    offset, shape = v.get("rows_offset"), v.get("rows_shape")
    if not (_int(offset) and offset >= 0):
        p.add("stages.vocab.rows_offset", f"is {show(offset)}, not a byte offset", REEXPORT)
    layout = v.get("rows_layout")
    if layout not in ("rows", "columns"):
        p.add("stages.vocab.rows_layout", f"is {show(layout)}, not rows or columns", REEXPORT)
    axis = 0 if layout == "rows" else 1
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(_int(d) and 0 < d < 1 << 32 for d in shape)
        and (vocab is None or shape[axis] == vocab)
    ):
        p.add(
            "stages.vocab.rows_shape",
            f"is {show(shape)}, not the LM head's [vocabulary, hidden] ({layout})",
            REEXPORT,
        )


def _check_extras(m: Manifest, p: Problems) -> None:
    for key in ARCH_SIZES:
        v = m.architecture.get(key)
        if v is not None and not (_int(v) and 0 < v < 1 << 40):
            p.add(f"architecture.{key}", f"is {show(v)}, not a positive integer", REEXPORT)
    for key in ("model_type", "family"):
        if not isinstance(m.architecture.get(key, ""), str):
            p.add(f"architecture.{key}", "must be a string", REEXPORT)
    if m.stages is not None:
        st = m.stages
        for key in ("prefix", "suffix"):
            if not isinstance(st.get(key), str):
                p.add(f"stages.{key}", "must be a graph file name", REEXPORT)
        for key in ("cached", "suffix_inputs"):
            v = st.get(key)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                p.add(f"stages.{key}", "must be a list of tensor names", REEXPORT)
        axes = st.get("cached_sequence_axes") or {}
        if not isinstance(axes, dict) or not all(
            isinstance(v, list) and all(_int(a) and a >= 0 for a in v) for v in axes.values()
        ):
            p.add("stages.cached_sequence_axes", "must map names to lists of axes", REEXPORT)
        only = st.get("shape_only") or []
        cached = {x for x in st.get("cached") or [] if isinstance(x, str)}
        if not isinstance(only, list) or not all(isinstance(x, str) and x in cached for x in only):
            p.add("stages.shape_only", "must be a list of cached tensor names", REEXPORT)
        if st.get("vocab") is not None:
            _check_vocab(st["vocab"], m.vocab_size, p)
    if m.precision is not None and m.precision not in PRECISIONS:
        p.add("precision", f"is {show(m.precision)}, not one of {', '.join(PRECISIONS)}", REEXPORT)
    if m.decoder is not None:
        _check_decoder(m.decoder, p)
    if m.lora is not None:
        rank, freeze = m.lora.get("rank", 1), m.lora.get("freeze_a", False)
        if not (_int(rank) and rank >= 1) or not isinstance(freeze, bool):
            p.add("lora", "needs rank >= 1 and freeze_a true/false", REEXPORT)


def _check_decoder(d: dict[str, Any], p: Problems) -> None:
    if not isinstance(d.get("graph"), str):
        p.add("decoder.graph", "must be a graph file name", REEXPORT)
    files = d.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        p.add("decoder.files", "must be a list of file names", REEXPORT)
    elif d.get("graph") not in files:
        p.add("decoder.files", "must list decoder.graph", REEXPORT)
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if not (_int(d.get(key)) and 0 < d[key] < 1 << 20):
            p.add(f"decoder.{key}", f"is {show(d.get(key))}, not a positive integer", REEXPORT)
    precision = d.get("precision", "fp32")  # absent in decoders written before int8/int4
    if precision not in DECODER_PRECISIONS:
        p.add(
            "decoder.precision",
            f"is {show(precision)}, not one of {', '.join(DECODER_PRECISIONS)}",
            REEXPORT,
        )
    chat = d.get("chat")
    if chat is not None and not (
        isinstance(chat, dict) and all(isinstance(chat.get(k), str) for k in ("prefix", "suffix"))
    ):
        p.add("decoder.chat", "must hold the strings prefix and suffix", REEXPORT)


def unsafe_name(name: Any) -> str | None:
    """Why ``name`` cannot name a file inside a bundle folder (None: it can): it must be a
    relative path without ``..``, in either path syntax."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return f"{show(name)} is not a file name"
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or (PureWindowsPath(name).drive)
    ):
        return f"{name!r} is an absolute path: bundle paths are relative to the bundle folder"
    if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
        return f"{name!r} leaves the bundle folder (..)"
    return None


def _spec_dict(s: Any) -> dict[str, Any]:
    d = asdict(s)
    d["shape"] = list(d["shape"])
    return d


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, manifest: Manifest, files: list[str]) -> Path:
    """Hash ``files`` (relative to ``folder``) into the manifest and write it atomically."""
    folder = Path(folder)
    manifest.files = {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in files
    }
    return atomic.write_text(folder / MANIFEST, json.dumps(manifest.to_json(), indent=2) + "\n")


def fingerprint_of(manifest: Manifest) -> str:
    """The identity of a bundle (version 2): sha256 over its manifest in canonical JSON
    (sorted keys, no spaces) — which holds every file's sha256 — as ``fp2-`` + 16 hex. The
    optional decoding graph (``decoder`` and its files) is left out: it does not change what a
    run trains, and adding it to an older bundle must not orphan that bundle's ledgers."""
    d = manifest.to_json()
    d.pop("decoder", None)  # an added decoding graph is not a different bundle to train on
    skip = manifest.decoder_files()
    d["files"] = {k: v for k, v in d["files"].items() if k not in skip}
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return FINGERPRINT_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def legacy_fingerprint_of(manifest: Manifest) -> str:
    """Version 1 (edgezo 0.1): the hash of the files' hashes only, blind to the manifest."""
    h = hashlib.sha256()
    skip = manifest.decoder_files()
    for name in sorted(set(manifest.files) - skip):
        h.update(f"{name}:{manifest.files[name]['sha256']}\n".encode())
    return h.hexdigest()[:16]


def is_legacy_fingerprint(value: Any) -> bool:
    """True for a version 1 fingerprint (recorded by edgezo 0.1)."""
    return isinstance(value, str) and _LEGACY_FINGERPRINT.fullmatch(value) is not None


@dataclass
class Bundle:
    """A verified bundle folder."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def fingerprint(self) -> str:
        """A short identity of the bundle: the hash of its whole manifest (files' hashes
        included), ``fp2-`` + 16 hex digits (:func:`fingerprint_of`)."""
        return fingerprint_of(self.manifest)

    def recorded_by(self, recorded: Any, what: str) -> bool:
        """Whether ``recorded`` (a fingerprint stored in ``what``) names this bundle. An older
        edgezo's fingerprint of these very files counts, with a warning: it did not cover the
        manifest, so the manifest is not proven the same."""
        if recorded == self.fingerprint:
            return True
        if is_legacy_fingerprint(recorded) and recorded == legacy_fingerprint_of(self.manifest):
            warnings.warn(
                f"{what} was written by an older edgezo, whose bundle fingerprint ({recorded}) "
                f"covered the bundle's files but not its manifest: accepted for {self.path}, "
                "whose files match",
                EdgezoWarning,
                stacklevel=3,
            )
            return True
        return False

    def engine(self, settings: EngineSettings) -> ZOEngine:
        """A ZO engine over this bundle's trainable tensors, at their initial values."""
        from .zo.engine import ZOEngine

        return ZOEngine(self.manifest.trainable, self.initial_trainable, settings, str(self.path))

    def replay(self, ledger: Ledger, upto: int | None = None, progress=None) -> ZOEngine:
        """The engine after replaying ``upto`` steps (all by default) of a run's ledger, which
        must have been written for this bundle."""
        from .zo.engine import EngineSettings
        from .zo.replay import replay

        recorded = ledger.header.get("bundle")
        if not self.recorded_by(recorded, f"ledger {ledger.path}"):
            raise CheckpointError(
                f"ledger {ledger.path} was written for bundle {recorded}, not for {self.path} "
                f"({self.fingerprint})",
                "replay it on the bundle the run used (its path is in the ledger header)",
            )
        if upto is not None and not 0 <= upto <= len(ledger.records):
            raise CheckpointError(
                f"cannot replay {upto} steps: ledger {ledger.path} holds {len(ledger.records)}",
                f"pass --upto between 0 and {len(ledger.records)}",
            )
        engine = self.engine(EngineSettings.from_dict(ledger.header["engine"]))
        return replay(engine, ledger, upto, progress)

    def initial_trainable(self) -> dict[str, np.ndarray]:
        """Initial trainable values from ``trainable.safetensors``, checked against the manifest
        (shapes, float32, finite, |x| <= 1e6, positive where the manifest says so)."""
        from .zo.checkpoint import load_tensors

        path = self.path / "trainable.safetensors"
        # the exporter's file has no checksum of its own: the manifest's sha256 covers it
        tensors, _ = load_tensors(
            path, "trainable tensors", REEXPORT, BundleError, missing_checksum_ok=True
        )
        out = self._checked(tensors, path, REEXPORT)
        for spec in self.manifest.trainable:
            v = out[spec.name]
            bad = _bad_values(v, spec.positive)
            if bad:
                raise BundleError(f"{path}: {spec.name} {bad}", REEXPORT)
        return out

    def _checked(
        self, values: dict[str, np.ndarray], path: Path, fix: str
    ) -> dict[str, np.ndarray]:
        """``values`` as contiguous float32 arrays, one per trainable tensor of the manifest."""
        out: dict[str, np.ndarray] = {}
        for spec in self.manifest.trainable:
            v = values.get(spec.name)
            if v is None or tuple(v.shape) != spec.shape:
                got = None if v is None else tuple(v.shape)
                raise BundleError(
                    f"{path} has {spec.name} with shape {got}; the bundle needs {spec.shape}", fix
                )
            if v.dtype != np.float32:
                raise BundleError(
                    f"{path} has {spec.name} as {v.dtype}; trainable tensors are float32", fix
                )
            out[spec.name] = np.ascontiguousarray(v)
        return out

    def trainable_values(self, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
        """Trained tensors from a safetensors file (a run's ``trained.safetensors``), its
        checksum verified, checked to belong to this bundle and to match its shapes; ``None``:
        the initial values."""
        if path is None:
            return self.initial_trainable()
        from .zo.checkpoint import load_tensors

        path = Path(path)
        rebuild = (
            "rebuild it from the run's ledger: edgezo replay --run RUN --out "
            "RUN/trained.safetensors (or pass a run's trained.safetensors)"
        )
        values, meta = load_tensors(path, "trained tensors", rebuild, BundleError)
        owner = meta.get("bundle")
        if owner is not None and not self.recorded_by(owner, str(path)):
            raise BundleError(
                f"{path} was trained on bundle {owner}, not on {self.path} ({self.fingerprint})",
                "pass the bundle the run used (see the run's ledger header)",
            )
        out = self._checked(values, path, "pass the tensors trained on this bundle")
        for name, v in out.items():
            if not np.isfinite(v).all():
                raise BundleError(f"{path}: {name} holds NaN or infinite values", rebuild)
        return out

    def tokenizer(self):
        """The bundle's ``tokenizers.Tokenizer`` (text tasks), its special ids checked
        against its vocabulary."""
        from tokenizers import Tokenizer

        spec = self.manifest.tokenizer
        if spec is None:
            raise BundleError(
                f"bundle {self.path} has no tokenizer", "export it from a model with a tokenizer"
            )
        path = self.path / spec.file
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise BundleError(f"cannot read the tokenizer {path}: {e}", REEXPORT) from None
        size = max(tok.get_vocab_size(with_added_tokens=True), self.manifest.vocab_size or 0)
        ids = {k: getattr(spec, k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
        ids.update(
            {
                f"prompt.label_token_ids[{i}]": t
                for i, t in enumerate((self.manifest.prompt or {}).get("label_token_ids") or [])
            }
        )
        for key, v in ids.items():
            if v is not None and not 0 <= v < size:
                raise BundleError(
                    f"{self.path / MANIFEST}: {key} is {v}, outside the tokenizer's vocabulary "
                    f"({size} tokens)",
                    REEXPORT,
                )
        return tok


def _bad_values(v: np.ndarray, positive: bool) -> str | None:
    """Why initial values ``v`` cannot be trained from (None: they can)."""
    if not np.isfinite(v).all():
        return f"holds {int(np.count_nonzero(~np.isfinite(v)))} NaN or infinite values"
    top = float(np.max(np.abs(v))) if v.size else 0.0
    if top > MAX_ABS_INITIAL:
        return f"holds a value of magnitude {top:.3g}, beyond {MAX_ABS_INITIAL:g}"
    if positive and v.size and float(np.min(v)) <= 0:
        return "must stay positive (it is moved multiplicatively) but holds values <= 0"
    return None


# -- loading ----------------------------------------------------------------------------------


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder/name``, refused when it (or a symlink on the way) leads out of ``folder``."""
    problem = unsafe_name(name)
    if problem:
        raise BundleError(f"{what}: {problem}", REEXPORT)
    target = folder / name
    root = folder.resolve()
    real = target.resolve()
    if real != root and root not in real.parents:
        raise BundleError(
            f"{what}: {target} leads outside the bundle folder (to {real}, through a symlink)",
            "copy the files into the bundle folder instead of linking to them, or re-export it",
        )
    return target


def _read_manifest(mpath: Path) -> Any:
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is {size:,} bytes: not a manifest", REEXPORT)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            dup = sorted({k for k, _ in pairs if sum(1 for j, _ in pairs if j == k) > 1})
            raise BundleError(f"{mpath} repeats the key(s) {', '.join(dup)}", REEXPORT)
        return out

    try:
        return json.loads(mpath.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as e:
        raise BundleError(f"{mpath} is not UTF-8 text (byte {e.start})", REEXPORT) from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e})", REEXPORT) from None
    except RecursionError:
        raise BundleError(f"{mpath} nests too deeply to be a manifest", REEXPORT) from None


def _check_graph_references(folder: Path, manifest: Manifest, mpath: Path) -> None:
    """Every external-data file an ONNX graph of the bundle names stays inside the folder and
    is among the files the manifest hashes (ONNX Runtime would open it)."""
    from .onnx_refs import MalformedModel, external_locations

    for name in manifest.files:
        if not name.endswith(".onnx"):
            continue
        graph = folder / name
        try:
            refs = external_locations(graph)
        except MalformedModel as e:
            raise BundleError(f"{graph} is not a valid ONNX model ({e})", REEXPORT) from None
        base = PurePosixPath(name).parent
        for tensor, location in sorted(set(refs)):
            what = f"{graph}: tensor {tensor!r} keeps its data in {location!r}"
            _inside(folder / base, location, what)
            key = str(base / location) if str(base) != "." else location
            if PurePosixPath(key).as_posix() not in manifest.files:
                raise BundleError(
                    f"{what}, a file {mpath} does not list (its content would not be verified)",
                    REEXPORT,
                )


def _check_trainable_file(path: Path, manifest: Manifest) -> None:
    """The tensors file holds every trainable tensor, float32, of the manifest's shape (read
    from its header, before anything is allocated)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            stored = {k: (v.get_dtype(), v.get_shape()) for k, v in slices.items()}
    except Exception as e:  # safetensors raises several types on corrupt input
        raise BundleError(f"cannot read {path}: {e}", REEXPORT) from None
    for s in manifest.trainable:
        got = stored.get(s.name)
        if got is None or got[0] != "F32" or tuple(got[1]) != s.shape:
            have = "nothing" if got is None else f"{got[0]} {list(got[1])}"
            raise BundleError(
                f"{path} holds {have} for {s.name}; the manifest says F32 {list(s.shape)}",
                REEXPORT,
            )


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open and check a bundle folder (see the module docstring); with ``verify`` also check
    every file's sha256 (sizes are always checked)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"bundle folder {path} does not exist",
            "export one with `edgezo export --model ... --out DIR`, or pass the right --bundle",
        )
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(
            f"{mpath} is missing: {path} is not a complete bundle",
            "re-export it with `edgezo export` (an interrupted export leaves no manifest)",
        )
    _inside(path, MANIFEST, str(mpath))
    manifest = Manifest.from_json(_read_manifest(mpath), where=str(mpath))
    unlisted = Problems(str(mpath), BundleError, REEXPORT)
    for key, name in manifest.paths().items():
        if name not in manifest.files:  # the runtime would open a file nothing verifies
            unlisted.add(key, f"names {name!r}, which `files` does not list (nor hash)", REEXPORT)
    unlisted.check()
    for name, info in manifest.files.items():
        f = _inside(path, name, f"{mpath}: files[{name!r}]")
        if not f.is_file():
            raise BundleError(
                f"bundle file {f} is missing", "copy the whole bundle folder, or re-export it"
            )
        if f.stat().st_size != info["bytes"]:
            raise BundleError(
                f"bundle file {f} has {f.stat().st_size} bytes, the manifest says "
                f"{info['bytes']}: it is truncated or was changed",
                "copy the bundle again or re-export it",
            )
        if verify and sha256_file(f) != info["sha256"]:
            raise BundleError(
                f"bundle file {f} does not match its sha256 in the manifest: it is corrupted "
                "or was changed",
                "copy the bundle again or re-export it",
            )
    _check_graph_references(path, manifest, mpath)
    _check_trainable_file(path / "trainable.safetensors", manifest)
    return Bundle(path=path, manifest=manifest)
