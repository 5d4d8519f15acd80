"""Score a bundle, with its initial or trained tensors, on a data file."""

from __future__ import annotations

import math
from pathlib import Path

from .bundle import load_bundle
from .data import read_jsonl, tokenize
from .defaults import ensure_default_bundle
from .errors import CheckpointError
from .params import FlatParams
from .runner import LossRunner, RuntimeOptions
from .train import BATCH_INPUTS, heldout_loss


def evaluate(bundle: str | None, data: str, tensors: str | None = None,
             run_dir: str | None = None, max_length: int = 64, batch_size: int = 16,
             provider: str = "cpu") -> dict:
    """{"loss", "perplexity", "examples"}: mean per-example loss on ``data``."""
    if run_dir is not None:
        from .ledger import Ledger

        run = Path(run_dir)
        bundle = bundle or Ledger.read(run / "ledger.jsonl").header["bundle_path"]
        tensors = tensors or str(run / "trained.safetensors")
    b = load_bundle(bundle or ensure_default_bundle())
    params = FlatParams(b.manifest.trainable)
    if tensors is None:
        params.load(b.initial_trainable(), where=str(b.path))
    else:
        from safetensors import safe_open
        from safetensors.numpy import load_file

        if not Path(tensors).is_file():
            raise CheckpointError(f"{tensors} does not exist", "pass a run's trained.safetensors")
        with safe_open(tensors, framework="numpy") as f:
            owner = (f.metadata() or {}).get("bundle")
        if owner is not None and owner != b.fingerprint:
            raise CheckpointError(
                f"{tensors} was trained on bundle {owner}, not on {b.path} ({b.fingerprint})",
                "evaluate it with the bundle its run used (see the run's ledger header)",
            )
        params.load(load_file(tensors), where=tensors)
    examples = tokenize(read_jsonl(data), b.tokenizer(), b.manifest.tokenizer, max_length,
                        where=data)
    runner = LossRunner(b.model_path, params, BATCH_INPUTS, RuntimeOptions(provider=provider))
    loss = heldout_loss(runner, examples, batch_size, b.manifest.tokenizer.pad_token_id)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(examples)}
