"""A grouped-LoRA loss graph: G perturbed LoRA parameter sets evaluated in ONE ONNX Runtime call.

Issue #4 item 4 asks whether evaluating several perturbed parameter sets per call makes a ZO
step faster. This module builds the graph to measure it (``tools/bench_batched.py``); the
runtime does not use it (measured: docs/benchmarks/batched-eval.md).

::

    input_ids, attention_mask, labels [B, T] ──► tile G times ──► [G·B, T]
    every LoRA tensor has a leading group dim: A [G, r, in], B [G, out, r]   (G dynamic)
    each LoRA'd linear:  y = x Wᵀ + b  (x: [G·B, T, in], one MatMul for all groups)
                           + scale · ((x viewed [G, B·T, in]) @ Aᵀ) @ Bᵀ    (batched MatMul)
    loss [G·B] ──► reshape ──► loss [G, B]      (row g: the batch at parameter set g)

The frozen weights and the loss arithmetic are those of :mod:`exporters.loss` (the same
``CausalLMLossGraph``); only ``LoraLinear.forward`` is swapped for the grouped form, by
changing the class of the wrapped modules after :func:`exporters.trainables.select_trainables`
has built them. Row g of the grouped loss equals the normal graph's loss at set g (checked by
:func:`check_grouped_parity` and ``tests/test_batched.py``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.nn import functional as F

from edgezo.bundle import TensorSpec
from edgezo.errors import EdgezoError

from .lora import LoraLinear
from .loss import CausalLMLossGraph
from .onnx_export import BATCH_INPUTS, OPSET, dedupe_tied_head, dummy_batch, save_model

GROUP_AXIS = "group"


class GroupedLoraLinear(LoraLinear):
    """``LoraLinear`` whose ``lora_A``/``lora_B`` weights carry a leading group dim ``G``; the
    input's batch is G stacked copies, group g (rows g·B … g·B+B−1) uses set g."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        base = F.linear(x, weight, self.bias)
        a = self.lora_A.weight  # [G, r, in]
        b = self.lora_B.weight  # [G, out, r]
        xg = x.reshape(a.shape[0], -1, x.shape[-1])  # [G, B·T, in]
        lora = torch.matmul(torch.matmul(xg, a.transpose(1, 2)), b.transpose(1, 2))
        return base + lora.reshape(base.shape) * self.scaling


class GroupedLossGraph(CausalLMLossGraph):
    """``forward(input_ids, attention_mask, labels, trainables [G, ...]) -> loss [G, B]``."""

    def forward(self, input_ids, attention_mask, labels, trainables):  # noqa: D102
        groups = trainables[0].shape[0]
        tile = [groups, 1]
        loss, _ = super().forward(
            input_ids.repeat(tile), attention_mask.repeat(tile), labels.repeat(tile), trainables
        )
        return loss.reshape(groups, -1)


def make_grouped(model: torch.nn.Module, names: list[str]) -> GroupedLossGraph:
    """The grouped loss graph of a model whose LoRA layers ``exporters.lora`` wrapped.

    Every trainable tensor must be a LoRA ``A`` or ``B`` (the grouped matmul covers the LoRA
    path only); the model's ``LoraLinear`` modules are switched to the grouped forward.
    """
    lora_modules = [m for m in model.modules() if isinstance(m, LoraLinear)]
    lora_names = {
        f"{n}.lora_{x}.weight"
        for n, m in model.named_modules()
        if isinstance(m, LoraLinear)
        for x in "AB"
    }
    other = [n for n in names if n not in lora_names]
    if not lora_modules or other:
        raise EdgezoError(
            f"grouped evaluation covers LoRA tensors only; not LoRA: {other[:3] or 'no LoRA'}",
            "export with --mode lora",
        )
    for m in lora_modules:
        m.__class__ = GroupedLoraLinear
    return GroupedLossGraph(model, names).eval()


