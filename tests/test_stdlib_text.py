"""tools/stdlib_text.py: the second LM corpus is deterministic, disjoint and of the stated shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "stdlib_text.py"


def _build(out: Path, *args: str) -> tuple[list[str], list[str]]:
    """Run the tool as a script (a fresh interpreter, as documented)."""
    cmd = [sys.executable, str(TOOL), "--out", str(out), "--train", "40", "--heldout", "10"]
    subprocess.run([*cmd, *args], check=True, capture_output=True)
    return tuple(
        [json.loads(line)["text"] for line in (out / f).read_text(encoding="utf-8").splitlines()]
        for f in ("train.jsonl", "heldout.jsonl")
    )


def test_corpus_is_deterministic_and_disjoint(tmp_path):
    train, held = _build(tmp_path / "a")
    assert len(train) == 40 and len(held) == 10
    assert not set(train) & set(held)
    assert all(120 <= len(t) <= 400 and ">>>" not in t for t in train + held)
    assert (train, held) == _build(tmp_path / "b")  # the same seed, the same corpus
    assert train != _build(tmp_path / "c", "--seed", "1")[0]
