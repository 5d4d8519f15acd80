"""``export_classifier``: a BERT-family encoder → a validated ``classification`` bundle.

The graph (see :class:`exporters.loss.ClassificationLossGraph`)::

    input_ids, attention_mask [batch, sequence], labels [batch] (class ids), trainables
        ──► loss [batch] (cross-entropy), logits [batch, n_labels]

A bare encoder (all-MiniLM-L6-v2 is a sentence-transformers ``BertModel``) gets a linear head
over its mean-pooled last hidden states, the way sentence-transformers embeds; a
``...ForSequenceClassification`` model keeps its classifier. The ordered label names are
stored in the manifest (``labels``); training data lines are ``{"text": ..., "label": ...}``.

Validation as for causal LMs (``exporters/validate.py``): ONNX Runtime vs PyTorch loss and
logits on a padded batch at another sequence length, the loss at the initial values vs
PyTorch's own ``F.cross_entropy`` (or the model's own loss), and each trainable tensor must
move the loss (checked with a non-zero head: through a zero head nothing else would show).
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from edgezo.bundle import InputSpec, Manifest, write_manifest
from edgezo.errors import EdgezoError

from .bundle_writer import check_destination, staged_bundle
from .deps import versions
from .load import HEAD_INITS, LoadedModel, load_classifier
from .lora import layer_index
from .loss import ClassificationLossGraph
from .onnx_export import OPSET, save_model
from .stages import add_stages
from .trainables import LoraSettings, select_trainables
from .validate import (
    check_parity,
    check_sensitivity,
    classification_batch,
    ort_session,
    validation_point,
)

CLASSIFIER_MODES = ("head", "lora", "norms", "full")
TEXT_INPUTS = ("input_ids", "attention_mask")


def check_labels(labels: Sequence[str] | None) -> list[str]:
    """The label names: at least two, unique, non-empty strings."""
    names = [str(x).strip() for x in (labels or [])]
    if len(names) < 2 or any(not n for n in names) or len(set(names)) != len(names):
        raise EdgezoError(
            f"a classification bundle needs two or more distinct label names, got {names}",
            "pass --labels cooking,fitness,... (or --labels-from data.jsonl)",
        )
    return names


def export_classifier(
    model: str | Path,
    out: str | Path,
    labels: Sequence[str],
    mode: str = "head",
    head_init: str = "zero",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_targets: Sequence[str] | None = None,
    lora_layers: str | Sequence[int] | None = None,
    lora_freeze_a: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    progress: Callable[[str], None] | None = print,
    external_data: bool | None = None,
) -> Path:
    """Export an encoder classifier into a validated bundle folder ``out``; returns ``out``.

    Args:
        model: a Hugging Face folder of a supported encoder (``bert``).
        labels: the ordered class names (class id = position).
        mode: ``head`` (the classifier weight and bias), ``lora`` (LoRA on the
            architecture's targets, ``query``/``value`` for BERT, + the head), ``norms``
            (LayerNorms + the head) or ``full``.
        head_init: a new head (bare encoder) starts at ``zero`` (weights and bias; the ZO
            default) or ``random`` (N(0, 0.02²), zero bias). A model with its own classifier
            keeps it.
        lora_layers: ``lora`` only: which encoder layers get adapters (``last:N``, ``A-B``,
            ``0,5``; None: all). With the adapters on the last layers only, the bundle gets a
            frozen-prefix split (the hidden states entering the first adapted layer are
            cached per example), so a ZO step runs those layers and the head only.
        lora_freeze_a: ``lora`` only: train ``B`` (and the head), ``A`` stays its seeded
            random value (LoRA-FA).
        others: as for :func:`exporters.export.export_causal_lm`.
    """
    say = progress or (lambda _line: None)
    out = Path(out)
    names = check_labels(labels)
    if mode not in CLASSIFIER_MODES:
        raise EdgezoError(
            f"trainable mode {mode!r} is not one for classification",
            f"pass --mode as one of: {', '.join(CLASSIFIER_MODES)}",
        )
    if head_init not in HEAD_INITS:
        raise EdgezoError(
            f"unknown head initialisation {head_init!r}",
            f"pass --head-init as one of: {', '.join(HEAD_INITS)}",
        )
    if not tolerance >= 0:
        raise EdgezoError(f"tolerance must be >= 0, got {tolerance!r}", "pass --tolerance 1e-3")
    check_destination(out, overwrite)

    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    say(f"loading {model} ...")
    loaded = load_classifier(model, len(names), head_init, generator)
    module = loaded.model
    say(
        f"loaded {loaded.model_type} ({loaded.arch.family} family), {loaded.num_parameters:,} "
        f"parameters; head: {loaded.head_init}, {len(names)} labels"
    )
    if mode != "lora" and (lora_layers or lora_freeze_a):
        raise EdgezoError(
            f"--lora-layers/--lora-freeze-a place LoRA adapters, and --mode is {mode!r}",
            "pass --mode lora, or drop --lora-layers/--lora-freeze-a",
        )
    lora = None
    if mode == "lora":
        targets = tuple(lora_targets) if lora_targets else loaded.arch.lora_targets
        layers = lora_layers
        if layers is not None and not isinstance(layers, str):
            layers = tuple(int(i) for i in layers)
        lora = LoraSettings(
            rank=lora_rank,
            alpha=float(lora_alpha),
            targets=targets,
            layers=layers,
            freeze_a=bool(lora_freeze_a),
        )
    specs = select_trainables(module, loaded.arch, mode, lora, generator)
    if lora is not None and lora.layers is not None:  # the manifest records the indices
        adapted = {layer_index(s.name) for s in specs if s.role in ("lora_a", "lora_b")}
        lora = replace(lora, layers=tuple(sorted(adapted)))
    params = dict(module.named_parameters())
    values = [params[s.name].detach().clone().contiguous() for s in specs]
    n_train = sum(s.size for s in specs)
    say(f"trainable ({mode}): {len(specs)} tensors, {n_train:,} values")
    graph = ClassificationLossGraph(module, [s.name for s in specs]).eval()
    pad = loaded.pad_token_id or 0
    vocab = int(module.config.vocab_size)

    with staged_bundle(out, overwrite) as stage:
        t = time.perf_counter()
        say("exporting the loss graph to ONNX ...")
        model_files = _export(
            graph,
            values,
            specs,
            stage / "model.onnx",
            vocab,
            pad,
            len(names),
            generator,
            external_data,
        )
        say(f"exported {' + '.join(model_files)} in {time.perf_counter() - t:.1f} s")
        session = ort_session(stage / "model.onnx")
        point = validation_point(specs, values, generator)
        batch = classification_batch(vocab, pad, len(names), generator)
        parity = check_parity(session, graph, specs, point, batch, tolerance)
        parity["reference_diff"] = _check_reference(graph, specs, point, batch, tolerance)
        parity["sensitivity_min_change"] = check_sensitivity(
            session,
            specs,
            point,
            vocab,
            generator,
            labels=torch.randint(0, len(names), (1,), generator=generator),
        )
        del session
        say(
            f"validated: max |ONNX - PyTorch| loss {parity['max_abs_diff']:.2e}, logits "
            f"{parity['logits_max_abs_diff']:.2e} (tolerance {tolerance:g}); all {len(specs)} "
            "trainable tensors move the loss"
        )

        save_file(
            {s.name: v for s, v in zip(specs, values, strict=True)},
            str(stage / "trainable.safetensors"),
            metadata={"format": "pt"},
        )
        tok_spec = loaded.save_tokenizer(stage / "tokenizer.json")
        manifest = Manifest(
            task="classification",
            architecture=_architecture(loaded, len(names)),
            trainable_mode=mode,
            inputs=[
                *(InputSpec(n, "int64", ("batch", "sequence")) for n in TEXT_INPUTS),
                InputSpec("labels", "int64", ("batch",)),
            ],
            outputs=[
                InputSpec("loss", "float32", ("batch",)),
                InputSpec("logits", "float32", ("batch", len(names))),
            ],
            trainable=specs,
            tokenizer=tok_spec,
            lora=lora.to_json() if lora else None,
            labels=names,
            parity=parity,
            exporter={
                "name": "edgezo.exporters",
                **versions(),
                "opset": OPSET,
                "onnx_exporter": "torch.onnx.export(dynamo=False)",
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        write_manifest(stage, manifest, [*model_files, "trainable.safetensors", tok_spec.file])
        if mode == "head" or (lora is not None and lora.layers is not None):
            # all before the head (or the first adapted layer) is frozen: the runtime can
            # cache it per example
            add_stages(stage, log=say)
    say(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def _export(
    graph,
    values,
    specs,
    path: Path,
    vocab: int,
    pad: int,
    num_labels: int,
    generator: torch.Generator,
    external_data: bool | None,
) -> list[str]:
    """Trace on a right-padded 2×7 batch (so the padding mask is not frozen away)."""
    ids = torch.randint(0, vocab, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = pad
    labels = torch.tensor([0, num_labels - 1])
    names = [s.name for s in specs]
    axes = {n: {0: "batch", 1: "sequence"} for n in TEXT_INPUTS}
    axes.update(labels={0: "batch"}, loss={0: "batch"}, logits={0: "batch"})
    raw_dir = path.parent / "_raw"
    raw_dir.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (ids, mask, labels, list(values)),
            str(raw_dir / path.name),
            dynamo=False,
            input_names=[*TEXT_INPUTS, "labels", *names],
            output_names=["loss", "logits"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load(str(raw_dir / path.name))
    shutil.rmtree(raw_dir)
    got = [i.name for i in model.graph.input]
    dropped = [n for n in names if n not in got]
    if dropped:
        raise EdgezoError(
            f"sensitivity check failed: the loss does not depend on trainable tensor(s) "
            f"{', '.join(dropped[:5])} (dropped from the graph as unused); no bundle was written",
            "choose another --mode or --lora-targets",
        )
    if got != [*TEXT_INPUTS, "labels", *names]:
        raise EdgezoError(
            f"the exported graph's inputs are {got[:6]}...",
            "this is an exporter bug; report it with the model you exported",
        )
    return save_model(model, path, external_data)


def _check_reference(
    graph: ClassificationLossGraph, specs, point, batch, tolerance: float
) -> float:
    """Our per-example loss at ``point`` vs ``F.cross_entropy`` of the model run with its own
    parameters set to ``point`` (or, for a model with a classifier, its own loss)."""
    ids, mask, labels = batch
    with torch.no_grad():
        ours = graph(ids, mask, labels, list(point))[0]
        params = dict(graph.model.named_parameters())
        saved = {s.name: params[s.name].detach().clone() for s in specs}
        try:
            for s, v in zip(specs, point, strict=True):
                params[s.name].copy_(v)
            out = graph.model(input_ids=ids, attention_mask=mask)
            logits = out.logits if hasattr(out, "logits") else out
            theirs = F.cross_entropy(logits.float(), labels, reduction="none")
        finally:
            for name, v in saved.items():
                params[name].copy_(v)
    diff = float((ours - theirs).abs().max())
    if not diff <= tolerance:
        raise EdgezoError(
            f"reference check failed: the exported loss function gives {ours.tolist()} where "
            f"PyTorch's cross-entropy of the model gives {theirs.tolist()}",
            "the architecture description in exporters/architectures.py does not fit this "
            "model; no bundle was written",
        )
    return diff


def _architecture(loaded: LoadedModel, num_labels: int) -> dict:
    cfg = loaded.model.config
    return {
        "family": loaded.arch.family,
        "model_type": loaded.model_type,
        "num_parameters": loaded.num_parameters,
        "source": loaded.source,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "num_labels": num_labels,
        "head": "mean-pooled last hidden state -> linear"
        if loaded.head_init != "pretrained"
        else "the model's own classifier",
        "head_init": loaded.head_init,
    }
