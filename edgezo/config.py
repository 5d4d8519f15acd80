"""The fine-tuning run's configuration: one validated dataclass, from YAML plus CLI overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .configio import from_dict, load_yaml
from .errors import ConfigError
from .zo.directions import KINDS

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
    direction: Literal["rademacher", "gaussian", "sphere"] | None = _f(
        None,
        "direction distribution (sphere: uniform on the radius-√d sphere); default per "
        "mode (rademacher; lora: sphere)",
    )
    estimator: Literal["central", "onesided", "dap", "p3", "p4"] | None = _f(
        None,
        "gradient estimator: central two-point (2q forwards), onesided (q+1), "
        "dap: directionally aligned (2q+1), p3/p4: unbiased multi-level (papers.md §3); "
        "default per mode (central; lora, head: onesided)",
    )
    optimizer: Literal["sgd", "adam", "sign"] | None = _f(
        None,
        "update rule: sgd (with momentum), adam (two flat buffers of θ's size), sign; "
        "default per mode (sgd; head: adam)",
    )
    adam_beta1: float = _f(0.9, "Adam's first-moment decay β₁")
    adam_beta2: float = _f(0.999, "Adam's second-moment decay β₂")
    adam_eps: float = _f(1e-8, "Adam's ε")
    level_schedule: Literal["geometric", "zipf"] = _f(
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
    schedule: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate schedule")
    warmup_steps: int = _f(0, "linear warm-up steps")
    seed: int = _f(0, "run seed: directions and data order")
    eval_every: int = _f(50, "held-out evaluation every N steps (0: only before and after)")
    divergence_tolerance: float = _f(
        0.1, "roll back when the held-out loss rises this fraction above its best (0: never)"
    )
    plateau_factor: float = _f(
        0.5,
        "multiply the learning rate by this when a held-out evaluation (eval_every), after "
        "the run has improved, is no lower than every earlier one and than the previous one: "
        "a constant-lr ZO run stalls at a noise floor set by lr; 1 turns it off",
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
        "most MiB the cached prefix rows of the training and held-out data may take; "
        "a larger cache is not built and the run evaluates the full graph",
    )
    perturbation: Literal["auto", "copy", "inplace"] = _f(
        "auto",
        "copy: separate feed buffer; inplace: perturb θ itself (no extra memory); "
        "auto: inplace when the trainable tensors exceed 64 MiB",
    )

    def __post_init__(self) -> None:
        problems = []
        positive_ints = (
            "steps",
            "batch_size",
            "q",
            "eval_batch_size",
            "checkpoint_every",
            "micro_batch_size",
            "eval_budget",
            "autotune_steps",
        )
        for name in positive_ints:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            problems.append(f"time_budget_s must be > 0 (or null), got {self.time_budget_s}")
        if self.divergence_tolerance < 0:
            problems.append(f"divergence_tolerance must be >= 0, got {self.divergence_tolerance}")
        if not self.cache_prefix_mb > 0:
            problems.append(
                f"cache_prefix_mb must be > 0 (cache_prefix=false turns the cache "
                f"off), got {self.cache_prefix_mb}"
            )
        if not 0.0 < self.plateau_factor <= 1.0:
            problems.append(f"plateau_factor must be in (0, 1] (1: off), got {self.plateau_factor}")
        if self.max_rollbacks < 0:
            problems.append(f"max_rollbacks must be >= 0, got {self.max_rollbacks}")
        for name in ("eval_every", "warmup_steps", "seed", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.mu is not None and self.mu <= 0:
            problems.append(f"mu must be > 0, got {self.mu}")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip is not None and self.clip <= 0:
            problems.append(f"clip must be > 0 (or null for no clipping), got {self.clip}")
        if not 0.0 < self.holdout_fraction < 1.0:
            problems.append(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.direction is not None and self.direction not in KINDS:
            problems.append(f"direction must be one of {KINDS}")
        if self.optimizer == "adam" and self.momentum:
            problems.append(
                f"momentum ({self.momentum}) is for optimizer sgd or sign; adam "
                "uses adam_beta1 — drop momentum or set it to 0"
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            problems.append(f"adam_eps must be > 0, got {self.adam_eps}")
        if not 0.0 < self.level_ratio < 1.0:
            problems.append(
                f"level_ratio must be in (0, 1) so that μ_n = μ·c^(n-1) decreases "
                f"to 0 and stays positive, got {self.level_ratio}"
            )
        if not self.zipf_s > 1.0:
            problems.append(f"zipf_s must be > 1 (ζ(s) diverges otherwise), got {self.zipf_s}")
        if self.mu_floor <= 0:
            problems.append(f"mu_floor must be > 0, got {self.mu_floor}")
        elif (
            self.estimator in ("p3", "p4")
            and self.mu is not None
            and self.mu > 0
            and self.mu_floor >= self.mu
        ):
            problems.append(f"mu_floor ({self.mu_floor}) must be below mu ({self.mu})")
        if problems:
            raise ConfigError("; ".join(problems), "fix the fields named above")

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
