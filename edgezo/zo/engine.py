"""The ZO state of one run — θ, directions, estimator, optimiser — and its step.

Both the trainer and replay drive θ through :meth:`ZOEngine.step`; replay only swaps the loss
evaluations for the losses recorded in the ledger. The arithmetic is therefore the same code
path, and a replayed θ equals the trained θ bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from . import scales
from .directions import CONE, ConeDirections, Directions
from .estimators import ESTIMATORS, AnchorLoss, LevelSchedule
from .optim import OPTIMIZERS
from .params import FlatParams, TensorSpec
from .perturb import Perturber

INPLACE_THRESHOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class EngineSettings:
    """Everything that determines θ's arithmetic; stored in the ledger header."""

    seed: int
    direction: str = "rademacher"
    estimator: str = "central"
    q: int = 1
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip: float | None = None
    inplace: bool = False
    # fields added after the first release: defaults keep older ledger headers readable
    optimizer: str = "sgd"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    level_schedule: str = "geometric"
    level_ratio: float = 0.5
    zipf_s: float = 2.0
    mu_floor: float = 1e-5
    cone_angle: float = 60.0  # direction "cone": degrees between each probe and the momentum
    mu_scale: str = ""  # per-tensor perturbation factors (edgezo.zo.scales); "": none
    hizoo_beta: float = 0.99  # optimizer "hizoo": decay of the curvature average
    hizoo_pool: str = "tensor"  # optimizer "hizoo": one curvature per tensor or per value
    hizoo_max_scale: float = 4.0  # optimizer "hizoo": the preconditioner stays in [1/M, M]
    hizoo_estimate: str = "baseline"  # optimizer "hizoo": baseline | moment (the first version)
    hizoo_warmup: int = 20  # optimizer "hizoo": updates with the preconditioner at 1
    svrg_period: int = 50  # estimator "svrg": an anchor pass every this many steps
    svrg_anchor_q: int = 8  # estimator "svrg": directions of the anchor pass
    svrg_anchor_batches: int = 16  # estimator "svrg": batches in the anchor sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineSettings:
        """From a ledger header; fields it lacks (older edgezo) take their defaults."""
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CheckpointError(
                f"the ledger's engine settings hold fields this edgezo does not know: {unknown}",
                "replay it with the (newer) edgezo version that wrote it",
            )
        d = dict(d)
        if d.get("optimizer") == "hizoo" and "hizoo_estimate" not in d:
            # a ledger of the first hizoo (before these fields): its arithmetic
            d.update(hizoo_estimate="moment", hizoo_warmup=0)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def choose_inplace(mode: str, trainable_bytes: int) -> bool:
    """``perturbation`` auto|copy|inplace -> whether θ is perturbed in place."""
    if mode == "auto":
        return trainable_bytes > INPLACE_THRESHOLD_BYTES
    return mode == "inplace"


#: the initial trainable values, loaded on demand (a rollback rebuilds the state from them)
InitialValues = Callable[[], Mapping[str, np.ndarray]]


