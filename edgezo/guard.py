"""The held-out guard: what a run does after each held-out evaluation.

A small policy object, fed one held-out loss at a time (``observe(step, loss)``) and answering
with a :class:`Decision`; it knows no model, so it is tested without ONNX Runtime. Its rules:

- **divergence** — a non-finite loss, or one above (1 + ``divergence_tolerance``) × the best so
  far: roll θ back to the best point and halve the learning rate; after ``max_rollbacks`` of
  those, give up (θ stays at its best point);
- **progress** — a loss at least ``MIN_PROGRESS`` (0.1%) below the best: the new best;
- **plateau** — the run has improved before, and ``plateau_patience`` evaluations in a row
  brought no progress and the last is no lower than the one before: multiply the learning rate
  by ``plateau_factor`` (a constant-lr ZO run stalls at a noise floor set by lr). At most
  ``plateau_max_decays`` decays, never below ``plateau_min_lr_ratio`` × the configured rate;
  after a decay the patience starts again;
- **stall** — no progress for ``2 × eval_every`` steps while no decay is due (the run never
  improved, or its decays are spent): one warning per stall, suggesting a larger lr, more
  directions or Adam.

The guard's whole state is a function of the held-out losses it observed, which the run writes
into its ledger records (``heldout``), so a resumed run rebuilds it exactly by observing them
again (:meth:`HeldoutGuard.from_ledger`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

#: a held-out loss counts as progress when at least 0.1% below the best so far
MIN_PROGRESS = 1e-3
#: the learning-rate factor of a rollback
ROLLBACK_FACTOR = 0.5


@dataclass(frozen=True)
class GuardSettings:
    """The guard's rules; the fields of the same names in :class:`edgezo.config.FinetuneConfig`."""

    eval_every: int = 50
    divergence_tolerance: float = 0.1
    max_rollbacks: int = 3
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_max_decays: int = 4
    plateau_min_lr_ratio: float = 0.05

    @classmethod
    def of(cls, cfg: object) -> GuardSettings:
        """The settings from any object with these attribute names (a FinetuneConfig)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Decision:
    """What to do after one held-out evaluation.

    ``kind``: ``progress`` (a new best), ``steady`` (nothing to do), ``rollback`` (to
    ``to_step``; the lr scale is now ``lr_scale``), ``decay`` (plateau: lr scale now
    ``lr_scale``), ``stall`` (warn: ``message``) or ``give_up`` (too many rollbacks; θ must be
    rolled back to ``to_step`` once more and the run stops).
    """

    kind: str
    step: int
    loss: float
    lr_scale: float
    to_step: int | None = None
    message: str = ""


class HeldoutGuard:
    """Divergence rollback, plateau decay and stall warnings from held-out losses."""

    def __init__(self, settings: GuardSettings, before: float, start_step: int = 0):
        self.s = settings
        self.best, self.best_step = before, start_step
        self.start_step = start_step
        self.previous = before
        self.stalled_evals = 0  # evaluations in a row without progress
        self.rollbacks = 0
        self.decays = 0
        self.lr_scale = 1.0
        self._warned_for = -1  # the best step a stall warning was last given for

    @property
    def improved(self) -> bool:
        """Whether the run has made progress since it started."""
        return self.best_step > self.start_step

    def observe(self, step: int, loss: float) -> Decision:
        """The decision after the held-out ``loss`` at ``step`` (steps done); updates the state."""
        s = self.s
        if s.divergence_tolerance > 0 and (
            not math.isfinite(loss) or loss > self.best * (1.0 + s.divergence_tolerance)
        ):
            self.rollbacks += 1
            self.lr_scale *= ROLLBACK_FACTOR
            self.previous = self.best  # θ returns to the best point
            self.stalled_evals = 0
            why = (
                f"held-out loss {loss:.4f} is above {1 + s.divergence_tolerance:g} x its best "
                f"{self.best:.4f} (step {self.best_step})"
            )
            kind = "give_up" if self.rollbacks > s.max_rollbacks else "rollback"
            return Decision(kind, step, loss, self.lr_scale, self.best_step, why)
        previous, self.previous = self.previous, loss
        if loss < self.best * (1.0 - MIN_PROGRESS):
            self.best, self.best_step = loss, step
            self.stalled_evals = 0
            return Decision("progress", step, loss, self.lr_scale)
        self.stalled_evals += 1
        if self._decay_due(loss, previous):
            self.decays += 1
            self.lr_scale *= s.plateau_factor
            self.stalled_evals = 0
            why = (
                f"held-out loss {loss:.4f}: no progress in {s.plateau_patience} evaluations "
                f"(best {self.best:.4f} at step {self.best_step})"
            )
            return Decision("decay", step, loss, self.lr_scale, message=why)
        if (
            step - self.best_step >= 2 * s.eval_every
            and self._warned_for != self.best_step
            and not self._decay_possible()
        ):
            self._warned_for = self.best_step
            why = (
                f"no held-out progress in {step - self.best_step} steps (best {self.best:.4f} "
                f"at step {self.best_step})"
            )
            return Decision("stall", step, loss, self.lr_scale, message=why)
        return Decision("steady", step, loss, self.lr_scale)

    def _decay_possible(self) -> bool:
        s = self.s
        return (
            s.plateau_factor < 1.0
            and self.improved
            and self.decays < s.plateau_max_decays
            and self.lr_scale * s.plateau_factor >= s.plateau_min_lr_ratio
        )

    def _decay_due(self, loss: float, previous: float) -> bool:
        # still recovering from a change (the last evaluation went down): wait
        return (
            self._decay_possible()
            and self.stalled_evals >= self.s.plateau_patience
            and loss >= previous
        )

    @classmethod
    def from_ledger(
        cls, settings: GuardSettings, before: float, records: list[dict]
    ) -> HeldoutGuard:
        """The guard a run had after the ledger ``records``: every recorded held-out loss
        observed again, in order (a decision that needed a rollback is followed in the ledger
        by its rollback record, which changes nothing here)."""
        guard = cls(settings, before, 0)
        for r in records:
            if "heldout" in r:
                guard.observe(int(r["step"]) + 1, float(r["heldout"]))
        return guard
