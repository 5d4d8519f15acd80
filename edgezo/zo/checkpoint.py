"""Checkpoints and tensor files: atomic, deterministic, and carrying a checksum.

Every file is written through :mod:`edgezo.atomic` (a reader sees the previous complete file or
the new one, never a torn one, whatever moment the process is killed), in the safetensors
format, with

- a **checksum** in its metadata (``sha256``): the sha256 of the metadata and of every tensor's
  name, dtype, shape and bytes (:func:`checksum`), verified by :func:`load_tensors`, so a bit
  flip in the data is an error instead of a silently different θ;
- **byte-identical** content for identical tensors and metadata: sorted metadata keys, tensors
  in a fixed order. (safetensors' own writer orders the metadata by a hash map seeded per
  process, so this module writes the format — an 8-byte header length, a JSON header, the raw
  little-endian data — itself, streaming each tensor without a copy; reading stays the
  library's.)

A file without a checksum (written by an older edgezo) still loads, with an
:class:`~edgezo.errors.EdgezoWarning`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from .. import atomic
from ..errors import CheckpointError, EdgezoError, EdgezoWarning
from .ledger import Ledger

CHECKSUM = "sha256"
_CHECKSUM_TAG = b"edgezo-tensors/1\n"
#: numpy dtype -> safetensors dtype name
_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
REBUILD = "delete the checkpoint: --resume then rebuilds the state from the ledger"


def _little(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a = a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray makes 0-d 1-d
    return a if a.dtype.byteorder != ">" else a.astype(a.dtype.newbyteorder("<"))


def _bytes(a: np.ndarray) -> memoryview:
    return a.reshape(-1).view(np.uint8).data


def checksum(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """sha256 of ``metadata`` (but its own ``sha256``) and of every tensor, in name order."""
    h = hashlib.sha256(_CHECKSUM_TAG)
    for k in sorted(metadata):
        if k != CHECKSUM:
            h.update(json.dumps([k, metadata[k]]).encode() + b"\n")
    for name in sorted(tensors):
        a = _little(tensors[name])
        h.update(json.dumps([name, a.dtype.name, list(a.shape)]).encode() + b"\n")
        h.update(_bytes(a))
    return h.hexdigest()


def save_tensors_atomic(
    path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` and ``metadata`` (strings) to ``path`` atomically, with a checksum."""
    arrays = {k: _little(v) for k, v in tensors.items()}
    for k, a in arrays.items():
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"tensor {k!r} has dtype {a.dtype}, which safetensors cannot hold")
    meta = {str(k): str(v) for k, v in (metadata or {}).items() if k != CHECKSUM}
    meta[CHECKSUM] = checksum(arrays, meta)
    # larger items first keeps every tensor aligned to its item size (as safetensors does)
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for k in order:
        a = arrays[k]
        header[k] = {
            "dtype": _DTYPES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for k in order:
                f.write(_bytes(arrays[k]))

    return atomic.write_with(path, write)


def load_tensors(
    path: str | Path,
    what: str = "tensor file",
    fix: str = REBUILD,
    error: type[EdgezoError] = CheckpointError,
    missing_checksum_ok: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a safetensors file, its checksum verified (``error`` with
    ``fix`` when it cannot be read or does not match). A file without one loads with a
    warning, or silently with ``missing_checksum_ok`` (a file another hash covers)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist", fix)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types on corrupt input
        raise error(f"cannot read {what} {path}: {e}", fix) from None
    stored = meta.get(CHECKSUM)
    if stored is None and not missing_checksum_ok:
        warnings.warn(
            f"{what} {path} carries no checksum (written by an older edgezo): loaded without "
            "verifying its data",
            EdgezoWarning,
            stacklevel=2,
        )
    elif stored is not None and stored != checksum(tensors, meta):
        raise error(
            f"{what} {path} does not match the checksum written with it: its data is corrupted "
            "(a bit flip, a damaged copy) or was changed",
            fix,
        )
    return tensors, meta


#: state outside ``optim.`` that holds one value per trainable value (svrg's anchor θ̃)
THETA_SIZED = ("svrg.anchor_theta",)
#: ``optim.`` state with one value per trainable tensor (hizoo's per-tensor second moment)
PER_TENSOR = ("optim.hizoo_m2",)


def load_checkpoint(
    path: str | Path, fingerprint: str, ledger: Ledger | None = None
) -> tuple[dict[str, np.ndarray], int]:
    """Tensors and step of a checkpoint, which must belong to the bundle ``fingerprint`` and,
    given its run's ``ledger``, to that ledger (its chain value at the checkpoint's step)."""
    path = Path(path)
    tensors, meta = load_tensors(path, "checkpoint", REBUILD)
    if meta.get("bundle") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to bundle {meta.get('bundle')}, not to this bundle "
            f"({fingerprint})",
            "resume with the bundle the run was started with (see its ledger header), "
            "or start a new run with another --out",
        )
    step = meta.get("step", "")
    master = tensors.get("master")
    if not step.isdigit() or master is None or master.dtype != np.float32 or master.ndim != 1:
        raise CheckpointError(
            f"checkpoint {path} lacks its step or its float32 'master' vector", REBUILD
        )
    for k, v in tensors.items():
        theta_sized = k.startswith("optim.") or k in THETA_SIZED
        if theta_sized and v.shape != master.shape and v.size != 1 and k not in PER_TENSOR:
            raise CheckpointError(
                f"checkpoint {path}: {k} has shape {v.shape}, θ has {master.shape}", REBUILD
            )
    if ledger is not None and "ledger_chain" in meta and int(step) <= len(ledger.records):
        if meta["ledger_chain"] != ledger.chain_at(int(step)):
            raise CheckpointError(
                f"checkpoint {path} (step {step}) was not written by the run whose ledger is "
                f"{ledger.path}: their histories differ",
                "delete the checkpoint: --resume then rebuilds the state from the ledger",
            )
    return tensors, int(step)
