"""What a run may use in one session: a device profile's caps and budgets applied to a config.

``session_limits(cfg, bundle, ...)`` turns a :class:`FinetuneConfig` (and its ``device``
profile, if any) into the ONNX Runtime options (providers in the profile's order with
fallback, threads, CPU arena, GPU memory limit), the micro-batch size and the session budgets.
Every value the user set in the config wins over the profile's; a config that exceeds a cap
is an error that names the field and the fix.

``Budget`` counts a session's training forward evaluations (one per loss evaluation of the
effective batch, however many micro-batches it takes) and its wall-clock seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..bundle import Bundle
from ..config import FinetuneConfig
from ..errors import ConfigError
from ..runner import RuntimeOptions
from .profiles import DeviceProfile
from .resolve import load_profile

DEFAULT_CHECKPOINT_EVERY = 25


@dataclass
class Budget:
    """A session's evaluation and wall-clock budgets; ``None`` = unlimited."""

    evals: int | None = None
    seconds: float | None = None
    start: float = field(default_factory=time.perf_counter)
    used: int = 0  # training evaluations this session

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self, next_step_evals: int) -> str | None:
        """``"eval_budget"`` / ``"time_budget"`` when the next step may not start, else None."""
        if self.evals is not None and self.used + next_step_evals > self.evals:
            return "eval_budget"
        # time: at least one step per session, so that every session makes progress
        if self.seconds is not None and self.used > 0 and self.elapsed() >= self.seconds:
            return "time_budget"
        return None

    def why(self, reason: str) -> str:
        """The stop message for a stop ``reason``."""
        if reason == "eval_budget":
            return (
                f"the session's budget of {self.evals:,} forward evaluations is spent "
                f"({self.used:,} used)"
            )
        if reason == "time_budget":
            return f"the session's time budget of {self.seconds:g} s is spent"
        return "stop requested"

    def left(self) -> dict[str, float | None]:
        return {
            "evaluations_left": None if self.evals is None else self.evals - self.used,
            "seconds_left": None
            if self.seconds is None
            else max(0.0, self.seconds - self.elapsed()),
        }

    def describe(self) -> str:
        parts = []
        if self.evals is not None:
            parts.append(f"{self.evals:,} forward evaluations")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " / ".join(parts) + " per session" if parts else "no session budget"


@dataclass
class SessionLimits:
    profile: DeviceProfile | None
    runtime: RuntimeOptions
    budget: Budget
    checkpoint_every: int
    notes: list[str] = field(default_factory=list)

    @property
    def micro_batch(self) -> int | None:
        return self.runtime.micro_batch


