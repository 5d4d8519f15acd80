"""``edgezo plan``: will fine-tuning this bundle fit this device profile, and if not, what fits?

Peak memory of a ZO run is that of inference plus a few flat buffers::

    peak = max(load peak,  runtime + session + trainable buffers + optimiser state
                           + activations(micro-batch × sequence length))

- runtime: Python, numpy, ONNX Runtime, tokenizers (measured, or ``RUNTIME_MB``);
- session: the graph's initializers (the frozen weights) as ONNX Runtime holds them, measured
  by a dry run or taken as the size of ``model.onnx`` + its external data;
- trainable buffers: the float32 master θ and the feed buffer ONNX Runtime reads (one buffer
  when perturbed in place), plus direction scratch;
- optimiser state: θ-sized float32 buffers: one for momentum > 0, two for Adam's moments;
- frozen-prefix rows (a bundle with a prefix/suffix split, ``edgezo.prefix_cache``): every
  example's cached rows, ``cached_shapes`` floats per token (or per example), held in memory
  when they fit ``cache_prefix_mb``; past it they are memory-mapped from the run folder and
  count as disk, not memory (the OS pages them in per batch and may drop them again);
- activations: what forwards allocate, dominated for a causal LM by the loss tail's
  [rows × vocabulary] float blocks (the head's output, its cast and the log-softmax; rows =
  batch × sequence), plus a term in the head's weight bytes (vocabulary × hidden) and one
  layer's MLP and attention. The constants are fitted to measured peaks of two real
  vocabularies (SmolLM2-135M, 49,152 entries; Gemma 3 270M, 262,144:
  ``docs/benchmarks/plan-memory.md``) and scaled by measured forwards when a dry run is
  possible. With the CPU arena on, a shape's *second* forward allocates ONNX Runtime's
  memory-pattern block while the arena still holds the first forward's buffers: steady state
  is about 4.6 blocks instead of about 3.4 without the arena (measured: SmolLM2-135M 16×64,
  +500 MiB after the first forward, +920 MiB from the second on);
- mapped embedding: ONNX Runtime maps a bundle's external data file, so an embedding read
  only by its ``Gather`` keeps just the rows of the tokens seen resident (measured: a
  Qwen2.5-0.5B int4 bundle of 821 MiB ran at 1,052 MiB peak); it is not counted;
- load peak: an fp32 bundle with a tied embedding/LM head stores the matrix once and lets
  ONNX Runtime fold its transpose at session start, which holds a second copy of it until the
  session is built (measured: +640 MiB for Gemma 3 270M, +108 MiB for SmolLM2-135M).

The dry run (``calibrate``) runs in a child process: it loads the session exactly as a run
would, reads the resident memory after loading, then resets the kernel's high-water mark
(``/proc/self/clear_refs``) and runs two forwards at the run's micro-batch shape (shrunk to at
most ``CALIBRATION_TOKENS`` tokens, then scaled). Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import Bundle

MIB = 2**20
#: Resident memory of a run's process before any model is loaded (Python, numpy, onnxruntime,
#: tokenizers, edgezo), used when no dry run is made.
RUNTIME_MB = 100
#: [rows × vocabulary] float32 blocks resident at the steady-state peak of a loss forward,
#: with the CPU arena on and off (least-squares fit over SmolLM2-135M at 1×64 .. 16×128 and
#: Gemma 3 270M at 1×64 .. 8×64, 2 threads, ONNX Runtime 1.32; plan-memory.md). The graph's
#: tail holds the head's output, its cast and the log-softmax; with the arena the first
#: forward's buffers stay next to the memory-pattern block of the second.
LOGIT_COPIES = {True: 4.6, False: 3.4}
#: With the arena, a further share of the LM head's weight bytes (vocabulary × hidden × 4):
#: the part of the measured peak that does not grow with the rows (Gemma 3 270M: ~180 MiB
#: for a 640 MiB head; SmolLM2-135M ~30 MiB for 108 MiB) — same fit.
HEAD_WEIGHT_SHARE = {True: 0.28, False: 0.0}
#: One layer's activations (MLP, attention, residual stream) over one forward's, arena on/off.
LAYER_FACTOR = {True: 2.0, False: 1.0}
#: Transient memory while ONNX Runtime builds a session, as a share of the weights' bytes.
LOAD_TRANSIENT = 0.3
#: ONNX Runtime's constant folding skips a node whose output would pass this many bytes
#: (1.32: "Skipping constant folding for Transpose node ... exceeds the limit (1073741824
#: bytes)"): a tied head larger than that is not folded at session start
ORT_FOLD_LIMIT_BYTES = 1 << 30
#: Direction scratch (one chunk of values, bits and a float copy).
SCRATCH_BYTES = 3 * 4 * (1 << 20)
#: Most tokens (batch × sequence) of the calibrating forward; larger shapes are scaled from it.
CALIBRATION_TOKENS = 1024


@dataclass
class MemoryPlan:
    """A peak-memory estimate for one (bundle, profile, batch, sequence length)."""

    bundle: str
    device: str
    mode: str
    precision: str
    batch_size: int
    micro_batch: int
    max_length: int
    budget_mb: int
    parts_mb: dict[str, float]
    peak_mb: float
    calibrated: bool
    suggestions: list[str] = field(default_factory=list)
    prefix_rows_mb: float | None = None
    """Bytes of the frozen-prefix rows of the data (None: no split, or no data given)."""
    prefix_rows_where: str | None = None
    """``memory`` (counted in the peak) or ``disk`` (memory-mapped from the run folder)."""
    staged: bool = False
    """Planned as a run that caches its frozen prefix (its phases measured by a dry run)."""

    @property
    def fits(self) -> bool:
        return self.peak_mb <= self.budget_mb

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}

    def report(self) -> str:
        lines = [
            f"bundle {self.bundle} ({self.mode}, {self.precision}) on {self.device}: "
            f"batch {self.batch_size} (micro-batch {self.micro_batch}) × {self.max_length} "
            f"tokens",
        ]
        width = max(len(k) for k in self.parts_mb)
        for k, v in self.parts_mb.items():
            lines.append(f"  {k.ljust(width)}  {v:8,.0f} MiB")
        how = "calibrated by a dry run" if self.calibrated else "analytic, no dry run"
        if self.staged:
            how = "a dry run of the cached run's phases"
        lines.append(f"  {'peak'.ljust(width)}  {self.peak_mb:8,.0f} MiB  ({how})")
        lines.append(f"  {'budget'.ljust(width)}  {self.budget_mb:8,} MiB")
        if self.prefix_rows_where == "disk":
            lines.append(
                f"  frozen-prefix rows: {self.prefix_rows_mb:,.0f} MiB on disk "
                "(prefix_rows.bin in the run folder, memory-mapped: past cache_prefix_mb)"
            )
        if self.fits:
            lines.append(f"fits: {self.peak_mb / self.budget_mb:.0%} of the memory budget")
        else:
            lines.append(f"does NOT fit: {self.peak_mb:,.0f} MiB > {self.budget_mb:,} MiB")
        for s in self.suggestions:
            lines.append(f"  fix: {s}")
        return "\n".join(lines)


# -- the parts --------------------------------------------------------------------------------


def weight_bytes(bundle: Bundle) -> int:
    """Bytes of the graph and its external data (the frozen weights)."""
    return sum(p.stat().st_size for p in bundle.path.glob("model.onnx*") if p.is_file())


def precision_of(bundle: Bundle) -> str:
    q = bundle.manifest.quantization or {}
    bits = q.get("bits") or q.get("weight_bits")
    return f"int{bits}" if bits else ("fp32" if not q else str(q.get("kind", "quantised")))


def head_weight_bytes(arch: dict[str, Any]) -> float:
    """Bytes of the LM head's matrix in fp32 (vocabulary × hidden × 4)."""
    return 4.0 * int(arch.get("vocab_size", 32000)) * int(arch.get("hidden_size", 512))


