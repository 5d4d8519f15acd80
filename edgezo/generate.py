"""Text generation with a bundle's (personalised) tensors, runtime-only (no torch).

Two paths, the same tokens (greedy parity is tested):

- **KV cache** (a bundle with a ``decoder`` in its manifest, ``exporters/decode.py``): the
  decoding graph runs the prompt once (an empty past) and then one token per step, feeding back
  its ``present`` keys/values as the next ``past`` (bound with IOBinding, never copied to
  numpy). A step costs one token's forward, so ``n`` new tokens cost about one prompt forward
  plus ``n`` one-token forwards.
- **Recompute** (older bundles): the loss graph's ``next_logits`` output (the logits at each
  row's last attended position) with ``labels`` all −100; every new token re-runs the whole
  prefix. Used with a note; ``edgezo export --decoder-only --bundle B`` adds the decoding graph.

The prefix is truncated to its last ``max_length`` tokens (and to the model's positions, when
the manifest records them); with the KV cache a sequence that outgrows ``max_length`` is
re-read from its last ``max_length`` tokens, which is what the recompute path sees.

Greedy with ``temperature=0``; otherwise sampling from ``softmax(logits / temperature)``,
optionally restricted to the ``top_k`` most likely tokens and/or the smallest set whose
probability reaches ``top_p``, drawn from an explicit ``np.random.Generator`` (never numpy's
global state). Generation stops at the bundle's EOS token, at one of ``stop`` strings (the
text is cut before it), or after ``max_new_tokens``. ``chat=True`` wraps the prompt in the
tokenizer's chat template, rendered at export around one user message (the runtime has no
template engine). :meth:`TextGenerator.stream` yields the text piece by piece as tokens come.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    stopped_at_stop: bool = False  # one of the stop strings appeared (the text ends before it)


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


class KVDecoder:
    """The decoding graph of a bundle (``manifest.decoder``): ``start(ids)`` runs the prompt,
    ``step(token)`` one more token; both return the next-token logits (float32 [vocab])."""

    def __init__(self, bundle: Bundle, params: FlatParams, options: RuntimeOptions):
        import onnxruntime as ort

        from .runner import resolve_provider

        d = bundle.manifest.decoder or {}
        self.layers = int(d["num_layers"])
        self.heads = int(d["num_kv_heads"])
        self.head_dim = int(d["head_dim"])
        #: the frozen weights' precision: fp32, or weight-only int8/int4 (``MatMulNBits``)
        self.precision = str(d.get("precision", "fp32"))
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = options.cpu_arena
        so.log_severity_level = 3
        provider = resolve_provider(options.provider or "cpu")
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        path = bundle.path / d["graph"]
        try:
            providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load {path}: {e}", "re-export it") from None
        self.past = [
            f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")
        ]
        self.present = [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        wanted = {"input_ids", "attention_mask", *self.past, *(s.name for s in params.specs)}
        got = {i.name for i in self.session.get_inputs()}
        if got != wanted:
            raise BundleError(
                f"{path} inputs do not match the manifest (graph only {sorted(got - wanted)[:3]}"
                f", manifest only {sorted(wanted - got)[:3]})",
                "add the decoding graph again: edgezo export --decoder-only --bundle B",
            )
        self.params = params
        self.length = 0
        self._values: list = []

    def _bind_trainables(self, io) -> None:
        import onnxruntime as ort

        if not self._values:  # shares params.feed: a later load() is seen without rebinding
            self._values = [
                (name, ort.OrtValue.ortvalue_from_numpy(v))
                for name, v in self.params.feed_views().items()
            ]
        for name, ov in self._values:
            io.bind_ortvalue_input(name, ov)

    def _run(self, ids: np.ndarray, past: list | None) -> np.ndarray:
        io = self.session.io_binding()
        self._bind_trainables(io)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", np.ones((1, self.length + ids.shape[1]), np.int64))
        if past is None:
            empty = np.zeros((1, self.heads, 0, self.head_dim), np.float32)
            for name in self.past:
                io.bind_cpu_input(name, empty)
        else:
            for name, ov in zip(self.past, past, strict=True):
                io.bind_ortvalue_input(name, ov)
        io.bind_output("logits")
        for name in self.present:
            io.bind_output(name, self.device)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        self._past = out[1:]
        self.length += ids.shape[1]
        return out[0].numpy()[0]

    def start(self, ids: list[int]) -> np.ndarray:
        self.length = 0
        return self._run(np.asarray([ids], dtype=np.int64), None)

    def step(self, token: int) -> np.ndarray:
        return self._run(np.asarray([[token]], dtype=np.int64), self._past)


class TextGenerator:
    """One ONNX Runtime session of a bundle; ``load`` tensors, then ``generate`` repeatedly.

    ``kv_cache``: ``None`` uses the decoding graph when the bundle has one (else the loss graph,
    with a note in ``notes``); ``False`` always re-runs the loss graph; ``True`` requires it.
    """

    def __init__(
        self,
        bundle: Bundle,
        options: RuntimeOptions | None = None,
        kv_cache: bool | None = None,
    ):
        require_generation(bundle)
        options = options or RuntimeOptions()
        self.bundle = bundle
        self.options = options
        self.spec = bundle.manifest.tokenizer
        self.tokenizer = bundle.tokenizer()
        self.params = FlatParams(bundle.manifest.trainable)
        self.params.load(bundle.initial_trainable(), where=str(bundle.path))
        self.max_positions = bundle.manifest.architecture.get("max_position_embeddings")
        self.notes: list[str] = []
        has_decoder = bundle.manifest.decoder is not None
        if kv_cache and not has_decoder:
            raise BundleError(
                f"bundle {bundle.path} has no decoding graph (KV cache)",
                f"add it: edgezo export --decoder-only --bundle {bundle.path}",
            )
        self.decoder = None
        self._runner: LossRunner | None = None
        if has_decoder and kv_cache is not False:
            self.decoder = KVDecoder(bundle, self.params, options)
            rows = (bundle.manifest.decoder or {}).get("max_positions")
            if rows:  # the fused graph's rotary tables end there
                self.max_positions = min(int(rows), int(self.max_positions or rows))
            if self.decoder.precision != "fp32":
                rel = (bundle.manifest.decoder or {}).get("parity_vs_loss_graph", {})
                rel = rel.get("max_rel_logit_diff") if isinstance(rel, dict) else None
                self.notes.append(
                    f"the decoding graph's frozen weights are {self.decoder.precision} "
                    "(weight-only MatMulNBits; trainable tensors fp32)"
                    + (
                        f": logits within {rel:.2%} of fp32's at export"
                        if isinstance(rel, float)
                        else ""
                    )
                    + "; greedy text may differ slightly from the fp32 model's"
                )
        elif kv_cache is None:
            self.notes.append(
                f"bundle {bundle.path} has no decoding graph: every new token re-runs the whole "
                f"prefix (slow); add one with `edgezo export --decoder-only --bundle "
                f"{bundle.path}`"
            )

    @property
    def runner(self) -> LossRunner:
        if self._runner is None:
            self._runner = LossRunner(
                self.bundle.model_path, self.params, BATCH_INPUTS, self.options
            )
        return self._runner

    @property
    def decoder_precision(self) -> str | None:
        """The decoding graph's weight precision (None: no decoding graph in use)."""
        return None if self.decoder is None else self.decoder.precision

    @property
    def chat_pieces(self) -> dict[str, str] | None:
        return (self.bundle.manifest.decoder or {}).get("chat")

    def load(self, tensors: str | Path | None = None) -> None:
        """Use trained tensors (a run's ``trained.safetensors``), or the initial ones (None)."""
        self.params.load(
            self.bundle.trainable_values(tensors), where=str(tensors or self.bundle.path)
        )

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits (float32 [vocab]) after the token sequence ``ids``, by a full
        forward of the loss graph."""
        arr = np.asarray([ids], dtype=np.int64)
        batch = {
            "input_ids": arr,
            "attention_mask": np.ones_like(arr),
            "labels": np.full_like(arr, IGNORE),
        }
        return self.runner.next_logits(batch)[0]

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        spec = self.spec
        if chat:
            pieces = self.chat_pieces
            if pieces is None:
                raise ConfigError(
                    f"bundle {self.bundle.path} records no chat template (its tokenizer has "
                    "none, or the bundle has no decoding graph)",
                    "drop --chat, or add the decoding graph with `edgezo export --decoder-only "
                    "--bundle B` from a model whose tokenizer has a chat template",
                )
            text = pieces["prefix"] + prompt + pieces["suffix"]
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = [spec.bos_token_id] if spec.add_bos and spec.bos_token_id is not None else []
        return bos + self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def tokens(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng: np.random.Generator | None = None,
        max_length: int = 256,
    ) -> Iterator[int]:
        """The new tokens after ``ids`` one at a time (the EOS token ends it, not yielded)."""
        ids = list(ids[-max_length:])
        eos = self.spec.eos_token_id
        dec = self.decoder
        logits = dec.start(ids) if dec is not None else self.next_logits(ids)
        for i in range(max_new_tokens):
            token = pick_token(logits, temperature, top_k, top_p, rng)
            if eos is not None and token == eos:
                return
            yield token
            ids.append(token)
            if i + 1 == max_new_tokens:
                return
            if dec is None:
                logits = self.next_logits(ids[-max_length:])
            elif dec.length + 1 > max_length:  # outgrown: re-read the last max_length tokens
                logits = dec.start(ids[-max_length:])
            else:
                logits = dec.step(token)

    def _check(self, max_new_tokens: int, max_length: int, temperature: float) -> int:
        if max_new_tokens < 0:
            raise ConfigError(
                f"max_new_tokens must be >= 0, got {max_new_tokens}",
                "pass a positive --max-new-tokens",
            )
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}", "raise it")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}", "pass 0 (greedy)")
        if self.max_positions:
            max_length = min(max_length, int(self.max_positions))
        return max_length

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        rng: np.random.Generator | None = None,
        seed: int | None = None,
        max_length: int = 256,
        stop: Sequence[str] = (),
        chat: bool = False,
        result: list | None = None,
    ) -> Iterator[str]:
        """The continuation's text in pieces as tokens come (the pieces join to
        :meth:`generate`'s ``text``); a :class:`Generation` is appended to ``result``."""
        max_length = self._check(max_new_tokens, max_length, temperature)
        if temperature > 0 and rng is None:
            rng = np.random.default_rng(seed)
        stop = [s for s in stop if s]
        ids = self.encode(prompt, chat)
        if not ids:
            raise ConfigError("the prompt encodes to no tokens", "pass a non-empty --prompt")
        prompt_tokens = min(len(ids), max_length)
        hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be forming
        new: list[int] = []
        shown = 0
        text = ""
        stopped_eos = stopped_stop = False
        budget = max_new_tokens
        for token in self.tokens(ids, max_new_tokens, temperature, top_k, top_p, rng, max_length):
            new.append(token)
            budget -= 1
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, stopped_stop = text[:cut], True
                break
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
                continue
            ready = len(text) - hold
            if ready > shown:
                yield text[shown:ready]
                shown = ready
        else:
            stopped_eos = budget > 0
        if len(text) > shown:
            yield text[shown:]
        if result is not None:
            result.append(Generation(text, new, stopped_eos, prompt_tokens, stopped_stop))

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
        stop: Sequence[str] = (),
        chat: bool = False,
    ) -> Generation:
        result: list[Generation] = []
        for _ in self.stream(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            rng,
            seed,
            max_length,
            stop,
            chat,
            result,
        ):
            pass
        return result[0]


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
    stop: Sequence[str] = (),
    chat: bool = False,
    kv_cache: bool | None = None,
) -> Generation:
    """Continue ``prompt`` with the bundle's graph at trained ``tensors`` (or a run's, with
    ``run_dir``; the initial tensors when neither is given). See the module docstring."""
    b, tensors = resolve(bundle, tensors, run_dir)
    gen = TextGenerator(b, RuntimeOptions(provider=provider), kv_cache=kv_cache)
    gen.load(tensors)
    return gen.generate(
        prompt, max_new_tokens, temperature, top_k, top_p, rng, seed, max_length, stop, chat
    )
