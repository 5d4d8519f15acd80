"""Automatic learning-rate and μ selection at the start of a run, at a bounded, reported cost.

A user who passes no hyperparameters should get a run that learns. The right learning rate of
a ZO run depends on the model, the trainable set, the data and the estimator (its useful range
spans orders of magnitude), so instead of trusting one table value the run measures:

1. **μ check** (1 + 4 forward evaluations per try, at most ``MU_TRIES`` tries): at θ₀ on the
   first batch, f(θ₀ ± μz) for ``MU_DIRECTIONS`` directions z. The first-order part
   d = (f₊ − f₋)/2 must stand above float32 noise (RMS |d| ≥ ``NOISE`` · |f₀|), else μ is
   multiplied by 10. (The second-order part c = (f₊ + f₋)/2 − f₀ is measured and recorded but
   not acted on by default: for symmetric directions E[(zᵀHz)·z] = 0, so in a one-sided
   estimate it adds zero-mean noise, not bias, and on SmolLM2 LoRA one-sided q=4 learned well
   at μ 1e-2 although c exceeded d there. ``check_mu(curvature=True)`` shrinks μ while c > d.)
   Then a **smoothness check** (4 more evaluations): the central derivative estimates along the
   same directions at μ and μ/4 must agree (RMS relative difference ≤ ``ROUGH``). For a smooth
   loss they differ by O(μ²); for a loss that rounding makes a step function of θ — an int8
   graph whose activations are quantised at run time with a per-tensor scale, when the
   trainable tensors feed those activations — the difference f(θ + μz) − f(θ) is rounding
   noise of about the same size at every μ, so the estimates grow like 1/μ. Measured on
   SmolLM2-135M, LoRA-FA on the last 4 blocks, ``--precision int8 --precision-scope all``:
   one-sided estimates at μ 1e-3 … 1e-1 were off by 2.6×–230× the directional derivative's
   RMS (the fp32 bundle: 0.4–20%), and the run diverged (held-out 5.55 → 13.5 in 50 steps).
   No μ helps, so the check does not change μ: it says so, with the fix.
2. **learning-rate race**: from θ₀, each candidate lr runs ``steps`` ZO steps with the run's own
   estimator, optimiser, directions and batches — common random numbers, so the candidates
   differ only in lr — and is then judged by its mean loss on a probe set of training examples
   the trial did not train on. Candidates are the mode default × 3^j: j ∈ {−1, 0, 1} first,
   then the grid is extended past the winning edge (downwards when every candidate raised
   the probe loss), at most ``MAX_EXTEND`` times. The winner
   is the candidate with the lowest probe loss (a candidate that diverges loses), and the run
   uses the winner / ``BACKOFF``: k steps cannot show the noise a run accumulates.
   If no candidate lowers the probe loss at all, the default is kept and the run says so.

θ and the optimiser state are restored exactly after every trial, so the run itself starts
from θ₀ and its ledger replays as usual: the chosen lr and μ are stored in the run's config
(and ``autotune.json``) and every ledger record holds the lr it used. The cost — every forward
evaluation, counted in training-batch units — is logged, written to the run's metrics and
counted against the session budget.

In-place runs (the trainable tensors exceed the in-place threshold, e.g. ``full`` mode) skip
the race: restoring θ₀ would need a copy of θ, which is exactly the memory in-place avoids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .zo.engine import ZOEngine
from .zo.perturb import plain

NOISE = 2e-6  # relative size of float32 noise in a mean loss over a batch
MU_TRIES = 3
MU_DIRECTIONS = 2  # one direction's projection can be near zero by chance
ROUGH = 0.5  # most RMS relative difference of the derivative estimates at μ and μ/4
GRID = 3.0  # candidate lrs are default × GRID^j
MAX_EXTEND = 2
# The race's winner is the edge of what is stable for ``steps`` steps; ZO noise accumulates
# over a run, so the run uses winner / BACKOFF (an LR range test's usual "a notch or two below
# the steepest point"). Calibrated by optimiser:
# - sgd (SmolLM2-135M LoRA, sample notes, momentum 0.9): the winner 2.7e-3 diverged by step 30
#   (held-out 5.43 -> 23.9 at step 40) while 3e-4 (winner / 9) lowers the loss steadily;
# - adam and sign move every coordinate by ~lr whatever the noise, so one notch is enough
#   (all-MiniLM-L6-v2 zero head, topics, onesided q=8: winner 0.03; 1e-2 = winner / 3 reaches
#   held-out loss 0.40 in 3000 steps, 3.3e-3 = winner / 9 only 0.64 in 2000).
BACKOFF = {"sgd": GRID**2, "adam": GRID, "sign": GRID}
PROBE_BATCHES = 2  # probe set: this many training batches the trials do not train on


@dataclass
class TuneResult:
    lr: float
    mu: float
    evaluations: int
    seconds: float = 0.0
    probe_before: float = float("nan")
    trials: list[dict[str, Any]] = field(default_factory=list)  # lr, probe loss, evaluations
    mu_trials: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """As JSON values: a non-finite float (no probe measured) becomes null."""
        return _finite(asdict(self))


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def worst_case_evaluations(
    steps: int,
    per_step: float,
    batch_size: int,
    probe_examples: int,
    tune_mu: bool,
    tune_lr: bool = True,
) -> int:
    """The most forward evaluations (training-batch units) a selection can cost."""
    probe = math.ceil(probe_examples / batch_size)
    lr_cost = (3 + MAX_EXTEND) * (math.ceil(steps * per_step) + probe) + probe if tune_lr else 0
    return lr_cost + ((1 + 2 * MU_DIRECTIONS * (MU_TRIES + 1)) if tune_mu else 0)


def check_mu(
    engine: ZOEngine,
    loss: Callable[[], float],
    mu: float,
    log,
    curvature: bool = True,
    directions: int = MU_DIRECTIONS,
    smoothness: bool = False,
) -> tuple[float, list[dict[str, Any]], int]:
    """μ adjusted until loss differences along a few directions are signal, not float32 noise
    (and, with ``curvature``, not dominated by the second-order part — noise in a one-sided
    estimate, cancelled by a central one); with ``smoothness``, then the smoothness check
    (module docstring), whose result is the last entry of the tries (``rough``) and, when the
    loss is not smooth, a warning line; returns (μ, the tries, evaluations spent)."""
    perturber = engine.perturber
    us = [plain(0, i) for i in range(directions)]
    tries: list[dict[str, Any]] = []
    perturber.at_theta()
    f0 = loss()
    evals = 1
    for _ in range(MU_TRIES):
        pairs = [_pair(engine, u, mu, loss) for u in us]
        evals += 2 * len(us)
        finite = all(np.isfinite(x) for pair in pairs for x in pair)
        d = float(np.sqrt(np.mean([((fp - fm) / 2.0) ** 2 for fp, fm in pairs])))
        c = float(np.sqrt(np.mean([((fp + fm) / 2.0 - f0) ** 2 for fp, fm in pairs])))
        tries.append({"mu": mu, "first_order": d, "second_order": c, "f0": f0})
        if not finite or (curvature and c > d):
            verdict, new = "curvature dominates", mu / 10.0
        elif d < NOISE * abs(f0):
            verdict, new = "below float32 noise", mu * 10.0
        else:
            break
        log(
            f"edgezo: autotune: μ {mu:g}: {verdict} (first-order {d:.3g}, second-order "
            f"{c:.3g}, RMS over {len(us)} directions); trying μ {new:g}"
        )
        mu = new
    else:  # no try settled it: keep a μ that was measured, never the next untried one
        last = tries[-1]
        bound = curvature and last["second_order"] > last["first_order"]
        mu = tries[0]["mu"] if bound else last["mu"]
        log(
            f"edgezo: autotune: μ not settled in {MU_TRIES} tries; using μ {mu:g} (measured "
            "above); pass mu= to choose it"
        )
    if smoothness:
        at_mu = [_pair(engine, u, mu, loss) for u in us]
        at_quarter = [_pair(engine, u, mu / 4.0, loss) for u in us]
        evals += 4 * len(us)
        g1 = np.array([(fp - fm) / (2.0 * mu) for fp, fm in at_mu])
        g2 = np.array([(fp - fm) / (0.5 * mu) for fp, fm in at_quarter])
        scale = max(float(np.sqrt(np.mean(g1**2))), float(np.sqrt(np.mean(g2**2))))
        rough = float(np.sqrt(np.mean((g1 - g2) ** 2)) / scale) if scale > 0 else 0.0
        tries.append({"mu": mu, "smoothness_check": True, "rough": rough})
        if not np.isfinite(rough) or rough > ROUGH:
            log(
                f"edgezo: autotune: warning: the loss is not smooth in the trainable tensors: "
                f"derivative estimates along the same directions at μ {mu:g} and {mu / 4:g} "
                f"differ by {rough:.3g} (RMS, relative; a smooth loss: < {ROUGH:g}), so finite "
                "differences measure rounding, not slope, and ZO steps will not learn. A "
                "bundle whose trained graph quantises activations at run time does this "
                "(edgezo export --precision int8 --precision-scope all): re-export with "
                "--precision-scope prefix or --precision fp32"
            )
    return mu, tries, evals


def _pair(engine: ZOEngine, u, mu: float, loss: Callable[[], float]) -> tuple[float, float]:
    p = engine.perturber
    p.to(u, mu)
    fp = loss()
    p.to(u, -mu)
    fm = loss()
    p.reset()
    p.at_theta()
    return fp, fm


def select_lr(
    engine: ZOEngine,
    default_lr: float,
    mu: float,
    steps: int,
    train_loss: Callable[[int], Callable[[], float]],
    probe_loss: Callable[[], float],
    probe_cost: int,
    log,
) -> tuple[float, float, list[dict[str, Any]], int, str]:
    """The learning-rate race; returns (lr, probe loss before, trials, evaluations, note).

    ``train_loss(step)`` gives the loss closure of training batch ``step``; ``probe_loss()``
    the mean loss on the probe set at the current feed (``probe_cost`` evaluations).
    """
    params, opt = engine.params, engine.optimizer
    theta0 = params.master.copy()
    state0 = {k: v.copy() for k, v in opt.state().items()}
    engine.perturber.at_theta()
    before = probe_loss()
    evals = probe_cost
    results: dict[int, dict[str, Any]] = {}

    def trial(j: int) -> float:
        nonlocal evals
        lr = default_lr * GRID**j
        spent = 0
        try:
            for t in range(steps):
                rec = engine.step(t, lr, mu, train_loss(t))
                spent += len(rec["losses"])
                if rec["status"] != "ok":
                    break
            engine.perturber.at_theta()
            probe = probe_loss() if rec["status"] == "ok" else float("nan")
            spent += probe_cost
        finally:
            params.master[:] = theta0
            opt.load_state(state0)
            engine.perturber.at_theta()
        evals += spent
        probe = probe if np.isfinite(probe) else float("inf")
        results[j] = {"lr": lr, "probe_loss": probe, "evaluations": spent}
        log(
            f"edgezo: autotune: lr {lr:.3g}: probe loss {before:.4f} -> {probe:.4f} "
            f"after {steps} steps"
        )
        return probe

    for j in (-1, 0, 1):
        trial(j)
    for _ in range(MAX_EXTEND):
        best = min(results, key=lambda j: results[j]["probe_loss"])
        if results[best]["probe_loss"] > before:
            trial(min(results) - 1)  # every candidate made things worse: go smaller
        elif not results[best]["probe_loss"] < before:
            break  # nothing moved the loss at all: the fallback, not a wider grid
        elif best == max(results):
            trial(best + 1)
        elif best == min(results):
            trial(best - 1)
        else:
            break
    best = min(results, key=lambda j: results[j]["probe_loss"])
    trials = [results[j] for j in sorted(results)]
    if not results[best]["probe_loss"] < before:
        note = (
            f"no candidate lr lowered the probe loss ({before:.4f}) in {steps} steps; "
            f"kept the default lr {default_lr:g}"
        )
        return default_lr, before, trials, evals, note
    backoff = BACKOFF.get(engine.settings.optimizer, GRID**2)
    return results[best]["lr"] / backoff, before, trials, evals, ""


def autotune(
    engine: ZOEngine,
    *,
    lr: float | None,
    default_lr: float,
    mu: float,
    tune_mu: bool,
    steps: int,
    batches: Callable[[int], dict[str, np.ndarray]],
    probe: Sequence[dict[str, np.ndarray]],
    probe_cost: int,
    mean_loss: Callable[[dict[str, np.ndarray]], float],
    log,
) -> TuneResult:
    """Choose μ (when ``tune_mu``) and lr (when ``lr`` is None) for ``engine``'s run."""
    import time

    t0 = time.perf_counter()
    evals = 0
    mu_trials: list[dict[str, Any]] = []
    if tune_mu:
        first = batches(0)
        mu, mu_trials, spent = check_mu(
            engine, lambda: mean_loss(first), mu, log, curvature=False, smoothness=True
        )
        evals += spent

    def probe_loss() -> float:
        return float(np.mean([mean_loss(b) for b in probe]))

    def train_loss(t: int) -> Callable[[], float]:
        b = batches(t)
        return lambda: mean_loss(b)

    note = ""
    before = float("nan")
    trials: list[dict[str, Any]] = []
    if lr is None:
        lr, before, trials, spent, note = select_lr(
            engine, default_lr, mu, steps, train_loss, probe_loss, probe_cost, log
        )
        evals += spent
    return TuneResult(
        lr=lr,
        mu=mu,
        evaluations=evals,
        seconds=time.perf_counter() - t0,
        probe_before=before,
        trials=trials,
        mu_trials=mu_trials,
        note=note,
    )
