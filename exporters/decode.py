"""The decoding graph: prefill and one-token steps with a KV cache, for ``edgezo generate``.

::

    input_ids [B, S], attention_mask [B, P+S]          past_key_values.{i}.key/value [B, H, P, D]
    trainables (same names and shapes as model.onnx) ─┐                        │
                                                      ▼                        ▼
                     model body (trainables substituted, DynamicCache of the past)
                                                      │
            logits [B, vocab] (the last position)  ◄──┴──► present.{i}.key/value [B, H, P+S, D]

One graph serves both phases: the prompt is a step with an empty past (P = 0), each new token a
step with S = 1 and the previous step's ``present`` as ``past``. The trainable tensors are graph
inputs exactly like the loss graph's, so a run's ``trained.safetensors`` plugs in unchanged;
the frozen weights are the same tensors as the loss graph's (the model is rebuilt from the
manifest's source with the same seed, and :func:`check_decoder` compares its logits with
``model.onnx``'s ``next_logits``).

**Two ways to write it.** For Llama, Qwen2, Qwen3, SmolLM3, Gemma 3 and Phi-3 (head size
a multiple of 16) :mod:`exporters.decode_fused` writes the graph directly with
ONNX Runtime's ``GroupQueryAttention`` and fused RMS norms (``decoder.kind`` ``fused``: ~13
nodes a layer; the traced graph runs ~110 a layer per step, mostly shape arithmetic, which on
a 2-core CPU cost more than the int8 weights). Every other model is traced through
``torch.onnx`` as below (``traced``). Both have the same inputs, outputs and check.

The past's shapes come from optimum's ``NormalizedConfigManager`` and past-key/value dummy
generators (``MistralDummyPastKeyValuesGenerator`` for grouped-query attention); a model
optimum does not describe is probed once instead. The dummy past is traced with a padded
position so Hugging Face builds an explicit attention mask (with an all-ones mask it would skip
the mask and the tracer would freeze that shortcut).

The graph's frozen weights that are byte-identical to tensors of ``model.onnx.data`` are not
stored again: the decoder's initializers point into the loss graph's external-data file
(:func:`share_external_data`), so a large bundle carries its weights once.

**Decoder precision** (``--decoder-precision``, :data:`DECODER_PRECISIONS`): a one-token step
reads every frozen weight once per token, so it is bound by memory bandwidth, not arithmetic.
``int8``/``int4`` quantise the decoder's frozen ``MatMul`` weights to ONNX Runtime's weight-only
``MatMulNBits`` (blocks of 32, accuracy level 4: int8 dot products;
:func:`exporters.quantize.quantize_decoder`), a quarter / an eighth of the bytes. A tied LM head
(the embedding's transpose) is untied first: the head keeps the folded ``[hidden, vocab]`` copy
as its own initializer, which is quantised, while the embedding ``Gather`` stays fp32 (and
shared with ``model.onnx.data``). The trainable tensors stay float32 graph inputs with the same
names and shapes, so a run's ``trained.safetensors`` plugs in unchanged. The quantised weights
are new bytes: they live in the decoder's own ``decoder.onnx.data``. The loss graph is not
changed (training still sees fp32), and :func:`check_decoder` compares the quantised logits
with the fp32 loss graph's within :data:`QUANT_LOGIT_RTOL` and reports the deviation. int8
stays close to fp32; int4 weights are lossy (on SmolLM2-135M its greedy tokens differ from the
first ones: docs/benchmarks/generation.md).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from edgezo.bundle import (
    DECODER_PRECISIONS,
    MANIFEST,
    Manifest,
    fingerprint_of,
    load_bundle,
    write_manifest,
)
from edgezo.errors import EdgezoError

from .loss import _SubstitutedGraph
from .memory import release_memory
from .onnx_export import EXTERNAL_DATA, OPSET

DECODER = "decoder.onnx"
DECODER_DATA = "decoder.onnx.data"
DECODER_VERSION = 1
__all__ = ["DECODER_PRECISIONS", "add_decoder", "build_decoder", "check_decoder"]
#: a quantised decoder's largest accepted max|logits − fp32 logits| / max|fp32 logits| over the
#: checked steps, per precision: a quantisation error, not an export bug, so far looser than
#: fp32's tolerance. Measured on SmolLM2-135M (random prompt / English prompt): int8 0.079 /
#: 0.046, int4 0.42 / 0.48 (int4 weights are lossy: its top-1 tokens often differ); an all-zero
#: output, the failure mode of MatMulNBits at accuracy level 4 with fed scales, gives 1.0
QUANT_LOGIT_RTOL = {"int8": 0.25, "int4": 0.75}


def check_decoder_precision(precision: str) -> None:
    """Refuse an unknown ``--decoder-precision`` before anything slow happens."""
    if precision not in DECODER_PRECISIONS:
        raise EdgezoError(
            f"unknown decoder precision {precision!r}",
            f"pass --decoder-precision as one of: {', '.join(DECODER_PRECISIONS)}",
        )


def quantised_decoder_precision(bundle_precision: str | None, asked: str = "fp32") -> str:
    """The decoding graph's precision for a bundle quantised as ``bundle_precision``: the
    same bit width (``int8``, ``int8-dynamic`` → int8; ``int4`` → int4), so generation runs at
    the precision the bundle was trained at. ``asked``: the ``--decoder-precision`` given
    (``fp32``, the default, means none); another width than the bundle's is refused."""
    own = "int4" if bundle_precision == "int4" else "int8"
    if asked not in ("fp32", own):
        raise EdgezoError(
            f"--decoder-precision {asked} was given for a quantised bundle "
            f"(--precision {bundle_precision}): its decoding graph is quantised like its loss "
            f"graph, {own}",
            f"drop --decoder-precision (or pass {own}), or export an fp32 bundle with "
            f"--decoder-precision {asked}",
        )
    return own


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class DecoderGraph(_SubstitutedGraph):
    """``forward(input_ids, attention_mask, past, trainables) -> (logits, *present)``.

    ``past`` is the flat list ``[key_0, value_0, key_1, ...]`` of ``[B, H, P, D]`` tensors;
    ``attention_mask`` covers past and new tokens (``[B, P+S]``).
    """

    def __init__(self, model: torch.nn.Module, names: list[str], pass_position_ids: bool):
        super().__init__(model, names)
        self.pass_position_ids = pass_position_ids

    def forward(self, input_ids, attention_mask, past, trainables):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
        kw: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": True,
            "logits_to_keep": 1,  # the head runs on the last position only
        }
        if self.pass_position_ids:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kw["position_ids"] = positions[:, -input_ids.shape[1] :]
        with self._substituted(trainables):
            out = self.model(**kw)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits[:, -1, :].float(), *present)


