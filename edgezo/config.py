"""The fine-tuning run's configuration: one validated dataclass, from YAML plus CLI overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .configio import from_dict, load_yaml
from .directions import KINDS
from .errors import ConfigError

# Per trainable-mode defaults for the learning rate and the perturbation size μ.
# LoRA and norms follow MeZO's reported ranges scaled for ZO-SGD with momentum on small
# models; full-parameter values are MeZO's (papers.md §1).
# Full parameters use plain ZO-SGD: a momentum buffer would double the memory of θ.
MODE_DEFAULTS: dict[str, dict[str, float]] = {
    "lora": {"lr": 1e-3, "mu": 1e-2, "momentum": 0.9},
    "norms": {"lr": 1e-3, "mu": 1e-2, "momentum": 0.9},
    "full": {"lr": 1e-6, "mu": 1e-3, "momentum": 0.0},
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
    steps: int = _f(200, "ZO steps to run")
    batch_size: int = _f(8, "examples per step")
    max_length: int = _f(64, "tokens per example (longer ones are truncated)")
    lr: float | None = _f(None, "learning rate; default per trainable mode (MODE_DEFAULTS)")
    mu: float | None = _f(None, "perturbation size μ; default per trainable mode")
    q: int = _f(1, "random directions per step")
    direction: Literal["rademacher", "gaussian"] = _f("rademacher", "direction distribution")
    estimator: Literal["central"] = _f("central", "gradient estimator")
    momentum: float | None = _f(
        None, "momentum β of ZO-SGD (0: plain SGD, no extra buffer); default per mode")
    weight_decay: float = _f(0.0, "decoupled weight decay λ")
    clip: float | None = _f(None, "clip each projected gradient to [-clip, clip]")
    schedule: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate schedule")
    warmup_steps: int = _f(0, "linear warm-up steps")
    seed: int = _f(0, "run seed: directions and data order")
    eval_every: int = _f(50, "held-out evaluation every N steps (0: only before and after)")
    eval_batch_size: int = _f(16, "examples per held-out evaluation batch")
    checkpoint_every: int = _f(25, "atomic checkpoint every N steps")
    provider: Literal["cpu", "cuda"] = _f("cpu", "ONNX Runtime execution provider")
    threads: int = _f(0, "intra-op threads (0: all cores)")
    perturbation: Literal["auto", "copy", "inplace"] = _f(
        "auto", "copy: separate feed buffer; inplace: perturb θ itself (no extra memory); "
        "auto: inplace when the trainable tensors exceed 64 MiB")

    def __post_init__(self) -> None:
        problems = []
        positive_ints = ("steps", "batch_size", "q", "eval_batch_size", "checkpoint_every")
        for name in positive_ints:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "warmup_steps", "seed", "threads"):
            if getattr(self, name) < 0:
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
        if self.direction not in KINDS:
            problems.append(f"direction must be one of {KINDS}")
        if problems:
            raise ConfigError("; ".join(problems), "fix the fields named above")

    @classmethod
    def load(cls, path: str | None = None, overrides: dict[str, Any] | None = None
             ) -> FinetuneConfig:
        data = load_yaml(path) if path else {}
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return from_dict(cls, data, where=path or "finetune config")

    def resolved(self, mode: str) -> FinetuneConfig:
        """A copy with lr, μ and momentum filled from the trainable mode's defaults."""
        defaults = MODE_DEFAULTS.get(mode)
        d = asdict(self)
        for key in ("lr", "mu", "momentum"):
            if d[key] is None:
                if defaults is None:
                    raise ConfigError(f"no default {key} for trainable mode {mode!r}",
                                      f"pass {key}= explicitly")
                d[key] = defaults[key]
        return FinetuneConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
