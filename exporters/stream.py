"""The streamed int4 export: a causal LM whose fp32 weights never sit in memory whole.

Today's export loads the torch model, traces it, validates the fp32 graph against PyTorch and
quantises the loaded fp32 graph; its largest stage is about 2x the fp32 weights
(``exporters.memory.STAGE_FACTORS``), which puts a 3B model (12 GiB of fp32 weights) past a
machine of 24 GB. :func:`export_causal_lm_streamed` holds one weight at a time instead:

1. **A model of zero pages.** The torch model is built with its parameters on the ``meta``
   device, then every frozen weight gets the storage of an untouched anonymous mapping of its
   shape (:func:`zero_storage`): it reads as zeros and never becomes resident (the kernel maps
   its one shared zero page; measured: reading 1 GiB of it adds ~3 MiB of page tables). The
   loss graph is traced with the weights as graph inputs (as ``exporters/weight_attach.py``
   already does for every export), so the trace costs activations only.
2. **Weights attached from the checkpoint, quantised as they come.** ``attach_weights`` reads
   each tensor from the safetensors checkpoint (:class:`CheckpointReader`, one ``safe_open`` per
   tensor), folds what the tracer would have folded (a Linear weight's ``Transpose``), and hands
   every folded ``MatMul`` weight to :func:`exporters.quantize.matmul_nbits_one`: ONNX Runtime's
   ``MatMulNBitsQuantizer`` on that one node, so the packing is the one today's int4 export
   writes. Only the packed weights, scales and zero points reach ``model.onnx.data``; the
   embedding ``Gather`` stays fp32, as in today's int4 bundles. Neither an fp32
   ``model.onnx.data`` nor the fp32 graph ever exists.
3. **Validation without the fp32 model.** The PyTorch reference runs the model's own forward
   with a hook on every module that owns checkpoint weights: the module's weights are read in
   just before its forward and put back to zero pages right after (:func:`materialised`), so at
   most one module's weights (the largest: the embedding, also the tied head) are resident.
   What is checked, on the same batches as today's export: the int4 ONNX Runtime loss against
   this fp32 PyTorch loss within ``quant_rtol`` (today: the int4 graph against the fp32 ONNX
   graph, which was itself checked against PyTorch within ``tolerance``; the fp32 ONNX graph is
   what is skipped here), the loss function against the model's own Hugging Face loss
   (PyTorch, streamed too), and every trainable tensor moving the int4 loss.

Limits: LoRA only (``--mode lora``: the trainable tensors are new, not checkpoint weights), a
Hugging Face folder with safetensors weights (no GGUF), no decoding graph (``edgezo generate``
re-runs the loss graph), int4 only.
"""

from __future__ import annotations

import json
import mmap
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file

from edgezo.bundle import Manifest, write_manifest
from edgezo.errors import EdgezoError

from .bundle_writer import check_destination, staged_bundle
from .deps import versions
from .load import (
    LoadedModel,
    _config_for,
    _fast_tokenizer,
    _first_id,
    available_memory_bytes,
    parameter_sizes,
    resolve_source,
)
from .loss import CausalLMLossGraph
from .memory import release_memory, streamed_memory_estimate
from .onnx_export import (
    BATCH_INPUTS,
    EXTERNAL_DATA,
    OPSET,
    _trace,
    batch_input_specs,
    check_signature,
    dummy_batch,
    output_specs,
)
from .quantize import _NODE, QUANT_RTOL, check_quant_args, matmul_nbits_one
from .stages import add_stages
from .stream_int8 import LinearRanges, StreamedInt8
from .trainables import FROZEN_LORA_A
from .validate import (
    LORA_B_STD,
    check_quantized,
    check_reference,
    check_sensitivity,
    ort_session,
    parity_batch,
    torch_outputs,
    validation_point,
)
from .weight_attach import attach_weights, externalize_rest, fold_plan, matmul_sites

#: tensors below this many bytes get ordinary (resident) zeros: a mapping per tiny tensor
#: costs more than it saves
ZERO_PAGE_MIN_BYTES = 1 << 20


