"""Every registered architecture besides the conftest Llama: a tiny random model of it is
exported in every trainable mode and must pass the exporter's own validation (ONNX vs PyTorch
parity, the model's own Hugging Face loss, sensitivity), then match Hugging Face's loss here.

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
}


@pytest.fixture(scope="module", params=sorted(set(TINY_CONFIGS) - {"llama", *TINY_ENCODERS}))
def arch_dir(request, tmp_path_factory) -> tuple[str, Path]:
    from transformers import PreTrainedTokenizerFast

    model_type = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
    tok = build_tiny_tokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    build_tiny_model(model_type, tok.get_vocab_size()).save_pretrained(folder)
    return model_type, folder


@pytest.mark.parametrize("mode", ["lora", "norms", "full"])
def test_tiny_architecture_exports_with_parity(arch_dir, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    model_type, folder = arch_dir
    out = export_causal_lm(folder, tmp_path / "b", mode=mode, progress=None)
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m.architecture["model_type"] == model_type and m.trainable_mode == mode
    assert m.parity["max_abs_diff"] < 1e-4 and m.parity["hf_reference_diff"] < 1e-4
    assert m.parity["sensitivity_min_change"] > 0
    names = [s.name for s in m.trainable]
    if (model_type, mode) in EXPECTED:
        count, name = EXPECTED[model_type, mode]
        assert len(names) == count and name in names
    if (model_type, mode) == ("gpt2", "lora"):  # Conv1D: W is [in, out]; PEFT's A/B shapes
        shapes = {s.name: s.shape for s in m.trainable}
        assert shapes["transformer.h.0.attn.c_attn.lora_A.weight"] == (8, 32)  # [r, in]
        assert shapes["transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 8)  # [3 x 32, r]
    if mode == "full":
        frozen = m.architecture["num_parameters"] - m.trainable_size
        assert frozen == (2 * 32 if model_type == "opt" else 0)  # OPT: k_proj biases (no effect)

    # the bundle's loss on a padded batch equals Hugging Face's own per-example loss
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 52, size=(2, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    labels = np.where(mask == 1, ids, -100)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    feeds.update(bundle.initial_trainable())
    got = sess.run(["loss"], feeds)[0]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for row, n in enumerate((11, 7)):
            x = torch.tensor(ids[row : row + 1, :n])
            ref = hf(input_ids=x, labels=x).loss.item()
            assert abs(float(got[row]) - ref) < 1e-4, (model_type, mode, row)


def test_unknown_architecture_lists_all_supported(tmp_path):
    from transformers import T5Config

    from edgezo.errors import EdgezoError

    T5Config(num_layers=1, d_model=16, num_heads=2).save_pretrained(tmp_path / "t5")
    with pytest.raises(EdgezoError, match="'t5' is not supported") as e:
        export_causal_lm(tmp_path / "t5", tmp_path / "out", progress=None)
    for model_type in ("llama", "qwen2", "gpt2", "opt", "bert"):
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
