"""The bundle: the contract between the desktop exporter and the on-device runtime.

A bundle is a folder::

    manifest.json          versioned description of everything below, with sha256 of each file
    model.onnx (+ .data)   forward-only graph: batch inputs + one input per trainable tensor
                           -> ``loss`` [batch] (per-example mean over valid tokens)
    trainable.safetensors  initial values of the trainable tensors
    tokenizer.json         Hugging Face ``tokenizers`` file (text tasks)

The exporter writes it with :func:`write_manifest`; the runtime opens it with
:func:`load_bundle`, which checks the format version and every file's hash and fails with a
message naming the file and the fix. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import atomic
from .errors import BundleError
from .zo.params import TensorSpec

if TYPE_CHECKING:
    from .zo.engine import EngineSettings, ZOEngine
    from .zo.ledger import Ledger

FORMAT = "edgezo-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

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
DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "float16": np.float16}


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
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- (de)serialisation -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [_spec_dict(s) for s in self.inputs]
        d["outputs"] = [_spec_dict(s) for s in self.outputs]
        d["trainable"] = [_spec_dict(s) for s in self.trainable]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(
                f"{where} is not an edgezo bundle manifest (format={d.get('format')!r})",
                "point --bundle at a folder written by `edgezo export`",
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{where} has bundle format version {version!r}; this edgezo reads version "
                f"{FORMAT_VERSION}",
                "re-export the model with the `edgezo export` of this edgezo version, or "
                "install the edgezo version that wrote the bundle",
            )
        try:
            tok = d.get("tokenizer")
            return cls(
                task=d["task"],
                architecture=dict(d["architecture"]),
                trainable_mode=d["trainable_mode"],
                inputs=[InputSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in d["inputs"]],
                outputs=[InputSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in d["outputs"]],
                trainable=[
                    TensorSpec(
                        s["name"],
                        tuple(int(x) for x in s["shape"]),
                        s.get("dtype", "float32"),
                        s.get("role", "dense"),
                        bool(s.get("positive", False)),
                    )
                    for s in d["trainable"]
                ],
                tokenizer=TokenizerSpec(**tok) if tok else None,
                lora=d.get("lora"),
                quantization=d.get("quantization"),
                labels=list(d["labels"]) if d.get("labels") is not None else None,
                prompt=d.get("prompt"),
                stages=d.get("stages"),
                parity=dict(d.get("parity") or {}),
                exporter=dict(d.get("exporter") or {}),
                files=dict(d.get("files") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(
                f"{where} is malformed ({type(e).__name__}: {e})",
                "re-export the bundle with `edgezo export`",
            ) from None

    def check_task(self, where: str = MANIFEST) -> None:
        """The task is known and carries what it needs (labels, prompt)."""
        if self.task not in TASKS:
            raise BundleError(
                f"{where} has task {self.task!r}; this edgezo knows {', '.join(TASKS)}",
                "re-export the bundle with `edgezo export`, or upgrade edgezo",
            )
        if self.task != "causal_lm" and not self.labels:
            raise BundleError(
                f"{where}: a {self.task} bundle lists no labels", "re-export it with --labels"
            )
        if self.task == "prompt_classification":
            ids = (self.prompt or {}).get("label_token_ids") or []
            if "{text}" not in (self.prompt or {}).get("template", "") or len(ids) != len(
                self.labels or []
            ):
                raise BundleError(
                    f"{where}: the prompt template or label words are missing",
                    "re-export it with --template and --label-words",
                )

    @property
    def trainable_size(self) -> int:
        return sum(s.size for s in self.trainable)


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
        """A short identity of the bundle: the hash of its manifest's file hashes."""
        h = hashlib.sha256()
        for name in sorted(self.manifest.files):
            h.update(f"{name}:{self.manifest.files[name]['sha256']}\n".encode())
        return h.hexdigest()[:16]

    def engine(self, settings: EngineSettings) -> ZOEngine:
        """A ZO engine over this bundle's trainable tensors, at their initial values."""
        from .zo.engine import ZOEngine

        return ZOEngine(self.manifest.trainable, self.initial_trainable, settings, str(self.path))

    def replay(self, ledger: Ledger, upto: int | None = None, progress=None) -> ZOEngine:
        """The engine after replaying ``upto`` steps (all by default) of a run's ledger, which
        must have been written for this bundle."""
        from .zo.engine import EngineSettings
        from .zo.replay import check_ledger_fingerprint, replay

        check_ledger_fingerprint(ledger, self.fingerprint, str(self.path))
        engine = self.engine(EngineSettings.from_dict(ledger.header["engine"]))
        return replay(engine, ledger, upto, progress)

    def initial_trainable(self) -> dict[str, np.ndarray]:
        """Initial trainable values from ``trainable.safetensors``, checked against the manifest."""
        from safetensors.numpy import load_file

        path = self.path / "trainable.safetensors"
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises several types on corrupt input
            raise BundleError(
                f"cannot read {path}: {e}", "re-export the bundle with `edgezo export`"
            ) from None
        return self._checked(tensors, path, "re-export the bundle with `edgezo export`")

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
            out[spec.name] = np.ascontiguousarray(v, dtype=np.float32)
        return out

    def trainable_values(self, path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
        """Trained tensors from a safetensors file (a run's ``trained.safetensors``), checked
        to belong to this bundle and to match its shapes; ``None``: the initial values."""
        if path is None:
            return self.initial_trainable()
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path} does not exist", "pass a run's trained.safetensors")
        try:
            with safe_open(str(path), framework="numpy") as f:
                owner = (f.metadata() or {}).get("bundle")
            values = load_file(str(path))
        except Exception as e:  # safetensors raises several types on bad files
            raise BundleError(f"cannot read {path}: {e}", "pass a .safetensors file") from None
        if owner is not None and owner != self.fingerprint:
            raise BundleError(
                f"{path} was trained on bundle {owner}, not on {self.path} ({self.fingerprint})",
                "pass the bundle the run used (see the run's ledger header)",
            )
        return self._checked(values, path, "pass the tensors trained on this bundle")

    def tokenizer(self):
        """The bundle's ``tokenizers.Tokenizer`` (text tasks)."""
        from tokenizers import Tokenizer

        spec = self.manifest.tokenizer
        if spec is None:
            raise BundleError(
                f"bundle {self.path} has no tokenizer", "export it from a model with a tokenizer"
            )
        return Tokenizer.from_file(str(self.path / spec.file))


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open a bundle folder; with ``verify`` check every file's size and sha256."""
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
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e})", "re-export the bundle") from None
    manifest = Manifest.from_json(raw, where=str(mpath))
    manifest.check_task(str(mpath))
    for required in ("model.onnx", "trainable.safetensors"):
        if required not in manifest.files:
            raise BundleError(f"{mpath} lists no {required}", "re-export the bundle")
    for name, info in manifest.files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(
                f"bundle file {f} is missing", "copy the whole bundle folder, or re-export it"
            )
        if f.stat().st_size != info.get("bytes"):
            raise BundleError(
                f"bundle file {f} has {f.stat().st_size} bytes, the manifest says "
                f"{info.get('bytes')}: it is truncated or was changed",
                "copy the bundle again or re-export it",
            )
        if verify and sha256_file(f) != info.get("sha256"):
            raise BundleError(
                f"bundle file {f} does not match its sha256 in the manifest: it is corrupted "
                "or was changed",
                "copy the bundle again or re-export it",
            )
    return Bundle(path=path, manifest=manifest)
