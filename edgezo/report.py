"""``edgezo report``: what a run did, as a table and a plot of its losses.

Reads the run folder only (no bundle, no model): ``summary.json`` (held-out before/after,
steps, evaluations, seconds, stop reason, lr/μ), the ledger (every step's lr and μ, so their
changes by rollbacks, plateau decays or autotune are counted) and ``metrics.jsonl`` (training
loss per step with its elapsed time, held-out evaluations, rollbacks and plateaus).

The plot (``loss.png``: training and held-out loss against steps and against seconds) needs
matplotlib, an optional extra (``pip install 'edgezo[report]'``); without it the table is
printed with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .run import RunFolder


@dataclass
class RunReport:
    summary: dict[str, Any]
    steps: list[int] = field(default_factory=list)  # per training step
    train_loss: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)  # since the run's start
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, s)
    lrs: list[float] = field(default_factory=list)  # per ledger step
    mus: list[float] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)  # rollback / plateau counts

    def rows(self) -> list[tuple[str, str]]:
        """The summary table as (what, value) rows."""
        s = self.summary

        def num(x: Any, fmt: str = ".4f") -> str:
            return "-" if x is None else format(x, fmt)

        before, after = s.get("heldout_before"), s.get("heldout_after")
        change = (
            f" ({(after - before) / before:+.1%})"
            if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before
            else ""
        )
        rows = [
            ("held-out loss before -> after", f"{num(before)} -> {num(after)}{change}"),
        ]
        if s.get("heldout_accuracy_before") is not None:
            rows.append(
                (
                    "held-out accuracy before -> after",
                    f"{s['heldout_accuracy_before']:.1%} -> {s['heldout_accuracy_after']:.1%}",
                )
            )
        rows += [
            ("steps", str(s.get("steps"))),
            ("stop reason", str(s.get("stop_reason"))),
            (
                "evaluations (train / held-out / autotune)",
                f"{s.get('train_evaluations')} / {s.get('eval_evaluations')} / "
                f"{s.get('tune_evaluations', 0)}",
            ),
            ("seconds (all sessions)", num(s.get("seconds"), ".1f")),
            ("trainable values", f"{s.get('trainable_parameters', 0):,}"),
            (
                "lr configured -> last",
                f"{num(s.get('lr'), '.3g')} -> {num(s.get('lr_last'), '.3g')}",
            ),
            ("lr changes in the ledger", _changes(self.lrs)),
            ("mu", f"{num(s.get('mu'), '.3g')} ({_changes(self.mus)})"),
            (
                "rollbacks / lr decays (plateau)",
                f"{s.get('rollbacks', 0)} / {s.get('lr_decays', 0)}",
            ),
        ]
        if self.evals:
            best = min(self.evals, key=lambda e: e[1])
            rows.append(("best held-out loss", f"{best[1]:.4f} at step {best[0]}"))
        return rows

    def table(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())


def _changes(values: list[float]) -> str:
    if not values:
        return "no steps"
    n = sum(1 for a, b in zip(values, values[1:], strict=False) if a != b)
    if n == 0:
        return "constant"
    return f"{n} change{'s' if n != 1 else ''}: {values[0]:.3g} -> {values[-1]:.3g}"


def load_report(run_dir: str | Path) -> RunReport:
    """The report of a run folder; a clear error when it is not one."""
    run = RunFolder(run_dir)
    if not run.summary.is_file():
        raise ConfigError(
            f"{run.path} has no summary.json: it is not a run folder, or its first session has "
            "not finished",
            "pass --run the folder `edgezo finetune --out` wrote (it holds summary.json)",
        )
    try:
        summary = json.loads(run.summary.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {run.summary}: {e}", "re-run or resume the run") from None
    rep = RunReport(summary=summary)
    if run.ledger.is_file():
        from .zo.ledger import Ledger

        for rec in Ledger.read(run.ledger).records:
            rep.lrs.append(float(rec["lr"]))
            rep.mus.append(float(rec["mu"]))
    offset = last = 0.0
    step_seconds: dict[int, float] = {}
    for row in run.metric_rows():
        kind = row.get("kind")
        if kind == "session":
            offset, last = offset + last, 0.0
        elif kind == "step" and isinstance(row.get("loss"), (int, float)):
            last = float(row.get("elapsed_s") or 0.0)
            t = offset + last
            rep.steps.append(int(row["step"]) + 1)  # the loss of step k is seen after k+1 steps
            rep.train_loss.append(float(row["loss"]))
            rep.train_seconds.append(t)
            step_seconds[int(row["step"]) + 1] = t
        elif kind == "eval" and isinstance(row.get("heldout_loss"), (int, float)):
            step = int(row["step"])
            t = step_seconds.get(step, offset + last if step else 0.0)
            rep.evals.append((step, float(row["heldout_loss"]), t))
        elif kind in ("rollback", "plateau"):
            rep.events[kind] = rep.events.get(kind, 0) + 1
    return rep


def plot(rep: RunReport, path: str | Path) -> Path | None:
    """Write the loss plot to ``path``; None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, xs, ex, label in (
        (axes[0], rep.steps, [e[0] for e in rep.evals], "steps"),
        (axes[1], rep.train_seconds, [e[2] for e in rep.evals], "seconds"),
    ):
        if rep.train_loss:
            ax.plot(xs, rep.train_loss, lw=0.8, alpha=0.6, label="training loss (batch)")
        if rep.evals:
            ax.plot(ex, [e[1] for e in rep.evals], "o-", label="held-out loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    s = rep.summary
    fig.suptitle(f"{Path(s.get('out', '')).name}: {s.get('steps')} steps, {s.get('stop_reason')}")
    from . import atomic

    try:
        return atomic.write_with(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
