"""Score a bundle, with its initial or trained tensors, on a data file."""

from __future__ import annotations

import math
from pathlib import Path

from .bundle import load_bundle
from .data import read_jsonl, tokenize
from .defaults import ensure_default_bundle
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
    params.load(b.trainable_values(tensors), where=str(tensors or b.path))
    examples = tokenize(read_jsonl(data), b.tokenizer(), b.manifest.tokenizer, max_length,
                        where=data)
    runner = LossRunner(b.model_path, params, BATCH_INPUTS, RuntimeOptions(provider=provider))
    loss = heldout_loss(runner, examples, batch_size, b.manifest.tokenizer.pad_token_id)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(examples)}