def past_shape(model: torch.nn.Module, model_type: str) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of the model's KV cache."""
    from optimum.utils import NormalizedConfigManager
    from optimum.utils.input_generators import (
        DummyPastKeyValuesGenerator,
        MistralDummyPastKeyValuesGenerator,
    )

    config = model.config
    try:
        normalized = NormalizedConfigManager.get_normalized_config_class(model_type)(config)
        gqa = getattr(normalized, "num_key_value_heads", None) is not None
        cls = MistralDummyPastKeyValuesGenerator if gqa else DummyPastKeyValuesGenerator
        gen = cls("text-generation", normalized, batch_size=1, sequence_length=1)
        with torch.random.fork_rng(devices=[]):  # the generators draw from the global RNG
            key = gen.generate("past_key_values")[0][0]
        layers = int(normalized.num_layers)
        shape = (layers, int(key.shape[1]), int(key.shape[3]))
    except Exception:  # optimum does not describe every model (gpt2's entry raises)
        shape = None
    probe = _probe_past(model)
    if shape is not None and shape != probe:  # e.g. an explicit head_dim optimum does not read
        shape = probe
    return shape or probe


def _probe_past(model: torch.nn.Module) -> tuple[int, int, int]:
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layers = out.cache.layers
    return len(layers), int(layers[0].keys.shape[1]), int(layers[0].keys.shape[3])


