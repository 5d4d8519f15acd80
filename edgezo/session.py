"""Setting up one fine-tuning session: everything the loop in :mod:`edgezo.train` needs.

:func:`setup` turns a config into a :class:`Session` — the run folder, the bundle, the data
(and its cached frozen prefix), the ONNX Runtime session, the ZO engine, the session budgets
and the ledger — either for a new run or for one resumed from its folder:

    new run      resolve the recipe -> run folder + config.yaml -> data, runner, engine
                 -> lr/μ selection (stored in config.yaml) -> held-out loss at step 0
                 -> the ledger (its header holds that loss): the run has started
    resumed run  config.yaml (+ what was set again) -> data, runner, engine -> the ledger,
                 read once -> checkpoint + replay of the records after it -> the held-out
                 guard rebuilt from the ledger's held-out losses

A start that fails (or is killed) before its ledger exists leaves nothing a later start or
resume would trip over (:func:`edgezo.run.remove_failed_start`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic, prefix_cache, vocab_subset
from .autotune import PROBE_BATCHES, autotune, worst_case_evaluations
from .bundle import Bundle, load_bundle
from .config import FinetuneConfig, recipe_key
from .data import BatchStream, Example, read_jsonl, split_holdout, tokenize_for
from .defaults import default_data, ensure_default_bundle
from .device.limits import SessionLimits, session_limits
from .device.plan import optimizer_buffers
from .device.resolve import load_profile
from .errors import CheckpointError, ConfigError
from .evaluate import score
from .guard import GuardSettings, HeldoutGuard
from .run import RunFolder, default_out, remove_failed_start, resume_config
from .runner import LossRunner
from .zo.checkpoint import load_checkpoint, save_tensors_atomic
from .zo.engine import EngineSettings, ZOEngine, choose_inplace
from .zo.ledger import Ledger
from .zo.optim import Schedule
from .zo.replay import apply, check_ledger_fingerprint, is_rollback

#: the batch inputs of a bundle's full loss graph
BATCH_INPUTS = ["input_ids", "attention_mask", "labels"]
MIN_HELDOUT = 5  # fewer held-out examples than this measure nothing


@dataclass
class Session:
    """One session of a run: what the loop reads and drives."""

    cfg: FinetuneConfig
    run: RunFolder
    bundle: Bundle
    engine: ZOEngine
    runner: LossRunner
    stream: BatchStream
    held: list[Example]
    limits: SessionLimits
    schedule: Schedule
    index: int  # 0 for the run's first session
    t0: float
    log: Any = print
    ledger: Ledger | None = None  # set once the run has started or been reopened
    guard: HeldoutGuard | None = None
    start_step: int = 0
    heldout_before: float = float("nan")  # the run's, at step 0
    accuracy_before: float | None = None
    session_before: float = float("nan")  # at this session's start
    tune_evaluations: int = 0  # the run's lr/μ selection (done in its first session)
    prefix_forward_calls: int = 0
    train_evals: int = 0  # the run's training forward evaluations so far (ledger)
    evaluations_at_start: int = 0
    previous_seconds: float = 0.0  # the earlier sessions' wall-clock time
    bar: Any = None  # the progress bar, when one is shown

    @property
    def per_step(self) -> float:
        return self.engine.estimator.evals_per_step

    def train_evaluations(self) -> int:
        return self.train_evals

    def note(self, message: str) -> None:
        """A line for the user that must not tear the progress bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.log(message)

    def lr(self, step: int) -> float:
        """The learning rate step ``step`` runs at: the schedule × the guard's scale."""
        return self.schedule(step) * self.guard.lr_scale

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def heldout(self) -> tuple[float, dict[str, float]]:
        """Mean held-out loss at θ, and ``{"heldout_accuracy": ...}`` for classifiers."""
        self.engine.perturber.at_theta()
        r = score(
            self.runner,
            self.held,
            self.cfg.eval_batch_size,
            self.bundle.manifest.tokenizer.pad_token_id,
            self.bundle.manifest,
        )
        return r["loss"], ({} if r["accuracy"] is None else {"heldout_accuracy": r["accuracy"]})

    def save_checkpoint(self) -> None:
        """θ and optimiser state at the ledger's current step; the ledger is made durable
        first, so a checkpoint is never ahead of it."""
        self.ledger.sync()
        tensors = {"master": self.engine.params.master, **self.engine.optimizer.state()}
        step = len(self.ledger.records)
        meta = {"bundle": self.bundle.fingerprint, "step": str(step)}
        chain = self.ledger.chain_at(step)
        if chain is not None:  # binds the checkpoint to this ledger's history
            meta["ledger_chain"] = chain
        save_tensors_atomic(self.run.checkpoint, tensors, metadata=meta)