def session_limits(
    cfg: FinetuneConfig,
    bundle: Bundle,
    optim_buffers: int,
    inplace: bool,
    evals_per_step: float,
    profile: DeviceProfile | None = None,
) -> SessionLimits:
    """Apply a device profile (``profile``, else ``cfg.device``'s, if any) to ``cfg``: runtime
    options, caps, budgets."""
    if profile is None and cfg.device:
        profile = load_profile(cfg.device)
    notes: list[str] = []
    eval_budget = cfg.eval_budget or (profile.eval_budget if profile else None)
    time_budget = cfg.time_budget_s or (profile.time_budget_s if profile else None)
    every = cfg.checkpoint_every or (
        profile.checkpoint_every if profile else DEFAULT_CHECKPOINT_EVERY
    )
    if eval_budget is not None and eval_budget < evals_per_step:
        raise ConfigError(
            f"eval_budget {eval_budget} is less than one step's {evals_per_step} forward "
            "evaluations: no step could run",
            f"raise eval_budget to at least {evals_per_step} (e.g. eval_budget=1000), or lower q",
        )
    budget = Budget(evals=eval_budget, seconds=time_budget)

    if profile is None:
        runtime = RuntimeOptions(
            provider=cfg.provider or "cpu",
            threads=cfg.threads or 0,
            micro_batch=cfg.micro_batch_size,
        )
        return SessionLimits(None, runtime, budget, every, notes)

    where = f"--device {profile.name}"
    if cfg.max_length > profile.max_seq_len:
        raise ConfigError(
            f"max_length {cfg.max_length} exceeds {where}'s max_seq_len {profile.max_seq_len}",
            f"use --max-length {profile.max_seq_len} or less, or a profile with longer "
            "sequences (edgezo devices lists them)",
        )
    if cfg.micro_batch_size is not None and cfg.micro_batch_size > profile.max_batch_size:
        raise ConfigError(
            f"micro_batch_size {cfg.micro_batch_size} exceeds {where}'s max_batch_size "
            f"{profile.max_batch_size}",
            f"use micro_batch_size={profile.max_batch_size} or less (or leave it unset: the "
            "profile's cap is used)",
        )
    micro = cfg.micro_batch_size or profile.max_batch_size
    micro = fit_micro_batch(
        cfg,
        bundle,
        profile,
        micro,
        optim_buffers,
        inplace,
        explicit=cfg.micro_batch_size is not None,
        notes=notes,
    )
    if cfg.batch_size > micro:
        calls = -(-cfg.batch_size // micro)
        notes.append(
            f"batch_size {cfg.batch_size} exceeds the micro-batch of {micro} "
            f"({where} max_batch_size {profile.max_batch_size}): each evaluation runs "
            f"as {calls} forward calls of at most {micro} examples; the effective "
            "batch and the ZO step are unchanged"
        )
    runtime = runtime_options(
        profile, provider=cfg.provider, threads=cfg.threads, micro_batch=micro
    )
    return SessionLimits(profile, runtime, budget, every, notes)


def runtime_options(
    profile: DeviceProfile,
    *,
    provider: str | None = None,
    threads: int | None = None,
    micro_batch: int | None = None,
) -> RuntimeOptions:
    """The ONNX Runtime options a device profile defines — the one place they are made.

    Providers in the profile's order (an explicit ``provider`` wins), its threads (unless
    ``threads`` is given), CPU arena, each provider's options (GPU memory cap, the profile's
    ``provider_options``); ``micro_batch`` defaults to the
    profile's ``max_batch_size``.
    """
    return RuntimeOptions(
        provider=provider,  # None: the first available of the profile's providers
        providers=profile.providers,
        threads=profile.threads if threads is None else threads,
        cpu_arena=profile.cpu_arena,
        gpu_mem_limit_mb=profile.gpu_memory_mb,
        provider_options=tuple(
            (p, tuple(sorted(o.items()))) for p, o in profile.session_options().items()
        ),
        micro_batch=profile.max_batch_size if micro_batch is None else micro_batch,
    )


def fit_micro_batch(
    cfg: FinetuneConfig,
    bundle: Bundle,
    profile: DeviceProfile,
    micro: int,
    optim_buffers: int,
    inplace: bool,
    explicit: bool,
    notes: list[str],
) -> int:
    """The micro-batch whose analytic memory estimate fits the profile's budget."""
    from .plan import estimate, suggest

    def plan_at(mb: int, seq: int = cfg.max_length):
        return estimate(
            bundle,
            device=profile.name,
            budget_mb=profile.memory_budget_mb,
            batch_size=cfg.batch_size,
            max_length=seq,
            micro_batch=mb,
            optim_buffers=optim_buffers,
            inplace=inplace,
            cpu_arena=profile.cpu_arena,
        )

    wanted = min(micro, max(cfg.batch_size, cfg.eval_batch_size))
    plan = plan_at(wanted)
    if plan.fits:
        return micro
    for mb in range(wanted - 1, 0, -1):
        if plan_at(mb).fits:
            if explicit:
                notes.append(
                    f"micro_batch_size {micro} may not fit {profile.name}'s "
                    f"{profile.memory_budget_mb:,} MiB (estimate "
                    f"{plan.peak_mb:,.0f} MiB); micro_batch_size={mb} would"
                )
                return micro
            notes.append(
                f"memory: micro-batch {wanted} needs ~{plan.peak_mb:,.0f} MiB, over "
                f"{profile.name}'s {profile.memory_budget_mb:,} MiB; using "
                f"micro-batch {mb}"
            )
            return mb
    fixes = suggest(bundle, plan_at, plan_at(1), profile.max_batch_size)
    raise ConfigError(
        f"{bundle.path} does not fit --device {profile.name} even at micro-batch 1 × "
        f"{cfg.max_length} tokens: ~{plan_at(1).peak_mb:,.0f} MiB needed, memory_budget_mb is "
        f"{profile.memory_budget_mb:,} (details: edgezo plan --bundle {bundle.path} --device "
        f"{profile.name})",
        "; or ".join(fixes),
    )
