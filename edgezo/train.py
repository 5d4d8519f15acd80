"""The fine-tuning loop, top to bottom.

    bundle + data + device profile ──► session limits, held-out loss before
        for each step t:
            budget spent or stop asked?  → checkpoint, stop (resume next session)
            batch_t = data order (seed, t)             pure function: resumable
            record  = engine.step(t, lr(t), μ, loss)   perturb → forwards → g → update θ
            ledger.append(record)                      fsync'd: the run's ground truth
            every N steps: atomic checkpoint, held-out loss, metrics line
    ──► held-out loss after, trained.safetensors, summary.json

A killed run is resumed from its last checkpoint plus the ledger records after it, which are
replayed without forwards; the result is bit-identical to the uninterrupted run. A run that
reaches its session budget (forward evaluations or seconds, from ``--device`` or the config)
or whose ``should_stop()`` says so stops the same way, after the step under way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import atomic, prefix_cache
from .autotune import PROBE_BATCHES, autotune, worst_case_evaluations
from .bundle import Bundle, load_bundle
from .config import FinetuneConfig, recipe_key
from .data import BatchStream, Example, read_jsonl, split_holdout, tokenize_for
from .defaults import default_data, ensure_default_bundle
from .device.limits import session_limits
from .device.plan import optimizer_buffers
from .device.resolve import load_profile
from .errors import CheckpointError
from .evaluate import score
from .runner import LossRunner
from .zo.checkpoint import load_checkpoint, save_tensors_atomic
from .zo.engine import EngineSettings, ZOEngine, choose_inplace
from .zo.ledger import Ledger
from .zo.optim import Schedule
from .zo.replay import apply, check_ledger_fingerprint, is_rollback, rollback_record

BATCH_INPUTS = ["input_ids", "attention_mask", "labels"]
MIN_PROGRESS = 1e-3  # a held-out loss counts as progress when 0.1% below the best so far


@dataclass
class RunSummary:
    out: str
    steps: int
    stop_reason: str
    heldout_before: float
    heldout_after: float
    train_evaluations: int
    eval_evaluations: int
    seconds: float
    trainable_parameters: int
    heldout_accuracy_before: float | None = None  # classification tasks
    heldout_accuracy_after: float | None = None
    tune_evaluations: int = 0  # spent by the lr/μ auto-selection (edgezo.autotune)
    prefix_forward_calls: int = 0  # the one pass over the data of a cached prefix
    lr: float | None = None
    mu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- data -------------------------------------------------------------------------------------


MIN_HELDOUT = 5  # fewer held-out examples than this measure nothing


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


def heldout(
    runner: LossRunner, examples: list[Example], cfg: FinetuneConfig, bundle: Bundle
) -> tuple[float, dict[str, float]]:
    """Mean per-example held-out loss (float64), and ``{"heldout_accuracy": ...}`` for
    classification tasks (empty for a causal LM): extra fields of the metrics row."""
    r = score(
        runner,
        examples,
        cfg.eval_batch_size,
        bundle.manifest.tokenizer.pad_token_id,
        bundle.manifest,
    )
    return r["loss"], ({} if r["accuracy"] is None else {"heldout_accuracy": r["accuracy"]})


def _acc(extra: dict[str, float]) -> str:
    return f", accuracy {extra['heldout_accuracy']:.1%}" if extra else ""


# -- the run folder ---------------------------------------------------------------------------


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.config = path / "config.yaml"
        self.ledger = path / "ledger.jsonl"
        self.checkpoint = path / "checkpoint.safetensors"
        self.metrics = path / "metrics.jsonl"
        self.trained = path / "trained.safetensors"
        self.summary = path / "summary.json"

    def metric(self, **row: Any) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def default_out() -> str:
    return os.path.join("runs", time.strftime("finetune-%Y%m%d-%H%M%S"))


#: Config fields that shape a session, not θ's arithmetic: on resume the new value (if set) wins.
SESSION_FIELDS = (
    "steps",
    "device",
    "micro_batch_size",
    "threads",
    "provider",
    "checkpoint_every",
    "data",
)
#: Budgets are per session: on resume they are this session's (None: the device profile's).
BUDGET_FIELDS = ("eval_budget", "time_budget_s")


def prepare(cfg: FinetuneConfig, resume: bool, log) -> tuple[FinetuneConfig, RunFolder]:
    """Create or reopen the run folder; on resume the stored config wins except for the
    session fields given again (``steps`` may grow, budgets and device may change)."""
    out = Path(cfg.out or default_out())
    run = RunFolder(out)
    if resume:
        if not run.ledger.is_file():
            raise CheckpointError(
                f"--resume: {out} holds no run (no ledger.jsonl)",
                "point --out at the folder of the run to resume, or drop --resume",
            )
        stored = FinetuneConfig.load(str(run.config))
        for key in SESSION_FIELDS:
            if getattr(cfg, key) is not None:
                setattr(stored, key, getattr(cfg, key))
        for key in BUDGET_FIELDS:
            setattr(stored, key, getattr(cfg, key))
        return stored, run
    if run.ledger.exists():
        raise CheckpointError(
            f"{out} already holds a run; nothing was overwritten",
            f"continue it with --resume --out {out}, or choose another --out",
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, run


# -- the loop ---------------------------------------------------------------------------------


def finetune(
    cfg: FinetuneConfig,
    resume: bool = False,
    log=print,
    progress: bool | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Fine-tune ``cfg.bundle`` on ``cfg.data``; ``resume`` continues the run in ``cfg.out``.

    ``should_stop()`` is asked before every step (it may block, e.g. while an app pauses the
    run); a true answer stops the run like a budget does. ``on_step(info)`` is called after
    every step with ``step``, ``steps``, ``loss``, ``evaluations`` (this session),
    ``total_evaluations`` and what is left of the budgets.
    """
    t0 = time.perf_counter()
    bundle = load_bundle(cfg.bundle or ensure_default_bundle(log))
    auto_lr = cfg.autotune and cfg.lr is None and not resume
    auto_mu = cfg.autotune and cfg.mu is None and not resume
    cfg = cfg.resolved(recipe_key(bundle.manifest.trainable_mode, bundle.manifest.lora))
    auto_lr = auto_lr and bool(cfg.lr_race)
    if cfg.bundle is None:
        cfg.bundle = str(bundle.path)
    if cfg.device:
        load_profile(cfg.device)  # a bad --device fails before the run folder is made
    cfg, run = prepare(cfg, resume, log)
    bundle = bundle if Path(cfg.bundle) == bundle.path else load_bundle(cfg.bundle)

    train, held = load_examples(cfg, bundle, log)
    pad_id = bundle.manifest.tokenizer.pad_token_id
    stream = BatchStream(train, cfg.batch_size, cfg.seed, pad_id)
    trainable_bytes = bundle.manifest.trainable_size * 4
    settings = EngineSettings(
        seed=cfg.seed,
        direction=cfg.direction,
        estimator=cfg.estimator,
        q=cfg.q,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        clip=cfg.clip,
        inplace=choose_inplace(cfg.perturbation, trainable_bytes),
        optimizer=cfg.optimizer,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        level_schedule=cfg.level_schedule,
        level_ratio=cfg.level_ratio,
        zipf_s=cfg.zipf_s,
        mu_floor=cfg.mu_floor,
    )
    engine = bundle.engine(settings)
    per_step = engine.estimator.evals_per_step
    limits = session_limits(
        cfg, bundle, optimizer_buffers(cfg.optimizer, cfg.momentum), settings.inplace, per_step
    )
    budget = limits.budget
    prefix_calls = 0
    runner = None
    if cfg.cache_prefix and prefix_cache.available(bundle):
        t_cache = time.perf_counter()
        try:
            (train, held), prefix_calls = prefix_cache.cache_rows(
                bundle,
                [train, held],
                cfg.eval_batch_size,
                pad_id,
                limits.runtime,
                max_mb=cfg.cache_prefix_mb,
            )
        except prefix_cache.CacheTooLarge as e:
            prefix_calls = e.forward_calls
            log(
                f"edgezo: not caching the frozen prefix: its rows for {len(train) + len(held)} "
                f"examples would take {e} (cache_prefix_mb={cfg.cache_prefix_mb:g}); every "
                "evaluation runs the full graph — raise cache_prefix_mb if memory allows"
            )
        else:
            stream = BatchStream(train, cfg.batch_size, cfg.seed, pad_id)
            runner = LossRunner(
                prefix_cache.suffix_path(bundle),
                engine.params,
                prefix_cache.suffix_inputs(bundle),
                limits.runtime,
            )
            log(
                f"edgezo: frozen prefix computed once for {len(train) + len(held)} examples "
                f"({prefix_calls} forward calls, {time.perf_counter() - t_cache:.1f} s, "
                f"{prefix_cache.rows_mb([train, held]):,.0f} MiB of rows); every ZO evaluation "
                f"runs {prefix_cache.suffix_path(bundle).name} only"
            )
    if runner is None:
        runner = LossRunner(bundle.model_path, engine.params, BATCH_INPUTS, limits.runtime)

    # ledger: new, or reopened and caught up (checkpoint + replay of the records after it)
    if resume:
        ledger = Ledger.read(run.ledger, repair=True)
        check_ledger_fingerprint(ledger, bundle.fingerprint, str(bundle.path))
        if EngineSettings.from_dict(ledger.header["engine"]) != settings:
            raise CheckpointError(
                f"{run.ledger} was written with other engine settings than {run.config}",
                "do not edit a run's config.yaml; start a new run with another --out",
            )
        start, guard = restore(engine, ledger, run, bundle, log)
    else:
        ledger = Ledger.create(
            run.ledger,
            {
                "bundle": bundle.fingerprint,
                "bundle_path": str(bundle.path),
                "engine": settings.to_dict(),
            },
        )
        start, guard = 0, None

    log(
        f"edgezo: bundle {bundle.path} ({bundle.manifest.architecture.get('model_type')}, "
        f"mode {bundle.manifest.trainable_mode}): {len(bundle.manifest.trainable)} trainable "
        f"tensors, {engine.params.dim:,} values, {engine.params.nbytes / 2**20:.1f} MiB buffers"
        f"{' (in place)' if settings.inplace else ''} + "
        f"{engine.optimizer.nbytes / 2**20:.1f} MiB {cfg.optimizer} state"
    )
    log(
        f"edgezo: {len(train)} training / {len(held)} held-out examples; {cfg.steps} steps × "
        f"{per_step} forward evaluations; lr {'auto' if auto_lr else f'{cfg.lr:g}'}, "
        f"μ {'auto' if auto_mu else f'{cfg.mu:g}'}, "
        f"q {cfg.q}, {cfg.direction}, {cfg.estimator}, {cfg.optimizer}, momentum "
        f"{cfg.momentum:g}; run folder {run.path}"
    )
    opts = limits.runtime
    log(
        f"edgezo: {'device ' + limits.profile.name if limits.profile else 'no device profile'}"
        f": {runner.provider}, {opts.threads or 'all'} threads, CPU arena "
        f"{'on' if opts.cpu_arena else 'off'}, micro-batch {opts.micro_batch or 'off'}; "
        f"{budget.describe()}; checkpoint every {limits.checkpoint_every} steps"
    )
    for note in limits.notes + runner.notes:
        log(f"edgezo: note: {note}")

    tune_evals = 0
    if (auto_lr or auto_mu) and start == 0:
        tune_evals = run_autotune(cfg, engine, runner, stream, run, auto_lr, auto_mu, log)
        budget.used += tune_evals
    schedule = Schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup_steps)

    engine.perturber.at_theta()
    before, extra = heldout(runner, held, cfg, bundle)
    acc_before = extra.get("heldout_accuracy")
    if start == 0:
        run.metric(kind="eval", step=0, heldout_loss=before, **extra)
    log(f"edgezo: held-out loss at step {start}: {before:.4f}{_acc(extra)}")

    bar = _progress_bar(cfg.steps, start, progress)
    train_evals = sum(len(r["losses"]) for r in ledger.records)  # over the whole run
    stop_reason = "completed"
    last = before
    final_eval = None  # (ledger length, loss, extra) of the latest in-loop held-out evaluation
    # the divergence guard's reference point: from the checkpoint when resuming
    best, best_step = guard if guard is not None else (before, start)
    warned_at = -1  # the best step a "no progress" warning was last given for
    lowest = previous = best  # held-out losses for the plateau rule (any improvement counts)
    rollbacks = [r for r in ledger.records if is_rollback(r)]
    lr_scale = ledger_lr_scale(ledger.records, schedule)
    try:
        while len(ledger.records) < cfg.steps:
            step = len(ledger.records)
            # a step boundary: the ledger and θ agree; stop here if the session must end
            reason = budget.exhausted(per_step) or (
                "cancelled" if should_stop is not None and should_stop() else None
            )
            if reason is not None:
                stop_reason = reason
                break
            batch = stream.batch(step)
            record = engine.step(
                step, schedule(step) * lr_scale, cfg.mu, lambda b=batch: runner.mean_loss(b)
            )
            ledger.append(record)
            train_evals += len(record["losses"])
            budget.used += len(record["losses"])
            run.metric(
                kind="step",
                step=step,
                loss=float(np.mean(record["losses"])),
                lr=record["lr"],
                g=record["g"],
                status=record["status"],
                train_evaluations=train_evals,
                **{k: record[k] for k in ("mu_floor_hits", "levels") if k in record},
            )
            if record["status"] != "ok":
                log(f"edgezo: step {step}: non-finite loss, update skipped")
            done = step + 1
            if on_step is not None:
                on_step(
                    {
                        "step": done,
                        "steps": cfg.steps,
                        "loss": float(np.mean(record["losses"])),
                        "evaluations": budget.used,
                        "total_evaluations": train_evals,
                        **budget.left(),
                    }
                )
            # the last step is checked too: a run must not end on a diverged θ
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                engine.perturber.at_theta()
                last, extra = heldout(runner, held, cfg, bundle)
                final_eval = (len(ledger.records), last, extra)
                run.metric(kind="eval", step=done, heldout_loss=last, **extra)
                if bar is None:
                    log(f"edgezo: step {done}/{cfg.steps} held-out loss {last:.4f}{_acc(extra)}")
                stalled = False
                if diverged(last, best, cfg.divergence_tolerance):
                    # roll θ back to the best held-out point, through the ledger, and halve lr
                    why = (
                        f"held-out loss {last:.4f} is above {1 + cfg.divergence_tolerance:g}"
                        f" x its best {best:.4f} (step {best_step})"
                    )
                    rec = rollback_record(len(ledger.records), best_step, 0.5, why)
                    apply(engine, [rec], ledger.records + [rec])
                    ledger.append(rec)
                    rollbacks.append(rec)
                    lr_scale *= 0.5
                    last = best
                    run.metric(
                        kind="rollback",
                        step=rec["step"],
                        to=best_step,
                        lr_scale=lr_scale,
                        reason=why,
                    )
                    save_checkpoint(engine, run, bundle, ledger, (best, best_step))
                    log(
                        f"edgezo: {why}: rolled back to step {best_step}, learning rate now "
                        f"x{lr_scale:g}"
                    )
                    if len(rollbacks) > cfg.max_rollbacks:
                        stop_reason = "diverged"
                        break
                elif last < best * (1.0 - MIN_PROGRESS):
                    best, best_step = last, done
                else:
                    stalled = True
                # at a floor: it improved before, and this evaluation is no lower than any
                # before nor than the previous one (still recovering from a decay: wait)
                floor = stalled and best_step > start and last >= max(lowest, previous)
                lowest, previous = min(lowest, last), last
                if floor and cfg.plateau_factor < 1.0 and done < cfg.steps:
                    # at its noise floor: a smaller step goes lower (the records keep each
                    # step's lr, so the ledger replays and a resumed run continues with it);
                    # a run that never improved needs a larger lr instead (the warning below)
                    lr_scale *= cfg.plateau_factor
                    run.metric(kind="plateau", step=done, lr_scale=lr_scale, heldout_loss=last)
                    log(
                        f"edgezo: held-out loss {last:.4f} not below its lowest so far nor the "
                        f"previous evaluation: learning "
                        f"rate x{cfg.plateau_factor:g}, now {schedule(step) * lr_scale:g}"
                    )
                if (
                    stalled
                    and not (best_step > start and cfg.plateau_factor < 1.0)
                    and done - best_step >= 2 * cfg.eval_every
                    and warned_at != best_step
                ):
                    warned_at = best_step  # once per stall
                    note = (
                        f"edgezo: no held-out progress in {done - best_step} steps "
                        f"({(done - best_step) * per_step:g} forward evaluations; best "
                        f"{best:.4f} at step {best_step}): try a larger lr (now "
                        f"{schedule(step) * lr_scale:g}), more directions (q={cfg.q}), or "
                        f"optimizer=adam"
                    )
                    if bar is not None:
                        bar.write(note)
                    else:
                        log(note)
            if done % limits.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(engine, run, bundle, ledger, (best, best_step))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{np.mean(record['losses']):.3f}",
                    heldout=f"{last:.3f}",
                    evals=train_evals,
                )
            elif done % max(1, cfg.steps // 10) == 0:
                log(f"edgezo: step {done}/{cfg.steps} train loss {np.mean(record['losses']):.4f}")
        if stop_reason == "diverged":
            log(
                f"edgezo: stopped: the held-out loss diverged {len(rollbacks)} times although "
                f"each rollback halved the learning rate (now x{lr_scale:g}); θ is at its best "
                f"point (step {best_step}). Try a smaller lr or mu, more directions (q), or "
                f"optimizer=adam; the ledger keeps every step"
            )
        elif stop_reason != "completed":
            save_checkpoint(engine, run, bundle, ledger, (best, best_step))
            log(
                f"edgezo: {budget.why(stop_reason)}; stopped with a checkpoint at step "
                f"{len(ledger.records)} of {cfg.steps} — continue next session with: "
                f"edgezo finetune --resume --out {run.path}"
            )
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        save_checkpoint(engine, run, bundle, ledger, (best, best_step))
        log(
            f"edgezo: interrupted; checkpoint at step {len(ledger.records)} — "
            f"continue with: edgezo finetune --resume --out {run.path}"
        )
    finally:
        if bar is not None:
            bar.close()
        ledger.close()

    engine.perturber.at_theta()
    steps_done = len(ledger.records)
    if final_eval is not None and final_eval[0] == steps_done:  # θ unchanged since then
        after, extra = final_eval[1], final_eval[2]
    else:
        after, extra = heldout(runner, held, cfg, bundle)
        run.metric(kind="eval", step=steps_done, heldout_loss=after, **extra)
    save_tensors_atomic(
        run.trained,
        engine.params.state_dict(),
        metadata={"bundle": bundle.fingerprint, "step": str(steps_done)},
    )
    summary = RunSummary(
        out=str(run.path),
        steps=steps_done,
        stop_reason=stop_reason,
        heldout_before=before,
        heldout_after=after,
        train_evaluations=train_evals,
        eval_evaluations=runner.eval_evaluations,
        seconds=time.perf_counter() - t0,
        trainable_parameters=engine.params.dim,
        tune_evaluations=tune_evals,
        lr=cfg.lr,
        mu=cfg.mu,
        prefix_forward_calls=prefix_calls,
        heldout_accuracy_before=acc_before,
        heldout_accuracy_after=extra.get("heldout_accuracy"),
    )
    atomic.write_text(run.summary, json.dumps(summary.to_dict(), indent=2) + "\n")
    log(
        f"edgezo: held-out loss {before:.4f} -> {after:.4f} "
        f"({'-' if after <= before else '+'}{abs(before - after) / before:.1%}){_acc(extra)} "
        f"after "
        f"{steps_done} steps, {train_evals} training forward evaluations"
        f"{f' (+{tune_evals} for the lr/μ selection)' if tune_evals else ''}, "
        f"{summary.seconds:.0f} s; trained tensors: {run.trained}"
    )
    return summary


def run_autotune(
    cfg: FinetuneConfig,
    engine: ZOEngine,
    runner: LossRunner,
    stream: BatchStream,
    run: RunFolder,
    auto_lr: bool,
    auto_mu: bool,
    log,
) -> int:
    """Choose lr and/or μ (edgezo.autotune); store them in the run's config; return the cost."""
    if engine.params.inplace:
        log(
            "edgezo: autotune: skipped — this run perturbs θ in place, and the learning-rate "
            "race would need a copy of θ to restart from; using the mode defaults (lr "
            f"{cfg.lr:g}, μ {cfg.mu:g}); pass lr= and mu= to choose them"
        )
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
    probe = [stream.batch(k + i) for i in range(PROBE_BATCHES)]
    result = autotune(
        engine,
        lr=None if auto_lr else cfg.lr,
        default_lr=cfg.lr,
        mu=cfg.mu,
        tune_mu=auto_mu,
        steps=k,
        batches=stream.batch,
        probe=probe,
        probe_cost=PROBE_BATCHES,
        mean_loss=runner.mean_loss,
        log=log,
    )
    cfg.lr, cfg.mu = result.lr, result.mu
    if result.note:
        log(f"edgezo: autotune: {result.note}")
    log(
        f"edgezo: autotune: lr {cfg.lr:.3g}, μ {cfg.mu:g} ({result.evaluations} forward "
        f"evaluations, {result.seconds:.0f} s)"
    )
    atomic.write_text(run.path / "autotune.json", json.dumps(result.to_dict(), indent=2) + "\n")
    # a resumed run keeps the chosen values
    atomic.write_text(run.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run.metric(
        kind="autotune", lr=cfg.lr, mu=cfg.mu, evaluations=result.evaluations, trials=result.trials
    )
    return result.evaluations


def ledger_lr_scale(records: list[dict], schedule) -> float:
    """The factor on the schedule that the run reached (rollbacks and plateaus): read from
    the last step's recorded lr, or the rollbacks' product when no step follows them."""
    scale = 1.0
    for r in reversed(records):
        if is_rollback(r):
            scale *= float(r["lr_scale"])
            continue
        base = schedule(int(r["step"]))
        if base > 0:
            return scale * float(r["lr"]) / base
    return scale


def diverged(loss: float, best: float, tolerance: float) -> bool:
    """Held-out loss non-finite, or above (1 + tolerance) x the best so far (0: guard off)."""
    if tolerance <= 0:
        return False
    return not np.isfinite(loss) or loss > best * (1.0 + tolerance)


def save_checkpoint(
    engine: ZOEngine, run: RunFolder, bundle: Bundle, ledger: Ledger, guard: tuple[float, int]
) -> None:
    """θ, optimiser state, and the divergence guard's reference (best held-out loss, step),
    at the ledger's current step. The ledger is made durable first, so a checkpoint is never
    ahead of it."""
    ledger.sync()
    step = len(ledger.records)
    tensors = {"master": engine.params.master, **engine.optimizer.state()}
    save_tensors_atomic(
        run.checkpoint,
        tensors,
        metadata={
            "bundle": bundle.fingerprint,
            "step": str(step),
            "guard_best": repr(guard[0]),
            "guard_step": str(guard[1]),
        },
    )


def restore(
    engine: ZOEngine, ledger: Ledger, run: RunFolder, bundle: Bundle, log
) -> tuple[int, tuple[float, int] | None]:
    """Bring the engine to the ledger's last step: checkpoint, then replay what follows it.

    Returns the step and the divergence guard's reference stored with the checkpoint.
    """
    step, guard = 0, None
    if run.checkpoint.is_file():
        tensors, step = load_checkpoint(run.checkpoint, bundle.fingerprint)
        guard = checkpoint_guard(run.checkpoint)
        if step > len(ledger.records):
            raise CheckpointError(
                f"{run.checkpoint} is at step {step} but the ledger ends at {len(ledger.records)}",
                "delete the checkpoint; the ledger rebuilds the state",
            )
        engine.params.master[:] = tensors["master"]
        engine.optimizer.load_state(tensors)
    apply(engine, ledger.records[step:], ledger.records)
    log(
        f"edgezo: resumed at step {len(ledger.records)} (checkpoint {step}, "
        f"{len(ledger.records) - step} steps replayed from the ledger)"
    )
    return len(ledger.records), guard


def checkpoint_guard(path: Path) -> tuple[float, int] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if "guard_best" not in meta:
        return None
    return float(meta["guard_best"]), int(meta["guard_step"])


def _progress_bar(total: int, start: int, enabled: bool | None):
    if enabled is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(
        total=total,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        disable=None if enabled is None else not enabled,
    )
    return None if bar.disable else bar