# -- the configuration and the run folder -----------------------------------------------------


def open_run(cfg: FinetuneConfig, resume: bool, log) -> tuple[FinetuneConfig, RunFolder, bool]:
    """The session's config and run folder, and whether the run starts now (no ledger yet).

    Resuming reads the stored config first (a bundle or recipe default never overrides it);
    only the fields the user set again change. A new run gets its recipe from the bundle's
    trainable mode.
    """
    if resume:
        if cfg.out is None:
            raise ConfigError("--resume needs the run folder", "pass --out RUN_FOLDER")
        run = RunFolder(cfg.out)
        cfg = resume_config(run.stored_config(), cfg, run.path)
        cfg.out = str(run.path)
        if not run.started:
            log(
                f"edgezo: {run.path} never got past its start (no ledger.jsonl): starting it "
                "afresh with its stored config"
            )
        return cfg, run, not run.started
    run = RunFolder(cfg.out or default_out())
    if run.started:
        raise CheckpointError(
            f"{run.path} already holds a run; nothing was overwritten",
            f"continue it with --resume --out {run.path}, or choose another --out",
        )
    cfg = FinetuneConfig(**{**cfg.to_dict(), "out": str(run.path)})
    return cfg, run, True


def resolve_recipe(cfg: FinetuneConfig, bundle: Bundle) -> tuple[FinetuneConfig, bool, bool]:
    """The bundle mode's recipe filled in; whether lr and μ are to be chosen (autotune)."""
    mode = recipe_key(bundle.manifest.trainable_mode, bundle.manifest.lora)
    auto_lr, auto_mu = cfg.autotune and cfg.lr is None, cfg.autotune and cfg.mu is None
    resolved = cfg.resolved(mode)
    auto_lr = auto_lr and bool(resolved.lr_race)
    resolved.bundle = str(bundle.path)
    return resolved, auto_lr, auto_mu


def engine_settings(cfg: FinetuneConfig, bundle: Bundle) -> EngineSettings:
    """The engine settings from the config's fields of the same names (plus ``inplace``)."""
    names = [n for n in EngineSettings.__dataclass_fields__ if n != "inplace"]
    inplace = choose_inplace(cfg.perturbation, bundle.manifest.trainable_size * 4)
    return EngineSettings(**{n: getattr(cfg, n) for n in names}, inplace=inplace)


# -- data, runner -----------------------------------------------------------------------------


