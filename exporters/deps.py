"""Import checks for the desktop-only dependencies, with the install hint."""

from __future__ import annotations

import importlib.util

from edgezo.errors import EdgezoError

EXPORT_HINT = "pip install 'edgezo[export]' torch==2.13.0"
_REQUIRED = ("torch", "transformers", "onnx", "onnxruntime", "safetensors", "tokenizers")


def require_export_deps() -> None:
    """Raise an :class:`EdgezoError` with the install command if an export dependency is missing."""
    missing = [m for m in _REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise EdgezoError(
            f"exporting needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "not installed (the device runtime does not need them; the desktop exporter does)",
            f"{EXPORT_HINT}  (torch==2.13.0 keeps the CPU build)",
        )


def versions() -> dict[str, str]:
    """Versions of the packages that shaped an export, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("edgezo", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out
