"""The fine-tuning loop, top to bottom.

    config ──► setup (edgezo.session): run folder, bundle, data, runner, engine, ledger
        for each step t:
            budget or stop?                    → checkpoint, stop (resume next session)
            ZO step + ledger                   batch_t = f(seed, t); perturb → forwards → g
                                               → update θ; the record appended, fsync'd
            held-out guard (every N steps)     rollback, lr decay or a warning (edgezo.guard)
            checkpoint (every M steps)         θ + optimiser state, atomic
            report                             metrics row, progress bar
    ──► held-out loss after, trained.safetensors, summary.json (the run and this session)

A killed run is resumed from its last checkpoint plus the ledger records after it, which are
replayed without forwards; the result is bit-identical to the uninterrupted run. Held-out
losses are written into the ledger records they follow, so the guard's decisions replay too.
A run that reaches its session budget (forward evaluations or seconds, from ``--device`` or
the config) or whose ``should_stop()`` says so stops the same way, after the step under way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .config import FinetuneConfig
from .data import collate, shuffled
from .errors import ConfigError
from .guard import Decision
from .run import RunSummary, SessionReport
from .session import BATCH_INPUTS, MIN_HELDOUT, Session, setup, write_trained
from .zo.replay import apply, rollback_record

__all__ = ["BATCH_INPUTS", "MIN_HELDOUT", "RunSummary", "finetune"]

#: a run stops after this many steps in a row whose losses were not finite
MAX_SKIPPED_IN_A_ROW = 10
#: ``edgezo.data.shuffled`` purpose of svrg's anchor sample (0, 1: epoch order, held-out split)
ANCHOR_SAMPLE = 2


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

    On resume the stored config is used; fields of ``cfg`` that differ from their defaults
    (what a user set again: ``steps``, budgets, ``device`` ...) replace the stored values.
    ``should_stop()`` is asked before every step (it may block, e.g. while an app pauses the
    run); a true answer stops the run like a budget does. ``on_step(info)`` is called after
    every step with ``step``, ``steps``, ``loss``, ``evaluations`` (this session),
    ``total_evaluations`` and what is left of the budgets.
    """
    s = setup(cfg, resume, log)
    s.bar = _progress_bar(s.cfg.steps, s.start_step, progress)
    try:
        stop_reason = train_loop(s, should_stop, on_step)
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    finally:
        if s.bar is not None:
            s.bar.close()
            s.bar = None
    return finish(s, stop_reason)


def train_loop(s: Session, should_stop, on_step) -> str:
    """Run steps until the config's count, a budget, a stop request or a divergence."""
    cfg, engine, ledger, budget = s.cfg, s.engine, s.ledger, s.limits.budget
    skipped = 0
    anchor = anchor_loss(s)
    while len(ledger.records) < cfg.steps:
        step = len(ledger.records)
        # budget or stop? (a step boundary: the ledger and θ agree)
        reason = budget.exhausted(s.per_step) or (
            "cancelled" if should_stop is not None and should_stop() else None
        )
        if reason is not None:
            _stopped(s, reason)
            return reason

        # ZO step + ledger
        batch = s.stream.batch(step)
        record = engine.step(
            step, s.lr(step), cfg.mu, lambda b=batch: s.runner.mean_loss(b), anchor=anchor
        )
        budget.used += len(record["losses"])
        s.train_evals += len(record["losses"])
        done = step + 1
        skipped = skipped + 1 if record["status"] != "ok" else 0

        # held-out guard: every eval_every steps and after the last one (never end diverged)
        decision = None
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            loss, extra = s.heldout()
            record.update(heldout=loss, **extra)
            decision = s.guard.observe(done, loss)
        ledger.append(record)
        _record_step(s, record, on_step)
        if decision is not None and _act(s, decision, extra):
            return "diverged"

        # checkpoint
        if done % s.limits.checkpoint_every == 0 or done == cfg.steps:
            s.save_checkpoint()

        # report
        _progress(s, record)
        if skipped >= MAX_SKIPPED_IN_A_ROW:
            s.save_checkpoint()
            s.log(
                f"edgezo: stopped: the last {skipped} steps had non-finite losses (updates "
                "skipped): θ is unchanged since; try a smaller mu or lr, or check the data"
            )
            return "non_finite"
    return "completed"


