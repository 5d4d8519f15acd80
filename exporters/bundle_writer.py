"""Write a bundle atomically: build it in a hidden sibling folder, move it into place at the end.

An export that fails or is interrupted removes its staging folder and leaves ``--out`` as it
was: either absent, or the previous bundle when overwriting.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgezo.errors import EdgezoError


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a file, or an existing non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise EdgezoError(f"--out {out} is a file", "pass --out a folder path for the bundle")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EdgezoError(
            f"--out {out} already exists and is not empty",
            "pass another --out, or --overwrite to replace it (overwrite=True from Python)",
        )


@contextmanager
def staged_bundle(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; on success it replaces ``out``.

    On any error (KeyboardInterrupt included) the staging folder is removed and ``out`` is
    untouched.
    """
    out = Path(out).absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    stage = out.parent / f".{out.name}.partial-{token}"
    stage.mkdir()
    try:
        yield stage
        _normalise_permissions(stage)
        check_destination(out, overwrite)  # someone may have written there meanwhile
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{token}"
            os.replace(out, old)
        try:
            os.replace(stage, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _normalise_permissions(folder: Path) -> None:
    """Some writers (safetensors, onnx external data) create files 0600; a bundle is meant to
    be copied and shared, so give every file the ordinary ``0666 & ~umask``."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