def activation_bytes(
    arch: dict[str, Any], batch: int, seq: int, cpu_arena: bool = True, fp32_head: bool = True
) -> float:
    """Analytic bytes the forwards of a run hold at their steady-state peak at (batch, seq):
    the loss tail's [rows × vocabulary] blocks, the head term with the arena (for an fp32
    head: a quantised bundle's measured peaks have none: Qwen2.5-0.5B int4 within 5% without
    it), one layer's MLP and attention, residual stream. Unknown sizes are guessed from the
    hidden size."""
    hidden = int(arch.get("hidden_size", 512))
    vocab = int(arch.get("vocab_size", 32000))
    inter = int(arch.get("intermediate_size") or 4 * hidden)
    heads = int(arch.get("num_attention_heads") or max(1, hidden // 64))
    tokens = batch * seq
    logits = 4.0 * LOGIT_COPIES[cpu_arena] * tokens * vocab
    layer = 4.0 * (tokens * (6 * hidden + 3 * inter) + 2 * batch * heads * seq * seq)
    head = HEAD_WEIGHT_SHARE[cpu_arena] * head_weight_bytes(arch) if fp32_head else 0.0
    return logits + head + LAYER_FACTOR[cpu_arena] * layer


def mapped_embedding_bytes(bundle: Bundle) -> float:
    """Bytes of the fp32 embedding that stay out of resident memory: ONNX Runtime maps a
    bundle's external data file, and a ``Gather`` touches only the rows of the tokens it
    reads, unless the whole matrix is read at load (a tied head's folded transpose). 0 for
    a bundle without external data (its weights are read into memory)."""
    if not (bundle.path / "model.onnx.data").is_file() or tied_head_fold_bytes(bundle):
        return 0.0
    return head_weight_bytes(bundle.manifest.architecture)


def tied_head_fold_bytes(bundle: Bundle) -> float:
    """Bytes of the transposed copy of a tied embedding ONNX Runtime builds at session start
    (an fp32 bundle stores a tied LM head once; a quantised one keeps the head as its own
    initializer): 0 when the head is not tied."""
    arch = bundle.manifest.architecture
    if not arch.get("tie_word_embeddings") or bundle.manifest.quantization:
        return 0.0
    return head_weight_bytes(arch)


def unfolded_tied_head_bytes(bundle: Bundle) -> float:
    """Bytes a tied fp32 head past :data:`ORT_FOLD_LIMIT_BYTES` adds to the session: ONNX
    Runtime does not fold its transpose, and the session then holds the embedding's mapped
    pages and a second copy of the matrix (measured: Gemma 3 1B, a 262,144 x 1,152 head of
    1,152 MiB: 5,058 MiB resident after the session against 100 + 3,814 of weights; RssFile
    1,188 MiB, RssAnon 3,877; docs/benchmarks/scale.md). 0 for a head that is folded."""
    head = tied_head_fold_bytes(bundle)
    return head if head > ORT_FOLD_LIMIT_BYTES else 0.0


def load_transient_bytes(bundle: Bundle) -> float:
    """Memory ONNX Runtime holds only while it builds the session: a share of the weights it
    reads at load (not the mapped embedding, which only its ``Gather`` reads, row by row:
    counting it put a Llama 3.2 3B int4 bundle's load peak, 3,106 MiB, above its measured run
    peak, 2,632: +18%, docs/benchmarks/scale.md), or a tied head's folded transpose."""
    read = weight_bytes(bundle) - mapped_embedding_bytes(bundle)
    fold = 0.0 if unfolded_tied_head_bytes(bundle) else tied_head_fold_bytes(bundle)
    return max(read * LOAD_TRANSIENT, fold)


def prefix_row_widths(bundle: Bundle, threads: int = 1) -> dict[str, tuple[int, int, int]]:
    """Per cached tensor of a frozen-prefix split: (values per sequence position, sequence
    axes, bytes per value), read off one prefix forward of a 1 × 8 batch (the graph's cached
    shapes can be symbolic: heads, or a [sequence × sequence] mask). Empty without a split."""
    import numpy as np

    from ..runner import LossRunner, RuntimeOptions
    from ..zo.params import FlatParams

    st = bundle.manifest.stages
    if not st:
        return {}
    probe = 8
    runner = LossRunner(
        bundle.path / st["prefix"],
        FlatParams([]),
        ["input_ids", "attention_mask"],
        RuntimeOptions(threads=threads),
    )
    ids = np.arange(3, 3 + probe, dtype=np.int64)[None, :]
    shape_only = set(st.get("shape_only") or ())  # no rows held (edgezo.prefix_cache)
    names = [n for n in st["cached"] if n not in shape_only]
    values = runner.outputs({"input_ids": ids, "attention_mask": np.ones_like(ids)}, names)
    axes = st.get("cached_sequence_axes") or {}
    out = {}
    for n, v in zip(names, values, strict=True):
        seq_axes = list(axes.get(n, ()))
        fixed = int(np.prod([d for k, d in enumerate(v.shape) if k and k not in seq_axes]))
        out[n] = (fixed, len(seq_axes), int(v.dtype.itemsize))
    return out


def prefix_row_bytes(widths: dict[str, tuple[int, int, int]], lengths: list[int]) -> float:
    """Bytes the cache holds for examples of ``lengths`` tokens (rows at their own length)."""
    total = 0.0
    for fixed, seq_axes, itemsize in widths.values():
        total += sum(float(fixed) * itemsize * float(n) ** seq_axes for n in lengths)
    return total


def optimizer_buffers(optimizer: str, momentum: float, scaled: bool = False) -> int:
    """θ-sized float32 buffers the update rule keeps (edgezo.zo.optim): adam's two moments;
    the momentum of sgd, sign and hizoo; hizoo's curvature average and per-value scale; the
    per-value scale of a run with ``mu_scale`` (``scaled``)."""
    if optimizer == "adam":
        return 2 + int(scaled)
    held = 1 if momentum > 0 else 0
    if optimizer == "hizoo":
        return held + 2
    return held + int(scaled)


def default_micro_batch(batch_size: int, max_batch: int) -> int:
    return max(1, min(batch_size, max_batch))


# -- the dry run ------------------------------------------------------------------------------


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, high-water mark) of this process in bytes (Linux /proc, else rusage)."""
    try:
        status = Path("/proc/self/status").read_text()
        vals = {
            ln.split(":")[0]: int(ln.split()[1]) * 1024
            for ln in status.splitlines()
            if ln.startswith(("VmRSS", "VmHWM"))
        }
        return vals["VmRSS"], vals["VmHWM"]
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load_for_probe(bundle_path: str, inplace: bool):
    """(bundle, θ) loaded in the child as a run loads them (the tokenizer too)."""
    from ..bundle import load_bundle
    from ..zo.params import FlatParams

    bundle = load_bundle(bundle_path)
    params = FlatParams(bundle.manifest.trainable, inplace=inplace)
    params.load(bundle.initial_trainable())
    bundle.tokenizer()
    return bundle, params


def _random_batch(bundle: Bundle, rng, batch: int, seq: int, high: int) -> dict[str, Any]:
    """A (batch, seq) batch of token ids in [3, high) with its labels (class ids for a
    classifier, the tokens for a causal LM)."""
    import numpy as np

    ids = rng.integers(3, max(4, high), size=(batch, seq), dtype=np.int64)
    labels = (
        rng.integers(0, len(bundle.manifest.labels), size=batch, dtype=np.int64)
        if bundle.manifest.task == "classification"
        else ids.copy()
    )
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def _probe(
    bundle_path: str, cpu_arena: bool, threads: int, shapes: list[list[int]], inplace: bool
) -> dict[str, Any]:
    """Runs in the child: load as a run does, then a forward at each (batch, seq) of
    ``shapes`` (increasing), recording the high-water mark of each."""
    import numpy as np

    from ..runner import LossRunner, RuntimeOptions

    base, _ = _rss_bytes()
    bundle, params = _load_for_probe(bundle_path, inplace)
    runner = LossRunner(
        bundle.model_path,
        params,
        ["input_ids", "attention_mask", "labels"],
        RuntimeOptions(threads=threads, cpu_arena=cpu_arena),
    )
    loaded, load_peak = _rss_bytes()
    vocab = int(bundle.manifest.architecture.get("vocab_size", 2))
    rng = np.random.default_rng(0)
    reset, peaks = True, []
    for batch, seq in shapes:
        reset = _reset_peak() and reset
        runner.losses(_random_batch(bundle, rng, batch, seq, vocab))
        peaks.append(_rss_bytes()[1])
    return {
        "base": base,
        "loaded": loaded,
        "load_peak": load_peak,
        "forward_peaks": peaks,
        "shapes": shapes,
        "peak_reset": reset,
        "params_bytes": params.nbytes,
    }


def _probe_stages(
    bundle_path: str,
    cpu_arena: bool,
    threads: int,
    seq: int,
    cache_batch: int,
    eval_batch: int,
    micro_batch: int,
    vocab_rows: int,
    inplace: bool,
) -> dict[str, Any]:
    """Runs in the child: the phases of a run that caches its frozen prefix, as
    ``edgezo.session`` runs them. The prefix session and two forwards at the caching batch
    (``cache_batch``); that session released; the suffix session, and the vocabulary-subset
    session over ``vocab_rows`` head rows where the bundle has one (0: none); two held-out
    forwards of the whole-vocabulary suffix at ``eval_batch`` and two training forwards at
    ``micro_batch``. Each phase's high-water mark is read on its own (``clear_refs``); the
    bytes of the probe's own feed rows are reported so the estimate can leave them out (a
    run's rows are counted exactly, from the data)."""
    import gc

    import numpy as np

    from .. import prefix_cache
    from .. import vocab_subset as vs
    from ..runner import LossRunner, RuntimeOptions
    from ..zo.params import FlatParams

    base, _ = _rss_bytes()
    bundle, params = _load_for_probe(bundle_path, inplace)
    opts = RuntimeOptions(threads=threads, cpu_arena=cpu_arena)
    st = bundle.manifest.stages
    vocab = int(bundle.manifest.architecture.get("vocab_size", 2))
    rng = np.random.default_rng(0)
    text = ["input_ids", "attention_mask"]
    reset = True

    def batch(b: int) -> dict[str, np.ndarray]:  # tokens within the subset: its labels
        return _random_batch(bundle, rng, b, seq, min(vocab, vocab_rows or vocab))

    prefix = LossRunner(bundle.path / st["prefix"], FlatParams([]), text, opts)
    prefix_loaded, prefix_load_peak = _rss_bytes()
    reset = _reset_peak() and reset
    names = tuple(st["cached"])
    for _ in range(2):
        prefix.outputs({k: v for k, v in batch(cache_batch).items() if k in text}, names)
    prefix_peak = _rss_bytes()[1]

    def suffix_feeds(runner: LossRunner, b: int) -> dict[str, np.ndarray]:
        x = batch(b)
        rows = runner.outputs({k: x[k] for k in text}, names, heldout=False)
        feeds = dict(zip(names, rows, strict=True))
        feeds.update({k: x[k] for k in st["suffix_inputs"]})
        return feeds

    held, train = suffix_feeds(prefix, eval_batch), suffix_feeds(prefix, micro_batch)
    feed_bytes = sum(v.nbytes for f in (held, train) for v in f.values())
    del prefix
    gc.collect()
    suffix = LossRunner(
        prefix_cache.suffix_path(bundle), params, prefix_cache.suffix_inputs(bundle), opts
    )
    entry = vs.entry_of(bundle)
    vocab_session = False
    if entry is not None and 0 < vocab_rows < vocab:
        subset = vs.VocabSubset.of(bundle.path, entry, np.arange(vocab_rows), vocab)
        vocab_session = suffix.use_vocab_subset(subset) is None
    loaded, load_peak = _rss_bytes()
    reset = _reset_peak() and reset
    for _ in range(2):
        suffix.losses(held, heldout=True)
    eval_peak = _rss_bytes()[1]
    reset = _reset_peak() and reset
    for _ in range(2):
        suffix.losses(train)
    train_peak = _rss_bytes()[1]
    return {
        "base": base,
        "prefix_loaded": prefix_loaded,
        "prefix_load_peak": prefix_load_peak,
        "prefix_peak": prefix_peak,
        "loaded": loaded,
        "load_peak": load_peak,
        "eval_peak": eval_peak,
        "train_peak": train_peak,
        "feed_bytes": feed_bytes,
        "vocab_session": vocab_session,
        "shapes": {"cache": cache_batch, "eval": eval_batch, "train": micro_batch, "seq": seq},
        "peak_reset": reset,
        "params_bytes": params.nbytes,
    }


def calibration_shape(micro_batch: int, seq: int) -> tuple[int, int]:
    """The run's micro-batch shape, shrunk to at most ``CALIBRATION_TOKENS`` tokens."""
    seq = min(seq, CALIBRATION_TOKENS)
    return max(1, min(micro_batch, CALIBRATION_TOKENS // seq)), seq


def calibrate(
    bundle: Bundle,
    shape: tuple[int, int],
    cpu_arena: bool = True,
    threads: int = 0,
    inplace: bool = False,
    timeout: float = 300,
) -> dict[str, Any] | None:
    """Measure the load and one forward at ``shape`` (batch, seq) in a child process.

    None where that is not possible (no /proc high-water-mark reset, the child failed)."""
    args = [str(bundle.path), cpu_arena, threads, [list(shape)] * 2, inplace]
    return _run_probe("_probe", args, timeout)


def _run_probe(name: str, args: list, timeout: float) -> dict[str, Any] | None:
    """``edgezo.device.plan.<name>(*args)`` in a child process: its JSON result, or None
    where the child fails, times out or cannot reset the high-water mark."""
    code = (
        f"import json, sys; from edgezo.device.plan import {name}; "
        f"print(json.dumps({name}(*json.loads(sys.argv[1]))))"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out if out.get("peak_reset") else None


def calibrate_stages(
    bundle: Bundle,
    seq: int,
    cache_batch: int,
    eval_batch: int,
    micro_batch: int,
    vocab_rows: int = 0,
    cpu_arena: bool = True,
    threads: int = 0,
    inplace: bool = False,
    timeout: float = 300,
) -> dict[str, Any] | None:
    """Measure the phases of a cached run (:func:`_probe_stages`) in a child process, each
    batch shrunk to at most ``CALIBRATION_TOKENS`` tokens. None where that is not possible."""
    shapes = [calibration_shape(b, seq) for b in (cache_batch, eval_batch, micro_batch)]
    seq = shapes[0][1]
    args = [str(bundle.path), cpu_arena, threads, seq, *(b for b, _ in shapes), vocab_rows]
    return _run_probe("_probe_stages", [*args, inplace], timeout)


def vocab_rows_for(
    bundle: Bundle,
    vocab_subset: int | None = None,
    vocab_sample: int | None = None,
    train: list | None = None,
) -> int:
    """Head rows the vocabulary-subset session of a run holds (``edgezo.vocab_subset``): the
    ``vocab_subset`` most frequent ids and every label of ``train`` (the training examples;
    None: the frequent ids only), plus ``vocab_sample`` stand-ins (None: the config's
    defaults); 0 when the bundle has no vocabulary graph, the subset is off or it would be
    the whole vocabulary."""
    from .. import vocab_subset as vs
    from ..config import FinetuneConfig

    fields = FinetuneConfig.__dataclass_fields__
    if vocab_subset is None:
        vocab_subset = fields["vocab_subset"].default
    if vocab_sample is None:
        vocab_sample = fields["vocab_sample"].default

    vocab = bundle.manifest.vocab_size
    if vs.entry_of(bundle) is None or vocab_subset <= 0 or not vocab:
        return 0
    chosen = len(vs.choose(train or [], vocab_subset, vocab))
    rows = chosen + max(0, vocab_sample)
    return rows if rows < vocab else 0


def recipe_of(bundle: Bundle) -> dict[str, Any]:
    """The settings a run of ``bundle`` takes when the config names none (its mode's recipe
    over ``RECIPE_DEFAULTS``), so a plan describes the run ``finetune`` would make."""
    from ..config import MODE_DEFAULTS, RECIPE_DEFAULTS, recipe_key

    key = recipe_key(bundle.manifest.trainable_mode, bundle.manifest.lora)
    return {**RECIPE_DEFAULTS, **MODE_DEFAULTS.get(key, {})}


# -- the estimate -----------------------------------------------------------------------------


def theta_bytes(dim: int, inplace: bool, optim_buffers: int) -> tuple[float, float]:
    """(trainable buffers, optimiser state) of ``dim`` trainable values: the float32 master θ
    and its feed copy (one buffer in place) plus direction scratch; θ-sized optimiser buffers."""
    buffers = 4 * dim * (1 if inplace else 2) + SCRATCH_BYTES * min(1.0, dim / (1 << 20))
    return buffers, 4 * dim * optim_buffers


def rows_place(rows: float | None, cache_prefix_mb: float | None) -> str | None:
    """Where a run keeps ``rows`` bytes of frozen-prefix rows: ``memory`` within
    ``cache_prefix_mb`` (None: no cap), else ``disk``; None without rows."""
    if rows is None:
        return None
    return "memory" if cache_prefix_mb is None or rows / MIB <= cache_prefix_mb else "disk"


def _plan(
    bundle: Bundle,
    parts: dict[str, float],
    peak: float,
    rows: float | None,
    where: str | None,
    **kw: Any,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of byte-valued ``parts`` and ``peak``."""
    if rows is not None:
        parts[f"frozen-prefix rows ({'in memory' if where == 'memory' else 'on disk: 0'})"] = (
            rows if where == "memory" else 0.0
        )
    return MemoryPlan(
        bundle=str(bundle.path),
        mode=bundle.manifest.trainable_mode,
        precision=precision_of(bundle),
        parts_mb={k: v / MIB for k, v in parts.items()},
        peak_mb=peak / MIB,
        prefix_rows_mb=None if rows is None else rows / MIB,
        prefix_rows_where=where,
        **kw,
    )


def estimate(
    bundle: Bundle,
    *,
    device: str,
    budget_mb: int,
    batch_size: int,
    max_length: int,
    micro_batch: int,
    optim_buffers: int,
    inplace: bool,
    cpu_arena: bool = True,
    calibration: dict[str, Any] | None = None,
    prefix_rows: float | None = None,
    cache_prefix_mb: float | None = None,
) -> MemoryPlan:
    """Peak resident memory of fine-tuning ``bundle`` at micro-batch × max_length, in MiB.

    ``prefix_rows``: bytes of the training + held-out data's frozen-prefix rows
    (:func:`prefix_row_bytes`); they count in memory when within ``cache_prefix_mb`` (None:
    no cap), else they are on disk."""
    arch = bundle.manifest.architecture
    dim = bundle.manifest.trainable_size
    buffers, optim = theta_bytes(dim, inplace, optim_buffers)
    fp32_head = not bundle.manifest.quantization
    act = activation_bytes(arch, micro_batch, max_length, cpu_arena, fp32_head)
    weights = weight_bytes(bundle)
    if calibration is not None:
        c = calibration
        runtime_session = c["loaded"] - c["params_bytes"]
        measured_act = max(0, max(c["forward_peaks"]) - c["loaded"])
        small = activation_bytes(arch, *c["shapes"][-1], cpu_arena, fp32_head)
        act = measured_act * act / small
        load_peak = c["load_peak"] - c["params_bytes"] + buffers
        parts = {"runtime + session (measured)": runtime_session}
    else:
        unfolded = unfolded_tied_head_bytes(bundle)
        resident = weights - mapped_embedding_bytes(bundle) + unfolded
        runtime_session = RUNTIME_MB * MIB + resident
        transient = load_transient_bytes(bundle)
        load_peak = RUNTIME_MB * MIB + resident + transient + buffers
        parts = {"runtime": RUNTIME_MB * MIB, "session (weights)": resident - unfolded}
        if unfolded:
            parts["tied head not folded (a 2nd copy)"] = unfolded
    parts["trainable buffers"] = buffers
    parts["optimiser state"] = optim
    parts[f"activations {micro_batch}x{max_length}"] = act
    rows = prefix_rows
    where = rows_place(rows, cache_prefix_mb)
    steady = runtime_session + buffers + optim + act + (rows if where == "memory" else 0.0)
    peak = max(steady, load_peak)
    if load_peak > steady:
        parts["(load peak)"] = load_peak
    return _plan(
        bundle,
        parts,
        peak,
        rows,
        where,
        device=device,
        batch_size=batch_size,
        micro_batch=micro_batch,
        max_length=max_length,
        budget_mb=budget_mb,
        calibrated=calibration is not None,
    )


def estimate_staged(
    bundle: Bundle,
    calibration: dict[str, Any],
    *,
    device: str,
    budget_mb: int,
    batch_size: int,
    max_length: int,
    micro_batch: int,
    eval_batch: int,
    optim_buffers: int,
    inplace: bool,
    vocab_rows: int = 0,
    cpu_arena: bool = True,
    prefix_rows: float | None = None,
    cache_prefix_mb: float | None = None,
) -> MemoryPlan:
    """Peak resident memory of a run that caches its frozen prefix, from a dry run of its
    phases (:func:`calibrate_stages`), in MiB::

        peak = max(prefix phase:  prefix session + its forwards at the caching batch + rows,
                   training phase: suffix (+ vocabulary-subset) sessions + buffers
                                   + optimiser state + max(held-out forward, training forward)
                                   + rows)

    The rows count only when they stay in memory (``cache_prefix_mb``); a measured forward's
    extra memory is scaled to the run's shape by :func:`activation_bytes` (the training
    forward's vocabulary: the subset's ``vocab_rows``)."""
    c = calibration
    arch = dict(bundle.manifest.architecture)
    dim = bundle.manifest.trainable_size
    buffers, optim = theta_bytes(dim, inplace, optim_buffers)
    fp32_head = not bundle.manifest.quantization
    shapes = c["shapes"]

    def scaled(measured: float, batch: int, probe_batch: int, vocab: int | None = None) -> float:
        a = dict(arch, vocab_size=vocab) if vocab else arch
        run = activation_bytes(a, batch, max_length, cpu_arena, fp32_head)
        probe = activation_bytes(a, probe_batch, shapes["seq"], cpu_arena, fp32_head)
        return max(0.0, measured) * run / probe

    own = c["params_bytes"]
    rows = prefix_rows
    where = rows_place(rows, cache_prefix_mb)
    held_rows = rows if where == "memory" else 0.0
    prefix_session = c["prefix_loaded"] - own
    prefix_act = scaled(c["prefix_peak"] - c["prefix_loaded"], eval_batch, shapes["cache"])
    prefix_phase = prefix_session + prefix_act + buffers + held_rows
    sessions = c["loaded"] - own - c["feed_bytes"]
    eval_act = scaled(c["eval_peak"] - c["loaded"], eval_batch, shapes["eval"])
    train_act = scaled(
        c["train_peak"] - c["loaded"],
        micro_batch,
        shapes["train"],
        vocab_rows if c.get("vocab_session") else None,
    )
    train_phase = sessions + buffers + optim + max(eval_act, train_act) + held_rows
    load_peak = max(c["prefix_load_peak"] - own, c["load_peak"] - own - c["feed_bytes"])
    load_peak += buffers
    parts = {
        "prefix phase: runtime + prefix session (measured)": prefix_session,
        f"prefix phase: activations {eval_batch}x{max_length}": prefix_act,
        "runtime + suffix session"
        + (" + vocabulary-subset session" if c.get("vocab_session") else "")
        + " (measured)": sessions,
        "trainable buffers": buffers,
        "optimiser state": optim,
        f"activations: held-out {eval_batch}x{max_length}": eval_act,
        f"activations: training {micro_batch}x{max_length}"
        + (f" over {vocab_rows:,} head rows" if c.get("vocab_session") else ""): train_act,
    }
    phases = {"prefix phase": prefix_phase, "training phase": train_phase}
    peak = max(prefix_phase, train_phase, load_peak)
    plan = _plan(
        bundle,
        parts,
        peak,
        rows,
        where,
        device=device,
        batch_size=batch_size,
        micro_batch=micro_batch,
        max_length=max_length,
        budget_mb=budget_mb,
        calibrated=True,
        staged=True,
    )
    for name, v in phases.items():
        plan.parts_mb[f"({name})"] = v / MIB
    if load_peak > max(phases.values()):
        plan.parts_mb["(load peak)"] = load_peak / MIB
    return plan


def largest_fitting_micro_batch(plan_at, max_batch: int) -> int | None:
    """The largest micro-batch in 1..max_batch whose plan fits (``plan_at(mb) -> MemoryPlan``)."""
    for mb in range(max_batch, 0, -1):
        if plan_at(mb).fits:
            return mb
    return None


def suggest(bundle: Bundle, plan_at, plan: MemoryPlan, max_batch: int) -> list[str]:
    """Concrete changes that make a plan fit, most direct first."""
    out: list[str] = []
    if plan.fits:
        return out
    mb = largest_fitting_micro_batch(plan_at, min(plan.micro_batch, max_batch))
    if mb is not None:
        out.append(
            f"micro-batch {mb}: micro_batch_size={mb} (the effective batch stays "
            f"{plan.batch_size}; ZO micro-batching is exact)"
        )
        return out
    one = plan_at(1, plan.max_length)
    for seq in (1024, 512, 256, 128, 64, 32):
        if seq < plan.max_length and plan_at(1, seq).fits:
            out.append(f"shorter sequences: --max-length {seq} (with micro_batch_size=1)")
            break
    weights_mb = weight_bytes(bundle) / MIB
    if plan.mode == "full":
        out.append(
            "LoRA instead of full: export with --mode lora; the trainable buffers "
            f"({plan.parts_mb['trainable buffers']:,.0f} MiB) shrink to a few MiB"
        )
    if plan.precision == "fp32":
        out.append(
            f"an int4 bundle: weights ~{weights_mb * 0.39:,.0f} MiB instead of "
            f"{weights_mb:,.0f} MiB (export it with --quantize int4; SmolLM2-135M: "
            "201 vs 515 MiB)"
        )
    if not out or one.peak_mb > plan.budget_mb:
        out.append(
            f"a device with more memory: at batch 1 this needs ~{one.peak_mb:,.0f} MiB; "
            "raise memory_budget_mb in a copy of the profile if the device has it"
        )
    return out


def make_plan(
    bundle: Bundle,
    profile,
    *,
    batch_size: int,
    max_length: int,
    micro_batch: int | None = None,
    optim_buffers: int = 0,
    inplace: bool = False,
    dry_run: bool = True,
    data_lengths: list[int] | None = None,
    cache_prefix_mb: float | None = None,
    cache_prefix: bool = True,
    eval_batch: int | None = None,
    vocab_rows: int = 0,
) -> MemoryPlan:
    """The plan for ``bundle`` on ``profile`` (a :class:`edgezo.device.profiles.DeviceProfile`);
    ``data_lengths``: the token count of every training and held-out example, whose
    frozen-prefix rows are counted (``cache_prefix_mb`` as for :func:`estimate`).

    A bundle with a frozen-prefix split that the run caches (``cache_prefix``) is planned
    phase by phase from a dry run of its prefix, suffix and vocabulary-subset sessions
    (:func:`estimate_staged`; ``eval_batch``: the run's held-out and caching batch,
    ``vocab_rows``: :func:`vocab_rows_for`); without a dry run, or where it fails, from the
    full graph's, which holds every weight in one session (an upper bound: +10.5% with the
    rows in memory, +32.5% on disk, before the phases were modelled)."""
    mb = micro_batch or default_micro_batch(batch_size, profile.max_batch_size)
    eval_batch = eval_batch or mb
    rows = None
    staged = bool(cache_prefix and bundle.manifest.stages)
    if data_lengths and staged:
        rows = prefix_row_bytes(prefix_row_widths(bundle, profile.threads or 1), data_lengths)
    cal = stages = None
    if dry_run and staged:
        stages = calibrate_stages(
            bundle,
            max_length,
            eval_batch,
            eval_batch,
            mb,
            vocab_rows,
            cpu_arena=profile.cpu_arena,
            threads=profile.threads,
            inplace=inplace,
        )
    if dry_run and stages is None:
        cal = calibrate(
            bundle,
            calibration_shape(mb, max_length),
            cpu_arena=profile.cpu_arena,
            threads=profile.threads,
            inplace=inplace,
        )

    def plan_at(mb: int, seq: int = max_length) -> MemoryPlan:
        common = dict(
            device=profile.name,
            budget_mb=profile.memory_budget_mb,
            batch_size=batch_size,
            max_length=seq,
            micro_batch=mb,
            optim_buffers=optim_buffers,
            inplace=inplace,
            cpu_arena=profile.cpu_arena,
            prefix_rows=rows,
            cache_prefix_mb=cache_prefix_mb,
        )
        if stages is not None:
            return estimate_staged(
                bundle, stages, eval_batch=eval_batch, vocab_rows=vocab_rows, **common
            )
        return estimate(bundle, calibration=cal, **common)

    plan = plan_at(mb)
    plan.suggestions = suggest(bundle, plan_at, plan, profile.max_batch_size)
    if max_length > profile.max_seq_len:
        plan.suggestions.insert(
            0,
            f"--max-length {profile.max_seq_len}: the profile caps "
            f"sequences at {profile.max_seq_len} tokens",
        )
    return plan


def run_settings(
    bundle: Bundle, momentum: float | None, perturbation: str = "auto", optimizer: str = "sgd"
) -> tuple[int, bool]:
    """(optimiser buffers, inplace) a run with these config values would use."""
    from ..zo.engine import choose_inplace

    if momentum is None:
        momentum = recipe_of(bundle).get("momentum", 0.0)
    return (
        optimizer_buffers(optimizer, momentum),
        choose_inplace(perturbation, bundle.manifest.trainable_size * 4),
    )


def fmt_mb(x: float) -> str:
    return f"{x:,.0f} MiB" if math.isfinite(x) else "?"


if __name__ == "__main__":  # pragma: no cover - used by calibrate() through -c
    print(json.dumps(_probe(*json.loads(sys.argv[1]))))
    os._exit(0)