def anchor_loss(s: Session) -> Callable[[int], float] | None:
    """``estimator=svrg``: anchor(j), the loss of batch j of its anchor sample at the current
    feed — ``svrg_anchor_batches`` batches of ``batch_size`` training examples, a seeded sample
    without repeats (the whole training set when they add up to it). None for the others."""
    cfg = s.cfg
    if cfg.estimator != "svrg":
        return None
    examples, size, n = s.stream.examples, s.stream.batch_size, cfg.svrg_anchor_batches
    if n * size > len(examples):
        raise ConfigError(
            f"svrg_anchor_batches={n} batches of {size} examples need {n * size} training "
            f"examples, and there are {len(examples)}",
            f"set svrg_anchor_batches to at most {len(examples) // size} (the whole training "
            "set) or lower batch_size",
        )
    order = shuffled(len(examples), cfg.seed, ANCHOR_SAMPLE, 0)[: n * size]
    batches = [
        collate([examples[int(i)] for i in order[j * size : (j + 1) * size]], s.stream.pad_id)
        for j in range(n)
    ]
    return lambda j: s.runner.mean_loss(batches[j])


def _act(s: Session, d: Decision, extra: dict[str, float]) -> bool:
    """Carry out a held-out decision; True when the run must stop (it diverged for good)."""
    s.run.metric(kind="eval", step=d.step, heldout_loss=d.loss, **extra)
    if s.bar is None:
        acc = f", accuracy {extra['heldout_accuracy']:.1%}" if extra else ""
        s.log(f"edgezo: step {d.step}/{s.cfg.steps} held-out loss {d.loss:.4f}{acc}")
    if d.kind in ("rollback", "give_up"):
        # roll θ back to the best held-out point, through the ledger; the guard halved lr
        rec = rollback_record(len(s.ledger.records), d.to_step, 0.5, d.message)
        apply(s.engine, [rec], s.ledger.records + [rec])
        s.ledger.append(rec)
        s.run.metric(kind="rollback", step=rec["step"], to=d.to_step, lr_scale=d.lr_scale,
                     reason=d.message)  # fmt: skip
        s.save_checkpoint()
        s.log(f"edgezo: {d.message}: rolled back to step {d.to_step}, learning rate now "
              f"x{d.lr_scale:g}")  # fmt: skip
        if d.kind == "give_up":
            s.log(
                f"edgezo: stopped: the held-out loss diverged {s.guard.rollbacks} times although "
                f"each rollback halved the learning rate (now x{d.lr_scale:g}); θ is at its best "
                f"point (step {d.to_step}). Try a smaller lr or mu, more directions (q), or "
                "optimizer=adam; the ledger keeps every step"
            )
            return True
    elif d.kind == "decay":
        s.run.metric(kind="plateau", step=d.step, lr_scale=d.lr_scale, heldout_loss=d.loss)
        s.log(f"edgezo: {d.message}: learning rate x{s.cfg.plateau_factor:g}, now {s.lr(d.step):g}")
    elif d.kind == "stall":
        s.note(
            f"edgezo: {d.message}: try a larger lr (now {s.lr(d.step):g}), more directions "
            f"(q={s.cfg.q}), or optimizer=adam"
        )
    return False


def _stopped(s: Session, reason: str) -> None:
    s.save_checkpoint()
    s.log(
        f"edgezo: {s.limits.budget.why(reason)}; stopped with a checkpoint at step "
        f"{len(s.ledger.records)} of {s.cfg.steps} — continue next session with: "
        f"edgezo finetune --resume --out {s.run.path}"
    )


