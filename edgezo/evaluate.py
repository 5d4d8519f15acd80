"""Score a bundle, with its initial or trained tensors, on a data file.

=====================  ===========================================================================
task                   what is measured (one forward per batch)
=====================  ===========================================================================
causal_lm              mean per-example loss (``loss`` output); perplexity = exp(loss)
classification         mean cross-entropy (``loss``) and accuracy (argmax of ``logits``)
prompt_classification  the prompt alone is run; from ``next_logits`` at its last token: the loss
                       on the label word's first token (= the training loss) and accuracy = argmax
                       over the label words' first tokens
=====================  ===========================================================================
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .bundle import Manifest, load_bundle
from .data import IGNORE, Example, collate, eval_batches, read_jsonl, tokenize_for
from .defaults import ensure_default_bundle
from .runner import LossRunner, RuntimeOptions
from .zo.params import FlatParams

BATCH_INPUTS = ["input_ids", "attention_mask", "labels"]


def score(
    runner: LossRunner, examples: list[Example], batch_size: int, pad_id: int, manifest: Manifest
) -> dict:
    """{"loss": mean per-example loss (float64), "accuracy": share right or None}."""
    if manifest.task == "causal_lm":
        total = 0.0
        for batch in eval_batches(examples, batch_size, pad_id):
            total += float(np.sum(runner.losses(batch, heldout=True), dtype=np.float64))
        return {"loss": total / len(examples), "accuracy": None}
    total, right = 0.0, 0
    if manifest.task == "classification":
        for batch in eval_batches(examples, batch_size, pad_id):
            loss, logits = runner.outputs(batch, ("loss", "logits"))
            total += float(np.sum(loss, dtype=np.float64))
            right += int(np.sum(np.argmax(logits, axis=-1) == batch["labels"]))
    else:  # prompt_classification: the prompt without its label word
        words = np.asarray((manifest.prompt or {})["label_token_ids"], dtype=np.int64)
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = collate(
                [Example(e.input_ids[:-1], (IGNORE,), e.line, e.target) for e in chunk], pad_id
            )
            (logits,) = runner.outputs(batch, ("next_logits",))
            logits = logits.astype(np.float64)
            peak = logits.max(axis=-1)
            lse = np.log(np.exp(logits - peak[:, None]).sum(axis=-1)) + peak
            targets = np.array([e.target for e in chunk])
            total += float(np.sum(lse - logits[np.arange(len(chunk)), words[targets]]))
            right += int(np.sum(np.argmax(logits[:, words], axis=-1) == targets))
    return {"loss": total / len(examples), "accuracy": right / len(examples)}


def evaluate(
    bundle: str | None,
    data: str,
    tensors: str | None = None,
    run_dir: str | None = None,
    max_length: int = 64,
    batch_size: int = 16,
    provider: str = "cpu",
) -> dict:
    """{"loss", "perplexity", "accuracy", "examples", "task"} of a bundle on ``data``
    (``accuracy`` is None for a causal LM, ``perplexity`` None for classification)."""
    if run_dir is not None:
        from .zo.ledger import Ledger

        run = Path(run_dir)
        bundle = bundle or Ledger.read(run / "ledger.jsonl").header["bundle_path"]
        tensors = tensors or str(run / "trained.safetensors")
    b = load_bundle(bundle or ensure_default_bundle())
    params = FlatParams(b.manifest.trainable)
    params.load(b.trainable_values(tensors), where=str(tensors or b.path))
    examples = tokenize_for(b.manifest, read_jsonl(data), b.tokenizer(), max_length, where=data)
    runner = LossRunner(b.model_path, params, BATCH_INPUTS, RuntimeOptions(provider=provider))
    result = score(runner, examples, batch_size, b.manifest.tokenizer.pad_token_id, b.manifest)
    lm = b.manifest.task == "causal_lm"
    return {
        **result,
        "perplexity": math.exp(min(result["loss"], 50.0)) if lm else None,
        "examples": len(examples),
        "task": b.manifest.task,
    }