class ZOEngine:
    """θ (flat float32), directions, estimator and optimiser of one run.

    The core knows no bundle: it is handed the trainable tensors' ``specs`` and ``initial``, a
    function returning their starting values (called again when a rollback rebuilds an
    earlier state, so a full-parameter θ is not kept twice in memory). ``where`` names their
    source in error messages. The runtime builds one with :meth:`edgezo.bundle.Bundle.engine`.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        initial: InitialValues,
        settings: EngineSettings,
        where: str = "initial tensors",
    ):
        self.specs = list(specs)
        self.initial = initial
        self.where = where
        self.settings = settings
        self.params = FlatParams(self.specs, inplace=settings.inplace)
        values = dict(initial())
        self.params.load(values, where=where)
        try:
            self.tensor_scales = scales.tensor_factors(self.specs, values, settings.mu_scale)
        except ValueError as e:
            raise ConfigError(
                f"mu_scale {settings.mu_scale!r}: {e}",
                "name trainable tensors or their roles (edgezo.zo.scales), or drop mu_scale",
            ) from None
        del values
        self.cone: ConeDirections | None = None
        if settings.direction == CONE:
            self.cone = ConeDirections(settings.seed, self.params.dim, settings.cone_angle)
            self.dirs: Directions | ConeDirections = self.cone
        else:
            self.dirs = Directions(settings.seed, self.params.dim, settings.direction)
        self.perturber = Perturber(self.params, self.dirs)
        self.perturber.vectors.scale = scales.scale_vector(self.specs, self.tensor_scales)
        schedule = LevelSchedule(settings.level_schedule, settings.level_ratio, settings.zipf_s)
        self.estimator = ESTIMATORS[settings.estimator](
            q=settings.q,
            schedule=schedule,
            mu_floor=settings.mu_floor,
            svrg_period=settings.svrg_period,
            svrg_anchor_q=settings.svrg_anchor_q,
            svrg_anchor_batches=settings.svrg_anchor_batches,
            dim=self.params.dim,
        )
        self.optimizer = OPTIMIZERS[settings.optimizer](
            self.params,
            self.perturber.vectors,
            momentum=settings.momentum,
            betas=(settings.adam_beta1, settings.adam_beta2),
            eps=settings.adam_eps,
            weight_decay=settings.weight_decay,
            clip=settings.clip,
            hizoo_beta=settings.hizoo_beta,
            hizoo_pool=settings.hizoo_pool,
            hizoo_max_scale=settings.hizoo_max_scale,
            hizoo_estimate=settings.hizoo_estimate,
            hizoo_warmup=settings.hizoo_warmup,
            direction=settings.direction,
        )
        if hasattr(self.estimator, "state"):  # svrg's anchor: checkpointed with the optimiser
            self.optimizer.companions.append(self.estimator)
            if settings.direction == CONE or settings.optimizer == "hizoo" or settings.inplace:
                raise ConfigError(
                    f"estimator {settings.estimator} regenerates its anchor's directions for "
                    "many steps and evaluates θ̃ beside θ: it works with sphere, gaussian or "
                    "rademacher directions, a non-hizoo optimiser and a feed buffer",
                    "use direction=sphere, optimizer=sgd and perturbation=copy",
                )
        if self.cone is not None:
            axis = self.optimizer.history
            if axis is None:
                raise ConfigError(
                    f"direction cone leans each probe on the optimiser's momentum, and "
                    f"optimizer {settings.optimizer} with momentum {settings.momentum} keeps none",
                    "set momentum > 0 (e.g. momentum=0.9; one float32 buffer of θ's size) or "
                    "optimizer=adam, or use direction=sphere",
                )
            self.cone.bind(axis)

    def step(
        self,
        step: int,
        lr: float,
        mu: float,
        evaluate: Callable[[], float],
        anchor: AnchorLoss | None = None,
    ) -> dict[str, Any]:
        """One ZO step; returns the ledger record. A non-finite loss skips the update.

        The record holds every evaluation's loss (their count is the step's actual forward
        cost), the projected gradients, and the estimator's extra fields (P3/P4's levels and
        ``mu_floor_hits``, DAP's signs). ``anchor(j)``, the loss of anchor batch j at the
        current feed, is read by ``estimator=svrg`` only (its anchor passes).
        """
        if self.cone is not None:
            self.cone.begin(step)  # this step's directions lean on the momentum as it is now
        try:
            if getattr(self.estimator, "wants_anchor", False):
                est = self.estimator.estimate(step, mu, self.perturber, evaluate, anchor)
            else:
                est = self.estimator.estimate(step, mu, self.perturber, evaluate)
            status = "ok" if est.finite else "skipped"
            if status == "ok":
                kw = {}
                if getattr(self.optimizer, "wants_curvature", False):
                    kw["curvature"] = est.curvature
                self.optimizer.update(est.vectors, est.g, lr, displacement=est.displacement, **kw)
            else:
                self.optimizer.settle(est.displacement)  # θ back where it was, no update
        finally:
            if self.cone is not None:
                self.cone.end()
        return {
            "step": step,
            "lr": lr,
            "mu": mu,
            "losses": est.losses,
            "g": est.g,
            "status": status,
            **est.info,
        }

    def fresh(self) -> ZOEngine:
        """A new engine at the initial values with the same settings (rollback, replay)."""
        return ZOEngine(self.specs, self.initial, self.settings, self.where)

    def replay(self, record: dict[str, Any]) -> None:
        """Redo a recorded step from its losses; the projected gradients must agree."""
        losses = iter(record["losses"])

        def recorded() -> float:
            try:
                return next(losses)
            except StopIteration:
                raise CheckpointError(
                    f"ledger step {record['step']} holds too few losses for this estimator",
                    "replay with the settings in the ledger header (was the file edited?)",
                ) from None

        redone = self.step(
            record["step"], record["lr"], record["mu"], recorded, anchor=lambda _j: recorded()
        )
        if redone["g"] != record["g"] and redone["status"] == "ok":
            raise CheckpointError(
                f"ledger step {record['step']}: recorded projected gradients {record['g']} "
                f"differ from those recomputed from its losses {redone['g']}",
                "the ledger was edited or written by an incompatible edgezo version",
            )
