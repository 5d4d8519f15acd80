"""Every registered architecture besides the conftest Llama: a tiny random model of it is
exported in every trainable mode and must pass the exporter's own validation (ONNX vs PyTorch
parity, the model's own Hugging Face loss, sensitivity), then match Hugging Face's loss here.

The families added for on-device personalisation (Llama 3.x RoPE scaling, Qwen3, Phi-3,
SmolLM3, Gemma 2, Gemma 3) run in all six modes: lora, LoRA-FA on the last block (with its
frozen-prefix split), norms, full, int4 (LoRA on an int4 graph) and scales.

A registered ``model_type`` without a tiny config in ``conftest.TINY_CONFIGS`` fails
``test_export.py::test_every_architecture_has_a_tiny_test_model``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import (  # noqa: E402
    TINY_CONFIGS,
    TINY_ENCODERS,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_model_type,
)

from edgezo.bundle import load_bundle  # noqa: E402
from exporters import export_causal_lm  # noqa: E402

#: (model_type, mode) -> (trainable tensor count, a name that must be among them)
EXPECTED = {
    ("qwen2", "lora"): (8, "model.layers.0.self_attn.q_proj.lora_A.weight"),
    ("qwen2", "norms"): (5, "model.norm.weight"),
    ("gpt2", "lora"): (4, "transformer.h.0.attn.c_attn.lora_B.weight"),
    ("gpt2", "norms"): (10, "transformer.ln_f.bias"),
    ("opt", "lora"): (8, "model.decoder.layers.1.self_attn.v_proj.lora_A.weight"),
    ("opt", "norms"): (10, "model.decoder.final_layer_norm.weight"),
    ("qwen3", "norms"): (9, "model.layers.1.self_attn.k_norm.weight"),  # + q/k norms
    ("phi3", "lora"): (4, "model.layers.1.self_attn.qkv_proj.lora_B.weight"),  # fused qkv
    ("gemma2", "norms"): (9, "model.layers.0.pre_feedforward_layernorm.weight"),
    ("gemma3_text", "norms"): (13, "model.layers.1.self_attn.q_norm.weight"),
    ("gemma3_text", "lora_fa"): (2, "model.layers.1.self_attn.v_proj.lora_B.weight"),
}

#: the families of issue 17 (every mode); the others run lora, norms and full
NEW_FAMILIES = ("llama3", "qwen3", "phi3", "smollm3", "gemma2", "gemma3_text")
ALL_MODES = ("lora", "lora_fa", "norms", "full", "int4", "scales")
#: test mode -> export_causal_lm arguments
MODE_ARGS = {
    "lora": {"mode": "lora"},
    "lora_fa": {"mode": "lora", "lora_layers": "last:1", "lora_freeze_a": True},
    "norms": {"mode": "norms"},
    "full": {"mode": "full"},
    "int4": {"mode": "lora", "quantize": "int4"},
    "scales": {"mode": "scales", "quantize": "int4"},
}
ARCH_KEYS = sorted(set(TINY_CONFIGS) - {"llama", *TINY_ENCODERS})
CASES = [
    (key, mode)
    for key in ARCH_KEYS
    for mode in (ALL_MODES if key in NEW_FAMILIES else ("lora", "norms", "full"))
]


def _save_tiny(key: str, folder: Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    tok = build_tiny_tokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    build_tiny_model(key, tok.get_vocab_size()).save_pretrained(folder)
    return folder


_DIRS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """``get(key) -> folder`` of a saved tiny model, built once per module."""

    def get(key: str) -> Path:
        if key not in _DIRS or not _DIRS[key].exists():
            _DIRS[key] = _save_tiny(key, tmp_path_factory.mktemp(f"tiny-{key}"))
        return _DIRS[key]

    return get


@pytest.fixture(scope="module", params=ARCH_KEYS)
def arch_dir(request, tiny_dirs) -> tuple[str, Path]:
    return request.param, tiny_dirs(request.param)


@pytest.mark.parametrize(("key", "mode"), CASES)
def test_tiny_architecture_exports_with_parity(tiny_dirs, tmp_path, key, mode):
    from transformers import AutoModelForCausalLM

    folder = tiny_dirs(key)
    model_type = tiny_model_type(key)
    args = MODE_ARGS[mode]
    out = export_causal_lm(folder, tmp_path / "b", progress=None, **args)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.architecture["model_type"] == model_type and m.trainable_mode == args["mode"]
    assert m.parity["max_abs_diff"] < 1e-4 and m.parity["hf_reference_diff"] < 1e-4
    assert m.parity["sensitivity_min_change"] > 0
    names = [s.name for s in m.trainable]
    roles = {s.role for s in m.trainable}
    if mode == "lora_fa":  # B of the last block only, and its frozen prefix split off
        assert roles == {"lora_b"} and all(".layers.1." in n for n in names)
        assert m.lora["freeze_a"] and m.lora["layers"] == [1]
        assert m.stages and (out / m.stages["prefix"]).is_file()
    if mode in ("int4", "scales"):
        q = m.quantization
        assert q["quantized_matmuls"] > 0 and q["parity_vs_fp32"]["max_rel_diff"] < 0.1
        assert (roles == {"scale"}) if mode == "scales" else (roles == {"lora_a", "lora_b"})
        if mode == "scales":
            assert q["fed_scales_exact"]
    if (key, mode) in EXPECTED:
        count, name = EXPECTED[key, mode]
        assert len(names) == count and name in names
    if (model_type, mode) == ("gpt2", "lora"):  # Conv1D: W is [in, out]; PEFT's A/B shapes
        shapes = {s.name: s.shape for s in m.trainable}
        assert shapes["transformer.h.0.attn.c_attn.lora_A.weight"] == (8, 32)  # [r, in]
        assert shapes["transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 8)  # [3 x 32, r]
    if mode == "full":
        frozen = m.architecture["num_parameters"] - m.trainable_size
        assert frozen == (2 * 32 if model_type == "opt" else 0)  # OPT: k_proj biases (no effect)
    if mode in ("int4", "scales"):
        return  # the quantised graph is checked against the fp32 graph (above), not HF

    # the bundle's loss on a padded batch equals Hugging Face's own per-example loss; rows of
    # 11, 7 and 3 tokens: longer and shorter than the Gemma tiny models' 4-token window
    rng = np.random.default_rng(0)
    lengths = (11, 7, 3)
    ids = rng.integers(3, 52, size=(len(lengths), 11))
    mask = (np.arange(11)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    feeds.update(bundle.initial_trainable())
    got = sess.run(["loss"], feeds)[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if mode == "lora_fa":  # B is zero: the adapted model is the base model
        assert all(not np.any(v) for v in bundle.initial_trainable().values())
    with torch.no_grad():
        for row, n in enumerate(lengths):
            x = torch.tensor(ids[row : row + 1, :n])
            ref = hf(input_ids=x, labels=x).loss.item()
            assert abs(float(got[row]) - ref) < 1e-4, (model_type, mode, row)


def test_unknown_architecture_lists_all_supported(tmp_path):
    from transformers import T5Config

    from edgezo.errors import EdgezoError

    T5Config(num_layers=1, d_model=16, num_heads=2).save_pretrained(tmp_path / "t5")
    with pytest.raises(EdgezoError, match="'t5' is not supported") as e:
        export_causal_lm(tmp_path / "t5", tmp_path / "out", progress=None)
    for model_type in (
        "llama",
        "qwen2",
        "qwen3",
        "phi3",
        "smollm3",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "opt",
        "bert",
    ):
        assert model_type in str(e.value)


def test_peft_handoff_per_architecture(arch_dir, tmp_path):
    """Trained LoRA tensors of every family load into ``peft`` with the bundle's loss (GPT-2:
    PEFT's ``fan_in_fan_out`` Conv1D path)."""
    peft = pytest.importorskip("peft")
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    from exporters.handoff import handoff

    model_type, folder = arch_dir
    out = export_causal_lm(folder, tmp_path / "b", mode="lora", progress=None)
    b = load_bundle(out)
    rng = np.random.default_rng(0)
    values = {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
        for k, v in b.initial_trainable().items()
    }
    save_file(values, str(tmp_path / "t.safetensors"))
    adapter = handoff(out, tmp_path / "adapter", tmp_path / "t.safetensors")
    ids = rng.integers(3, 52, size=(1, 10))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(
        ["loss"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids, **values}
    )[0]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        x = torch.tensor(ids)
        ref = model(input_ids=x, labels=x).loss.item()
    assert abs(float(got[0]) - ref) < 1e-4
