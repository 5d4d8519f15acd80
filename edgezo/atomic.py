"""Replacing a file atomically and durably: write a temporary file beside it, fsync it, rename
it over the target, fsync the folder.

A reader sees the previous complete file or the new complete one, never a torn one, whatever
moment the process is killed; after the call returns the new file survives a power cut. Like
:mod:`edgezo.errors`, this module is at the bottom: every part of edgezo may import it, the ZO
core included. Temporary files are named ``.<name>.tmp-<pid>``; :func:`remove_stale_temps`
clears those a killed process left behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder (makes a rename in it durable); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes the new content to ``tmp``; it then replaces ``path`` atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically and durably."""
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with UTF-8 ``text`` atomically and durably."""
    return write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes that a killed process left in ``folder``
    (any ``.<name>.tmp-<pid>`` whose process is gone); returns what was removed."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