def zero_storage(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of zeros of ``shape`` backed by an untouched private anonymous mapping: reading
    it maps the kernel's shared zero page, so it does not become resident (writing would)."""
    numel = int(np.prod(shape, dtype=np.int64))
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < ZERO_PAGE_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps ``buf`` alive


class CheckpointReader:
    """The tensors of a Hugging Face folder's safetensors checkpoint (one ``model.safetensors``
    or shards with ``model.safetensors.index.json``), read one at a time as fp32 numpy."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise EdgezoError(
                f"{self.folder} has no safetensors weights (model.safetensors or "
                "model.safetensors.index.json), which the streamed export reads tensor by tensor",
                "save the model with save_pretrained(safe_serialization=True), or export "
                "without --stream",
            )
        self.reads = 0

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a C-contiguous float32 array (the file is opened and closed
        around the read, so none of its pages stay mapped)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            t = f.get_tensor(name)
        self.reads += 1
        return np.ascontiguousarray(t.float().numpy())


class StreamedModel:
    """A torch model whose checkpoint weights are zero pages, and where to read each one."""

    def __init__(self, loaded: LoadedModel, reader: CheckpointReader, names: dict[int, str]):
        self.loaded = loaded
        self.reader = reader
        self.names = names  # id(parameter) -> checkpoint name
        self.zeros = {
            id(p): p.data for p in loaded.model.parameters() if id(p) in names
        }  # the zero-page storage each parameter returns to


def load_streamed(folder: str | Path, precision: str = "int4") -> StreamedModel:
    """The causal LM of ``folder`` with zero-page weights (:func:`zero_storage`), its tokenizer
    and a reader of its checkpoint; nothing of the weights is read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve_source(folder, None)
    config, model_type, arch = _config_for(folder, gguf, "causal_lm")
    _check_memory(config, folder, precision)
    reader = CheckpointReader(folder)
    tokenizer = _fast_tokenizer(folder, str(folder), {"local_files_only": True})
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are real
        hf = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=arch.attn_implementation
        )
    hf.tie_weights()  # from_config leaves a tied head its own parameter
    hf.eval()
    names: dict[int, str] = {}
    new: dict[int, torch.nn.Parameter] = {}
    missing = []
    for name, p in hf.named_parameters():  # a tied head is listed once, under the embedding
        if name not in reader:
            missing.append(name)
            continue
        q = torch.nn.Parameter(zero_storage(tuple(p.shape)), requires_grad=False)
        new[id(p)] = q
        names[id(q)] = name
    if missing:
        raise EdgezoError(
            f"{folder}: the checkpoint has no tensor for parameter(s) {missing[:3]}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
            "export a checkpoint saved by save_pretrained for this model's own class, or "
            "export without --stream",
        )
    for module in hf.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[leaf] = new[id(p)]
    eos = _first_id(tokenizer.eos_token_id, hf.config.eos_token_id)
    loaded = LoadedModel(
        model=hf,
        arch=arch,
        model_type=model_type,
        source=str(folder),
        tokenizer=tokenizer,
        pad_token_id=_first_id(tokenizer.pad_token_id, eos),
        eos_token_id=eos,
        bos_token_id=_first_id(tokenizer.bos_token_id, None),
    )
    return StreamedModel(loaded, reader, names)


def _check_memory(config, folder: Path, precision: str = "int4") -> None:
    """Refuse, before any weight is read, a model whose streamed export would not fit in this
    machine's available memory (:func:`exporters.memory.streamed_memory_estimate`)."""
    available = available_memory_bytes()
    sizes = parameter_sizes(config)
    if available is None or sizes is None:
        return
    params = sizes[0]
    need = streamed_memory_estimate(*sizes, precision=precision)
    if need > available:
        raise EdgezoError(
            f"{folder} ({config.model_type}, {params / 1e9:.2f}B parameters) needs about "
            f"{need / 2**30:.1f} GiB for the streamed {precision} export; this machine has "
            f"{available / 2**30:.1f} GiB available",
            "free memory, or export on a machine with more memory",
        )


@contextmanager
def materialised(streamed: StreamedModel) -> Iterator[None]:
    """During the block, each module that owns checkpoint weights reads them in just before its
    forward and returns them to zero pages right after: a whole-model forward holds one
    module's weights at a time."""
    owners: dict[torch.nn.Module, list[torch.nn.Parameter]] = {}
    for module in streamed.loaded.model.modules():
        own = [p for p in module._parameters.values() if p is not None and id(p) in streamed.names]
        if own:
            owners[module] = own

    def load(module, _args):
        for p in owners[module]:
            p.data = torch.from_numpy(streamed.reader.read(streamed.names[id(p)]))

    def drop(module, _args, _out):
        for p in owners[module]:
            p.data = streamed.zeros[id(p)]

    handles = []
    try:
        for module in owners:
            handles.append(module.register_forward_pre_hook(load))
            handles.append(module.register_forward_hook(drop))
        yield
    finally:
        for h in handles:
            h.remove()
        for module in owners:
            drop(module, None, None)
        release_memory()


