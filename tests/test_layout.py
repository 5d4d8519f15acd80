"""The package layout keeps its dependency rules (docs/concepts/architecture.md).

- ``edgezo/zo/`` — the ZO core — is numpy only: no onnxruntime, and none of the runtime's
  modules (only ``edgezo.errors`` and ``edgezo.atomic``, the bottom layer every part may
  import);
- ``edgezo.device.profiles`` does not import detection (profiles <- detect <- resolve).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

EDGEZO = Path(__file__).resolve().parents[1] / "edgezo"
CORE = sorted((EDGEZO / "zo").glob("*.py"))
#: the bottom layer, importable by every part (it imports nothing of edgezo)
BOTTOM = ("edgezo.errors", "edgezo.atomic")


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` (in ``package``) imports, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from .. import atomic`` imports the module edgezo.atomic
            out |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_zo_core_imports_only_itself_errors_and_numpy(path):
    for name in _imports(path, "edgezo.zo"):
        top = name.split(".")[0]
        if top == "edgezo":
            assert name.startswith("edgezo.zo") or name in BOTTOM, (path.name, name)
        else:
            assert top not in ("onnxruntime", "onnx", "torch", "transformers"), (path.name, name)


def test_importing_the_zo_core_loads_no_runtime_module():
    code = (
        "import sys, edgezo.zo.engine, edgezo.zo.replay, edgezo.zo.checkpoint\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'onnxruntime' or "
        f"(m.startswith('edgezo.') and not m.startswith('edgezo.zo') and m not in {BOTTOM!r})]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_profiles_do_not_import_detection():
    names = _imports(EDGEZO / "device" / "profiles.py", "edgezo.device")
    assert "edgezo.device.detect" not in names and "edgezo.device.resolve" not in names
