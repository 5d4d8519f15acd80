"""The fine-tuning run's configuration: one validated dataclass, from YAML plus CLI overrides."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .configio import Problems, from_dict, load_yaml
from .errors import ConfigError
from .zo import scales
from .zo.directions import ALL_KINDS
from .zo.estimators import ESTIMATORS, SCHEDULES
from .zo.optim import HIZOO_ESTIMATES, HIZOO_KINDS, HIZOO_POOLS, OPTIMIZERS, SCHEDULE_KINDS

# the choices of the registry-backed fields, from the registries themselves
DIRECTIONS = ALL_KINDS
ESTIMATOR_NAMES = tuple(ESTIMATORS)
OPTIMIZER_NAMES = tuple(OPTIMIZERS)

# Per trainable-mode recipes: lr, perturbation size μ, momentum and what else a mode sets;
# what it does not name falls back to RECIPE_DEFAULTS. Each value's measurement:
# docs/benchmarks/recipes.md.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    # LoRA on every block: reached MeZO's 300-evaluation loss in 30-35 evaluations
    "lora": {
        "lr": 1e-3,
        "mu": 1e-2,
        "momentum": 0.9,
        "estimator": "onesided",
        "q": 4,
        "direction": "sphere",
        "steps": 100,
        "lr_race": False,
    },
    # LoRA-FA (B only; A frozen) on the last blocks with a cached frozen prefix: the default
    "lora_fa": {
        "lr": 2e-1,
        "mu": 1e-2,
        "momentum": 0.9,
        "estimator": "onesided",
        "q": 4,
        "direction": "sphere",
        "steps": 500,
        "batch_size": 4,
        "eval_batch_size": 4,
        "lr_race": False,
    },
    "norms": {"lr": 3e-4, "mu": 1e-2, "momentum": 0.9},  # LoRA's values, not tuned yet
    "full": {"lr": 1e-6, "mu": 1e-3, "momentum": 0.0},  # MeZO's; no buffer beside θ
    # int4 quantisation scales (4.2M values on SmolLM2): central q=1, plain SGD; 1e-2 diverged
    "scales": {"lr": 3e-3, "mu": 1e-3, "momentum": 0.0, "lr_race": False},
    # a zero head over a cached encoder: Adam, q=8; 88-90% accuracy in 2,000-3,000 cheap steps
    "head": {
        "lr": 1e-2,
        "mu": 1e-3,
        "momentum": 0.0,
        "optimizer": "adam",
        "estimator": "onesided",
        "q": 8,
        "steps": 2000,
    },
}


def recipe_key(mode: str, lora: dict | None = None) -> str:
    """The MODE_DEFAULTS entry for a bundle: its trainable mode, or ``lora_fa`` for LoRA with
    ``A`` frozen (its B-only steps take a learning rate ~200x LoRA's)."""
    return "lora_fa" if mode == "lora" and (lora or {}).get("freeze_a") else mode


RECIPE_DEFAULTS: dict[str, Any] = {
    "steps": 200,
    "batch_size": 8,
    "q": 1,
    "estimator": "central",
    "optimizer": "sgd",
    "direction": "rademacher",
    "autotune_steps": 8,
    "lr_race": True,
    "eval_batch_size": 16,
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class FinetuneConfig:
    bundle: str | None = _f(None, "bundle folder; default: the SmolLM2-135M LoRA bundle")
    data: str | None = _f(None, "JSONL training data; default: the embedded sample notes")
    eval_data: str | None = _f(None, "JSONL held-out data; default: a split of --data")
    holdout_fraction: float = _f(0.2, "share of --data held out when no eval_data is given")
    out: str | None = _f(None, "run folder (ledger, checkpoints, metrics); default runs/<time>")
    steps: int | None = _f(
        None, "ZO steps to run; default per trainable mode (200; lora: 100; head: 2000)"
    )
    batch_size: int | None = _f(
        None,
        "examples per step; default per mode (8; lora_fa: 4 — its steps are cheap and "
        "the direction noise, not the batch's, dominates)",
    )
    max_length: int = _f(64, "tokens per example (longer ones are truncated)")
    lr: float | None = _f(None, "learning rate; default per trainable mode (MODE_DEFAULTS)")
    mu: float | None = _f(None, "perturbation size μ; default per trainable mode")
    q: int | None = _f(None, "random directions per step; default per mode (1; lora: 4; head: 8)")
    direction: Literal[DIRECTIONS] | None = _f(
        None,
        "direction distribution (sphere: uniform on the radius-√d sphere; cone: on a cone of "
        "half-angle cone_angle around the momentum, sphere until it exists — needs momentum "
        "> 0 or adam; docs/concepts/zo-step.md); default per mode (rademacher; lora: sphere)",
    )
    cone_angle: float = _f(
        60.0,
        "direction=cone: degrees between each probe direction and the momentum, in (0, 90); "
        "60 puts cos² = 1/4 of each probe's energy on the momentum direction",
    )
    estimator: Literal[ESTIMATOR_NAMES] | None = _f(
        None,
        "gradient estimator: central two-point (2q forwards), onesided (q+1), "
        "mirrored: central plus a shared base, whose second differences feed hizoo (2q+1), "
        "fzoo: onesided normalised by the spread of the q probe losses (q+1; §7), "
        "dap: directionally aligned (2q+1), p3/p4: unbiased multi-level "
        "(docs/concepts/literature.md §3); "
        "default per mode (central; lora, head: onesided)",
    )
    optimizer: Literal[OPTIMIZER_NAMES] | None = _f(
        None,
        "update rule: sgd (with momentum), adam (two flat buffers of θ's size), sign, "
        "hizoo: sgd with a diagonal curvature preconditioner learnt from estimator=mirrored "
        "(one more buffer of θ's size; docs/concepts/zo-step.md); "
        "default per mode (sgd; head: adam)",
    )
    hizoo_beta: float = _f(
        0.99, "optimizer=hizoo: decay of the moving average of the curvature estimates, in [0, 1)"
    )
    hizoo_pool: Literal[HIZOO_POOLS] = _f(
        "tensor",
        "optimizer=hizoo: one curvature per trainable tensor (the mean of its values' "
        "estimates) or one per value (needs of the order of d² probes to resolve)",
    )
    hizoo_max_scale: float = _f(
        4.0,
        "optimizer=hizoo: the preconditioner's factor on the perturbation stays in [1/M, M] "
        "(the step's in [1/M², M²]); >= 1",
    )
    hizoo_estimate: Literal[HIZOO_ESTIMATES] = _f(
        "baseline",
        "optimizer=hizoo: the curvature estimate: baseline (each second difference minus the "
        "running mean of the past ones, averaged with bias correction: ~6x less noise on the "
        "LM task) or moment (the first version, without the baseline)",
    )
    hizoo_warmup: int = _f(
        20, "optimizer=hizoo: updates with the preconditioner at 1 while the curvature averages"
    )
    svrg_period: int = _f(
        50,
        "estimator=svrg: an anchor pass every N steps (its step moves along the anchor's "
        "estimate alone; docs/concepts/zo-step.md)",
    )
    svrg_anchor_q: int = _f(8, "estimator=svrg: directions of each anchor pass")
    svrg_anchor_batches: int = _f(
        16,
        "estimator=svrg: batches (of batch_size) in the anchor sample, a fixed seeded sample "
        "of the training set; each anchor pass costs (svrg_anchor_q + 1) x this many forwards",
    )
    mu_scale: str = _f(
        "",
        "per-tensor perturbation factors: comma-separated key=value, key a tensor name, a "
        "role (norm, lora_b, ...) or *, value a number > 0 or rms (the tensor's RMS at the "
        "start; 1 for an all-zero tensor); a tensor is perturbed by mu x its factor and moves "
        "factor² as far; e.g. norm=0.1 or rms; empty: off",
    )
    adam_beta1: float = _f(0.9, "Adam's first-moment decay β₁")
    adam_beta2: float = _f(0.999, "Adam's second-moment decay β₂")
    adam_eps: float = _f(1e-8, "Adam's ε")
    level_schedule: Literal[SCHEDULES] = _f(
        "geometric", "p3/p4 level distribution: geometric (μ_n = μ·c^(n-1)) or zipf"
    )
    level_ratio: float = _f(0.5, "p3/p4 geometric ratio c in (0, 1)")
    zipf_s: float = _f(2.0, "p3/p4 Zipf exponent s > 1")
    mu_floor: float = _f(
        1e-5,
        "p3/p4 clamp μ_n at this floor (counted as mu_floor_hits); fp32 forwards make "
        "smaller μ_n noise, not signal",
    )
    momentum: float | None = _f(
        None, "momentum β of ZO-SGD (0: plain SGD, no extra buffer); default per mode"
    )
    weight_decay: float = _f(0.0, "decoupled weight decay λ")
    clip: float | None = _f(None, "clip each projected gradient to [-clip, clip]")
    schedule: Literal[SCHEDULE_KINDS] = _f("constant", "learning-rate schedule")
    warmup_steps: int = _f(0, "linear warm-up steps")
    seed: int = _f(0, "run seed: directions and data order")
    eval_every: int = _f(50, "held-out evaluation every N steps (0: only before and after)")
    divergence_tolerance: float = _f(
        0.1, "roll back when the held-out loss rises this fraction above its best (0: never)"
    )
    plateau_factor: float = _f(
        0.5,
        "multiply the learning rate by this when the run, after improving, stalls: "
        "plateau_patience held-out evaluations in a row without progress, the last no lower "
        "than the one before (a constant-lr ZO run stalls at a noise floor set by lr); 1: off",
    )
    plateau_patience: int = _f(
        2, "held-out evaluations in a row without progress before the learning rate is decayed"
    )
    plateau_max_decays: int = _f(4, "most plateau decays of the learning rate in a run")
    plateau_min_lr_ratio: float = _f(
        0.05, "plateau decays stop before the learning rate falls below this x the configured one"
    )
    max_rollbacks: int = _f(3, "rollbacks (each halves the learning rate) before giving up")
    eval_batch_size: int | None = _f(
        None,
        "examples per held-out evaluation (and prefix-caching) batch; default per mode "
        "(16; lora_fa: 4 — its suffix's LM-head activations at 16 rows doubled a run's peak "
        "memory)",
    )
    checkpoint_every: int | None = _f(
        None, "atomic checkpoint every N steps; default: the device profile's, else 25"
    )
    provider: Literal["cpu", "cuda"] | None = _f(
        None, "ONNX Runtime execution provider; default: the device profile's order, else cpu"
    )
    threads: int | None = _f(
        None, "intra-op threads (0: all cores); default: the device profile's, else 0"
    )
    device: str | None = _f(
        None, "device profile (name, family or YAML path): caps, providers and budgets"
    )
    micro_batch_size: int | None = _f(
        None, "examples per forward call (exact for ZO); default: the profile's max_batch_size"
    )
    eval_budget: int | None = _f(
        None, "training forward evaluations per session; default: the device profile's"
    )
    time_budget_s: float | None = _f(
        None, "wall-clock seconds per session; default: the device profile's"
    )
    autotune: bool = _f(
        True,
        "when lr / mu are not given, choose them at the start of the run with a short "
        "learning-rate race and a μ check (bounded, reported forward evaluations; "
        "edgezo.autotune)",
    )
    lr_race: bool | None = _f(
        None,
        "with autotune and no lr given, choose lr by the race; default per mode (on; "
        "lora: off, its measured lr is used — MODE_DEFAULTS)",
    )
    autotune_steps: int | None = _f(
        None, "ZO steps each candidate learning rate runs in the race (default 8)"
    )
    cache_prefix: bool = _f(
        True,
        "when the bundle carries a frozen-prefix split (a classification head over a "
        "frozen encoder, LoRA on a causal LM's last blocks), compute each example's prefix "
        "once and evaluate only the suffix",
    )
    cache_prefix_mb: float = _f(
        1024.0,
        "most MiB the cached prefix rows of the training and held-out data may take in "
        "memory; a larger cache is written to prefix_rows.bin in the run folder and "
        "memory-mapped (read per batch)",
    )
    vocab_subset: int = _f(
        8192,
        "training losses of a causal LM normalise the LM head's softmax over every token of "
        "the training data plus the N most frequent ones (the lowest ids of a BPE "
        "vocabulary) instead of the whole vocabulary, when the bundle has a "
        "vocabulary-subset suffix: the head is half of a step's work, and the step's "
        "direction stays within a few degrees; held-out losses always use the whole "
        "vocabulary; 0: the whole vocabulary in training too",
    )
    vocab_sample: int = _f(
        2048,
        "with vocab_subset: this many of the other tokens, drawn once per run from the seed, "
        "stand in for all of them in the training softmax (each weighted by the share it "
        "stands for), so the normaliser keeps the rest of the vocabulary; 0: none",
    )
    perturbation: Literal["auto", "copy", "inplace"] = _f(
        "auto",
        "copy: separate feed buffer; inplace: perturb θ itself (no extra memory); "
        "auto: inplace when the trainable tensors exceed 64 MiB",
    )

    def __post_init__(self) -> None:
        problems = Problems()
        for rule in _RULES:
            rule(self, problems)
        if problems:
            raise problems.error()  # from_dict names the file and merges its own problems

    @classmethod
    def load(
        cls, path: str | None = None, overrides: dict[str, Any] | None = None
    ) -> FinetuneConfig:
        data = load_yaml(path) if path else {}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return from_dict(cls, data, where=path or "finetune config")

    def resolved(self, mode: str) -> FinetuneConfig:
        """A copy with the recipe (steps, q, estimator, optimizer), lr, μ and momentum filled
        from the trainable mode's defaults."""
        defaults = MODE_DEFAULTS.get(mode)
        d = asdict(self)
        for key, fallback in RECIPE_DEFAULTS.items():
            if d[key] is None:
                d[key] = (defaults or {}).get(key, fallback)
        if d["optimizer"] == "adam" and d["momentum"] is None:
            d["momentum"] = 0.0  # Adam's own first moment (adam_beta1) replaces it
        for key in ("lr", "mu", "momentum"):
            if d[key] is None:
                if defaults is None:
                    raise ConfigError(
                        f"no default {key} for trainable mode {mode!r}", f"pass {key}= explicitly"
                    )
                d[key] = defaults[key]
        return FinetuneConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- validation: one rule per line, each naming its field, its range and the bad value ------


def _range(name: str, ok, what: str):
    """A rule: the field ``name`` (when set) must satisfy ``ok``; ``what`` says the range."""
    fix = f"set {name} {what.split(',')[0]} (or leave it out for the default)"

    def rule(cfg: FinetuneConfig, problems: Problems) -> None:
        v = getattr(cfg, name)
        if v is None:
            return
        if isinstance(v, float) and not math.isfinite(v):
            problems.add(name, f"must be a finite number ({what}), got {v}", fix)
        elif not ok(v):
            problems.add(name, f"must be {what}, got {v!r}", fix)

    return rule


def _rule(name: str, check, what: str, fix: str):
    """A cross-field rule on ``name``: ``check(cfg)`` true means ``what`` (formatted with c)."""

    def rule(cfg: FinetuneConfig, problems: Problems) -> None:
        if check(cfg):
            problems.add(name, what.format(c=cfg), fix.format(c=cfg))

    return rule


def _mu_scale_rule(cfg: FinetuneConfig, problems: Problems) -> None:
    try:
        scales.parse(cfg.mu_scale)
    except ValueError as e:
        problems.add(
            "mu_scale",
            f"{cfg.mu_scale!r}: {e}",
            "write key=value pairs, e.g. mu_scale=norm=0.1,lora_b=1 or mu_scale=rms",
        )


_RULES = [
    *(
        _range(n, lambda v: v >= 1, ">= 1")
        for n in (
            "steps",
            "batch_size",
            "q",
            "eval_batch_size",
            "checkpoint_every",
            "micro_batch_size",
            "eval_budget",
            "autotune_steps",
            "plateau_patience",
            "svrg_period",
            "svrg_anchor_q",
            "svrg_anchor_batches",
        )
    ),
    *(
        _range(n, lambda v: v >= 0, ">= 0")
        for n in (
            "eval_every",
            "warmup_steps",
            "seed",
            "threads",
            "max_rollbacks",
            "plateau_max_decays",
            "divergence_tolerance",
            "weight_decay",
            "vocab_subset",
            "vocab_sample",
            "hizoo_warmup",
        )
    ),
    _range("max_length", lambda v: v >= 2, ">= 2"),
    _range("lr", lambda v: v > 0, "> 0, e.g. 1e-3"),
    _range("mu", lambda v: v > 0, "> 0, e.g. 1e-2"),
    _range("momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    _range("clip", lambda v: v > 0, "> 0 (or null for no clipping)"),
    _range("holdout_fraction", lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    _range("time_budget_s", lambda v: v > 0, "> 0 seconds (or null)"),
    _range("cache_prefix_mb", lambda v: v > 0, "> 0 (cache_prefix=false turns the cache off)"),
    _range("plateau_factor", lambda v: 0.0 < v <= 1.0, "in (0, 1] (1: off)"),
    _range("plateau_min_lr_ratio", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    _range("adam_beta1", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    _range("adam_beta2", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    _range("adam_eps", lambda v: v > 0, "> 0"),
    _range("level_ratio", lambda v: 0.0 < v < 1.0, "in (0, 1) so that μ_n = μ·c^(n-1) decreases"),
    _range("zipf_s", lambda v: v > 1.0, "> 1 (ζ(s) diverges otherwise)"),
    _range("mu_floor", lambda v: v > 0, "> 0"),
    _range("cone_angle", lambda v: 0.0 < v < 90.0, "between 0 and 90 degrees (exclusive), e.g. 60"),
    _range("hizoo_beta", lambda v: 0.0 <= v < 1.0, "in [0, 1), e.g. 0.99"),
    _range("hizoo_max_scale", lambda v: v >= 1.0, ">= 1, e.g. 4"),
    _mu_scale_rule,
    _rule(
        "optimizer",
        lambda c: c.optimizer == "hizoo" and c.estimator not in (None, "mirrored"),
        "hizoo learns its curvature from the mirrored estimator's second differences, and "
        "estimator is {c.estimator}",
        "set estimator=mirrored (2q+1 forwards; q=2 costs the default's 5), or use optimizer=sgd",
    ),
    _rule(
        "direction",
        lambda c: c.optimizer == "hizoo" and c.direction not in (None, *HIZOO_KINDS),
        "hizoo reads the curvature's diagonal from the directions' squared entries, and "
        "{c.direction} directions carry none",
        "set direction=sphere or direction=gaussian",
    ),
    _rule(
        "estimator",
        lambda c: c.estimator == "svrg" and (c.direction == "cone" or c.optimizer == "hizoo"),
        "svrg regenerates its anchor's directions for many steps, which a cone (leaning on the "
        "momentum of its own step) or hizoo (rescaling every step) would change",
        "use direction=sphere and optimizer=sgd (or adam) with estimator=svrg",
    ),
    _rule(
        "perturbation",
        lambda c: c.estimator == "svrg" and c.perturbation == "inplace",
        "inplace moves θ itself, and svrg evaluates its anchor θ̃ beside θ",
        "set perturbation=copy (or auto: copy below 64 MB of trainable values)",
    ),
    _rule(
        "direction",
        lambda c: (
            c.direction == "cone"
            and c.momentum == 0
            and c.optimizer is not None  # None: the mode's, checked once resolved
            and c.optimizer != "adam"
        ),
        "cone leans each probe on the momentum, and momentum is 0 (optimizer "
        "{c.optimizer}): there is none",
        "set momentum (e.g. momentum=0.9) or optimizer=adam, or use direction=sphere",
    ),
    _rule(
        "momentum",
        lambda c: c.optimizer == "adam" and bool(c.momentum),
        "({c.momentum}) is for optimizer sgd or sign; adam uses adam_beta1",
        "drop momentum or set it to 0",
    ),
    _rule(
        "mu_floor",
        lambda c: (
            c.estimator in ("p3", "p4")
            and c.mu is not None
            and math.isfinite(c.mu)
            and math.isfinite(c.mu_floor)
            and 0 < c.mu <= c.mu_floor
        ),
        "({c.mu_floor}) must be below mu ({c.mu}) for estimator {c.estimator}",
        "lower mu_floor (e.g. mu_floor={c.mu}/100) or raise mu",
    ),
]
