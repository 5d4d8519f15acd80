"""Load a causal LM (Hugging Face folder or GGUF file) or an encoder classifier (Hugging Face
folder) and its tokenizer, in fp32.

GGUF weights are dequantised by transformers (needs ``accelerate``); the quantizer is detached
afterwards so the model behaves like any fp32 model (``save_pretrained`` works again).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgezo.bundle import TokenizerSpec
from edgezo.errors import EdgezoError

from .architectures import Architecture, check_config, get_architecture


@dataclass
class LoadedModel:
    """A model ready to export: fp32, eval mode, with its tokenizer and description."""

    model: torch.nn.Module
    arch: Architecture
    model_type: str
    source: str
    tokenizer: Any  # a transformers fast tokenizer (has ``backend_tokenizer``)
    pad_token_id: int | None
    eos_token_id: int | None
    bos_token_id: int | None
    head_init: str | None = None  # classification: "zero", "random" or "pretrained"
    #: why an optional decoding graph is left out (its trace would not fit), else None
    decoder_left_out: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def num_parameters(self) -> int:
        """Parameters counted once each (tied embedding and head count once)."""
        return sum(p.numel() for p in self.model.parameters())

    def save_tokenizer(self, path: Path) -> TokenizerSpec:
        """Write ``tokenizer.json`` (``tokenizers`` format) and describe it for the manifest.

        ``add_bos`` is read off the saved file itself: whether encoding text with it already
        puts the BOS token first (the runtime must then not add another).
        """
        from tokenizers import Tokenizer

        self.tokenizer.backend_tokenizer.save(str(path))
        ids = Tokenizer.from_file(str(path)).encode("a", add_special_tokens=True).ids
        add_bos = self.bos_token_id is not None and bool(ids) and ids[0] == self.bos_token_id
        return TokenizerSpec(
            file=path.name,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            add_bos=add_bos,
        )


def resolve_source(model: str | Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """Turn ``--model``/``--gguf-file`` into (folder, gguf file name or None).

    ``model`` may be a Hugging Face folder, a folder holding ``gguf_file``, or a ``.gguf`` file.
    """
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        return path.parent, path.name
    if not path.is_dir():
        raise EdgezoError(
            f"model {str(model)!r} is not a folder or a .gguf file",
            "pass --model a Hugging Face model folder (config.json + weights), a .gguf file, "
            "or a folder together with --gguf-file NAME (nothing is downloaded from a hub)",
        )
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise EdgezoError(
                f"GGUF file {gguf_file!r} is not in {path}",
                "pass --gguf-file the file name of a .gguf file inside the --model folder",
            )
        if importlib.util.find_spec("accelerate") is None:
            raise EdgezoError(
                "loading a GGUF file needs the `accelerate` package, which is not installed",
                "pip install 'edgezo[export]' torch==2.13.0",
            )
    elif not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"pass --gguf-file {ggufs[0]}" if ggufs else "point --model at a model folder"
        raise EdgezoError(f"{path} has no config.json", hint)
    return path, gguf_file


def read_config(folder: Path, gguf_file: str | None) -> Any:
    """The model's config, read before any weights (a few seconds for a GGUF file)."""
    from transformers import AutoConfig

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, **kw)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError ...
        raise EdgezoError(
            f"cannot read the model config in {folder} ({type(e).__name__}: {e})",
            "point --model at a Hugging Face model folder or a GGUF file of a supported "
            "architecture",
        ) from None
    return config


def load_causal_lm(
    model: str | Path,
    gguf_file: str | None = None,
    precision: str | None = None,
    decoder: bool = False,
    optional_decoder: bool = False,
) -> LoadedModel:
    """Load model and tokenizer in fp32, eval mode, with its architecture description.

    The architecture is checked from the config before any weights are read, so an unsupported
    model fails in a second; so is the memory the export will need (``precision`` and
    ``decoder``: what it will build, :func:`check_export_memory`). ``optional_decoder``: an
    export that fits only without the decoding graph goes on without it
    (``decoder_left_out`` says why) instead of being refused.
    """
    from transformers import AutoModelForCausalLM

    folder, gguf_file = resolve_source(model, gguf_file)
    config, model_type, arch = _config_for(folder, gguf_file, "causal_lm")
    if gguf_file:
        check_gguf_types(folder / gguf_file, model_type)
    where = str(folder / gguf_file) if gguf_file else str(folder)
    left_out = None
    try:
        check_export_memory(config, where, precision, decoder)
    except EdgezoError as e:
        if not (decoder and optional_decoder):
            raise
        check_export_memory(config, where, precision, False)  # refuses what does not fit
        left_out = f"{e} (without it the export fits; --decoder insists)"
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    source = str(folder / gguf_file) if gguf_file else str(folder)
    tokenizer = _fast_tokenizer(folder, source, kw)

    hf = AutoModelForCausalLM.from_pretrained(
        folder,
        config=config,
        dtype=torch.float32,
        attn_implementation=arch.attn_implementation,
        **kw,
    )
    _detach_quantizer(hf)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(False)
    hf.eval()

    eos = _first_id(tokenizer.eos_token_id, hf.config.eos_token_id)
    pad = _first_id(tokenizer.pad_token_id, eos)
    bos = _first_id(tokenizer.bos_token_id, None)
    return LoadedModel(
        model=hf,
        arch=arch,
        model_type=model_type,
        source=source,
        tokenizer=tokenizer,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=bos,
        decoder_left_out=left_out,
    )


