"""``export_bundle``: a model → a validated edgezo bundle, for one of the bundle tasks.

=====================  ==================================================================
task                   what is exported
=====================  ==================================================================
causal_lm              :func:`export_causal_lm`: next-token loss (HF folder or GGUF)
prompt_classification  the same causal LM graph; the manifest adds a prompt template and
                       one label word per class (MeZO-style: the loss is on the label
                       word's first token; the runtime builds prompt + label word)
classification         :func:`exporters.classification.export_classifier`: an encoder
                       (BERT family) with a classification head
=====================  ==================================================================
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import onnx
import torch
from safetensors.torch import save_file

from edgezo.bundle import TASKS, Manifest, write_manifest
from edgezo.errors import EdgezoError

from .architectures import MODES, config_sizes
from .bundle_writer import check_destination, staged_bundle
from .classification import check_labels
from .default import DEFAULT_LORA
from .deps import versions
from .load import LoadedModel, load_causal_lm
from .lora import layer_index
from .loss import CausalLMLossGraph
from .memory import release_memory
from .onnx_export import OPSET, batch_input_specs, export_loss_graph, output_specs, save_model
from .precision import (
    ACTIVATIONS,
    SCHEME,
    SCOPES,
    calibration_feeds,
    check_precision_supported,
    prefix_only,
    quantize_int8_smooth,
    resolve_precision,
)
from .quantize import QUANT_RTOL, check_quant_args, quantize_model, scales_to_inputs
from .stages import add_stages
from .trainables import FROZEN_LORA_A, LoraSettings, select_trainables
from .validate import (
    check_fed_scales,
    check_parity,
    check_quantized,
    check_reference,
    check_sensitivity,
    fp32_loss,
    ort_session,
    parity_batch,
    torch_outputs,
    validation_point,
)

#: the LoRA layout the default recipe (MODE_DEFAULTS["lora_fa"]) was measured on, the default
#: bundle's (exporters.default.DEFAULT_LORA): LoRA-FA on
#: the value projection of the last four blocks, so the blocks before are a cached frozen
#: prefix (docs/benchmarks/recipes.md)
MEASURED_LAYOUT = {
    "targets": tuple(DEFAULT_LORA["lora_targets"]),
    "last": int(DEFAULT_LORA["lora_layers"].removeprefix("last:")),
    "freeze_a": DEFAULT_LORA["lora_freeze_a"],
}


def measured_layout(model, arch) -> tuple[tuple[str, ...], str, bool]:
    """(targets, layers, freeze_a) of :data:`MEASURED_LAYOUT` for ``model``: the architecture's
    targets where it has no ``v_proj`` (GPT-2's fused ``c_attn``), every block where it has no
    more than four."""
    wanted = MEASURED_LAYOUT["targets"]
    targets = wanted if set(wanted) <= set(arch.lora_targets) else arch.lora_targets
    blocks = {
        layer_index(name)
        for name, _ in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and layer_index(name) is not None
    }
    last = MEASURED_LAYOUT["last"]
    layers = f"last:{last}" if len(blocks) > last else "all"
    return tuple(targets), layers, bool(MEASURED_LAYOUT["freeze_a"])


def export_causal_lm(
    model: str | Path,
    out: str | Path,
    mode: str = "lora",
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_targets: list[str] | tuple[str, ...] | None = None,
    lora_layers: str | None = None,
    lora_freeze_a: bool = False,
    lora_layout: str | None = None,
    gguf_file: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    progress: Callable[[str], None] | None = print,
    external_data: bool | None = None,
    quantize: str | None = None,
    precision: str | None = None,
    precision_scope: str = "all",
    int8_weights: str = "auto",
    int8_activations: str = "dynamic",
    block_size: int = 32,
    accuracy_level: int = 0,
    quant_rtol: float = QUANT_RTOL,
    task: str = "causal_lm",
    labels: Sequence[str] | None = None,
    template: str | None = None,
    label_words: Sequence[str] | None = None,
    decoder: bool | None = None,
    decoder_precision: str = "fp32",
    decoder_fused: bool | None = None,
    stream: bool = False,
) -> Path:
    """Export a causal LM into a validated bundle folder ``out``; returns ``out``.

    Args:
        model: a Hugging Face model folder, a folder holding ``gguf_file``, or a ``.gguf`` file.
        out: bundle folder to create (must be absent or empty unless ``overwrite``).
        mode: ``lora`` (LoRA A/B on ``lora_targets``), ``norms`` (normalisation weights and
            biases), ``full`` (every parameter once) or ``scales`` (the int4 quantisation
            scales, with ``quantize="int4"``).
        lora_rank, lora_alpha, lora_targets: LoRA settings (targets default to the
            architecture's, ``q_proj``/``v_proj`` for Llama).
        lora_layers: which blocks get adapters: ``None``/``"all"``, ``"last:N"``, ``"A-B"`` or
            a comma list (``exporters.lora.resolve_layers``). Adapters on the last blocks
            only leave a frozen prefix that the runtime caches (``exporters/stages.py``).
        lora_freeze_a: train LoRA ``B`` only; ``A`` is a frozen initializer (LoRA-FA).
        lora_layout: ``"measured"`` replaces the three above by the layout the default recipe
            was measured on (:data:`MEASURED_LAYOUT`), fitted to the model's blocks; what
            ``edgezo export --mode lora`` does when no placement option is given.
        gguf_file: name of a GGUF file inside the ``model`` folder.
        seed: seeds the LoRA ``A`` initialisation and the validation batches (an explicit
            generator; global random state is not touched).
        overwrite: replace an existing non-empty ``out``.
        tolerance: largest accepted |ONNX − PyTorch| loss difference.
        progress: called with one line per step (``None`` for silence).
        external_data: store weights in ``model.onnx.data`` (``None``: when above 256 MiB).
        precision: ``fp32`` (default), ``int8`` (per-channel int8 weights with smoothing,
            int8 compute: ``exporters.precision``), ``int8-dynamic`` (per-tensor int8,
            ``MatMulInteger``) or ``int4`` (``MatMulNBits``); the frozen ``MatMul`` weights
            are quantised, trainable tensors stay fp32 graph inputs. The fp32 graph is
            validated against PyTorch first, then the quantised graph against the fp32 graph
            with ``quant_rtol``. An int8 precision this CPU cannot run correctly is refused
            (``exporters.precision.check_precision_supported``).
        precision_scope: ``all`` or ``prefix`` (int8: quantise only the blocks before the
            first adapted block, so the cached prefix runs in int8 and the suffix in fp32).
        int8_weights: how ``int8`` stores its weights: ``s8``, ``u8`` (exact on an x86 CPU
            without VNNI, whose u8 × s8 kernels saturate), ``s7``, or ``auto`` (``s8`` where
            the exporting CPU has int8 dot-product instructions, else ``u8``).
        int8_activations: how ``int8`` quantises the activations its ``MatMul`` s read:
            ``dynamic`` (a scale from each batch's range, at run time) or ``static`` (a scale
            per tensor calibrated at export and fixed: an example's loss does not depend on
            its batch-mates, and a small change of the trainable tensors re-rounds only the
            values it moves across a rounding step; ``docs/guides/precision.md``).
        quantize: the older spelling of ``precision``: ``"int8"`` = ``int8-dynamic``,
            ``"int4"`` = ``int4``.
        block_size: int4 block size (32, 64 or 128).
        accuracy_level: ``MatMulNBits`` accuracy level (0 default; ``scales`` needs 0).
        quant_rtol: largest accepted relative |quantised − fp32| ONNX loss difference.
        task: ``causal_lm`` or ``prompt_classification`` (then ``labels``, a ``template``
            holding ``{text}``, e.g. ``"{text}\nTopic:"``, and one of ``label_words`` per
            label, e.g. ``" cooking"``: their first tokens must differ).
        decoder: also write the KV-cache decoding graph for ``edgezo generate``
            (``exporters/decode.py``); ``None``: for an fp32 ``causal_lm`` bundle.
        decoder_precision: the decoding graph's frozen weights: ``fp32`` (default), or
            weight-only ``int8``/``int4`` ``MatMulNBits`` (faster one-token steps; the loss
            graph stays as ``precision`` says). Recorded as the manifest's
            ``decoder.precision``.
        decoder_fused: the decoding graph's kind: None (default) writes the fused graph
            (``exporters/decode_fused.py``: GroupQueryAttention and fused norms, a fraction
            of the nodes) where the model's family has one, and traces the model otherwise;
            True requires the fused graph, False always traces. Recorded as
            ``decoder.kind``.
        stream: the streamed int4 export (``exporters/stream.py``): the weights are read from
            the checkpoint one tensor at a time and quantised as they are attached, so the
            fp32 model and graph never sit in memory whole (what a model too large for the
            ordinary export needs). It takes a Hugging Face folder with safetensors weights,
            ``precision="int4"``, ``mode="lora"``, task ``causal_lm`` and no decoding graph;
            validation compares the int4 graph with PyTorch run one module at a time.

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
    precision = resolve_precision(precision, quantize)
    # the quantisation scheme (exporters.quantize), None for fp32
    quantize = None if precision == "fp32" else SCHEME.get(precision, precision)
    check_quant_args(quantize, mode, block_size, accuracy_level)
    if precision_scope not in SCOPES:
        raise EdgezoError(
            f"unknown precision scope {precision_scope!r}",
            f"pass --precision-scope as one of: {', '.join(SCOPES)}",
        )
    if precision_scope == "prefix" and (precision != "int8" or not lora_layers):
        raise EdgezoError(
            f"--precision-scope prefix quantises the frozen prefix before the adapted blocks; "
            f"it needs --precision int8 and --lora-layers (got --precision {precision}, "
            f"--lora-layers {lora_layers or 'all'})",
            "pass --precision int8 --lora-layers last:N, or --precision-scope all",
        )
    weights_format = check_precision_supported(precision, int8_weights=int8_weights)
    if int8_activations not in ACTIVATIONS:
        raise EdgezoError(
            f"unknown int8 activation quantisation {int8_activations!r}",
            f"pass --int8-activations as one of: {', '.join(ACTIVATIONS)}",
        )
    if int8_activations != "dynamic" and precision != "int8":
        raise EdgezoError(
            f"--int8-activations {int8_activations} applies to --precision int8, not {precision}",
            "drop --int8-activations, or pass --precision int8",
        )
    if not quant_rtol >= 0:
        raise EdgezoError(f"quant_rtol must be >= 0, got {quant_rtol!r}", "pass 0.1")
    if task not in ("causal_lm", "prompt_classification"):
        raise EdgezoError(
            f"export_causal_lm exports task causal_lm or prompt_classification, not {task!r}",
            "use export_bundle(task=...) for classification",
        )
    if task == "prompt_classification":
        labels = check_labels(labels)
        if not template or "{text}" not in template:
            raise EdgezoError(
                f"the prompt template {template!r} has no {{text}} placeholder",
                'pass --template "{text}\nTopic:" (any text around {text})',
            )
        if label_words is None or len(label_words) != len(labels):
            raise EdgezoError(
                f"{len(labels)} labels but {0 if label_words is None else len(label_words)} "
                "label words",
                "pass one --label-words entry per label, in the same order",
            )
    from .decode import check_decoder_precision

    check_decoder_precision(decoder_precision)
    if decoder is False and decoder_precision != "fp32":
        raise EdgezoError(
            f"--decoder-precision {decoder_precision} was given with --no-decoder",
            "drop --no-decoder (or --decoder-precision)",
        )
    if quantize:
        from .decode import quantised_decoder_precision

        quantised_decoder_precision(precision, decoder_precision)  # refuses another width
    if decoder and quantize and mode == "scales":
        raise EdgezoError(
            "the decoding graph (--decoder) of a bundle that trains its quantisation scales is "
            "not exported yet (it would need the scales as inputs)",
            "drop --decoder (generate then re-runs the loss graph)",
        )
    if stream:
        bad = [
            what
            for what, wrong in (
                (
                    f"--precision {precision} (int4 or int8 only)",
                    precision not in ("int4", "int8"),
                ),
                (f"--mode {mode} (lora only)", mode != "lora"),
                (f"--task {task} (causal_lm only)", task != "causal_lm"),
                ("a GGUF file (a safetensors folder only)", gguf_file is not None),
                ("--decoder (none yet)", bool(decoder)),
            )
            if wrong
        ]
        if bad:
            raise EdgezoError(
                f"the streamed export (--stream) does not take {', '.join(bad)}",
                "pass --stream with --precision int4 or int8, --mode lora and a Hugging Face "
                "folder, or "
                "export without --stream",
            )
        from .stream import export_causal_lm_streamed

        return export_causal_lm_streamed(
            model,
            out,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            lora_layers=lora_layers,
            lora_freeze_a=lora_freeze_a,
            lora_layout=lora_layout,
            seed=seed,
            overwrite=overwrite,
            tolerance=tolerance,
            progress=progress,
            block_size=block_size,
            accuracy_level=accuracy_level,
            quant_rtol=quant_rtol,
            precision=precision,
            precision_scope=precision_scope,
            weights_format=weights_format or "s8",
            int8_activations=int8_activations,
        )
    check_destination(out, overwrite)  # fail before the slow load

    t0 = time.perf_counter()
    say(f"loading {model}{f' ({gguf_file})' if gguf_file else ''} ...")
    auto_decoder = decoder is None
    if auto_decoder:  # on for a causal LM where its trace fits this machine (load_causal_lm)
        decoder = task == "causal_lm" and not (quantize and mode == "scales")
    loaded = load_causal_lm(
        model, gguf_file, precision if quantize else None, decoder, optional_decoder=auto_decoder
    )
    if decoder and loaded.decoder_left_out:
        say(f"note: no decoding graph: {loaded.decoder_left_out}")
        decoder = False
    num_parameters = loaded.num_parameters
    prompt = (
        _prompt_info(loaded, template, list(label_words))
        if task == "prompt_classification"
        else None
    )
    say(
        f"loaded {loaded.model_type} ({loaded.arch.family} family), {num_parameters:,} "
        f"parameters in {time.perf_counter() - t0:.1f} s"
    )

    generator = torch.Generator().manual_seed(seed)
    lora, specs = lora_trainables(
        loaded,
        mode,
        lora_rank,
        lora_alpha,
        lora_targets,
        lora_layers,
        lora_freeze_a,
        lora_layout,
        generator,
        say,
    )
    params = dict(loaded.model.named_parameters())
    values = [params[s.name].detach().clone().contiguous() for s in specs]
    n_train = sum(s.size for s in specs)
    say(
        "trainable (scales): the int4 scales, added after quantisation"
        if mode == "scales"
        else f"trainable ({mode}): {len(specs)} tensors, {n_train:,} values "
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
        fp32_dir = stage / "_fp32" if quantize else stage
        fp32_dir.mkdir(exist_ok=True)
        model_files = export_loss_graph(
            graph,
            values,
            specs,
            fp32_dir / "model.onnx",
            loaded.vocab_size,
            pad,
            generator,
            # a quantised export keeps the head as its own initializer, so it is quantised too
            tied_embedding=None
            if quantize
            else _frozen_tied_embedding(loaded, {s.name for s in specs}),
            external_data=external_data,
            progress=say,
        )
        size = sum((fp32_dir / f).stat().st_size for f in model_files)
        say(
            f"exported {' + '.join(model_files)} ({size / 2**20:.1f} MiB) in "
            f"{time.perf_counter() - t:.1f} s"
        )

        t = time.perf_counter()
        say(
            "validating (ONNX Runtime vs PyTorch parity, loss vs the model's own loss, "
            "sensitivity of each trainable) ..."
        )
        point = validation_point(specs, values, generator)
        batch = parity_batch(loaded.vocab_size, pad, generator)
        # PyTorch first, then ONNX Runtime: where the torch model is not needed afterwards (no
        # decoding graph to trace) its weights are dropped before the session holds a copy
        reference = torch_outputs(graph, point, batch)
        try:  # raised after the parity check, which names an export bug first
            hf_reference_diff, reference_error = (
                check_reference(graph, values, loaded.vocab_size, generator, tolerance),
                None,
            )
        except EdgezoError as e:
            hf_reference_diff, reference_error = None, e
        trainable_values = {s.name: v for s, v in zip(specs, values, strict=True)}
        frozen_a = (
            {
                n: params[n].detach().clone().contiguous()
                for n in (s.name.replace("lora_B.", "lora_A.") for s in specs)
            }
            if lora is not None and lora.freeze_a  # the adapter hand-off needs A too
            else None
        )
        if not decoder:
            loaded.model.to("meta")  # frees the weights; the config and tokenizer stay
            graph = params = None
            release_memory()
        session = ort_session(fp32_dir / "model.onnx")
        parity = check_parity(session, reference, specs, point, batch, tolerance)
        if reference_error is not None:
            raise reference_error
        if quantize:  # the PyTorch parity is that of the fp32 graph the quantiser starts from
            parity["graph"] = "fp32 ONNX before quantisation (see quantization.parity_vs_fp32)"
        parity["hf_reference_diff"] = hf_reference_diff
        if specs:
            parity["sensitivity_min_change"] = check_sensitivity(
                session, specs, point, loaded.vocab_size, generator
            )
        say(
            f"validated in {time.perf_counter() - t:.1f} s: max |ONNX - PyTorch| = "
            f"{parity['max_abs_diff']:.2e} (tolerance {tolerance:g})"
            + (f", all {len(specs)} trainable tensors move the loss" if specs else "")
        )

        quant_info = None
        if quantize:
            # the quantiser holds the fp32 graph and its output at once: the fp32 session goes
            # first, its loss recorded (measured: docs/benchmarks/scale.md)
            fp32_reference = fp32_loss(session, specs, point, batch)
            session = None
            release_memory()
            t = time.perf_counter()
            say(f"quantising the frozen MatMul weights ({precision}) ...")
            fp32_model = onnx.load(str(fp32_dir / "model.onnx"))
            if precision == "int8":
                keep = (
                    (lambda _w: True) if precision_scope == "all" else prefix_only(min(lora.layers))
                )
                calib = calibration_feeds(
                    loaded.tokenizer,
                    loaded.vocab_size,
                    {s.name: v.numpy() for s, v in zip(specs, values, strict=True)},
                )
                qmodel, quant_info = quantize_int8_smooth(
                    fp32_model,
                    calib,
                    keep,
                    weights_format=weights_format,
                    activations=int8_activations,
                )
                quant_info["scope"] = precision_scope
            else:
                qmodel, quant_info = quantize_model(
                    fp32_model,
                    quantize,
                    block_size,
                    accuracy_level,
                    reduce_range=weights_format == "s7",
                )
            del fp32_model
            quant_info["precision"] = precision
            if precision.startswith("int8") and precision_scope == "all" and specs:
                say(
                    "note: the trainable tensors feed activations this int8 graph rounds to 8 "
                    "bits (with run-time or fixed scales alike), so its loss is a step function "
                    "of them: ZO fine-tuning will not "
                    "learn on it (docs/guides/precision.md); for fine-tuning export with "
                    "--precision-scope prefix (int8 frozen prefix, fp32 suffix)"
                )
            baked_dir = None
            if mode == "scales":
                baked_dir = stage / "_baked"
                baked_dir.mkdir()
                save_model(qmodel, baked_dir / "model.onnx", external_data)
                scale_specs, scale_values = scales_to_inputs(qmodel)
                specs = [*specs, *scale_specs]
                point = [*point, *(torch.from_numpy(v) for v in scale_values.values())]
                trainable_values.update({k: torch.from_numpy(v) for k, v in scale_values.items()})
            model_files = save_model(qmodel, stage / "model.onnx", external_data)
            del qmodel
            qsession = ort_session(stage / "model.onnx")
            quant_info["parity_vs_fp32"] = check_quantized(
                qsession, fp32_reference, specs, point, batch, quant_rtol
            )
            if baked_dir is not None:
                quant_info["fed_scales_exact"] = check_fed_scales(
                    qsession, ort_session(baked_dir / "model.onnx"), specs, point, batch
                )
                shutil.rmtree(baked_dir)
            parity["sensitivity_min_change"] = check_sensitivity(
                qsession, specs, point, loaded.vocab_size, generator
            )
            del qsession
            shutil.rmtree(fp32_dir)
            q = quant_info["parity_vs_fp32"]
            say(
                f"quantised {quant_info['quantized_matmuls']} MatMuls in "
                f"{time.perf_counter() - t:.1f} s: loss vs fp32 ONNX max abs "
                f"{q['max_abs_diff']:.3g}, max rel {q['max_rel_diff']:.3g} (rtol {quant_rtol:g})"
                + (", fed scales = baked scales exactly" if mode == "scales" else "")
            )
        del session

        save_file(
            {s.name: trainable_values[s.name].contiguous() for s in specs},
            str(stage / "trainable.safetensors"),
            metadata={"format": "pt"},
        )
        tok_spec = loaded.save_tokenizer(stage / "tokenizer.json")
        manifest = Manifest(
            task=task,
            labels=list(labels) if prompt else None,
            prompt=prompt,
            architecture=_architecture_dict(loaded, num_parameters),
            trainable_mode=mode,
            inputs=batch_input_specs(),
            outputs=output_specs(),
            trainable=specs,
            tokenizer=tok_spec,
            lora=lora.to_json() if lora else None,
            quantization=quant_info,
            precision=precision,
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
        extra = []
        if decoder:
            from .decode import build_decoder

            dec_files, manifest.decoder = build_decoder(
                loaded,
                specs,
                values,
                stage,
                seed,
                tolerance,
                quant_info,
                say,
                decoder_precision,
                decoder_fused,
            )
            extra += dec_files
        if frozen_a is not None:
            save_file(frozen_a, str(stage / FROZEN_LORA_A), metadata={"format": "pt"})
            extra.append(FROZEN_LORA_A)
        write_manifest(
            stage, manifest, [*model_files, "trainable.safetensors", tok_spec.file, *extra]
        )
        if lora is not None and lora.layers is not None:  # adapters on some blocks only
            graph = params = loaded = None  # the torch model is not needed from here on
            add_stages(stage, log=say)
    say(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def export_bundle(
    model: str | Path,
    out: str | Path,
    task: str = "causal_lm",
    labels: Sequence[str] | None = None,
    mode: str | None = None,
    head_init: str = "zero",
    template: str | None = None,
    label_words: Sequence[str] | None = None,
    **kw,
) -> Path:
    """Export ``model`` into a bundle for ``task``; returns ``out``.

    ``export_bundle(model=..., out=..., task="classification", labels=[...], mode="head",
    head_init="zero")`` for an encoder; ``task="prompt_classification"`` with ``labels``,
    ``template`` and ``label_words`` for a causal LM; ``task="causal_lm"`` (default). ``mode``
    defaults to ``head`` for classification and ``lora`` otherwise; ``kw`` as for
    :func:`export_causal_lm` (quantisation: causal LM tasks only).
    """
    if task == "classification":
        from .classification import export_classifier

        unset = ("lora_layers", "lora_freeze_a", "decoder", "decoder_fused")  # left at default
        kw = {k: v for k, v in kw.items() if not (k in unset and not v)}
        if kw.get("decoder_precision") == "fp32":  # the default: nothing asked of the decoder
            del kw["decoder_precision"]
        bad = sorted(
            set(kw)
            - {
                "lora_rank",
                "lora_alpha",
                "lora_targets",
                "lora_layers",
                "lora_freeze_a",
                "seed",
                "overwrite",
                "tolerance",
                "progress",
                "external_data",
            }
        )
        if bad:
            raise EdgezoError(
                f"option(s) {', '.join(bad)} do not apply to task classification "
                "(quantisation and the decoding graph are causal-LM options)",
                "drop them, or export a causal LM task",
            )
        return export_classifier(
            model, out, labels or [], mode=mode or "head", head_init=head_init, **kw
        )
    if task not in TASKS:
        raise EdgezoError(f"unknown task {task!r}", f"pass --task as one of: {', '.join(TASKS)}")
    if labels is not None and task == "causal_lm":
        raise EdgezoError(
            "labels were given for a causal_lm bundle",
            "pass --task classification (encoder) or prompt_classification",
        )
    return export_causal_lm(
        model,
        out,
        mode=mode or "lora",
        task=task,
        labels=labels,
        template=template,
        label_words=label_words,
        **kw,
    )


def _prompt_info(loaded: LoadedModel, template: str, words: list[str]) -> dict:
    """The manifest's ``prompt``: template, label words and their (distinct) first tokens."""
    tok = loaded.tokenizer.backend_tokenizer
    first = []
    for word in words:
        ids = tok.encode(word, add_special_tokens=False).ids
        if not ids:
            raise EdgezoError(
                f"label word {word!r} encodes to no token", "pass non-empty --label-words"
            )
        first.append(int(ids[0]))
    if len(set(first)) != len(first):
        clash = [(w, tok.id_to_token(t)) for w, t in zip(words, first, strict=True)]
        raise EdgezoError(
            f"the label words' first tokens are not distinct: {clash}; the classes could not "
            "be told apart",
            "choose label words that start differently (e.g. with a leading space: ' cooking')",
        )
    return {"template": template, "label_words": words, "label_token_ids": first}


def lora_trainables(
    loaded: LoadedModel,
    mode: str,
    lora_rank: int,
    lora_alpha: float,
    lora_targets,
    lora_layers,
    lora_freeze_a: bool,
    lora_layout: str | None,
    generator: torch.Generator,
    say: Callable[[str], None],
) -> tuple[LoraSettings | None, list]:
    """(LoRA settings, trainable specs) of an export (the ordinary and the streamed one): the
    measured layout resolved, the adapters added to ``loaded.model`` (``mode="lora"``), and the
    settings' ``layers`` replaced by the block indices that got adapters, as the manifest
    records them."""
    lora = None
    if mode == "lora":
        if lora_layout == "measured":
            lora_targets, lora_layers, lora_freeze_a = measured_layout(loaded.model, loaded.arch)
            say(
                f"LoRA layout: {'LoRA-FA ' if lora_freeze_a else ''}r={lora_rank} on "
                f"{','.join(lora_targets)} of blocks {lora_layers} (the default recipe's; "
                "--lora-layers all for every block)"
            )
        elif lora_layout is not None:
            raise EdgezoError(f"unknown LoRA layout {lora_layout!r}", "pass measured or None")
        lora = LoraSettings(
            rank=lora_rank,
            alpha=float(lora_alpha),
            targets=tuple(lora_targets) if lora_targets else loaded.arch.lora_targets,
            layers=lora_layers,
            freeze_a=bool(lora_freeze_a),
        )
    specs = select_trainables(loaded.model, loaded.arch, mode, lora, generator)
    if lora is not None and lora.layers is not None:  # the manifest records the indices
        lora = replace(
            lora,
            layers=tuple(
                sorted({layer_index(s.name) for s in specs if s.role in ("lora_a", "lora_b")})
            ),
        )
    return lora, specs


def _architecture_dict(loaded: LoadedModel, num_parameters: int) -> dict:
    cfg = loaded.model.config
    sizes = config_sizes(loaded.arch, cfg)  # optimum's normalised attribute names
    return {
        "family": loaded.arch.family,
        "model_type": loaded.model_type,
        "num_parameters": num_parameters,
        "source": loaded.source,
        "vocab_size": loaded.vocab_size,
        "hidden_size": sizes["hidden_size"],
        "num_layers": sizes["num_layers"],
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
