"""Per-tensor perturbation scales (``mu_scale``): the perturbation and the step per tensor.

A run perturbs every value by μ·z. With ``mu_scale`` each trainable tensor T gets a fixed
factor s_T > 0: its values are perturbed by μ·s_T·z and, because the projected gradient is
then measured along s ⊙ z, move s_T² times as far as plain ZO-SGD would move them (in
expectation: a diagonal preconditioner S²). Tensors of very different size or sensitivity —
RMSNorm gains near 1 next to a LoRA B that starts at 0 — can then share one μ and one lr.

The setting is a comma-separated list of ``key=value``: the key is a tensor's name, a role
(``norm``, ``lora_b``, ``bias``, ... from the manifest) or ``*`` (every tensor), the value a
positive number or ``rms``: the tensor's root-mean-square at the start of the run (a tensor
that starts all zeros, such as a LoRA B, gets 1). A name beats a role, a role beats ``*``, and
a tensor no key names gets 1. ``rms`` alone means ``*=rms``; the empty string turns it off.
Examples: ``norm=0.1`` (norms perturbed by μ/10, moved 1/100 as far), ``norm=rms,lora_b=1``.
The factors are a function of the setting and the bundle's initial tensors only, so replay and
resume rebuild them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .directions import CHUNK
from .params import TensorSpec

RMS = "rms"


def parse(text: str) -> dict[str, float | str]:
    """``mu_scale`` as {key: factor or "rms"}; ValueError with what is wrong."""
    text = (text or "").strip()
    if not text:
        return {}
    if text == RMS:
        return {"*": RMS}
    out: dict[str, float | str] = {}
    for item in text.split(","):
        key, sep, value = (p.strip() for p in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"{item.strip()!r} is not key=value (e.g. norm=0.1 or norm=rms)")
        if key in out:
            raise ValueError(f"{key!r} is given twice")
        if value == RMS:
            out[key] = RMS
            continue
        try:
            factor = float(value)
        except ValueError:
            raise ValueError(f"{key}={value}: the value must be a number or rms") from None
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"{key}={value}: the factor must be a finite number > 0")
        out[key] = factor
    return out


def tensor_factors(
    specs: Sequence[TensorSpec], initial: Mapping[str, np.ndarray], text: str
) -> list[float]:
    """One factor per tensor (manifest order); ValueError naming a key that matches nothing."""
    rules = parse(text)
    names = {s.name for s in specs}
    roles = {s.role for s in specs}
    unknown = sorted(k for k in rules if k != "*" and k not in names and k not in roles)
    if unknown:
        raise ValueError(
            f"mu_scale names {unknown}, which is neither a trainable tensor nor a role of "
            f"this bundle (roles: {sorted(roles)})"
        )
    factors = []
    for s in specs:
        rule = rules.get(s.name, rules.get(s.role, rules.get("*", 1.0)))
        if rule == RMS:
            x = np.asarray(initial[s.name], dtype=np.float32).reshape(-1)
            parts = [_sumsq(x[i : i + CHUNK]) for i in range(0, x.size, CHUNK)]
            rms = math.sqrt(math.fsum(parts) / x.size) if x.size else 0.0
            rule = rms if rms > 0 else 1.0
        factors.append(float(rule))
    return factors


def scale_vector(specs: Sequence[TensorSpec], factors: Sequence[float]) -> np.ndarray | None:
    """The flat float32 per-value scale (None when every factor is 1)."""
    if all(f == 1.0 for f in factors):
        return None
    sizes = [s.size for s in specs]
    return np.repeat(np.asarray(factors, dtype=np.float32), sizes)


def _sumsq(x: np.ndarray) -> float:
    y = x.astype(np.float64)
    return float(np.dot(y, y))
