"""Hand trained tensors back to the desktop ecosystem.

``peft`` format (LoRA bundles): a PEFT adapter folder that ``peft.PeftModel.from_pretrained``
loads on top of the base model::

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, fan_in_fan_out
    adapter_model.safetensors    base_model.model.<name> for every LoRA tensor of the bundle

The bundle's LoRA tensors already carry PEFT's names without the ``base_model.model.`` prefix
(``model.layers.0.self_attn.q_proj.lora_A.weight``), PEFT's scaling ``lora_alpha / r`` is the
bundle's, and A is ``[r, in]``, B ``[out, r]`` as in PEFT (also for GPT-2's ``Conv1D``, where
PEFT's ``fan_in_fan_out`` refers to the base weight only).

``safetensors`` format (any mode): the trained tensors under their bundle names in one
``tensors.safetensors`` (Hugging Face state-dict keys for ``norms``/``full``, so
``model.load_state_dict(..., strict=False)`` takes them), plus a ``handoff.json`` describing
the bundle they belong to.

``onnx_adapter`` format (LoRA bundles): ``adapter.onnx_adapter``, written with ONNX Runtime's
``AdapterFormat``, holding every LoRA tensor (LoRA-FA's frozen A too) under the bundle's names,
which are the LoRA input names of the bundle's decoding graph: ONNX Runtime
(``RunOptions.add_active_adapter``) and onnxruntime-genai (``og.Adapters(model).load``,
``generator.set_active_adapter``) feed them to a model with those inputs. ``genai_model=True``
also writes ``genai-model/``: the decoding graph (logits reshaped to GenAI's ``[batch, 1,
vocab]``), ``genai_config.json`` and the tokenizer, a model onnxruntime-genai runs with the
adapter (needs the ``onnx`` package; tests/test_handoff.py checks GenAI's greedy tokens equal
``edgezo generate``'s). B is stored unscaled: the graph applies ``alpha / r``.

``hf`` format (any mode): a merged Hugging Face folder (``model.safetensors`` + config +
tokenizer) that ``transformers`` loads without edgezo: the base weights of the bundle's source
folder with the trained tensors written in (LoRA merged as ``W + (alpha/r)·B·A``). numpy only
for a Hugging Face source; a GGUF source is dequantised by transformers (the export extra).

    python -m exporters.handoff --bundle B --tensors RUN/trained.safetensors --out DIR
    edgezo handoff --run RUN --format peft|hf|onnx_adapter|safetensors --out DIR

Needs only numpy and safetensors (no torch, no peft) to write peft/safetensors/onnx_adapter,
and hf from a Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from edgezo.errors import EdgezoError

FORMATS = ("peft", "hf", "onnx_adapter", "safetensors")
ADAPTER_FILE = "adapter.onnx_adapter"
GENAI_DIR = "genai-model"
PEFT_PREFIX = "base_model.model."


def load_tensors(bundle, tensors: str | Path | None) -> dict[str, np.ndarray]:
    """The bundle's trainable tensors from ``tensors`` (or its initial values), checked."""
    return bundle.trainable_values(tensors)


def frozen_lora_a(bundle) -> dict[str, np.ndarray]:
    """The frozen ``lora_A`` tensors of a ``freeze_a`` bundle (LoRA-FA), which the exporter
    stored beside the trainable ones: an adapter needs both."""
    from safetensors.numpy import load_file

    from .trainables import FROZEN_LORA_A

    path = bundle.path / FROZEN_LORA_A
    if not path.is_file():
        raise EdgezoError(
            f"bundle {bundle.path} trains LoRA B alone and has no {FROZEN_LORA_A}",
            "re-export the bundle with --lora-freeze-a",
        )
    return load_file(str(path))


def peft_config(manifest) -> dict:
    """``adapter_config.json`` for a LoRA bundle."""
    from .architectures import get_architecture

    lora = manifest.lora or {}
    try:
        fan_in_fan_out = get_architecture(manifest.architecture["model_type"]).lora_fan_in_fan_out
    except EdgezoError:
        fan_in_fan_out = False
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": manifest.architecture.get("source"),
        "r": int(lora["rank"]),
        "lora_alpha": float(lora["alpha"]),
        "target_modules": list(lora["targets"]),
        "exclude_modules": ["lm_head"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
        # adapters on some blocks only (--lora-layers): PEFT's own way to say which
        **({"layers_to_transform": list(lora["layers"])} if lora.get("layers") else {}),
    }


