"""A tiny LoRA wrapper for ``nn.Linear``, named the way PEFT names its tensors.

``y = x Wᵀ + b + (alpha / r) · (x Aᵀ) Bᵀ`` with ``A: [r, in_features]`` and
``B: [out_features, r]``. ``B`` starts at zero (the wrapped model is exactly the base model) and
``A`` is drawn from an explicit ``torch.Generator`` (Kaiming-uniform, as PEFT does).

The wrapper keeps the base ``weight``/``bias`` under their original names (frozen initializers
in the ONNX graph keep the Hugging Face names) and adds ``lora_A.weight`` / ``lora_B.weight``,
so the state-dict keys of the trainable tensors are
``model.layers.0.self_attn.q_proj.lora_A.weight`` — PEFT's keys without the adapter name and
``base_model.model.`` prefix, ready to hand to ``peft`` later.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from edgezo.errors import EdgezoError


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer storing ``W`` as
    ``[in, out]`` (PEFT's ``fan_in_fan_out``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoraLinear(nn.Module):
    """``nn.Linear`` (or GPT-2's ``Conv1D``) plus a rank-``r`` update; shares the base layer's
    parameters."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.fan_in_fan_out = _is_conv1d(base)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features = base.in_features
            self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        # skip_init: nn.Linear's own initialisation would draw from the global generator
        self.lora_A = nn.utils.skip_init(nn.Linear, self.in_features, rank, bias=False)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, self.out_features, bias=False)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, scale={self.scaling}"
        )


def apply_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str],
    rank: int,
    alpha: float,
    generator: torch.Generator,
    excluded: tuple[str, ...] = ("lm_head",),
    layers: str | tuple[int, ...] | None = None,
) -> list[str]:
    """Wrap every ``nn.Linear`` (or ``Conv1D``) whose last name component is in ``targets``,
    in module order; with ``layers`` (see :func:`resolve_layers`), only those in the chosen
    blocks.

    Returns the trainable parameter names, ``lora_A`` before ``lora_B`` for each module.
    Raises :class:`EdgezoError` for a bad rank/alpha or a target that matches no linear layer.
    """
    if not isinstance(rank, int) or rank < 1:
        raise EdgezoError(
            f"LoRA rank must be a positive integer, got {rank!r}", "pass --lora-rank 8"
        )
    if not alpha > 0:
        raise EdgezoError(f"LoRA alpha must be positive, got {alpha!r}", "pass --lora-alpha 16")
    if not targets:
        raise EdgezoError("no LoRA targets given", "pass --lora-targets q_proj,v_proj")

    linear_leaves: set[str] = set()
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if _is_linear(module) and leaf not in excluded:
            linear_leaves.add(leaf)
            if leaf in targets:
                chosen.append((name, module))
    unknown = [t for t in targets if t not in linear_leaves]
    if unknown:
        raise EdgezoError(
            f"LoRA target(s) {', '.join(unknown)} match no linear layer of this model",
            f"choose targets among: {', '.join(sorted(linear_leaves))}",
        )

    if layers is not None:
        keep = set(resolve_layers(layers, sorted({layer_index(n) for n, _ in chosen} - {None})))
        chosen = [(n, m) for n, m in chosen if layer_index(n) in keep]
    names: list[str] = []
    for name, linear in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoraLinear(linear, rank, alpha, generator))
        names += [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
    return names


_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """The block index in a module name (``model.layers.27.self_attn.q_proj`` → 27)."""
    found = _LAYER.search(f".{module_name}.")
    return int(found.group(1)) if found else None


def resolve_layers(
    spec: str | tuple[int, ...] | list[int], available: list[int]
) -> tuple[int, ...]:
    """The block indices a ``--lora-layers`` value names, among ``available``.

    ``all``; ``last:N`` (the N deepest blocks — with a frozen-prefix cache the ZO loop then
    evaluates only those); ``A-B`` (inclusive); or a comma list of indices and ranges.
    """
    text = (
        ",".join(str(i) for i in spec)
        if isinstance(spec, (tuple, list))
        else str(spec).strip().lower()
    )
    hint = "pass --lora-layers all, last:4, 26-29 or 0,5,29"
    if not available:
        raise EdgezoError(
            "the LoRA targets sit in no numbered block",
            hint.replace("pass", "drop --lora-layers, or pass"),
        )
    if text == "all":
        return tuple(available)
    try:
        if text.startswith("last:"):
            n = int(text[5:])
            if n < 1:
                raise ValueError
            picked = available[-n:]
            if n > len(available):
                raise EdgezoError(
                    f"--lora-layers {spec}: the model has {len(available)} blocks",
                    f"pass at most last:{len(available)}",
                )
            return tuple(picked)
        picked = []
        for part in text.split(","):
            a, sep, b = part.partition("-")
            lo, hi = int(a), int(b) if sep else int(a)
            picked += range(lo, hi + 1)
    except ValueError:
        raise EdgezoError(f"cannot read --lora-layers {spec!r}", hint) from None
    missing = sorted(set(picked) - set(available))
    if missing or not picked:
        raise EdgezoError(
            f"--lora-layers {spec}: no block {missing or picked} among the "
            f"LoRA targets' blocks {available[0]}-{available[-1]}",
            hint,
        )
    return tuple(sorted(set(picked)))