def _record_step(s: Session, record: dict, on_step) -> None:
    """The step's metrics row (and the app's callback): before its held-out evaluation's."""
    loss = float(np.mean(record["losses"]))
    extras = {k: record[k] for k in ("mu_floor_hits", "levels") if k in record}
    s.run.metric(kind="step", step=record["step"], loss=loss, lr=record["lr"], g=record["g"],
                 status=record["status"], train_evaluations=s.train_evals, session=s.index,
                 elapsed_s=round(s.elapsed(), 3), **extras)  # fmt: skip
    if record["status"] != "ok":
        s.note(f"edgezo: step {record['step']}: non-finite loss, update skipped")
    if on_step is not None:
        on_step({"step": record["step"] + 1, "steps": s.cfg.steps, "loss": loss,
                 "evaluations": s.limits.budget.used, "total_evaluations": s.train_evals,
                 **s.limits.budget.left()})  # fmt: skip


def _progress(s: Session, record: dict) -> None:
    done, loss = record["step"] + 1, float(np.mean(record["losses"]))
    if s.bar is not None:
        s.bar.update(1)
        held = f"{s.guard.previous:.3f}"
        s.bar.set_postfix(loss=f"{loss:.3f}", heldout=held, evals=s.train_evals)
    elif done % max(1, s.cfg.steps // 10) == 0:
        s.log(f"edgezo: step {done}/{s.cfg.steps} train loss {loss:.4f}")


def finish(s: Session, stop_reason: str) -> RunSummary:
    """After the loop: held-out loss at the final θ, trained tensors, the summary."""
    s.ledger.close()
    steps = len(s.ledger.records)
    if stop_reason == "interrupted":
        s.save_checkpoint()
        s.log(f"edgezo: interrupted; checkpoint at step {steps} — "
              f"continue with: edgezo finetune --resume --out {s.run.path}")  # fmt: skip
    last = s.ledger.records[-1] if s.ledger.records else None
    if last is not None and "heldout" in last and last.get("status") != "rollback":
        after = float(last["heldout"])  # θ unchanged since that evaluation
        extra = {"heldout_accuracy": last["heldout_accuracy"]} if "heldout_accuracy" in last else {}
    else:
        after, extra = s.heldout()
        s.run.metric(kind="eval", step=steps, heldout_loss=after, **extra)
    write_trained(s)
    ok_steps = [r for r in s.ledger.records if r.get("status") == "ok"]
    if steps and not ok_steps and stop_reason == "completed":
        stop_reason = "non_finite"
    session = SessionReport(
        index=s.index,
        start_step=s.start_step,
        steps=steps - s.start_step,
        heldout_before=s.session_before,
        seconds=s.elapsed(),
        train_evaluations=s.train_evaluations() - s.evaluations_at_start,
        eval_evaluations=s.runner.eval_evaluations,
        prefix_forward_calls=s.prefix_forward_calls,
    )
    summary = RunSummary(
        out=str(s.run.path),
        steps=steps,
        stop_reason=stop_reason,
        heldout_before=s.heldout_before,
        heldout_after=after,
        train_evaluations=s.train_evaluations(),
        eval_evaluations=s.runner.eval_evaluations,
        seconds=s.previous_seconds + s.elapsed(),
        trainable_parameters=s.engine.params.dim,
        heldout_accuracy_before=s.accuracy_before,
        heldout_accuracy_after=extra.get("heldout_accuracy"),
        tune_evaluations=s.tune_evaluations,
        prefix_forward_calls=s.prefix_forward_calls,
        lr=s.cfg.lr,
        mu=s.cfg.mu,
        lr_last=ok_steps[-1]["lr"] if ok_steps else None,
        rollbacks=s.guard.rollbacks,
        lr_decays=s.guard.decays,
        session=session,
    )
    summary.write(s.run)
    acc = f", accuracy {extra['heldout_accuracy']:.1%}" if extra else ""
    b = s.heldout_before
    change = f"{'-' if after <= b else '+'}{abs(b - after) / b:.1%}" if np.isfinite(b) else "?"
    tune = summary.tune_evaluations
    s.log(
        f"edgezo: held-out loss {b:.4f} -> {after:.4f} ({change}){acc} after {steps} steps, "
        f"{summary.train_evaluations} training forward evaluations"
        f"{f' (+{tune} for the lr/μ selection)' if tune else ''}, {summary.seconds:.0f} s"
        f"{f' in {s.index + 1} sessions' if s.index else ''}; trained tensors: {s.run.trained}"
    )
    return summary


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
