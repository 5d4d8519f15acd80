"""Gemma 3 from GGUF files (as llama.cpp writes them) through ``edgezo export --model
file.gguf``, and the refusals of issue 17: a GGUF of a quantisation type nothing can
dequantise, and config fields an architecture description does not cover."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file

from conftest import (  # noqa: E402
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_gemma3_for_gguf,
    write_tiny_gemma3_gguf,
)

from edgezo.errors import EdgezoError  # noqa: E402
from exporters import export_causal_lm  # noqa: E402


@pytest.mark.parametrize(("qtype", "hidden"), [("Q8_0", 32), ("Q4_K_M", 256)])
def test_gemma3_gguf_exports_through_the_cli(tmp_path, qtype, hidden):
    from click.testing import CliRunner
    from gguf import GGUFReader

    from edgezo.cli import main
    from exporters.load import load_causal_lm

    path = write_tiny_gemma3_gguf(tmp_path / f"tiny-gemma3-{qtype}.gguf", qtype, hidden=hidden)
    kinds = {t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert kinds == {"F32", "Q8_0" if qtype == "Q8_0" else "Q4_K"}
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", "--model", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    arch = manifest["architecture"]
    assert (arch["model_type"], arch["family"], arch["hidden_size"]) == (
        "gemma3_text",
        "gemma3",
        hidden,
    )
    assert arch["tie_word_embeddings"] and manifest["parity"]["hf_reference_diff"] < 1e-4

    # what transformers read is the model that was written: norms (stored 1 + w) exactly,
    # the quantised matrices within their quantisation error
    original, _, _ = tiny_gemma3_for_gguf(0, hidden)
    loaded = load_causal_lm(path).model.state_dict()
    for name, value in original.state_dict().items():
        if "norm" in name:
            assert torch.allclose(loaded[name], value, atol=1e-6), name
        elif name != "lm_head.weight":
            err = (loaded[name] - value).abs().max().item()
            # Q8_0: 1/127 of a 32-block's max; Q4_K: half a step of 1/15 of its range, scales 6-bit
            assert err < (0.01 if qtype == "Q8_0" else 0.1) * value.abs().max().item() + 1e-3


def test_gguf_of_an_undequantisable_type_is_refused(tmp_path):
    path = write_tiny_gemma3_gguf(tmp_path / "tiny-q8_1.gguf", "Q8_1")
    with pytest.raises(EdgezoError) as e:
        export_causal_lm(path, tmp_path / "out", progress=None)
    text = str(e.value)
    assert "gemma3_text" in text and "token_embd.weight" in text and "Q8_1" in text
    assert "llama-quantize" in e.value.fix and not (tmp_path / "out").exists()


def _saved(tmp_path, key: str, **overrides):
    from transformers import PreTrainedTokenizerFast

    tok = build_tiny_tokenizer()
    folder = tmp_path / key
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(folder)
    build_tiny_model(key, tok.get_vocab_size()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(overrides)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("key", "overrides", "field", "value"),
    [
        # dynamic NTK scaling changes the RoPE table with the sequence length: a traced graph
        # would freeze one length's table
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "rope_parameters.rope_type",
            "dynamic",
        ),
        # Phi-4-mini's longrope switches tables at a length, in place (not exportable)
        (
            "phi3",
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 3,
                    "long_factor": [2.0] * 3,
                    "partial_rotary_factor": 0.75,
                },
                "original_max_position_embeddings": 64,
            },
            "rope_parameters.rope_type",
            "longrope",
        ),
        (
            "gemma3_text",
            {"layer_types": ["chunked_attention", "full_attention"]},
            "layer_types",
            "chunked_attention",
        ),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping", None),
        ("qwen3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping", None),
    ],
)
def test_uncovered_config_fields_are_refused(tmp_path, key, overrides, field, value):
    folder = _saved(tmp_path, key, **overrides)
    with pytest.raises(EdgezoError) as e:
        export_causal_lm(folder, tmp_path / "out", progress=None)
    text = str(e.value)
    assert field in text and (value is None or repr(value) in text)
    assert key in text  # the model (its model_type)
    assert "exporters/architectures.py" in e.value.fix or "config.json" in e.value.fix


def test_a_model_too_large_to_export_here_is_refused(tmp_path, monkeypatch):
    from exporters import load

    folder = _saved(tmp_path, "qwen3")
    monkeypatch.setattr(load, "available_memory_bytes", lambda: 1000)  # a 1 kB machine
    with pytest.raises(EdgezoError) as e:
        export_causal_lm(folder, tmp_path / "out", progress=None)
    text = str(e.value)
    assert "qwen3" in text and "GiB to export" in text and "available" in text
    assert "more memory" in e.value.fix and not (tmp_path / "out").exists()
