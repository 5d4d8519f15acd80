"""Atomic checkpoints and tensor files: write to a temporary file, fsync, rename, fsync folder.

A reader therefore sees either the previous complete file or the new complete file, never a
torn one, whatever moment the process is killed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .. import atomic
from ..errors import CheckpointError


def save_tensors_atomic(
    path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> Path:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return atomic.write_with(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


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