def export_grouped_graph(
    graph: GroupedLossGraph,
    values: list[torch.Tensor],
    specs: list[TensorSpec],
    path: Path,
    vocab_size: int,
    pad_token_id: int,
    generator: torch.Generator,
    tied_embedding: str | None = None,
    external_data: bool | None = None,
) -> list[str]:
    """Export ``graph`` (inputs: the batch, then each trainable as ``[group, *shape]``; output
    ``loss [group, batch]``) to ``path``; returns the files written."""
    stacked = [torch.stack([v, v]) for v in values]  # traced with G = 2; G is a dynamic axis
    dynamic_axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in BATCH_INPUTS}
    dynamic_axes.update({s.name: {0: GROUP_AXIS} for s in specs})
    dynamic_axes["loss"] = {0: GROUP_AXIS, 1: "batch"}
    raw_dir = path.parent / "_raw_grouped"
    raw_dir.mkdir(parents=True)
    raw = raw_dir / path.name
    args = (*dummy_batch(vocab_size, pad_token_id, generator), stacked)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(raw),
            dynamo=False,
            input_names=[*BATCH_INPUTS, *(s.name for s in specs)],
            output_names=["loss"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load(str(raw))
    shutil.rmtree(raw_dir)
    got = [i.name for i in model.graph.input]
    if got != [*BATCH_INPUTS, *(s.name for s in specs)]:
        raise EdgezoError(
            f"the grouped graph's inputs are {got[:6]}..., not the batch then "
            "the trainable tensors",
            "this is an exporter bug; report it",
        )
    if tied_embedding is not None:
        dedupe_tied_head(model, tied_embedding)
    return save_model(model, path, external_data)


def grouped_feeds(
    batch: dict[str, np.ndarray], sets: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Feeds of the grouped graph: the batch once, each trainable stacked over the sets."""
    feeds = dict(batch)
    for name in sets[0]:
        feeds[name] = np.ascontiguousarray(np.stack([s[name] for s in sets]))
    return feeds


def check_grouped_parity(
    grouped_session,
    normal_session,
    batch: dict[str, np.ndarray],
    sets: list[dict[str, np.ndarray]],
    atol: float = 1e-4,
) -> float:
    """Max |grouped loss − normal loss| over the G sets; raises above ``atol``."""
    grouped = grouped_session.run(["loss"], grouped_feeds(batch, sets))[0]
    separate = np.stack([normal_session.run(["loss"], {**batch, **s})[0] for s in sets])
    diff = float(np.max(np.abs(grouped - separate)))
    if grouped.shape != separate.shape or not diff <= atol:
        raise EdgezoError(
            f"grouped losses {grouped.shape} differ from the separate calls' "
            f"{separate.shape} by {diff:.3g} (atol {atol:g})",
            "this is an exporter bug; report it with the model",
        )
    return diff


def export_pair(
    model: str | Path,
    out: Path,
    gguf_file: str | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] | None = None,
    seed: int = 0,
) -> tuple[Path, Path, list[TensorSpec], dict[str, np.ndarray], dict]:
    """Export a causal LM's normal LoRA loss graph and its grouped twin into ``out``.

    Returns (normal model.onnx, grouped model.onnx, trainable specs, initial values,
    info: vocab_size and pad_token_id). The normal graph is what a bundle holds
    (:func:`exporters.onnx_export.export_loss_graph`); both share the frozen weights.
    """
    from .export import _frozen_tied_embedding
    from .load import load_causal_lm
    from .onnx_export import export_loss_graph
    from .trainables import LoraSettings, select_trainables

    loaded = load_causal_lm(model, gguf_file)
    generator = torch.Generator().manual_seed(seed)
    lora = LoraSettings(
        rank=rank, alpha=float(alpha), targets=tuple(targets or loaded.arch.lora_targets)
    )
    specs = select_trainables(loaded.model, loaded.arch, "lora", lora, generator)
    params = dict(loaded.model.named_parameters())
    values = [params[s.name].detach().clone().contiguous() for s in specs]
    names = [s.name for s in specs]
    pad = loaded.pad_token_id if loaded.pad_token_id is not None else 0
    tied = _frozen_tied_embedding(loaded, set(names))
    normal_dir, grouped_dir = out / "normal", out / "grouped"
    normal_dir.mkdir(parents=True, exist_ok=True)
    grouped_dir.mkdir(parents=True, exist_ok=True)
    normal = CausalLMLossGraph(loaded.model, names, loaded.arch.pass_position_ids).eval()
    export_loss_graph(
        normal,
        values,
        specs,
        normal_dir / "model.onnx",
        loaded.vocab_size,
        pad,
        generator,
        tied_embedding=tied,
    )
    grouped = make_grouped(loaded.model, names)  # switches the LoRA layers: normal graph first
    grouped.pass_position_ids = loaded.arch.pass_position_ids
    export_grouped_graph(
        grouped,
        values,
        specs,
        grouped_dir / "model.onnx",
        loaded.vocab_size,
        pad,
        generator,
        tied_embedding=tied,
    )
    init = {s.name: v.numpy().astype(np.float32) for s, v in zip(specs, values, strict=True)}
    return (
        normal_dir / "model.onnx",
        grouped_dir / "model.onnx",
        specs,
        init,
        {"vocab_size": loaded.vocab_size, "pad_token_id": pad},
    )
