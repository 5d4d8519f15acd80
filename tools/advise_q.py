"""Suggest q (directions per step) for a bundle from measured loss-change agreement.

The runtime-only side of the kernel view (docs/concepts/literature.md §5): no Jacobian, no
torch — edgezo's direction generator, flat parameters and ONNX Runtime loss runner only. At
the bundle's θ, for each of ``--trials`` fixed batch pairs (A for the estimate, B held out):

1. central projected gradients g_i = (f_A(θ+μz_i) − f_A(θ−μz_i)) / 2μ, i < max(q)
   (2·max(q) forwards);
2. for each q and each disjoint block of q of those directions (max(q)/q blocks: independent
   q-direction steps, so small q, the noisiest, gets the most samples), the ZO-SGD step
   Δθ = −η ĝ, ĝ = (1/q) Σ g_i z_i (applied with ``FlatParams.move``, so positive tensors
   move multiplicatively, exactly as in training);
3. its predicted first-order loss change. ∇f·Δθ = −(η/q) Σ_i g_i (z_iᵀ∇f), and z_iᵀ∇f *is*
   what g_i measures (up to O(μ²)), so

       ΔL_pred = −(η/q) Σ_i g_i²        (same directions; no d anywhere)

   The tempting plug-in ĝ·Δθ = −η‖ĝ‖² uses ĝ twice: E‖ĝ‖² ≈ ‖∇f‖²(1 + (d+1)/q), so it
   overstates the change ≈ d/q-fold. Its ratio to ΔL_pred is printed (``ghat/pred``) as a check;
4. the measured change with one forward at θ+Δθ on A (same batch: is η in the linear regime?)
   and on B (held out: does the step the q directions chose generalise?).

Forwards per trial: 2·max(q) + 2 (losses at θ on A and B) + 2·Σ_q max(q)/q. Per q (``n``
steps measured): ``same_sign`` / ``held_sign`` = fraction of trials whose measured change has the
predicted sign (a decrease); ``*_ratio`` = median measured/predicted; ``held_corr`` = Pearson
correlation of predicted and measured held-out changes over trials (needs ≥ 3). The suggestion
is the smallest q whose held-out sign agreement reaches ``--threshold`` (the cost: 2q forwards
per step with the central estimator). If the same-batch agreement is poor, η is too large for
a first-order prediction; lower ``--lr``. When no listed q reaches the threshold, the mean and
spread of the held-out changes give a rough extrapolation (variance ∝ 1/q, mean independent
of q; see :func:`_extrapolate`).

Usage::

    python tools/advise_q.py --bundle DIR [--data FILE] [--eval-data FILE] [--qs 1 2 4 8]
                             [--trials 8] [--lr 1e-3] [--mu 1e-2] [--threads 1]

Default data: the embedded sample notes (training file for A, held-out file for B).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from edgezo.bundle import load_bundle
from edgezo.config import MODE_DEFAULTS, recipe_key
from edgezo.data import BatchStream, read_jsonl, tokenize
from edgezo.defaults import default_data
from edgezo.runner import LossRunner, RuntimeOptions
from edgezo.train import BATCH_INPUTS
from edgezo.zo.directions import KINDS, Directions
from edgezo.zo.params import FlatParams

COLUMNS = (
    "q",
    "fwd_per_step",
    "n",
    "same_sign",
    "same_ratio",
    "held_sign",
    "held_corr",
    "held_ratio",
    "ghat/pred",
)


@dataclass
class Advice:
    rows: list[dict[str, float]]  # one per q, keys COLUMNS
    suggested_q: int | None  # None: no q reached the threshold
    threshold: float
    evaluations: int  # forwards this advisor spent
    dim: int
    notes: list[str] = field(default_factory=list)
    extrapolated_q: float | None = None  # q for the threshold from mean/spread (rough)


class _Probe:
    """θ, its feed and the runner; sets the evaluated point θ ⊕ v (v a float32 vector)."""

    def __init__(self, bundle_dir: str | Path, threads: int):
        self.bundle = load_bundle(bundle_dir)
        self.params = FlatParams(self.bundle.manifest.trainable)
        self.params.load(self.bundle.initial_trainable(), where=str(self.bundle.path))
        self.runner = LossRunner(
            self.bundle.model_path, self.params, BATCH_INPUTS, RuntimeOptions(threads=threads)
        )

    def at_theta(self) -> None:
        self.params.sync_feed()

    def along(self, dirs: Directions, step: int, index: int, c: float) -> None:
        """feed = θ ⊕ c·z(step, index), chunk by chunk."""
        for s, _, v in dirs.chunks(step, index):
            self.params.move(self.params.master, self.params.feed, s, v * np.float32(c))

    def by(self, delta: np.ndarray) -> None:
        """feed = θ ⊕ Δθ."""
        self.params.move(self.params.master, self.params.feed, 0, delta.astype(np.float32))

    def loss(self, batch: dict[str, np.ndarray]) -> float:
        return self.runner.mean_loss(batch)


def _examples(bundle, path: str | Path, max_length: int):
    return tokenize(
        read_jsonl(path), bundle.tokenizer(), bundle.manifest.tokenizer, max_length, where=str(path)
    )


def _corr(a: list[float], b: list[float]) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def advise(
    bundle: str | Path,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    qs: tuple[int, ...] = (1, 2, 4, 8),
    trials: int = 8,
    lr: float | None = None,
    mu: float | None = None,
    batch_size: int = 8,
    max_length: int = 64,
    direction: str = "rademacher",
    seed: int = 0,
    threshold: float = 0.75,
    threads: int = 0,
    log=print,
) -> Advice:
    """Measure predicted-vs-actual loss changes per q and suggest the smallest adequate q."""
    qs = tuple(sorted(set(qs)))
    if qs[0] < 1 or trials < 1:
        raise ValueError("every q and the number of trials must be >= 1")
    if not 0.5 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0.5, 1) (a sign agreement), got {threshold}")
    probe = _Probe(bundle, threads)
    b = probe.bundle
    mode = MODE_DEFAULTS.get(
        recipe_key(b.manifest.trainable_mode, b.manifest.lora), MODE_DEFAULTS["lora"]
    )
    lr = mode["lr"] if lr is None else lr
    mu = mode["mu"] if mu is None else mu
    if data is None:
        data, sample_eval = default_data()
        eval_data = eval_data or sample_eval
    pad = b.manifest.tokenizer.pad_token_id
    train = _examples(b, data, max_length)
    stream_a = BatchStream(train, batch_size, seed, pad)
    # held-out batches: the eval file, else the odd batches of the same stream (A: the even)
    stream_b = (
        BatchStream(_examples(b, eval_data, max_length), batch_size, seed, pad)
        if eval_data is not None
        else None
    )
    dim = probe.params.dim
    dirs = Directions(seed, dim, direction)
    qmax = qs[-1]
    per_trial = 2 * qmax + 2 + sum(2 * (qmax // q) for q in qs)
    log(
        f"advise_q: {b.path} ({b.manifest.trainable_mode}): {dim:,} trainable values; "
        f"{trials} trials × {per_trial} forwards; lr {lr:g}, μ {mu:g}, "
        f"{direction}, batch {batch_size}"
    )

    pred: dict[int, list[float]] = {q: [] for q in qs}
    same: dict[int, list[float]] = {q: [] for q in qs}
    held: dict[int, list[float]] = {q: [] for q in qs}
    ghat: dict[int, list[float]] = {q: [] for q in qs}
    notes: list[str] = []
    t0 = time.perf_counter()
    for t in range(trials):
        if stream_b is None:
            batch_a, batch_b = stream_a.batch(2 * t), stream_a.batch(2 * t + 1)
        else:
            batch_a, batch_b = stream_a.batch(t), stream_b.batch(t)
        probe.at_theta()
        base_a, base_b = probe.loss(batch_a), probe.loss(batch_b)
        g = []
        for i in range(qmax):  # directions z(step=t, i): fresh per trial
            probe.along(dirs, t, i, mu)
            plus = probe.loss(batch_a)
            probe.along(dirs, t, i, -mu)
            g.append((plus - probe.loss(batch_a)) / (2.0 * mu))
        if not all(math.isfinite(x) for x in g + [base_a, base_b]):
            notes.append(f"trial {t}: a non-finite loss; skipped (lower --mu?)")
            continue
        for q in qs:  # every disjoint block of q of the directions is one q-direction step
            for blk in range(qmax // q):
                idx = range(blk * q, (blk + 1) * q)
                acc = np.zeros(dim, dtype=np.float64)  # Σ_{i in block} g_i z_i
                for i in idx:
                    for s, e, v in dirs.chunks(t, i):
                        acc[s:e] += g[i] * v.astype(np.float64)
                p = -lr / q * math.fsum(g[i] * g[i] for i in idx)
                probe.by((-lr / q) * acc)
                pred[q].append(p)
                same[q].append(probe.loss(batch_a) - base_a)
                held[q].append(probe.loss(batch_b) - base_b)
                ghat[q].append(float(-lr * np.dot(acc, acc) / q**2) / p if p else float("nan"))
        log(f"advise_q: trial {t + 1}/{trials} done ({time.perf_counter() - t0:.0f} s)")

    rows = []
    for q in qs:
        p = np.array(pred[q])
        n = max(1, len(p))
        rows.append(
            {
                "q": q,
                "fwd_per_step": 2 * q,
                "n": len(p),
                "same_sign": float(np.sum(np.sign(same[q]) == np.sign(p)) / n),
                "same_ratio": float(np.median(np.array(same[q]) / p)) if len(p) else float("nan"),
                "held_sign": float(np.sum(np.sign(held[q]) == np.sign(p)) / n),
                "held_corr": _corr(pred[q], held[q]),
                "held_ratio": float(np.median(np.array(held[q]) / p)) if len(p) else float("nan"),
                "ghat/pred": float(np.median(ghat[q])) if len(p) else float("nan"),
            }
        )
    extrapolated = _extrapolate(held, threshold)
    ok = [r["q"] for r in rows if r["held_sign"] >= threshold]
    suggested = int(ok[0]) if ok else None
    same_bad = [r["q"] for r in rows if r["same_sign"] < threshold]
    if same_bad:
        notes.append(
            f"same-batch agreement below {threshold:g} at q = {same_bad}: the step "
            f"is outside the first-order regime; lower --lr (now {lr:g})"
        )
    return Advice(rows, suggested, threshold, probe.runner.evaluations, dim, notes, extrapolated)


def _extrapolate(held: dict[int, list[float]], threshold: float) -> float | None:
    """The q at which held-out sign agreement would reach ``threshold``, from the spread.

    A q-direction step's held-out change is −(η/q) Σ g_i h_i (h_i: the held-out directional
    derivative): mean −η ∇f_A·∇f_B for every q, variance ∝ 1/q. So with m the pooled mean and
    s² the pooled q·variance, P(decrease) ≈ Φ(√q·|m|/s) and q ≈ (Φ⁻¹(threshold)·s/m)².
    None when the held-out loss does not fall on average (no q helps a single step).
    """
    xs = [(q, x) for q, v in held.items() for x in v]
    if len(xs) < 3:
        return None
    m = float(np.mean([x for _, x in xs]))
    s2 = float(np.mean([q * (x - m) ** 2 for q, x in xs]))
    if m >= 0 or s2 <= 0:
        return None
    return (NormalDist().inv_cdf(threshold) * math.sqrt(s2) / m) ** 2


def format_table(advice: Advice) -> str:
    widths = [max(8, len(c)) for c in COLUMNS]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, widths, strict=True))]
    for r in advice.rows:
        cells = []
        for c, w in zip(COLUMNS, widths, strict=True):
            v = r[c]
            cells.append(
                f"{int(v):>{w}d}"
                if c in ("q", "fwd_per_step", "n")
                else f"{v:>{w}.3g}"
                if c == "ghat/pred"
                else f"{v:>{w}.2f}"
            )
        lines.append("  ".join(cells))
    if advice.suggested_q is None:
        lines.append(
            f"suggestion: none of these q reached held-out sign agreement "
            f"{advice.threshold:g}; try larger q or more --trials"
        )
    else:
        q = advice.suggested_q
        lines.append(
            f"suggestion: q = {q} (smallest with held-out sign agreement ≥ "
            f"{advice.threshold:g}); cost {2 * q} forwards per step with the central "
            f"estimator, {1000 // (2 * q)} steps per 1000 forwards"
        )
    if advice.extrapolated_q is None:
        lines.append(
            "extrapolation: the held-out loss did not fall on average over these "
            "steps, so no q makes a single step agree; with few trials the mean is "
            "noise — run more --trials to tell"
        )
    else:
        lines.append(
            f"extrapolation (mean and spread of the held-out changes, rough with few "
            f"trials): q ≈ {advice.extrapolated_q:.3g} for agreement "
            f"{advice.threshold:g}"
        )
    lines += [f"note: {n}" for n in advice.notes]
    lines.append(f"advisor spent {advice.evaluations} forward evaluations (d = {advice.dim:,})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Advice:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="bundle folder (edgezo export)")
    ap.add_argument(
        "--data",
        default=None,
        help="JSONL as edgezo finetune reads (default: the embedded sample notes)",
    )
    ap.add_argument(
        "--eval-data",
        default=None,
        help="JSONL for the held-out batches "
        "(default: the sample's held-out file, or other batches of --data)",
    )
    ap.add_argument("--qs", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--trials", type=int, default=8, help="batch pairs (A, B) measured")
    ap.add_argument("--lr", type=float, default=None, help="η (default: the mode's lr)")
    ap.add_argument("--mu", type=float, default=None, help="μ (default: the mode's μ)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--direction", default="rademacher", choices=KINDS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threshold",
        type=float,
        default=0.75,
        help="held-out sign agreement the suggested q must reach",
    )
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all)")
    args = ap.parse_args(argv)
    if min(args.qs) < 1 or args.trials < 1:
        ap.error("--qs and --trials must be >= 1")
    if (args.lr is not None and args.lr <= 0) or (args.mu is not None and args.mu <= 0):
        ap.error("--lr and --mu must be > 0")
    if not 0.5 < args.threshold < 1.0:
        ap.error("--threshold is a sign agreement: give a value in (0.5, 1), e.g. 0.75")
    advice = advise(
        args.bundle,
        args.data,
        args.eval_data,
        tuple(args.qs),
        args.trials,
        args.lr,
        args.mu,
        args.batch_size,
        args.max_length,
        args.direction,
        args.seed,
        args.threshold,
        args.threads,
    )
    print(format_table(advice))
    return advice


if __name__ == "__main__":
    main()