HEAD_INITS = ("zero", "random")


def load_classifier(
    model: str | Path, num_labels: int, head_init: str, generator: torch.Generator
) -> LoadedModel:
    """An encoder classifier: a ``...ForSequenceClassification`` model keeps its own (trained)
    classifier, which must have ``num_labels`` outputs; a bare encoder (e.g. the
    sentence-transformers all-MiniLM-L6-v2 ``BertModel``) gets a linear head over its
    mean-pooled last hidden states (:class:`exporters.loss.MeanPoolClassifier`), initialised
    to zero (``head_init="zero"``) or N(0, 0.02²) with a zero bias (``"random"``).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    from .loss import MeanPoolClassifier

    if head_init not in HEAD_INITS:
        raise EdgezoError(
            f"unknown head initialisation {head_init!r}",
            f"pass --head-init as one of: {', '.join(HEAD_INITS)}",
        )
    folder, _ = resolve_source(model, None)
    config, model_type, arch = _config_for(folder, None, "classification")
    tokenizer = _fast_tokenizer(folder, str(folder), {"local_files_only": True})
    kw: dict[str, Any] = {
        "local_files_only": True,
        "dtype": torch.float32,
        "attn_implementation": arch.attn_implementation,
    }
    has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if has_head:
        if int(config.num_labels) != num_labels:
            raise EdgezoError(
                f"{folder} has a trained classifier with {config.num_labels} outputs, but "
                f"{num_labels} labels were given",
                f"pass --labels with {config.num_labels} names (config.json id2label: "
                f"{list(getattr(config, 'id2label', {}).values())})",
            )
        module = AutoModelForSequenceClassification.from_pretrained(folder, config=config, **kw)
    else:
        encoder = AutoModel.from_pretrained(folder, config=config, add_pooling_layer=False, **kw)
        module = MeanPoolClassifier(encoder, num_labels)
        with torch.no_grad():
            w = module.classifier.weight
            w.copy_(
                torch.zeros_like(w)
                if head_init == "zero"
                else torch.randn(w.shape, generator=generator) * 0.02
            )
            module.classifier.bias.zero_()
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    cls = _first_id(tokenizer.cls_token_id, tokenizer.bos_token_id)
    return LoadedModel(
        model=module,
        arch=arch,
        model_type=model_type,
        source=str(folder),
        tokenizer=tokenizer,
        pad_token_id=_first_id(tokenizer.pad_token_id, 0),
        eos_token_id=_first_id(tokenizer.sep_token_id, tokenizer.eos_token_id),
        bos_token_id=cls,
        head_init="pretrained" if has_head else head_init,
    )


_WRONG_TASK = {
    "causal_lm": (
        "an encoder: it has no causal language-model loss",
        "export it with --task classification --labels a,b,... (or "
        "export_bundle(task='classification', labels=[...]))",
    ),
    "classification": (
        "a causal LM: it has no encoder classification export",
        "export it with --task causal_lm, or --task prompt_classification "
        "--template ... --label-words ... to classify with label words",
    ),
}


def _config_for(folder: Path, gguf_file: str | None, task: str) -> tuple[Any, str, Architecture]:
    """(config, model_type, description) of a model that must be of ``task``'s kind."""
    config = read_config(folder, gguf_file)
    model_type = str(config.model_type)
    arch = get_architecture(model_type)
    if arch.task != task:
        what, fix = _WRONG_TASK[task]
        raise EdgezoError(f"{folder} is a {model_type} model ({arch.family} family), {what}", fix)
    check_config(arch, config, str(folder / gguf_file) if gguf_file else str(folder))
    return config, model_type, arch


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of this machine (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def count_parameters(config: Any) -> int | None:
    """Parameters of ``config``'s causal LM (tied head once), counted on the meta device (no
    memory); None for a config transformers cannot instantiate (it fails later, with its
    message)."""
    sizes = parameter_sizes(config)
    return None if sizes is None else sizes[0]


def parameter_sizes(config: Any) -> tuple[int, int] | None:
    """(parameters, values of the largest parameter) of ``config``'s causal LM, on the meta
    device; None where transformers cannot instantiate it."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    counts = [p.numel() for p in shell.parameters()]
    return sum(counts), max(counts, default=0)


def check_export_memory(
    config: Any,
    source: str,
    precision: str | None = None,
    decoder: bool = False,
    available: int | None = None,
) -> None:
    """Refuse, before any weight is read, a model whose export would not fit in ``available``
    bytes (default: this machine's available memory): its parameters as fp32 times the
    measured factor of the largest stage the export runs
    (:func:`exporters.memory.export_memory_estimate`)."""
    from .memory import export_memory_estimate

    if available is None:
        available = available_memory_bytes()
    if available is None:
        return
    sizes = parameter_sizes(config)
    if sizes is None:
        return
    params, largest = sizes
    need, stage, factor = export_memory_estimate(params, precision, decoder)
    if need > available:
        fixes = []
        if decoder:
            fixes.append("--no-decoder (the decoding graph's trace is the largest stage)")
        from .memory import streamed_memory_estimate

        if precision == "int8":
            streamed8 = streamed_memory_estimate(params, largest, "int8")
            if streamed8 <= available and not gguf_source(source):
                fixes.append(
                    "--precision int8 --stream (the streamed int8 export holds one weight at "
                    f"a time: about {streamed8 / 2**30:.1f} GiB)"
                )
        if precision and precision.startswith("int8"):
            fixes.append("--precision int4 (int8's quantiser is the largest stage)")
        streamed = streamed_memory_estimate(params, largest)
        if streamed <= available and not gguf_source(source):
            fixes.append(
                "--precision int4 --stream (the streamed export holds one weight at a time: "
                f"about {streamed / 2**30:.1f} GiB)"
            )
        raise EdgezoError(
            f"{source} ({config.model_type}, {params / 1e9:.2f}B parameters) needs about "
            f"{need / 2**30:.1f} GiB to export as {precision or 'fp32'}: its {stage} peaks at "
            f"{factor:g}x the {params * 4 / 2**30:.1f} GiB of fp32 weights; this machine has "
            f"{available / 2**30:.1f} GiB available",
            "export "
            + (f"with {' or '.join(fixes)}, or " if fixes else "")
            + "on a machine with more memory (the bundle then runs here: an int4 bundle of it "
            "needs far less), free memory, or export a smaller model",
        )


def gguf_source(source: str) -> bool:
    """Whether an export source names a GGUF file (the streamed export reads safetensors)."""
    return source.endswith(".gguf")


def check_gguf_types(path: Path, model_type: str) -> None:
    """Refuse a GGUF file holding a tensor type that cannot be dequantised (before the weights
    are read): each distinct type is tried on one zero block with the ``gguf`` package's own
    dequantiser, which transformers uses to load the file."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader, quants

    plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    first: dict[Any, str] = {}
    for tensor in GGUFReader(str(path)).tensors:
        first.setdefault(tensor.tensor_type, tensor.name)
    for kind, name in first.items():
        if kind.name in plain:
            continue
        _, block_bytes = GGML_QUANT_SIZES[kind]
        try:
            quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), kind)
        except NotImplementedError:
            raise EdgezoError(
                f"{path} ({model_type}): tensor {name} is stored as {kind.name}, a GGUF "
                "quantisation type the gguf package cannot dequantise",
                "re-quantise the model with llama.cpp's llama-quantize to a supported type "
                "(Q8_0, Q4_K_M, Q4_0, Q6_K ...), or export from the Hugging Face folder",
            ) from None


def _fast_tokenizer(folder: Path, source: str, kw: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except Exception as e:
        raise EdgezoError(
            f"cannot load a tokenizer from {source} ({type(e).__name__}: {e})",
            "the model folder needs a tokenizer (tokenizer.json or a GGUF with vocabulary)",
        ) from None
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise EdgezoError(
            f"the tokenizer of {source} is a slow (Python) tokenizer",
            "save the model with a fast tokenizer (tokenizer.json) and export again",
        )
    return tokenizer


def _detach_quantizer(model: torch.nn.Module) -> None:
    """A GGUF model is dequantised at load but keeps its quantizer, which blocks ``.float()``
    and ``save_pretrained``; the weights are plain tensors, so drop it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            setattr(model, attr, False if attr == "is_quantized" else None)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _first_id(*candidates: Any) -> int | None:
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return None