def calibrate_linears(
    streamed: StreamedModel,
    graph: CausalLMLossGraph,
    values: list[torch.Tensor],
    feeds: list[dict[str, np.ndarray]],
) -> dict[str, LinearRanges]:
    """The streamed int8 export's calibration: the loss graph run in PyTorch, one module's
    weights resident at a time (:func:`materialised`), on ``feeds``
    (:func:`exporters.precision.calibration_feeds`) at the trainables ``values``; for every
    Linear (a path under the Hugging Face model): its input's per-channel min and max over all
    batches and, read once while its weight is in memory, its weight's abs-max per input
    channel."""
    from .lora import LoraLinear

    model = streamed.loaded.model
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or (isinstance(m, LoraLinear) and not m.fan_in_fan_out)
    }
    lows: dict[str, np.ndarray] = {}
    highs: dict[str, np.ndarray] = {}
    wmax: dict[str, np.ndarray] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            lo, hi = x.amin(dim=0).numpy(), x.amax(dim=0).numpy()
            lows[name] = np.minimum(lows[name], lo) if name in lows else lo
            highs[name] = np.maximum(highs[name], hi) if name in highs else hi
            if name not in wmax:  # [out, in]: the max over each input channel's column
                wmax[name] = _column_absmax(module.weight.detach())

        return hook

    with materialised(streamed):  # its loading hooks run before these
        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
        try:
            with torch.no_grad():
                for feed in feeds:
                    graph(
                        torch.from_numpy(feed["input_ids"]),
                        torch.from_numpy(feed["attention_mask"]),
                        torch.from_numpy(feed["labels"]),
                        values,
                    )
        finally:
            for h in handles:
                h.remove()
    return {n: LinearRanges(lows[n], highs[n], wmax[n]) for n in lows}


def _column_absmax(weight: torch.Tensor, chunk_values: int = 2**24) -> np.ndarray:
    """``weight.abs().amax(dim=0)`` (float32) without an ``abs`` copy of the whole weight."""
    rows = max(1, chunk_values // max(weight.shape[-1], 1))
    out = None
    for i in range(0, weight.shape[0], rows):
        part = weight[i : i + rows].abs().amax(dim=0)
        out = part if out is None else torch.maximum(out, part)
    return out.numpy().copy()


def _int4_namer(model: onnx.ModelProto) -> Callable[[onnx.NodeProto], onnx.NodeProto]:
    """A ``MatMul`` with its weight renamed after its module, as
    :func:`exporters.quantize.name_matmul_weights` names them before today's quantisation."""
    taken = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}

    def named(node: onnx.NodeProto) -> onnx.NodeProto:
        m = _NODE.match(node.name)
        out = onnx.NodeProto()
        out.CopyFrom(node)
        if m is not None:
            new = m["path"].replace("/", ".") + ".weight"
            if new not in taken:
                taken.add(new)
                out.input[1] = new
        return out

    return named


