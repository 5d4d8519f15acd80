"""Every export is checked before it becomes a bundle.

(a) **Parity** — ONNX Runtime's loss against PyTorch's on a fixed right-padded batch of examples
    of different lengths with some ``-100`` labels, at a sequence length different from the one
    traced (so frozen shapes would show). Above the tolerance the export fails.
(b) **Reference** — at the initial values (LoRA ``B = 0``: the base model) the loss of one
    unpadded example equals the model's own Hugging Face loss (``model(labels=...).loss``), so
    the loss wrapper and the architecture description (``pass_position_ids`` ...) are right.
(c) **Sensitivity** — perturbing each trainable input alone must change the ONNX loss; a tensor
    that does not is named and the export fails (it would be trained for nothing).

Parity and sensitivity run where LoRA ``B`` is small but non-zero: with ``B = 0`` a
perturbation of ``A`` changes nothing and the LoRA path would go untested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgezo.bundle import TensorSpec
from edgezo.errors import EdgezoError

from .loss import CausalLMLossGraph, ClassificationLossGraph

LORA_B_STD = 0.02
PARITY_LENGTHS = (13, 9, 5)
SENSITIVITY_SHAPE = (1, 8)
SENSITIVITY_ATTEMPTS = (1.0, 3.0, 10.0)  # perturbation std per try, relative to the tensor's rms


def validation_point(
    specs: Sequence[TensorSpec], values: Sequence[torch.Tensor], generator: torch.Generator
) -> list[torch.Tensor]:
    """The trainable values validated: the initial ones, with LoRA ``B`` ~ N(0, 0.02²) and an
    all-zero classification head ~ N(0, 0.02²) (through a zero head nothing else would show)."""
    out = []
    for spec, v in zip(specs, values, strict=True):
        if spec.role == "lora_b" or (spec.role == "head" and not bool(v.any())):
            v = torch.randn(v.shape, generator=generator) * LORA_B_STD
        out.append(v.detach().clone().contiguous())
    return out


def parity_batch(
    vocab_size: int, pad_token_id: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded examples of lengths 13, 9, 5; prompt tokens of the first one ignored."""
    width = max(PARITY_LENGTHS)
    ids = torch.full((len(PARITY_LENGTHS), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PARITY_LENGTHS):
        ids[row, :n] = torch.randint(0, vocab_size, (n,), generator=generator)
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100
    return ids, mask, labels


def classification_batch(
    vocab_size: int, pad_token_id: int, num_labels: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The :func:`parity_batch` rows with class ids ``[batch]`` as labels."""
    ids, mask, _ = parity_batch(vocab_size, pad_token_id, generator)
    return ids, mask, torch.randint(0, num_labels, (len(ids),), generator=generator)


def ort_session(path: Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session on ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def make_feeds(
    batch: Sequence[torch.Tensor], specs: Sequence[TensorSpec], values: Sequence[torch.Tensor]
) -> dict[str, np.ndarray]:
    feeds = {
        name: t.numpy().astype(np.int64)
        for name, t in zip(("input_ids", "attention_mask", "labels"), batch, strict=True)
    }
    for spec, v in zip(specs, values, strict=True):
        feeds[spec.name] = np.ascontiguousarray(v.detach().numpy(), dtype=np.float32)
    return feeds


@dataclass(frozen=True)
class TorchOutputs:
    """A loss graph's PyTorch outputs on the parity batch: ``loss`` and its second output
    (named ``extra_output``)."""

    extra_output: str
    loss: np.ndarray
    second: np.ndarray


def torch_outputs(
    graph: CausalLMLossGraph | ClassificationLossGraph,
    point: Sequence[torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> TorchOutputs:
    """Run ``graph`` in PyTorch on ``batch`` at ``point``."""
    with torch.no_grad():
        loss, second = (t.numpy() for t in graph(*batch, list(point)))
    return TorchOutputs(graph.extra_output, loss, second)


def check_parity(
    session: Any,
    graph: CausalLMLossGraph | ClassificationLossGraph | TorchOutputs,
    specs: Sequence[TensorSpec],
    point: Sequence[torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tolerance: float,
) -> dict[str, Any]:
    """ORT vs PyTorch loss and second output (``next_logits`` or ``logits``); the manifest's
    ``parity`` dict, or an :class:`EdgezoError`. ``graph`` may be its outputs recorded by
    :func:`torch_outputs` (so the torch model can go before the session is made)."""
    if not isinstance(graph, TorchOutputs):
        graph = torch_outputs(graph, point, batch)
    second = graph.extra_output
    onnx_loss, onnx_logits = session.run(["loss", second], make_feeds(batch, specs, point))
    torch_loss, torch_logits = graph.loss, graph.second
    if onnx_loss.shape != torch_loss.shape or not np.all(np.isfinite(onnx_loss)):
        raise EdgezoError(
            f"the ONNX loss is {onnx_loss!r} (shape {onnx_loss.shape}), PyTorch gives "
            f"{torch_loss!r}",
            "this is an exporter bug; report it with the model you exported",
        )
    diff = float(np.max(np.abs(onnx_loss.astype(np.float64) - torch_loss)))
    if onnx_logits.shape != torch_logits.shape or not np.all(np.isfinite(onnx_logits)):
        raise EdgezoError(
            f"the ONNX {second} have shape {onnx_logits.shape} (finite: "
            f"{bool(np.all(np.isfinite(onnx_logits)))}), PyTorch's {torch_logits.shape}",
            "this is an exporter bug; report it with the model you exported",
        )
    logits_diff = float(np.max(np.abs(onnx_logits.astype(np.float64) - torch_logits)))
    parity = {
        "max_abs_diff": diff,
        f"{second}_max_abs_diff": logits_diff,
        "tolerance": tolerance,
        "batch_shape": list(batch[0].shape),
        "torch_loss": [round(float(x), 6) for x in torch_loss],
        "lora_b_std": LORA_B_STD if any(s.role == "lora_b" for s in specs) else None,
    }
    if not diff <= tolerance:
        raise EdgezoError(
            f"parity check failed: ONNX Runtime and PyTorch losses differ by {diff:.3g} "
            f"(tolerance {tolerance:g}) on a batch of shape {list(batch[0].shape)}; "
            f"PyTorch {torch_loss.tolist()}, ONNX {onnx_loss.tolist()}",
            "the exported graph is not faithful; no bundle was written. Report the model, or "
            "pass a larger --tolerance only if you understand the difference",
        )
    if not logits_diff <= tolerance:
        raise EdgezoError(
            f"parity check failed: ONNX Runtime and PyTorch {second} differ by "
            f"{logits_diff:.3g} (tolerance {tolerance:g}) on a batch of shape "
            f"{list(batch[0].shape)}",
            "the exported graph is not faithful; no bundle was written. Report the model, or "
            "pass a larger --tolerance only if you understand the difference",
        )
    return parity


def check_reference(
    graph: CausalLMLossGraph,
    values: Sequence[torch.Tensor],
    vocab_size: int,
    generator: torch.Generator,
    tolerance: float,
) -> float:
    """Our loss vs the model's own loss on one unpadded example (PyTorch only); returns the
    absolute difference, or raises an :class:`EdgezoError` above ``tolerance``."""
    ids = torch.randint(0, vocab_size, (1, max(PARITY_LENGTHS)), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ours = float(graph(ids, torch.ones_like(ids), labels, list(values))[0])
        theirs = float(graph.model(input_ids=ids, labels=labels, use_cache=False).loss)
    diff = abs(ours - theirs)
    if not diff <= tolerance:
        raise EdgezoError(
            f"reference check failed: the exported loss function gives {ours:.6f} where the "
            f"model's own Hugging Face loss is {theirs:.6f} (difference {diff:.3g}) on an "
            "unpadded example",
            "the architecture description in exporters/architectures.py does not fit this "
            "model (e.g. pass_position_ids); no bundle was written",
        )
    return diff


def check_sensitivity(
    session: Any,
    specs: Sequence[TensorSpec],
    point: Sequence[torch.Tensor],
    vocab_size: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
) -> float:
    """Perturb each trainable input alone; every one must move the loss.

    ``labels``: class ids ``[1]`` for a classification graph (default: the tokens, LM loss).

    Returns the smallest change that proved a tensor alive, relative to ``max(1, |loss|)``.

    ONNX Runtime on CPU is deterministic, so an input without effect changes the loss by exactly
    0. A live input's effect on a scalar loss has a random sign and can, rarely, round to 0 too
    (measured on SmolLM2: one LoRA tensor in 120 at the first draw), so a tensor is declared
    dead only after :data:`SENSITIVITY_ATTEMPTS` independent perturbations of growing size
    (relative to the tensor's rms, at least 0.01) all leave the loss unchanged.
    """
    ids = torch.randint(0, vocab_size, SENSITIVITY_SHAPE, generator=generator)
    batch = (ids, torch.ones_like(ids), ids.clone() if labels is None else labels)
    feeds = make_feeds(batch, specs, point)
    (base,) = session.run(["loss"], feeds)
    scale = max(1.0, float(np.max(np.abs(base))))
    dead: list[str] = []
    smallest = float("inf")
    for spec, v in zip(specs, point, strict=True):
        v = v.detach()
        rms = max(float(v.pow(2).mean().sqrt()) if v.numel() else 0.0, 1e-2)
        for size in SENSITIVITY_ATTEMPTS:
            moved = dict(feeds)
            noise = torch.randn(v.shape, generator=generator) * (size * rms)
            moved[spec.name] = (v + noise).numpy().astype(np.float32)
            (loss,) = session.run(["loss"], moved)
            change = float(np.max(np.abs(loss - base))) / scale
            if np.isfinite(change) and change > 0.0:
                smallest = min(smallest, change)
                break
        else:
            dead.append(spec.name)
    if dead:
        shown = ", ".join(dead[:5]) + (f" and {len(dead) - 5} more" if len(dead) > 5 else "")
        raise EdgezoError(
            f"sensitivity check failed: perturbing trainable tensor(s) {shown} does not change "
            "the ONNX loss, so training them would do nothing; no bundle was written",
            "choose other --lora-targets / --mode, or report the model if these tensors should "
            "matter",
        )
    return smallest


def fp32_loss(
    fp32_session: Any,
    specs: Sequence[TensorSpec],
    point: Sequence[torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> np.ndarray:
    """The fp32 graph's ``loss`` on the parity batch at ``point`` (fed the trainables it has)."""
    names = {i.name for i in fp32_session.get_inputs()}
    kept = [(s, v) for s, v in zip(specs, point, strict=True) if s.name in names]
    (f,) = fp32_session.run(["loss"], make_feeds(batch, [s for s, _ in kept], [v for _, v in kept]))
    return f


def check_quantized(
    qsession: Any,
    fp32_session: Any,
    specs: Sequence[TensorSpec],
    point: Sequence[torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rtol: float,
) -> dict[str, Any]:
    """Quantised vs fp32 ONNX loss on the parity batch (a quantisation error, not an export
    bug: checked against the relative tolerance ``rtol``); returns the figures for the manifest.

    ``specs``/``point`` are those of the quantised graph; the fp32 graph is fed the subset it
    has (``scales`` exist only in the quantised graph, at their quantiser values).
    ``fp32_session`` may be the fp32 graph's loss recorded by :func:`fp32_loss` instead, so
    the fp32 session need not stay alive while the quantiser holds the weights.
    """
    (q,) = qsession.run(["loss"], make_feeds(batch, specs, point))
    if isinstance(fp32_session, np.ndarray):  # recorded by fp32_loss before quantising
        f = fp32_session
    else:
        f = fp32_loss(fp32_session, specs, point, batch)
    if q.shape != f.shape or not np.all(np.isfinite(q)):
        raise EdgezoError(
            f"the quantised graph's loss is {q!r}, the fp32 graph gives {f!r}",
            "this is an exporter bug; report it with the model you exported",
        )
    q64, f64 = q.astype(np.float64), f.astype(np.float64)
    abs_diff = float(np.max(np.abs(q64 - f64)))
    rel_diff = float(np.max(np.abs(q64 - f64) / np.maximum(np.abs(f64), 1e-6)))
    figures = {
        "max_abs_diff": abs_diff,
        "max_rel_diff": rel_diff,
        "rtol": rtol,
        "fp32_loss": [round(float(x), 6) for x in f],
        "quantized_loss": [round(float(x), 6) for x in q],
    }
    if not rel_diff <= rtol:
        raise EdgezoError(
            f"quantisation changes the loss too much: relative difference {rel_diff:.3g} "
            f"(tolerance {rtol:g}) between the quantised and the fp32 ONNX graph; fp32 "
            f"{figures['fp32_loss']}, quantised {figures['quantized_loss']}",
            "use a smaller --block-size (32), --quantize int8 instead of int4, or a larger "
            "--quant-rtol if the loss of this model is known to tolerate it",
        )
    return figures


def check_fed_scales(
    qsession: Any,
    baked_session: Any,
    specs: Sequence[TensorSpec],
    point: Sequence[torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> bool:
    """The graph with the int4 scales fed as inputs must give exactly the loss of the same
    graph with the scales baked in (ONNX Runtime, accuracy level 0); True or an error."""
    (fed,) = qsession.run(["loss"], make_feeds(batch, specs, point))
    names = {i.name for i in baked_session.get_inputs()}
    kept = [(s, v) for s, v in zip(specs, point, strict=True) if s.name in names]
    (baked,) = baked_session.run(
        ["loss"], make_feeds(batch, [s for s, _ in kept], [v for _, v in kept])
    )
    if not np.array_equal(fed, baked):
        raise EdgezoError(
            f"with the int4 scales fed as graph inputs the loss is {fed.tolist()}, with the same "
            f"scales baked in {baked.tolist()}: this ONNX Runtime does not read fed MatMulNBits "
            "scales faithfully; no bundle was written",
            "use --accuracy-level 0, or train LoRA over the int4 base (--mode lora)",
        )
    return True