def load_examples(
    cfg: FinetuneConfig, bundle: Bundle, log=print
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples, tokenised with the bundle's tokenizer.

    Data too small for a meaningful held-out split is trained on whole and evaluated on itself,
    with a warning; classification data whose labels are all one class gets a warning too.
    """
    tok = bundle.tokenizer()
    m = bundle.manifest
    data, eval_data = cfg.data, cfg.eval_data
    if data is None:
        sample, sample_eval = default_data()
        data, eval_data = str(sample), eval_data or str(sample_eval)
    train = tokenize_for(m, read_jsonl(data), tok, cfg.max_length, where=data)
    if eval_data is not None:
        held = tokenize_for(m, read_jsonl(eval_data), tok, cfg.max_length, where=eval_data)
    elif round(len(train) * cfg.holdout_fraction) < MIN_HELDOUT:
        need = int(np.ceil((MIN_HELDOUT - 0.5) / cfg.holdout_fraction))
        log(
            f"edgezo: warning: {data} has {len(train)} examples, too few to hold out "
            f"{cfg.holdout_fraction:.0%} (at least {MIN_HELDOUT} held-out examples, i.e. "
            f"{need} examples, are needed): training on all of them and reporting the loss on "
            "the training examples — that measures fit, not generalisation; pass --eval-data "
            "for a real held-out set"
        )
        held = list(train)
    else:
        train, held = split_holdout(train, cfg.holdout_fraction, cfg.seed, where=data)
    if m.labels and len({e.target for e in train}) == 1:
        only = m.labels[train[0].target]
        log(
            f"edgezo: warning: every training example of {data} has the label {only!r} (the "
            f"bundle knows {len(m.labels)}: {', '.join(m.labels)}): the classifier can only "
            "learn to answer that one; add examples of the other labels"
        )
    return train, held


def build_runner(
    cfg: FinetuneConfig,
    bundle: Bundle,
    engine: ZOEngine,
    train: list[Example],
    held: list[Example],
    limits: SessionLimits,
    log,
    folder: Path | None = None,
) -> tuple[LossRunner, list[Example], list[Example], int]:
    """The loss runner: the bundle's suffix over cached prefix rows when the bundle has a
    frozen-prefix split (rows in memory when they fit ``cache_prefix_mb``, else memory-mapped
    from the run ``folder``), else the full graph. Returns the runner, the (possibly cached)
    examples and the prefix's forward calls."""
    pad_id = bundle.manifest.tokenizer.pad_token_id
    calls = 0
    if cfg.cache_prefix and prefix_cache.available(bundle):
        t = time.perf_counter()
        try:
            (c_train, c_held), calls = prefix_cache.cache_rows(
                bundle,
                [train, held],
                cfg.eval_batch_size,
                pad_id,
                limits.runtime,
                max_mb=cfg.cache_prefix_mb,
                folder=folder,
            )
        except prefix_cache.CacheTooLarge as e:
            log(
                f"edgezo: not caching the frozen prefix: its rows for {len(train) + len(held)} "
                f"examples would take {e} (cache_prefix_mb={cfg.cache_prefix_mb:g}); every "
                "evaluation runs the full graph — raise cache_prefix_mb if memory allows"
            )
            calls = e.forward_calls
        else:
            suffix = prefix_cache.suffix_path(bundle)
            runner = LossRunner(
                suffix, engine.params, prefix_cache.suffix_inputs(bundle), limits.runtime
            )
            where = (
                f"on disk, memory-mapped from {prefix_cache.ROWS_FILE} (past "
                f"cache_prefix_mb={cfg.cache_prefix_mb:g})"
                if prefix_cache.on_disk([c_train, c_held])
                else "in memory"
            )
            log(
                f"edgezo: frozen prefix computed once for {len(train) + len(held)} examples "
                f"({calls} forward calls, {time.perf_counter() - t:.1f} s, "
                f"{prefix_cache.rows_mb([c_train, c_held]):,.0f} MiB of rows {where}); every "
                f"ZO evaluation runs {suffix.name} only"
            )
            _use_vocab_subset(cfg, bundle, runner, train, log)
            return runner, c_train, c_held, calls
    runner = LossRunner(bundle.model_path, engine.params, BATCH_INPUTS, limits.runtime)
    return runner, train, held, calls


def _use_vocab_subset(cfg: FinetuneConfig, bundle: Bundle, runner: LossRunner, train, log):
    """Training losses on the bundle's vocabulary-subset suffix (``cfg.vocab_subset``)."""
    subset = vocab_subset.subset_for(bundle, train, cfg.vocab_subset, cfg.vocab_sample, cfg.seed)
    if subset is None:
        return
    why = runner.use_vocab_subset(subset)
    if why is not None:
        log(f"edgezo: training losses keep the whole vocabulary: the subset graph needs {why}")
        return
    rest = len(subset.ids) - subset.chosen
    log(
        f"edgezo: training losses normalise over {subset.chosen:,} of "
        f"{bundle.manifest.vocab_size:,} tokens (the training data's and the "
        f"{cfg.vocab_subset:,} most frequent; vocab_subset=0: all)"
        + (f" and {rest:,} sampled stand-ins for the rest" if rest else "")
        + "; held-out losses over all"
    )


def vocab_header(runner: LossRunner) -> dict[str, Any]:
    """The ledger header's record of the training vocabulary (empty: the whole one)."""
    subset = runner.vocab_subset
    return {} if subset is None else {"vocab_subset": subset.describe()}


# -- the session ------------------------------------------------------------------------------


def setup(cfg: FinetuneConfig, resume: bool, log=print) -> Session:
    """Everything one session needs, for a new run or a resumed one (module docstring)."""
    t0 = time.perf_counter()
    cfg, run, starting = open_run(cfg, resume, log)
    created = not run.path.exists()
    try:
        return _setup(cfg, run, starting, t0, log)
    except BaseException:
        if starting:
            remove_failed_start(run, created)
        raise


def _setup(cfg: FinetuneConfig, run: RunFolder, starting: bool, t0: float, log) -> Session:
    bundle = load_bundle(cfg.bundle or ensure_default_bundle(log))
    cfg, auto_lr, auto_mu = resolve_recipe(cfg, bundle)
    profile = load_profile(cfg.device) if cfg.device else None
    if starting:
        run.path.mkdir(parents=True, exist_ok=True)
        run.clear_unstarted()
        stored = FinetuneConfig(
            **{
                **cfg.to_dict(),
                **({"lr": None} if auto_lr else {}),
                **({"mu": None} if auto_mu else {}),
            }
        )
        run.write_config(stored)  # lr/μ null: still to be chosen (a resume redoes it)
    atomic.remove_stale_temps(run.path)

    train, held = load_examples(cfg, bundle, log)
    settings = engine_settings(cfg, bundle)
    engine = bundle.engine(settings)
    per_step = engine.estimator.evals_per_step
    buffers = optimizer_buffers(cfg.optimizer, cfg.momentum, scaled=bool(cfg.mu_scale))
    limits = session_limits(cfg, bundle, buffers, settings.inplace, per_step, profile)
    runner, train, held, prefix_calls = build_runner(
        cfg, bundle, engine, train, held, limits, log, folder=run.path
    )
    stream = BatchStream(train, cfg.batch_size, cfg.seed, bundle.manifest.tokenizer.pad_token_id)
    guard_settings = GuardSettings.of(cfg)
    s = Session(
        cfg=cfg,
        run=run,
        bundle=bundle,
        engine=engine,
        runner=runner,
        stream=stream,
        held=held,
        limits=limits,
        schedule=Schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps),
        index=run.sessions(),
        t0=t0,
        log=log,
        prefix_forward_calls=prefix_calls,
    )
    if starting:
        _announce(s, auto_lr, auto_mu, train)
        if auto_lr or auto_mu:
            s.tune_evaluations = run_autotune(s, auto_lr, auto_mu)
            limits.budget.used += s.tune_evaluations
            s.schedule = Schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps)
        before, extra = s.heldout()
        _check_finite_start(before, bundle)
        s.heldout_before = s.session_before = before
        s.accuracy_before = extra.get("heldout_accuracy")
        header = {
            "bundle": bundle.fingerprint,
            "bundle_path": str(bundle.path),
            "engine": settings.to_dict(),
            "heldout_before": before,
            **({"heldout_accuracy_before": s.accuracy_before} if extra else {}),
            **vocab_header(s.runner),
        }
        s.ledger = Ledger.create(run.ledger, header)  # the commit point: the run has started
        s.guard = HeldoutGuard(guard_settings, before)
        run.metric(kind="eval", step=0, heldout_loss=before, **extra)
    else:
        _resume(s, settings, guard_settings)
        _announce(s, False, False, train)
    s.train_evals = s.evaluations_at_start = sum(len(r["losses"]) for r in s.ledger.records)
    s.previous_seconds = run.previous_seconds()
    run.metric(kind="session", session=s.index, start_step=s.start_step, resumed=not starting)
    log(f"edgezo: held-out loss at step {s.start_step}: {s.session_before:.4f}")
    return s


