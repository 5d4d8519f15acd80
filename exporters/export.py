"""``export_causal_lm``: a Hugging Face / GGUF causal LM → a validated edgezo bundle."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgezo.bundle import Manifest, write_manifest
from edgezo.errors import EdgezoError

from .architectures import MODES
from .bundle_writer import check_destination, staged_bundle
from .deps import versions
from .load import LoadedModel, load_causal_lm
from .loss import CausalLMLossGraph
from .onnx_export import OPSET, batch_input_specs, export_loss_graph
from .trainables import LoraSettings, select_trainables
from .validate import (
    check_parity,
    check_reference,
    check_sensitivity,
    ort_session,
    parity_batch,
    validation_point,
)


def export_causal_lm(
    model: str | Path,
    out: str | Path,
    mode: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_targets: list[str] | tuple[str, ...] | None = None,
    gguf_file: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    progress: Callable[[str], None] | None = print,
    external_data: bool | None = None,
) -> Path:
    """Export a causal LM into a validated bundle folder ``out``; returns ``out``.

    Args:
        model: a Hugging Face model folder, a folder holding ``gguf_file``, or a ``.gguf`` file.
        out: bundle folder to create (must be absent or empty unless ``overwrite``).
        mode: ``lora`` (LoRA A/B on ``lora_targets``), ``norms`` (normalisation weights and
            biases) or ``full`` (every parameter once).
        lora_rank, lora_alpha, lora_targets: LoRA settings (targets default to the
            architecture's, ``q_proj``/``v_proj`` for Llama).
        gguf_file: name of a GGUF file inside the ``model`` folder.
        seed: seeds the LoRA ``A`` initialisation and the validation batches (an explicit
            generator; global random state is not touched).
        overwrite: replace an existing non-empty ``out``.
        tolerance: largest accepted |ONNX − PyTorch| loss difference.
        progress: called with one line per step (``None`` for silence).
        external_data: store weights in ``model.onnx.data`` (``None``: when above 256 MiB).

    Raises:
        EdgezoError: bad arguments, unsupported architecture, or a failed validation; no
            bundle folder is left behind.
    """
    say = progress or (lambda _line: None)
    out = Path(out)
    if mode not in MODES:
        raise EdgezoError(
            f"unknown trainable mode {mode!r}", f"pass --mode as one of: {', '.join(MODES)}"
        )
    if not tolerance >= 0:
        raise EdgezoError(f"tolerance must be >= 0, got {tolerance!r}", "pass --tolerance 1e-3")
    check_destination(out, overwrite)  # fail before the slow load

    t0 = time.perf_counter()
    say(f"loading {model}{f' ({gguf_file})' if gguf_file else ''} ...")
    loaded = load_causal_lm(model, gguf_file)
    num_parameters = loaded.num_parameters
    say(
        f"loaded {loaded.model_type} ({loaded.arch.family} family), {num_parameters:,} "
        f"parameters in {time.perf_counter() - t0:.1f} s"
    )

    generator = torch.Generator().manual_seed(seed)
    lora = None
    if mode == "lora":
        targets = tuple(lora_targets) if lora_targets else loaded.arch.lora_targets
        lora = LoraSettings(rank=lora_rank, alpha=float(lora_alpha), targets=targets)
    specs = select_trainables(loaded.model, loaded.arch, mode, lora, generator)
    params = dict(loaded.model.named_parameters())
    values = [params[s.name].detach().clone().contiguous() for s in specs]
    n_train = sum(s.size for s in specs)
    say(
        f"trainable ({mode}): {len(specs)} tensors, {n_train:,} values "
        f"({4 * n_train / 2**20:.1f} MiB fp32); frozen: "
        f"{num_parameters - (n_train if mode != 'lora' else 0):,} values"
    )
    graph = CausalLMLossGraph(
        loaded.model, [s.name for s in specs], loaded.arch.pass_position_ids
    ).eval()
    pad = loaded.pad_token_id if loaded.pad_token_id is not None else 0

    with staged_bundle(out, overwrite) as stage:
        t = time.perf_counter()
        say("exporting the loss graph to ONNX ...")
        model_files = export_loss_graph(
            graph,
            values,
            specs,
            stage / "model.onnx",
            loaded.vocab_size,
            pad,
            generator,
            tied_embedding=_frozen_tied_embedding(loaded, {s.name for s in specs}),
            external_data=external_data,
            progress=say,
        )
        size = sum((stage / f).stat().st_size for f in model_files)
        say(
            f"exported {' + '.join(model_files)} ({size / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - t:.1f} s"
        )

        t = time.perf_counter()
        say(
            "validating (ONNX Runtime vs PyTorch parity, loss vs the model's own loss, "
            "sensitivity of each trainable) ..."
        )
        session = ort_session(stage / "model.onnx")
        point = validation_point(specs, values, generator)
        parity = check_parity(
            session,
            graph,
            specs,
            point,
            parity_batch(loaded.vocab_size, pad, generator),
            tolerance,
        )
        parity["hf_reference_diff"] = check_reference(
            graph, values, loaded.vocab_size, generator, tolerance
        )
        parity["sensitivity_min_change"] = check_sensitivity(
            session, specs, point, loaded.vocab_size, generator
        )
        del session
        say(
            f"validated in {time.perf_counter() - t:.1f} s: max |ONNX - PyTorch| = "
            f"{parity['max_abs_diff']:.2e} (tolerance {tolerance:g}), all {len(specs)} "
            "trainable tensors move the loss"
        )

        save_file(
            {s.name: v for s, v in zip(specs, values, strict=True)},
            str(stage / "trainable.safetensors"),
            metadata={"format": "pt"},
        )
        tok_spec = loaded.save_tokenizer(stage / "tokenizer.json")
        manifest = Manifest(
            task=loaded.arch.task,
            architecture=_architecture_dict(loaded, num_parameters),
            trainable_mode=mode,
            inputs=batch_input_specs(),
            trainable=specs,
            tokenizer=tok_spec,
            lora=lora.to_json() if lora else None,
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
    say(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def _architecture_dict(loaded: LoadedModel, num_parameters: int) -> dict:
    cfg = loaded.model.config
    return {
        "family": loaded.arch.family,
        "model_type": loaded.model_type,
        "num_parameters": num_parameters,
        "source": loaded.source,
        "vocab_size": loaded.vocab_size,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


def _frozen_tied_embedding(loaded: LoadedModel, trainable: set[str]) -> str | None:
    """Name of the input embedding when the LM head shares it and it stays frozen."""
    model = loaded.model
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return None
    for name, p in model.named_parameters():
        if p is emb.weight:
            return None if name in trainable else f"model.{name}"  # the graph's attribute
    return None