def export_causal_lm_streamed(
    model: str | Path,
    out: str | Path,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_targets: list[str] | tuple[str, ...] | None = None,
    lora_layers: str | None = None,
    lora_freeze_a: bool = False,
    lora_layout: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    tolerance: float = 1e-3,
    progress: Callable[[str], None] | None = print,
    block_size: int = 32,
    accuracy_level: int = 0,
    quant_rtol: float = QUANT_RTOL,
    precision: str = "int4",
    precision_scope: str = "all",
    weights_format: str = "s8",
    int8_activations: str = "dynamic",
) -> Path:
    """Export the causal LM of the Hugging Face folder ``model`` as an int4 or int8 LoRA bundle
    ``out`` without ever holding its fp32 weights whole (module docstring); returns ``out``.

    The arguments mean what they mean for :func:`exporters.export.export_causal_lm`, which
    calls this with ``stream=True`` (``weights_format``: the int8 weight format it resolved
    for ``--int8-weights``); the bundle is the one ``export_causal_lm(...,
    precision=precision, decoder=False)`` writes (tested on tiny models:
    ``tests/test_stream_export.py``; int8: up to the calibration's float rounding,
    ``exporters/stream_int8.py``), but its ``parity`` records the quantised graph against the
    streamed PyTorch loss.
    """
    from .export import _architecture_dict, lora_trainables
    from .precision import calibration_feeds, prefix_only

    say = progress or (lambda _line: None)
    out = Path(out)
    if precision not in ("int4", "int8"):
        raise EdgezoError(
            f"the streamed export writes int4 or int8 bundles, not {precision}",
            "pass --precision int4 or int8 with --stream, or export without --stream",
        )
    if precision_scope != "all" and precision != "int8":
        raise EdgezoError(
            f"--precision-scope {precision_scope} applies to int8", "pass --precision-scope all"
        )
    check_quant_args("int4" if precision == "int4" else None, "lora", block_size, accuracy_level)
    if not tolerance >= 0 or not quant_rtol >= 0:
        raise EdgezoError("tolerance and quant_rtol must be >= 0", "pass 1e-3 and 0.1")
    check_destination(out, overwrite)

    t0 = time.perf_counter()
    say(f"loading {model} (streamed: the weights stay on disk, read one at a time) ...")
    streamed = load_streamed(model, precision)
    loaded = streamed.loaded
    num_parameters = loaded.num_parameters
    say(
        f"loaded {loaded.model_type} ({loaded.arch.family} family), {num_parameters:,} "
        f"parameters as zero pages in {time.perf_counter() - t0:.1f} s"
    )
    generator = torch.Generator().manual_seed(seed)
    lora, specs = lora_trainables(
        loaded,
        "lora",
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
    say(f"trainable (lora): {len(specs)} tensors, {n_train:,} values")
    graph = CausalLMLossGraph(
        loaded.model, [s.name for s in specs], loaded.arch.pass_position_ids
    ).eval()
    pad = loaded.pad_token_id if loaded.pad_token_id is not None else 0

    with staged_bundle(out, overwrite) as stage:
        t = time.perf_counter()
        say("tracing the loss graph over zero-page weights ...")
        trained = set(graph.names)
        frozen = [(n, p) for n, p in loaded.model.named_parameters() if n not in trained]
        tracer = CausalLMLossGraph(
            loaded.model, [*graph.names, *(n for n, _ in frozen)], graph.pass_position_ids
        ).eval()
        frozen_names = [f"model.{n}" for n, _ in frozen]
        raw_dir = stage / "_raw"
        raw_dir.mkdir()
        _trace(
            tracer,
            (
                *dummy_batch(loaded.vocab_size, pad, generator),
                [*values, *(p.detach() for _, p in frozen)],
            ),
            raw_dir / "model.onnx",
            [*BATCH_INPUTS, *(s.name for s in specs), *frozen_names],
        )
        del tracer
        release_memory()
        onnx_model = onnx.load(str(raw_dir / "model.onnx"))
        shutil.rmtree(raw_dir)
        say(f"traced in {time.perf_counter() - t:.1f} s")

        weights: dict[str, Callable[[], np.ndarray]] = {}
        for name, (_, p) in zip(frozen_names, frozen, strict=True):
            ckpt = streamed.names.get(id(p))
            if ckpt is not None:
                weights[name] = lambda c=ckpt: streamed.reader.read(c)
            else:  # a frozen LoRA A: new, real values
                weights[name] = lambda q=p: q.detach().numpy()
        namer = _int4_namer(onnx_model)
        quantised = 0
        int8 = None
        if precision == "int8":
            t = time.perf_counter()
            calib = calibration_feeds(loaded.tokenizer, loaded.vocab_size, {})
            say(
                f"calibrating the int8 smoothing on {len(calib)} batches (PyTorch, streamed "
                "one module at a time) ..."
            )
            ranges = calibrate_linears(streamed, graph, values, calib)
            keep = (lambda _w: True) if precision_scope == "all" else prefix_only(min(lora.layers))
            int8 = StreamedInt8(
                onnx_model,
                fold_plan(onnx_model, weights),
                matmul_sites(onnx_model, weights),
                ranges,
                namer,
                keep,
                weights_format=weights_format,
                activations=int8_activations,
                calibration_batches=len(calib),
            )
            del ranges
            release_memory()
            say(
                f"calibrated {len(int8.targets)} MatMuls in {len(int8.groups)} groups in "
                f"{time.perf_counter() - t:.1f} s"
            )

        def quantize(node: onnx.NodeProto, weight: np.ndarray):
            nonlocal quantised
            if int8 is not None:
                done = int8.quantize(node, weight)
            else:
                done = matmul_nbits_one(namer(node), weight, 4, block_size, accuracy_level)
            quantised += done is not None if int8 is None else node.name in int8.quantised
            del weight
            release_memory()  # the quantiser's one-node model and its copies of the weight
            return done

        t = time.perf_counter()
        say(
            "attaching the weights from the checkpoint, "
            + (
                f"int4 (block {block_size})"
                if int8 is None
                else f"int8 smoothed ({weights_format} weights)"
            )
            + " ..."
        )
        count, nbytes = attach_weights(
            onnx_model,
            weights,
            stage / EXTERNAL_DATA,
            quantize_matmul=quantize,
            transform=int8.transform if int8 is not None else None,
        )
        int8_info = int8.finish(onnx_model) if int8 is not None else None
        int8 = None
        if not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
            onnx_model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        check_signature(onnx_model, specs)
        externalize_rest(onnx_model, stage / EXTERNAL_DATA)
        onnx.save_model(onnx_model, str(stage / "model.onnx"))
        del onnx_model
        release_memory()
        say(
            f"attached {count} tensors ({nbytes / 2**20:.1f} MiB), {quantised} MatMuls as "
            f"{precision}, in {time.perf_counter() - t:.1f} s"
        )
        if quantised == 0:
            raise EdgezoError(
                "the streamed export quantised no MatMul", "this is an exporter bug; report it"
            )

        t = time.perf_counter()
        say(f"validating ({precision} ONNX Runtime vs PyTorch streamed one module at a time) ...")
        point = validation_point(specs, values, generator)
        batch = parity_batch(loaded.vocab_size, pad, generator)
        with materialised(streamed):
            reference = torch_outputs(graph, point, batch)
            hf_reference_diff = check_reference(
                graph, values, loaded.vocab_size, generator, tolerance
            )
        qsession = ort_session(stage / "model.onnx")
        parity_vs_fp32 = check_quantized(qsession, reference.loss, specs, point, batch, quant_rtol)
        parity_vs_fp32["fp32_reference"] = "PyTorch, streamed one module at a time"
        sensitivity = check_sensitivity(qsession, specs, point, loaded.vocab_size, generator)
        del qsession
        release_memory()
        say(
            f"validated in {time.perf_counter() - t:.1f} s: {precision} vs fp32 PyTorch loss max "
            f"rel {parity_vs_fp32['max_rel_diff']:.3g} (rtol {quant_rtol:g}); "
            f"{streamed.reader.reads} tensor reads so far"
        )
        trainable_values = {s.name: v for s, v in zip(specs, values, strict=True)}
        save_file(
            {s.name: trainable_values[s.name].contiguous() for s in specs},
            str(stage / "trainable.safetensors"),
            metadata={"format": "pt"},
        )
        extra = []
        if lora.freeze_a:
            frozen_a = {
                n: params[n].detach().clone().contiguous()
                for n in (s.name.replace("lora_B.", "lora_A.") for s in specs)
            }
            save_file(frozen_a, str(stage / FROZEN_LORA_A), metadata={"format": "pt"})
            extra.append(FROZEN_LORA_A)
        tok_spec = loaded.save_tokenizer(stage / "tokenizer.json")
        if int8_info is not None:
            quant_info = {
                **int8_info,
                "scope": precision_scope,
                "precision": "int8",
                "parity_vs_fp32": parity_vs_fp32,
            }
        else:
            quant_info = {
                "scheme": "int4",
                "method": "onnxruntime MatMulNBitsQuantizer (weight-only, asymmetric), one MatMul "
                "at a time as its weight is attached (streamed export)",
                "bits": 4,
                "block_size": block_size,
                "accuracy_level": accuracy_level,
                "symmetric": False,
                "quantized_matmuls": quantised,
                "gemm_rewritten": 0,
                "op": "MatMulNBits",
                "precision": "int4",
                "streamed": True,
                "parity_vs_fp32": parity_vs_fp32,
            }
        parity = {
            "graph": f"{precision} ONNX vs PyTorch fp32 streamed (no fp32 ONNX graph: see "
            "quantization.parity_vs_fp32)",
            "tolerance": tolerance,
            "lora_b_std": LORA_B_STD,
            "batch_shape": list(batch[0].shape),
            "torch_loss": [round(float(x), 6) for x in reference.loss],
            "hf_reference_diff": hf_reference_diff,
            "sensitivity_min_change": sensitivity,
        }
        manifest = Manifest(
            task="causal_lm",
            labels=None,
            prompt=None,
            architecture=_architecture_dict(loaded, num_parameters),
            trainable_mode="lora",
            inputs=batch_input_specs(),
            outputs=output_specs(),
            trainable=specs,
            tokenizer=tok_spec,
            lora=lora.to_json(),
            quantization=quant_info,
            precision=precision,
            parity=parity,
            exporter={
                "name": "edgezo.exporters",
                **versions(),
                "opset": OPSET,
                "onnx_exporter": "torch.onnx.export(dynamo=False), streamed weights",
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        write_manifest(
            stage,
            manifest,
            ["model.onnx", EXTERNAL_DATA, "trainable.safetensors", tok_spec.file, *extra],
        )
        graph = params = loaded = streamed = None
        release_memory()
        if lora.layers is not None:
            add_stages(stage, log=say)
    say(f"bundle written to {out} in {time.perf_counter() - t0:.1f} s")
    return out