def _check_finite_start(before: float, bundle: Bundle) -> None:
    if not np.isfinite(before):
        raise ConfigError(
            f"the held-out loss at the start is {before}: the bundle's initial tensors and "
            "this data give a non-finite loss, so no step could be judged",
            f"check the data (empty or all-padding examples?) and the bundle ({bundle.path}: "
            "edgezo eval --bundle B --data D scores it); re-export the bundle if it fails too",
        )


def _resume(s: Session, settings: EngineSettings, guard_settings: GuardSettings) -> None:
    """Reopen the ledger (once), bring θ to its last step, rebuild the guard from it."""
    run, bundle = s.run, s.bundle
    ledger = Ledger.read(run.ledger, repair=True)
    check_ledger_fingerprint(ledger, bundle.fingerprint, str(bundle.path))
    if EngineSettings.from_dict(ledger.header["engine"]) != settings:
        raise CheckpointError(
            f"{run.ledger} was written with other engine settings than {run.config}",
            "do not edit a run's config.yaml; start a new run with another --out",
        )
    written = ledger.header.get("vocab_subset")
    now = vocab_header(s.runner).get("vocab_subset")
    if written is None and now is not None:  # the run trained on the whole vocabulary
        s.runner.use_whole_vocabulary()
        s.log("edgezo: training losses over the whole vocabulary, as this run's first session")
    elif written != now:
        raise CheckpointError(
            f"{run.ledger} was trained with training losses over a vocabulary subset "
            f"{written} and this session would use {now or 'the whole vocabulary'}: the "
            "training data or vocab_subset changed since",
            "resume with the run's own data and config.yaml, or start a new run with --out",
        )
    step = 0
    if run.checkpoint.is_file():
        tensors, step = load_checkpoint(run.checkpoint, bundle.fingerprint, ledger)
        if step > len(ledger.records):
            raise CheckpointError(
                f"{run.checkpoint} is at step {step} but the ledger ends at {len(ledger.records)}",
                "delete the checkpoint; the ledger rebuilds the state",
            )
        s.engine.params.master[:] = tensors["master"]
        s.engine.optimizer.load_state(tensors)
    apply(s.engine, ledger.records[step:], ledger.records)
    s.ledger = ledger
    s.start_step = len(ledger.records)
    s.log(
        f"edgezo: resumed at step {s.start_step} (checkpoint {step}, "
        f"{s.start_step - step} steps replayed from the ledger)"
    )
    if run.autotune.is_file():
        s.tune_evaluations = int(_read_json(run.autotune).get("evaluations", 0))
    head = ledger.header
    if "heldout_before" in head:
        s.heldout_before = float(head["heldout_before"])
        s.accuracy_before = head.get("heldout_accuracy_before")
        s.guard = HeldoutGuard.from_ledger(guard_settings, s.heldout_before, ledger.records)
    else:  # a ledger of an older edgezo: no held-out losses in it
        first = next((r for r in s.run.metric_rows() if r.get("kind") == "eval"), None)
        s.heldout_before = float(first["heldout_loss"]) if first else float("nan")
        s.guard = HeldoutGuard(guard_settings, s.heldout_before, s.start_step)
        s.guard.lr_scale = ledger_lr_scale(ledger.records, s.schedule)
    last = ledger.records[-1] if ledger.records else None
    if last is not None and "heldout" in last:
        s.session_before = float(last["heldout"])
    else:
        s.session_before, _ = s.heldout()


