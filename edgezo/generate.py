"""Text generation with a bundle's (personalised) tensors, runtime-only (no torch).

The bundle's loss graph has a second output, ``next_logits`` [batch, vocab]: the logits at each
row's last attended position. Generation runs that same graph (one set of weights, no second
model) with ``labels`` all −100, reads ``next_logits``, picks the next token and appends it.

There is no KV cache: every new token re-runs the whole prefix, so a step costs one forward of
the current length and ``n`` new tokens cost ``n`` forwards. That is fine for the short
continuations this is for (seeing what personalisation changed), not for long texts. The prefix
is truncated to its last ``max_length`` tokens (and to the model's positions, when the manifest
records them).

Greedy with ``temperature=0``; otherwise sampling from ``softmax(logits / temperature)``,
optionally restricted to the ``top_k`` most likely tokens and/or the smallest set whose
probability reaches ``top_p``, drawn from an explicit ``np.random.Generator`` (never numpy's
global state). Generation stops at the bundle's EOS token or after ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle
from .errors import BundleError, ConfigError
from .runner import LossRunner, RuntimeOptions
from .zo.params import FlatParams

BATCH_INPUTS = ["input_ids", "attention_mask", "labels"]
IGNORE = -100


@dataclass
class Generation:
    text: str  # the continuation only (the prompt is not repeated), special tokens skipped
    token_ids: list[int]  # the new tokens, without the EOS that stopped it
    stopped_at_eos: bool
    prompt_tokens: int  # prompt tokens after truncation to max_length


def has_next_logits(bundle: Bundle) -> bool:
    return any(o.name == "next_logits" for o in bundle.manifest.outputs)


def require_generation(bundle: Bundle) -> None:
    """Raise a clear error for a bundle that cannot generate: a classifier, or one exported
    before ``next_logits`` existed."""
    if bundle.manifest.task == "classification":
        raise BundleError(
            f"bundle {bundle.path} is a classifier (labels: {', '.join(bundle.manifest.labels)})"
            ": it scores texts, it does not write them",
            "use `edgezo eval` for its accuracy; generate needs a causal-LM bundle",
        )
    if not has_next_logits(bundle):
        raise BundleError(
            f"bundle {bundle.path} has no `next_logits` output (outputs: "
            f"{[o.name for o in bundle.manifest.outputs]}): it was exported by an older edgezo "
            "and cannot generate text",
            "re-export the model with `edgezo export` of this edgezo version",
        )
    if bundle.manifest.tokenizer is None:
        raise BundleError(f"bundle {bundle.path} has no tokenizer", "re-export it with one")


def pick_token(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> int:
    """The next token from one row of logits: argmax when ``temperature <= 0``, else a draw."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    if rng is None:
        raise ConfigError("sampling needs a random generator", "pass rng= or seed=")
    z = logits / temperature
    if top_k is not None and 0 < top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - np.max(z))
    p /= p.sum()
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


class TextGenerator:
    """One ONNX Runtime session of a bundle; ``load`` tensors, then ``generate`` repeatedly."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions | None = None):
        require_generation(bundle)
        options = options or RuntimeOptions()
        self.bundle = bundle
        self.spec = bundle.manifest.tokenizer
        self.tokenizer = bundle.tokenizer()
        self.params = FlatParams(bundle.manifest.trainable)
        self.params.load(bundle.initial_trainable(), where=str(bundle.path))
        self.runner = LossRunner(bundle.model_path, self.params, BATCH_INPUTS, options)
        self.max_positions = bundle.manifest.architecture.get("max_position_embeddings")

    def load(self, tensors: str | Path | None = None) -> None:
        """Use trained tensors (a run's ``trained.safetensors``), or the initial ones (None)."""
        self.params.load(
            self.bundle.trainable_values(tensors), where=str(tensors or self.bundle.path)
        )

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits (float32 [vocab]) after the token sequence ``ids``."""
        arr = np.asarray([ids], dtype=np.int64)
        batch = {
            "input_ids": arr,
            "attention_mask": np.ones_like(arr),
            "labels": np.full_like(arr, IGNORE),
        }
        return self.runner.next_logits(batch)[0]

    def encode(self, prompt: str) -> list[int]:
        spec = self.spec
        bos = [spec.bos_token_id] if spec.add_bos and spec.bos_token_id is not None else []
        return bos + self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
        max_length: int = 256,
    ) -> Generation:
        if max_new_tokens < 0:
            raise ConfigError(
                f"max_new_tokens must be >= 0, got {max_new_tokens}",
                "pass a positive --max-new-tokens",
            )
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}", "raise it")
        if temperature > 0 and rng is None:
            rng = np.random.default_rng(seed)
        if self.max_positions:
            max_length = min(max_length, int(self.max_positions))
        ids = self.encode(prompt)
        if not ids:
            raise ConfigError("the prompt encodes to no tokens", "pass a non-empty --prompt")
        ids = ids[-max_length:]
        prompt_tokens = len(ids)
        eos = self.spec.eos_token_id
        new: list[int] = []
        stopped = False
        for _ in range(max_new_tokens):
            token = pick_token(self.next_logits(ids[-max_length:]), temperature, top_k, top_p, rng)
            if eos is not None and token == eos:
                stopped = True
                break
            new.append(token)
            ids.append(token)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text, new, stopped, prompt_tokens)


def resolve(
    bundle: str | Path | None, tensors: str | Path | None, run_dir: str | Path | None
) -> tuple[Bundle, str | None]:
    """The bundle and tensors file of ``bundle``/``tensors``, or of a run folder."""
    if run_dir is not None:
        from .zo.ledger import Ledger

        run = Path(run_dir)
        bundle = bundle or Ledger.read(run / "ledger.jsonl").header["bundle_path"]
        tensors = tensors or str(run / "trained.safetensors")
    if bundle is None:
        from .defaults import ensure_default_bundle

        bundle = ensure_default_bundle()
    return load_bundle(bundle), None if tensors is None else str(tensors)


def generate(
    bundle: str | Path | None,
    prompt: str,
    tensors: str | Path | None = None,
    run_dir: str | Path | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    max_length: int = 256,
    provider: str = "cpu",
) -> Generation:
    """Continue ``prompt`` with the bundle's graph at trained ``tensors`` (or a run's, with
    ``run_dir``; the initial tensors when neither is given). See the module docstring."""
    b, tensors = resolve(bundle, tensors, run_dir)
    gen = TextGenerator(b, RuntimeOptions(provider=provider))
    gen.load(tensors)
    return gen.generate(prompt, max_new_tokens, temperature, top_k, top_p, rng, seed, max_length)