def handoff(
    bundle: str | Path,
    out: str | Path,
    tensors: str | Path | None = None,
    fmt: str = "peft",
    overwrite: bool = False,
    genai_model: bool = False,
) -> Path:
    """Write ``tensors`` (a safetensors file trained on ``bundle``; its initial values when
    ``None``) to the folder ``out`` as a PEFT adapter (``fmt="peft"``, LoRA bundles), a merged
    Hugging Face model (``"hf"``), an ONNX Runtime adapter (``"onnx_adapter"``, LoRA bundles;
    with ``genai_model`` also a GenAI model folder) or plain safetensors; returns ``out``.
    Raises :class:`EdgezoError` with the fix on bad input."""
    from safetensors.numpy import save_file

    from edgezo.bundle import load_bundle

    from .bundle_writer import staged_bundle

    if fmt not in FORMATS:
        raise EdgezoError(f"unknown format {fmt!r}", f"pass --format one of: {', '.join(FORMATS)}")
    b = load_bundle(bundle)
    m = b.manifest
    if fmt in ("peft", "onnx_adapter") and (m.trainable_mode != "lora" or not m.lora):
        raise EdgezoError(
            f"a {'PEFT' if fmt == 'peft' else 'ONNX Runtime'} adapter holds LoRA tensors; bundle "
            f"{b.path} trains {m.trainable_mode!r}",
            "pass --format hf (a merged model) or safetensors for norms/full tensors",
        )
    if genai_model and fmt != "onnx_adapter":
        raise EdgezoError("--genai-model goes with --format onnx_adapter", "add it, or drop it")
    if genai_model and m.decoder is None:
        raise EdgezoError(
            f"bundle {b.path} has no decoding graph to build the GenAI model from",
            f"add it: edgezo export --decoder-only --bundle {b.path}",
        )
    if fmt == "hf" and m.trainable_mode == "scales":
        raise EdgezoError(
            "int4 scales have no Hugging Face weights to merge into",
            "pass --format safetensors",
        )
    values = load_tensors(b, tensors)
    if fmt in ("peft", "onnx_adapter", "hf") and m.lora and m.lora.get("freeze_a"):
        values = {**frozen_lora_a(b), **values}
    meta = {
        "bundle": b.fingerprint,
        "bundle_path": str(b.path),
        "trainable_mode": m.trainable_mode,
        "model_type": str(m.architecture.get("model_type")),
        "source": str(m.architecture.get("source")),
    }
    with staged_bundle(Path(out), overwrite) as stage:
        if fmt == "peft":
            save_file(
                {PEFT_PREFIX + name: v for name, v in values.items()},
                str(stage / "adapter_model.safetensors"),
                metadata={"format": "pt"},
            )
            (stage / "adapter_config.json").write_text(json.dumps(peft_config(m), indent=2) + "\n")
        elif fmt == "onnx_adapter":
            write_onnx_adapter(values, stage / ADAPTER_FILE)
            (stage / "handoff.json").write_text(json.dumps(dict(meta, **_lora_meta(m)), indent=2))
            if genai_model:
                write_genai_model(b, stage / GENAI_DIR)
        elif fmt == "hf":
            write_merged_hf(b, values, stage)
        else:
            save_file(values, str(stage / "tensors.safetensors"), metadata={"format": "pt"})
            info = dict(
                meta,
                tensors=[
                    {"name": s.name, "shape": list(s.shape), "role": s.role, "positive": s.positive}
                    for s in m.trainable
                ],
                quantization=m.quantization,
            )
            (stage / "handoff.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def _lora_meta(m) -> dict:
    lora = m.lora or {}
    return {
        "format": "onnxruntime AdapterFormat",
        "file": ADAPTER_FILE,
        "lora": {"rank": lora.get("rank"), "alpha": lora.get("alpha"), "scaled": False},
    }


def write_onnx_adapter(values: dict[str, np.ndarray], path: Path) -> None:
    """``values`` as an ONNX Runtime adapter file (``onnxruntime.AdapterFormat``)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(
        {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}
    )
    adapter.export_adapter(str(path))


def read_onnx_adapter(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file, by name (numpy)."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))
    return {k: v.numpy() for k, v in adapter.get_parameters().items()}


def genai_config(b) -> dict:
    """``genai_config.json`` for the bundle's decoding graph (onnxruntime-genai's decoder)."""
    m, d, t = b.manifest, b.manifest.decoder, b.manifest.tokenizer
    arch = m.architecture
    return {
        "model": {
            "type": str(arch.get("model_type")),
            "bos_token_id": t.bos_token_id if t.bos_token_id is not None else t.eos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "vocab_size": int(arch["vocab_size"]),
            "context_length": int(arch.get("max_position_embeddings") or 2048),
            "decoder": {
                "session_options": {"log_id": "edgezo", "provider_options": []},
                "filename": "model.onnx",
                "head_size": int(d["head_dim"]),
                "hidden_size": int(arch.get("hidden_size") or 0),
                "num_attention_heads": int(arch.get("hidden_size") or 0) // int(d["head_dim"]),
                "num_hidden_layers": int(d["num_layers"]),
                "num_key_value_heads": int(d["num_kv_heads"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": int(arch.get("max_position_embeddings") or 2048),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "early_stopping": True,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }


def write_genai_model(b, out: Path) -> None:
    """A GenAI model folder from the bundle's decoding graph: ``logits [batch, vocab]`` gains
    GenAI's sequence axis (an ``Unsqueeze``), weights shared with ``model.onnx.data`` are
    linked (or copied) beside it. Needs the ``onnx`` package."""
    import os
    import shutil

    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise EdgezoError(
            "writing a GenAI model folder needs the onnx package", "pip install onnx"
        ) from None
    out.mkdir(parents=True)
    graph_file = b.path / b.manifest.decoder["graph"]
    model = onnx.load(str(graph_file), load_external_data=False)
    g = model.graph
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits_last"
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "genai_seq_axis"))
    g.node.append(helper.make_node("Unsqueeze", ["logits_last", "genai_seq_axis"], ["logits"]))
    pos = [o.name for o in g.output].index("logits")
    vocab = int(b.manifest.architecture["vocab_size"])
    new = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 1, vocab])
    del g.output[pos]
    g.output.insert(pos, new)
    # the LoRA inputs get the bundle's initial values as defaults: an input with an initializer
    # is optional, which is what ONNX Runtime's adapters (and GenAI without one) need
    for name, value in b.initial_trainable().items():
        g.initializer.append(numpy_helper.from_array(value, name))
    if b.manifest.lora and b.manifest.lora.get("freeze_a"):
        # LoRA-FA: A is baked into the graph (frozen, the same values as the adapter's); its
        # names are declared as optional inputs so the adapter file, which carries A for
        # models that take it as an input, loads here too (ONNX Runtime refuses unknown names)
        for name, value in frozen_lora_a(b).items():
            g.input.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(value.shape))
            )
            g.initializer.append(numpy_helper.from_array(value, name))
    onnx.save_model(model, str(out / "model.onnx"))
    for f in b.manifest.decoder_files() | set(b.manifest.files):  # external data it names
        if f.endswith(".data") and f in _external_files(model):
            try:
                os.link(b.path / f, out / f)
            except OSError:
                shutil.copyfile(b.path / f, out / f)
    (out / "genai_config.json").write_text(json.dumps(genai_config(b), indent=2) + "\n")
    t = b.manifest.tokenizer
    shutil.copyfile(b.path / t.file, out / "tokenizer.json")
    tok = b.tokenizer()
    names = {
        k: tok.id_to_token(v)
        for k, v in (
            ("eos_token", t.eos_token_id),
            ("pad_token", t.pad_token_id),
            ("bos_token", t.bos_token_id),
        )
        if v is not None
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": t.add_bos, **names}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _external_files(model) -> set[str]:
    out = set()
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                out.add(e.value)
    return out


def write_merged_hf(b, values: dict[str, np.ndarray], out: Path) -> None:
    """A Hugging Face folder: the source's weights with ``values`` written in (LoRA merged),
    its config and the bundle's tokenizer. numpy only when the source is a Hugging Face folder
    of safetensors files."""
    import shutil

    from safetensors.numpy import load_file, save_file

    m = b.manifest
    src = Path(str(m.architecture.get("source")))
    shards = sorted(src.glob("*.safetensors")) if src.is_dir() else []
    if shards:
        weights: dict[str, np.ndarray] = {}
        for f in shards:
            weights.update(load_file(str(f)))
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    elif src.suffix == ".gguf" and src.is_file():
        weights = _gguf_weights(src, out)
    else:
        raise EdgezoError(
            f"the bundle's source model {src} is not here (a Hugging Face folder of safetensors "
            "files, or a GGUF file)",
            "run the hand-off where the model the bundle was exported from is",
        )
    merged = merge_into(weights, values, m)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    if not (out / "tokenizer.json").is_file():
        shutil.copyfile(b.path / m.tokenizer.file, out / "tokenizer.json")


def merge_into(weights: dict[str, np.ndarray], values: dict[str, np.ndarray], m) -> dict:
    """``weights`` (a state dict) with the trained ``values``: norms/full tensors replace their
    keys, LoRA pairs are merged into their base weight."""
    out = dict(weights)
    if m.trainable_mode == "lora":
        lora = m.lora or {}
        scale = float(lora["alpha"]) / int(lora["rank"])
        from .architectures import get_architecture

        try:
            conv1d = get_architecture(m.architecture["model_type"]).lora_fan_in_fan_out
        except EdgezoError:
            conv1d = False
        for name_a in [k for k in values if ".lora_A." in k]:
            base = name_a.replace(".lora_A.weight", ".weight")
            a, bb = values[name_a], values[name_a.replace(".lora_A.", ".lora_B.")]
            if base not in out:
                raise EdgezoError(f"the source model has no weight {base}", "use its own source")
            delta = scale * (bb.astype(np.float64) @ a.astype(np.float64))
            out[base] = (out[base].astype(np.float64) + (delta.T if conv1d else delta)).astype(
                out[base].dtype
            )
        return out
    for name, v in values.items():
        if name not in out:
            tied = name.replace("model.embed_tokens", "lm_head")
            if tied in out:
                name = tied
            else:
                raise EdgezoError(f"the source model has no tensor {name}", "use its own source")
        out[name] = np.asarray(v, dtype=out[name].dtype).reshape(out[name].shape)
    return out


def _gguf_weights(src: Path, out: Path) -> dict[str, np.ndarray]:
    """A GGUF source's fp32 state dict, dequantised by transformers (export side: torch)."""
    try:
        from .load import load_causal_lm
    except ImportError as e:
        raise EdgezoError(
            f"a GGUF source is dequantised by transformers, which cannot be imported ({e})",
            "install the export side: pip install torch==2.13.0 -e '.[export]'",
        ) from None
    loaded = load_causal_lm(src.parent, src.name)
    loaded.model.config.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    state = {k: v.detach().contiguous().numpy() for k, v in loaded.model.state_dict().items()}
    if getattr(loaded.model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option(
    "--tensors",
    type=click.Path(path_type=Path),
    default=None,
    help="Trained tensors (a run's trained.safetensors) [default: the bundle's initial ones].",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="peft", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--genai-model", is_flag=True, help="onnx_adapter: also write a GenAI model folder.")
def main(
    bundle: Path, tensors: Path | None, out: Path, fmt: str, overwrite: bool, genai_model: bool
) -> None:
    """Write trained tensors as a PEFT LoRA adapter folder, a merged Hugging Face model, an
    ONNX Runtime adapter, or plain safetensors."""
    from .cli import run

    def go() -> None:
        path = handoff(bundle, out, tensors, fmt, overwrite, genai_model)
        click.echo(f"wrote {fmt} hand-off to {path}")

    run(go)


if __name__ == "__main__":
    main(prog_name="python -m exporters.handoff")