def _announce(s: Session, auto_lr: bool, auto_mu: bool, train: list[Example]) -> None:
    """The budget up front: what is trained, at what cost, where, until when."""
    cfg, m, log = s.cfg, s.bundle.manifest, s.log
    p, opts = s.engine.params, s.limits.runtime
    log(
        f"edgezo: bundle {s.bundle.path} ({m.architecture.get('model_type')}, mode "
        f"{m.trainable_mode}): {len(m.trainable)} trainable tensors, {p.dim:,} values, "
        f"{p.nbytes / 2**20:.1f} MiB buffers{' (in place)' if p.inplace else ''} + "
        f"{s.engine.optimizer.nbytes / 2**20:.1f} MiB {cfg.optimizer} state"
    )
    lr = "auto" if auto_lr else f"{cfg.lr:g}"
    if s.start_step and s.guard.lr_scale != 1.0:
        lr += f" (x{s.guard.lr_scale:g} after rollbacks and plateaus: now {s.lr(s.start_step):g})"
    log(
        f"edgezo: {len(train)} training / {len(s.held)} held-out examples; {cfg.steps} steps × "
        f"{s.per_step:g} forward evaluations; lr {lr}, μ {'auto' if auto_mu else f'{cfg.mu:g}'}, "
        f"q {cfg.q}, {cfg.direction}, {cfg.estimator}, {cfg.optimizer}, momentum "
        f"{cfg.momentum:g}; run folder {s.run.path}"
    )
    where = f"device {s.limits.profile.name}" if s.limits.profile else "no device profile"
    log(
        f"edgezo: {where}: {s.runner.provider}, {opts.threads or 'all'} threads, CPU arena "
        f"{'on' if opts.cpu_arena else 'off'}, micro-batch {opts.micro_batch or 'off'}; "
        f"{s.limits.budget.describe()}; checkpoint every {s.limits.checkpoint_every} steps"
    )
    for note in s.limits.notes + s.runner.notes:
        log(f"edgezo: note: {note}")