def export_decoder_graph(
    graph: DecoderGraph,
    values: list[torch.Tensor],
    trainable_names: list[str],
    path: Path,
    vocab_size: int,
    past: tuple[int, int, int],
    generator: torch.Generator,
) -> onnx.ModelProto:
    """Trace ``graph`` to ONNX (in memory; see :func:`save_decoder`)."""
    layers, heads, dim = past
    batch, past_len, seq = 2, 3, 2
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    mask[1, 0] = 0  # a padded position: Hugging Face then builds an explicit mask
    dummy_past = [
        torch.randn(batch, heads, past_len, dim, generator=generator) for _ in range(2 * layers)
    ]
    names_in = ["input_ids", "attention_mask", *past_names(layers), *trainable_names]
    names_out = ["logits", *present_names(layers)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "logits": {0: "batch"},
    }
    for n in past_names(layers):
        axes[n] = {0: "batch", 2: "past_sequence"}
    for n in present_names(layers):
        axes[n] = {0: "batch", 2: "total_sequence"}
    raw_dir = path.parent / "_decoder_raw"
    raw_dir.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (ids, mask, dummy_past, list(values)),
                str(raw_dir / "decoder.onnx"),
                dynamo=False,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        model = onnx.load(str(raw_dir / "decoder.onnx"))
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    got = [i.name for i in model.graph.input]
    if got != names_in:
        missing = sorted(set(names_in) - set(got))
        raise EdgezoError(
            f"the decoding graph's inputs differ from what was traced (missing: {missing[:5]})",
            "this is an exporter bug; report it with the model you exported",
        )
    return model


def share_external_data(model: onnx.ModelProto, folder: Path) -> tuple[int, int]:
    """Point the decoder's initializers at byte-identical tensors of the loss graph's
    ``model.onnx.data`` (when it has one); returns (tensors shared, bytes shared).

    The loss graph's references give each tensor's offset and length; a decoder tensor of the
    same dtype, shape and bytes is made external with that location, so it is not stored twice.
    """
    data = folder / EXTERNAL_DATA
    if not data.is_file():
        return 0, 0
    loss = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    by_key: dict[tuple, tuple[int, int]] = {}
    for t in loss.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != EXTERNAL_DATA:
            continue
        off, length = int(info.get("offset", 0)), int(info["length"])
        by_key.setdefault((t.data_type, tuple(t.dims), length), []).append(off)
    if not by_key:
        return 0, 0
    shared = nbytes = 0
    with open(data, "rb") as f:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.raw_data:
                raw = numpy_helper.to_array(t).tobytes() if not t.raw_data else t.raw_data
            else:
                raw = t.raw_data
            offsets = by_key.get((t.data_type, tuple(t.dims), len(raw)))
            if not offsets or len(raw) < 1024:
                continue
            for off in offsets:
                f.seek(off)
                if f.read(len(raw)) == raw:
                    t.ClearField("raw_data")
                    for field in ("float_data", "int64_data", "int32_data", "double_data"):
                        t.ClearField(field)
                    t.data_location = onnx.TensorProto.EXTERNAL
                    del t.external_data[:]
                    for k, v in (
                        ("location", EXTERNAL_DATA),
                        ("offset", off),
                        ("length", len(raw)),
                    ):
                        e = t.external_data.add()
                        e.key, e.value = k, str(v)
                    shared += 1
                    nbytes += len(raw)
                    break
    return shared, nbytes


def save_decoder(model: onnx.ModelProto, folder: Path, own_data: bool = False) -> list[str]:
    """Write ``decoder.onnx`` (+ ``decoder.onnx.data`` for weights not shared and large, or
    always with ``own_data``: a quantised decoder's weights); returns the files written (without
    the shared ``model.onnx.data``)."""
    path = folder / DECODER
    own = [
        t
        for t in model.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024
    ]
    if own and (own_data or sum(len(t.raw_data) for t in own) > 256 * 2**20):
        for t in own:
            external_data_helper.set_external_data(t, DECODER_DATA)
        onnx.save_model(model, str(path))  # writes the raw data of the tensors marked above
        # onnx writes a tensor marked external into its location when saving with the raw data
        # still in memory; the loss graph's shared tensors carry no raw data and are skipped
        return [DECODER, DECODER_DATA]
    onnx.save_model(model, str(path))
    return [DECODER]


