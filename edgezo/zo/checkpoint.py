"""Atomic checkpoints and tensor files: write to a temporary file, fsync, rename, fsync folder.

A reader therefore sees either the previous complete file or the new complete file, never a
torn one, whatever moment the process is killed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..errors import CheckpointError
from .ledger import _fsync_dir


def save_tensors_atomic(
    path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, fingerprint: str) -> tuple[dict[str, np.ndarray], int]:
    """Tensors and step of a checkpoint, which must belong to the bundle ``fingerprint``."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}",
            "delete the checkpoint: --resume then rebuilds the state from the ledger",
        ) from None
    if meta.get("bundle") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to bundle {meta.get('bundle')}, not to this bundle "
            f"({fingerprint})",
            "resume with the bundle the run was started with (see its ledger header), "
            "or start a new run with another --out",
        )
    return tensors, int(meta["step"])