def run_autotune(s: Session, auto_lr: bool, auto_mu: bool) -> int:
    """Choose lr and/or μ (edgezo.autotune); store them in the run's config; return the cost.

    The choice is stored before the ledger exists: a start killed during the selection
    redoes it on resume, which chooses the same values (it is a deterministic function of the
    seed, the data and the bundle).
    """
    cfg, engine, log = s.cfg, s.engine, s.log
    if engine.params.inplace:
        log(
            "edgezo: autotune: skipped — this run perturbs θ in place, and the learning-rate "
            "race would need a copy of θ to restart from; using the mode defaults (lr "
            f"{cfg.lr:g}, μ {cfg.mu:g}); pass lr= and mu= to choose them"
        )
        s.run.write_config(cfg)
        return 0
    k = cfg.autotune_steps
    bound = worst_case_evaluations(
        k,
        engine.estimator.evals_per_step,
        cfg.batch_size,
        PROBE_BATCHES * cfg.batch_size,
        auto_mu,
        auto_lr,
    )
    what = " and ".join(n for n, a in (("lr", auto_lr), ("μ", auto_mu)) if a)
    log(
        f"edgezo: autotune: choosing {what} (at most {bound} forward evaluations; "
        "pass lr= / mu= or autotune=false to skip)"
    )
    probe = [s.stream.batch(k + i) for i in range(PROBE_BATCHES)]
    result = autotune(
        engine,
        lr=None if auto_lr else cfg.lr,
        default_lr=cfg.lr,
        mu=cfg.mu,
        tune_mu=auto_mu,
        steps=k,
        batches=s.stream.batch,
        probe=probe,
        probe_cost=PROBE_BATCHES,
        mean_loss=s.runner.mean_loss,
        log=log,
    )
    cfg.lr, cfg.mu = result.lr, result.mu
    if result.note:
        log(f"edgezo: autotune: {result.note}")
    log(
        f"edgezo: autotune: lr {cfg.lr:.3g}, μ {cfg.mu:g} ({result.evaluations} forward "
        f"evaluations, {result.seconds:.0f} s)"
    )
    atomic.write_text(s.run.autotune, _json(result.to_dict()))
    s.run.write_config(cfg)  # the chosen values, before the first step
    s.run.metric(
        kind="autotune",
        lr=cfg.lr,
        mu=cfg.mu,
        evaluations=result.evaluations,
        trials=result.trials,
    )
    return result.evaluations


def _json(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def ledger_lr_scale(records: list[dict], schedule: Schedule) -> float:
    """An older ledger's lr factor on the schedule (rollbacks and plateaus): read from the last
    step's recorded lr, or the rollbacks' product when no step follows them."""
    scale = 1.0
    for r in reversed(records):
        if is_rollback(r):
            scale *= float(r["lr_scale"])
            continue
        base = schedule(int(r["step"]))
        if base > 0:
            return scale * float(r["lr"]) / base
    return scale


def write_trained(s: Session) -> Path:
    """The trained tensors at the ledger's current step."""
    meta = {"bundle": s.bundle.fingerprint, "step": str(len(s.ledger.records))}
    return save_tensors_atomic(s.run.trained, s.engine.params.state_dict(), metadata=meta)