def check_decoder(
    folder: Path,
    trainables: dict[str, np.ndarray],
    vocab_size: int,
    generator: torch.Generator,
    tolerance: float,
    precision: str = "fp32",
    reference: str = "fp32 loss graph",
) -> dict[str, Any]:
    """The decoder against the bundle's loss graph (ONNX Runtime both): prefill logits and
    three cached steps equal ``model.onnx``'s ``next_logits`` of the same prefixes.

    fp32: within ``tolerance`` (absolute). A quantised decoder cannot match exactly: its
    largest deviation relative to the largest fp32 logit must stay within
    :data:`QUANT_LOGIT_RTOL`; the max abs deviation, the relative one, the RMS deviation over
    the logits' standard deviation and how many of the steps' top-1 tokens agree with fp32's
    are reported."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ids = torch.randint(0, vocab_size, (1, 6), generator=generator).numpy()
    steps = [(0, 3), (3, 4), (4, 5), (5, 6)]
    # one session at a time (each holds the weights): the loss graph's references first
    loss = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    loss_names = {i.name for i in loss.get_inputs()}
    feeds_t = {k: v for k, v in trainables.items() if k in loss_names}
    refs = [
        loss.run(
            ["next_logits"],
            {
                "input_ids": ids[:, :end],
                "attention_mask": np.ones((1, end), np.int64),
                "labels": np.full((1, end), -100, np.int64),
                **feeds_t,
            },
        )[0]
        for _, end in steps
    ]
    del loss
    release_memory()
    dec = ort.InferenceSession(str(folder / DECODER), so, providers=["CPUExecutionProvider"])
    dec_inputs = dec.get_inputs()
    layers = sum(1 for i in dec_inputs if i.name.startswith("past_key_values.")) // 2
    heads, dim = dec_inputs[2].shape[1], dec_inputs[2].shape[3]
    past = {n: np.zeros((1, heads, 0, dim), np.float32) for n in past_names(layers)}
    worst = scale = rms = 0.0
    top1 = 0
    for (start, end), ref in zip(steps, refs, strict=True):
        out = dec.run(
            None,
            {
                "input_ids": ids[:, start:end],
                "attention_mask": np.ones((1, end), np.int64),
                **past,
                **trainables,
            },
        )
        worst = max(worst, float(np.max(np.abs(out[0] - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
        rms = max(rms, float(np.sqrt(np.mean((out[0] - ref) ** 2)) / (np.std(ref) or 1.0)))
        top1 += int(np.array_equal(np.argmax(out[0], -1), np.argmax(ref, -1)))
        past = dict(zip(past_names(layers), out[1:], strict=True))
    if precision != "fp32":
        rel = worst / scale if scale > 0 else float("inf")
        limit = QUANT_LOGIT_RTOL[precision]
        if not rel <= limit:
            raise EdgezoError(
                f"the {precision} decoding graph's logits differ from the fp32 loss graph's by "
                f"{worst:.3g} ({rel:.3g} of the largest logit; tolerance {limit:g}): "
                "the quantised weights do not compute the model",
                "export with --decoder-precision fp32 (or int8, the closer one)",
            )
        return {
            "max_abs_logit_diff": worst,
            "max_rel_logit_diff": rel,
            "rms_logit_diff_over_std": rms,
            "top1_agree": top1,
            "steps_checked": len(steps),
            "reference": f"{reference} (model.onnx next_logits)",
        }
    if not worst <= tolerance:
        raise EdgezoError(
            f"the decoding graph's logits differ from the loss graph's by {worst:.3g} "
            f"(tolerance {tolerance:g}): it does not compute the same model",
            "re-export the bundle from its model (the source recorded in the manifest may have "
            "changed since)",
        )
    return {"max_abs_logit_diff": worst, "steps_checked": len(steps)}


def chat_pieces(tokenizer: Any) -> dict[str, str] | None:
    """The tokenizer's chat template rendered around one user message, as two strings: the
    runtime builds ``prefix + message + suffix`` without a template engine. None when the
    tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\x00EDGEZO_MESSAGE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True
    )
    if text.count(mark) != 1:
        return None
    prefix, suffix = text.split(mark)
    return {"prefix": prefix, "suffix": suffix}


