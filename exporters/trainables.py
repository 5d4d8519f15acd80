"""Choose the trainable tensors of a model for one trainable mode.

=======  =====================================================  ==============================
mode     trainable tensors                                      roles
=======  =====================================================  ==============================
lora     ``lora_A``/``lora_B`` of the targeted linear layers     ``lora_a``, ``lora_b``
norms    weights and biases of the normalisation modules        ``norm``, ``bias``
full     every parameter once (a tied embedding/head is one;    ``embedding``, ``norm``,
         not the architecture's ``no_effect_params``)           ``bias``, ``dense``
scales   none on the PyTorch side: the int4 ``MatMulNBits``     ``scale`` (positive)
         scales become graph inputs after quantisation
head     the classification head (weight and bias)              ``head``
=======  =====================================================  ==============================

For a classification task (``arch.head_modules``), ``lora`` and ``norms`` train the head too.

Everything else stays a frozen initializer in the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgezo.bundle import TensorSpec
from edgezo.errors import EdgezoError

from .architectures import MODES, Architecture
from .lora import apply_lora

#: a ``freeze_a`` bundle's file of the frozen ``lora_A`` tensors (for the adapter hand-off)
FROZEN_LORA_A = "lora_a.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters as written into the manifest (``lora`` dict)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: str | tuple[int, ...] | None = None
    """Which blocks get adapters: a ``--lora-layers`` value or the resolved indices
    (``exporters.lora.resolve_layers``); None: all."""
    freeze_a: bool = False
    """Train ``B`` only; ``A`` stays its seeded random initial value, a frozen initializer of
    the graph (LoRA-FA). For ZO this halves the perturbed dimensions or better, and no noise
    accumulates in ``A`` (whose scale, ~1/√in, is what a noisy ZO step overwhelms first)."""

    def to_json(self) -> dict:
        out = {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}
        if self.layers is not None:
            out["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        if self.freeze_a:
            out["freeze_a"] = True
        return out


def select_trainables(
    model: nn.Module,
    arch: Architecture,
    mode: str,
    lora: LoraSettings | None,
    generator: torch.Generator,
) -> list[TensorSpec]:
    """Pick (and for ``lora`` first create) the trainable tensors, in module order.

    Names are the parameters' state-dict keys; the order is the ONNX input order.
    """
    if mode == "head" or (arch.head_modules and mode in ("lora", "norms")):
        head = [
            TensorSpec(name, tuple(p.shape), "float32", "head")
            for name, p, module_name, _leaf in _named_params(model)
            if arch.is_head(module_name)
        ]
        if not head:
            raise EdgezoError(
                f"mode {mode!r} trains a classification head, and the {arch.family} "
                "description names none (head_modules) in this model",
                "--mode head is for classification bundles (--task classification); use "
                "--mode lora/norms/full for a causal LM",
            )
        if mode == "head":
            return head
        return _without_head(_select(model, arch, mode, lora, generator), head) + head
    return _select(model, arch, mode, lora, generator)


def _select(
    model: nn.Module,
    arch: Architecture,
    mode: str,
    lora: LoraSettings | None,
    generator: torch.Generator,
) -> list[TensorSpec]:
    if mode == "lora":
        if lora is None:
            raise ValueError("mode 'lora' needs LoraSettings")
        names = apply_lora(
            model,
            lora.targets,
            lora.rank,
            lora.alpha,
            generator,
            excluded=arch.lora_excluded,
            layers=lora.layers,
        )
        params = dict(model.named_parameters())
        if lora.freeze_a:
            names = [n for n in names if _lora_role(n) == "lora_b"]
        return [TensorSpec(n, tuple(params[n].shape), "float32", _lora_role(n)) for n in names]
    if mode == "norms":
        specs = [
            TensorSpec(name, tuple(p.shape), "float32", "bias" if leaf == "bias" else "norm")
            for name, p, module_name, leaf in _named_params(model)
            if arch.is_norm(module_name)
        ]
        if not specs:
            raise EdgezoError(
                f"the {arch.family} description matches no normalisation module in this model",
                "check `norm_modules` in exporters/architectures.py, or use --mode lora",
            )
        return specs
    if mode == "scales":
        return []  # added after quantisation (exporters/quantize.py)
    if mode == "full":
        return [
            TensorSpec(name, tuple(p.shape), "float32", _full_role(arch, module_name, leaf))
            for name, p, module_name, leaf in _named_params(model)
            if not arch.has_no_effect(name)
        ]
    raise EdgezoError(
        f"unknown trainable mode {mode!r}", f"pass --mode as one of: {', '.join(MODES)}"
    )


def _without_head(specs: list[TensorSpec], head: list[TensorSpec]) -> list[TensorSpec]:
    names = {s.name for s in head}
    return [s for s in specs if s.name not in names]


def _lora_role(name: str) -> str:
    return "lora_a" if ".lora_A." in name else "lora_b"


def _full_role(arch: Architecture, module_name: str, leaf: str) -> str:
    if arch.is_head(module_name):
        return "head"
    if leaf == "bias":
        return "bias"
    if arch.is_norm(module_name):
        return "norm"
    if arch.is_embedding(module_name):
        return "embedding"
    return "dense"


def _named_params(model: nn.Module):
    """(name, parameter, owning module name, attribute) once per distinct parameter."""
    for name, p in model.named_parameters():  # de-duplicates tied parameters
        module_name, _, leaf = name.rpartition(".")
        yield name, p, module_name, leaf