def build_decoder(
    loaded: Any,
    specs: list,
    values: list[torch.Tensor],
    stage: Path,
    seed: int,
    tolerance: float = 1e-3,
    quantize: dict | None = None,
    progress: Callable[[str], None] = lambda _line: None,
    precision: str = "fp32",
    fused: bool | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Export and check the decoding graph of ``loaded`` (trainables substituted as in the
    loss graph) into ``stage``, next to its ``model.onnx``; returns (files, manifest field).

    ``precision``: the decoder's frozen ``MatMul`` weights, ``fp32`` or weight-only
    ``int8``/``int4`` (:data:`DECODER_PRECISIONS`; the loss graph is not changed).
    ``fused``: None writes the fused graph (:mod:`exporters.decode_fused`) where the model's
    family has one and traces the model otherwise; True requires the fused graph, False traces."""
    check_decoder_precision(precision)
    t = time.perf_counter()
    bundle_precision = None
    if quantize:  # a quantised bundle's decoder is quantised like its loss graph
        bundle_precision = quantize.get("precision") or f"int{quantize.get('bits', 8)}"
        precision = quantised_decoder_precision(bundle_precision, precision)
    from .decode_fused import build_fused_decoder, fused_support

    generator = torch.Generator().manual_seed(seed + 1)
    names = [s.name for s in specs]
    past = past_shape(loaded.model, loaded.model_type)
    why_traced = fused_support(loaded) if fused is not False else "asked for (fused=False)"
    positions = None
    if why_traced is None:
        progress("writing the fused decoding graph (KV cache, GroupQueryAttention) ...")
        model, positions = build_fused_decoder(loaded, specs, past, precision)
    else:
        if fused:
            raise EdgezoError(
                f"no fused decoding graph for this model: {why_traced}",
                "export without requiring it (the traced decoding graph serves every family)",
            )
        progress(f"exporting the decoding graph (KV cache) to ONNX (traced: {why_traced}) ...")
        graph = DecoderGraph(loaded.model, names, loaded.arch.pass_position_ids).eval()
        model = export_decoder_graph(
            graph, values, names, stage / DECODER, loaded.vocab_size, past, generator
        )
    from .export import _frozen_tied_embedding
    from .onnx_export import dedupe_tied_head

    tied = _frozen_tied_embedding(loaded, set(names))
    quant_info = None
    if precision != "fp32":
        from .quantize import quantize_decoder

        # the head keeps the folded [hidden, vocab] copy of a tied embedding (no dedupe): it is
        # untied, its own MatMul weight, and quantised with the others
        progress(f"quantising the decoding graph's frozen MatMul weights ({precision}) ...")
        model, quant_info = quantize_decoder(model, precision)
        quant_info["head_untied"] = tied is not None
    elif tied is not None and positions is None:  # the traced head's folded copy of the
        dedupe_tied_head(model, tied)  # embedding, as in model.onnx (the fused graph has none)
    n_shared, shared_bytes = share_external_data(model, stage)
    files = save_decoder(model, stage, own_data=precision != "fp32")
    del model
    release_memory()  # the graph's weight copies, before the check's session loads them
    trainables = {
        s.name: v.detach().numpy().astype(np.float32) for s, v in zip(specs, values, strict=True)
    }
    rng = np.random.default_rng(seed)
    for k, v in trainables.items():  # a non-trivial point (LoRA B starts at zero)
        trainables[k] = (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32)
    reference = f"{bundle_precision} loss graph" if quantize else "fp32 loss graph"
    parity = check_decoder(
        stage, trainables, loaded.vocab_size, generator, tolerance, precision, reference
    )
    field: dict[str, Any] = {
        "version": DECODER_VERSION,
        "graph": DECODER,
        "files": files,
        "precision": precision,
        "kind": "traced" if positions is None else "fused",
        "num_layers": past[0],
        "num_kv_heads": past[1],
        "head_dim": past[2],
        "parity_vs_loss_graph": parity,
        "shared_weights_bytes": shared_bytes,
    }
    if positions is not None:
        field["max_positions"] = positions
    if quant_info is not None:
        field["quantization"] = quant_info
    chat = chat_pieces(loaded.tokenizer)
    if chat is not None:
        field["chat"] = chat
    quant_note = (
        f", {quant_info['quantized_matmuls']} MatMuls {precision}, max rel "
        f"{parity['max_rel_logit_diff']:.2e}, top-1 {parity['top1_agree']}/"
        f"{parity['steps_checked']} as fp32"
        if quant_info
        else ""
    )
    progress(
        f"decoding graph {' + '.join(files)} ({precision}) in {time.perf_counter() - t:.1f} s "
        f"({n_shared} weight tensors shared with the loss graph, "
        f"{shared_bytes / 2**20:.1f} MiB); logits vs the loss graph max abs "
        f"{parity['max_abs_logit_diff']:.2e}{quant_note}"
    )
    return files, field


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


def add_decoder(
    bundle: str | Path,
    model: str | Path | None = None,
    tolerance: float = 1e-3,
    progress: Callable[[str], None] | None = print,
    precision: str = "fp32",
) -> Path:
    """Add the decoding graph to an existing bundle (an older export), in place and atomically:
    the files are written, checked, then the manifest is replaced in one step. The bundle's
    fingerprint does not change (it does not cover the decoder), so runs on it still replay.

    ``model``: the model the bundle was exported from (default: the manifest's source).
    ``precision``: the decoder's frozen weights (:data:`DECODER_PRECISIONS`); a decoder already
    there is replaced.
    """
    from dataclasses import replace

    from .load import load_causal_lm
    from .trainables import LoraSettings, select_trainables

    say = progress or (lambda _line: None)
    check_decoder_precision(precision)
    folder = Path(bundle)
    b = load_bundle(folder)
    m = b.manifest
    if m.task == "classification":
        raise EdgezoError(
            f"bundle {folder} is a classifier: it has nothing to generate",
            "add a decoding graph to a causal-LM bundle",
        )
    if m.quantization and m.trainable_mode == "scales":
        raise EdgezoError(
            f"bundle {folder} trains its quantisation scales: its decoding graph would need "
            "them as inputs, which it does not take yet",
            "generate falls back to re-running the loss graph for this bundle",
        )
    source = model or m.architecture.get("source")
    if not source:
        raise EdgezoError(f"{folder}'s manifest records no source model", "pass --model")
    src = Path(str(source))
    gguf = src.name if src.suffix == ".gguf" else None
    say(f"loading {src} ...")
    loaded = load_causal_lm(src.parent if gguf else src, gguf)
    seed = int(m.exporter.get("seed", 0))
    generator = torch.Generator().manual_seed(seed)
    lora = None
    if m.trainable_mode == "lora" and m.lora:
        layers = m.lora.get("layers")
        lora = LoraSettings(
            rank=int(m.lora["rank"]),
            alpha=float(m.lora["alpha"]),
            targets=tuple(m.lora["targets"]),
            layers=tuple(layers) if isinstance(layers, list) else layers,
            freeze_a=bool(m.lora.get("freeze_a", False)),
        )
    specs = select_trainables(loaded.model, loaded.arch, m.trainable_mode, lora, generator)
    if [(s.name, tuple(s.shape)) for s in specs] != [(s.name, tuple(s.shape)) for s in m.trainable]:
        raise EdgezoError(
            f"the model {src} does not rebuild {folder}'s trainable tensors",
            "pass --model the model the bundle was exported from",
        )
    params = dict(loaded.model.named_parameters())
    initial = b.initial_trainable()
    values = [torch.from_numpy(initial[s.name].copy()) for s in specs]
    with torch.no_grad():
        for s, v in zip(specs, values, strict=True):
            params[s.name].copy_(v)
    before = fingerprint_of(m)
    tmp = folder / f".decoder-{time.time_ns()}"
    tmp.mkdir()
    try:
        for f in ("model.onnx", EXTERNAL_DATA):
            if (folder / f).is_file():  # a hard link: ONNX Runtime refuses external data
                _link_or_copy(folder / f, tmp / f)  # reached through a symlink out of the dir
        files, field = build_decoder(
            loaded, specs, values, tmp, seed, tolerance, m.quantization, say, precision
        )
        for f in files:
            (tmp / f).replace(folder / f)
        manifest = replace(m, decoder=field)
        stale = m.decoder_files() - set(files)  # e.g. an int8 decoder's data, now fp32
        old_files = [n for n in m.files if n not in files and n not in stale]
        write_manifest(folder, manifest, [*old_files, *files])
        for f in stale:
            (folder / f).unlink(missing_ok=True)
        after = fingerprint_of(Manifest.from_json(json.loads((folder / MANIFEST).read_text())))
        if after != before:  # cannot happen while fingerprint_of leaves the decoder out
            raise EdgezoError("the bundle fingerprint changed", "report this bug")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"decoding graph added to {folder} (fingerprint {before} unchanged)")
    return folder
