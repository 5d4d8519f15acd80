"""Hand-off: trained LoRA tensors → a PEFT adapter that ``peft`` loads with the same loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import genai_greedy  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.errors import EdgezoError  # noqa: E402
from exporters.handoff import handoff  # noqa: E402


def trained(bundle: Path, tmp_path: Path, metadata: dict | None = None) -> tuple[Path, dict]:
    """'Trained' tensors: the initial ones with every tensor moved (B no longer zero)."""
    b = load_bundle(bundle)
    rng = np.random.default_rng(0)
    values = {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
        for k, v in b.initial_trainable().items()
    }
    path = tmp_path / "trained.safetensors"
    save_file(values, str(path), metadata=metadata or {"bundle": b.fingerprint})
    return path, values


def batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 52, size=(3, 10))
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    return ids, mask, np.where(mask == 1, ids, -100)


def onnx_loss(bundle: Path, values: dict) -> np.ndarray:
    ids, mask, labels = batch()
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(
        ["loss"], {"input_ids": ids, "attention_mask": mask, "labels": labels, **values}
    )[0]


@pytest.mark.parametrize("layers, freeze_a", [(None, False), ("last:1", False), ("last:1", True)])
def test_peft_adapter_matches_bundle_loss(make_bundle, tiny_hf_dir, tmp_path, layers, freeze_a):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    kw = {"lora_layers": layers} if layers else {}
    bundle = make_bundle("lora", **kw, **({"lora_freeze_a": True} if freeze_a else {}))
    tensors, values = trained(bundle, tmp_path)
    out = handoff(bundle, tmp_path / "adapter", tensors)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "v_proj"]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    first = 1 if layers else 0  # the tiny model has blocks 0 and 1
    assert f"base_model.model.model.layers.{first}.self_attn.q_proj.lora_A.weight" in keys
    assert config.get("layers_to_transform") == ([1] if layers else None)
    # LoRA-FA: B alone is trained, A comes from the graph's initializers
    assert len(keys) == len(values) * (2 if freeze_a else 1)

    base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    ids, mask, labels = batch()
    with torch.no_grad():
        for row in range(len(ids)):
            n = int(mask[row].sum())
            x = torch.tensor(ids[row : row + 1, :n])
            ref = model(input_ids=x, labels=x).loss.item()
            got = float(onnx_loss(bundle, values)[row])
            assert abs(got - ref) < 1e-4, (row, got, ref)
    # the adapter really is in use: the base model alone gives another loss
    with torch.no_grad(), model.disable_adapter():
        x = torch.tensor(ids[:1])
        assert (
            abs(model(input_ids=x, labels=x).loss.item() - float(onnx_loss(bundle, values)[0]))
            > 1e-3
        )


def test_safetensors_format_for_norms(make_bundle, tmp_path):
    bundle = make_bundle("norms")
    tensors, values = trained(bundle, tmp_path)
    out = handoff(bundle, tmp_path / "plain", tensors, fmt="safetensors")
    got = load_file(str(out / "tensors.safetensors"))
    assert set(got) == set(values)
    assert all(np.array_equal(got[k], values[k]) for k in values)
    info = json.loads((out / "handoff.json").read_text())
    assert info["trainable_mode"] == "norms" and info["bundle"] == load_bundle(bundle).fingerprint


def test_handoff_refusals(make_bundle, tmp_path):
    lora, norms = make_bundle("lora"), make_bundle("norms")
    with pytest.raises(EdgezoError, match="PEFT adapter holds LoRA"):
        handoff(norms, tmp_path / "a", None, fmt="peft")
    wrong, _ = trained(norms, tmp_path)
    with pytest.raises(EdgezoError, match="trained on bundle"):
        handoff(lora, tmp_path / "b", wrong)
    with pytest.raises(EdgezoError, match="does not exist"):
        handoff(lora, tmp_path / "c", tmp_path / "nope.safetensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_handoff_cli(make_bundle, tmp_path):
    from click.testing import CliRunner

    from exporters.handoff import main

    bundle = make_bundle("lora")
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["--bundle", str(bundle), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "adapter_config.json").is_file()
    again = CliRunner().invoke(main, ["--bundle", str(bundle), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def _greedy(bundle: Path, values: dict, prompt: str, n: int) -> tuple[list[int], list[int]]:
    from edgezo.generate import TextGenerator

    gen = TextGenerator(load_bundle(bundle))
    gen.params.load(values)
    return gen.encode(prompt), gen.generate(prompt, n).token_ids


@pytest.mark.parametrize("freeze_a", [False, True])
def test_onnx_adapter_loads_in_onnxruntime(make_bundle, tmp_path, freeze_a):
    from exporters.handoff import ADAPTER_FILE, read_onnx_adapter

    bundle = make_bundle("lora", **({"lora_freeze_a": True} if freeze_a else {}))
    tensors, values = trained(bundle, tmp_path)
    out = handoff(bundle, tmp_path / "ad", tensors, fmt="onnx_adapter")
    stored = read_onnx_adapter(out / ADAPTER_FILE)
    assert all(np.array_equal(stored[k], v) for k, v in values.items())
    assert len(stored) == len(values) * (2 if freeze_a else 1)  # LoRA-FA: A is written too
    # ONNX Runtime's own adapter loading (RunOptions.add_active_adapter), on the GenAI model
    # folder's graph (LoRA inputs optional, defaulting to the initial values), must give the
    # logits of feeding the trained tensors to the bundle's decoding graph directly
    pytest.importorskip("onnx")
    from exporters.handoff import GENAI_DIR

    out = handoff(bundle, tmp_path / "ad-genai", tensors, fmt="onnx_adapter", genai_model=True)
    b = load_bundle(bundle)
    plain = ort.InferenceSession(
        str(bundle / b.manifest.decoder["graph"]), providers=["CPUExecutionProvider"]
    )
    sess = ort.InferenceSession(
        str(out / GENAI_DIR / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    ids, _, _ = batch()
    d = b.manifest.decoder
    feed = {
        "input_ids": ids[:1],
        "attention_mask": np.ones_like(ids[:1]),
        **{
            i.name: np.zeros((1, d["num_kv_heads"], 0, d["head_dim"]), np.float32)
            for i in plain.get_inputs()
            if i.name.startswith("past_key_values.")
        },
    }
    direct = plain.run(["logits"], {**feed, **values})[0]
    initial = sess.run(["logits"], feed)[0][:, 0]
    adapter = ort.LoraAdapter()
    adapter.Load(str(out / ADAPTER_FILE))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    via_adapter = sess.run(["logits"], feed, run_options=opts)[0][:, 0]
    np.testing.assert_allclose(via_adapter, direct, atol=1e-6)
    assert np.abs(initial - direct).max() > 1e-3  # the adapter changed the output


@pytest.mark.parametrize("freeze_a", [False, True])
def test_genai_generates_edgezo_greedy_tokens(make_bundle, tmp_path, freeze_a):
    og = pytest.importorskip("onnxruntime_genai")
    from exporters.handoff import ADAPTER_FILE, GENAI_DIR

    bundle = make_bundle("lora", **({"lora_freeze_a": True} if freeze_a else {}))
    tensors, values = trained(bundle, tmp_path)
    out = handoff(bundle, tmp_path / "genai", tensors, fmt="onnx_adapter", genai_model=True)
    model = og.Model(str(out / GENAI_DIR))
    adapters = og.Adapters(model)
    adapters.load(str(out / ADAPTER_FILE), "personal")
    for prompt in ("the cat", "we bake bread on sunday."):
        ids, ours = _greedy(bundle, values, prompt, 24)
        eos = load_bundle(bundle).manifest.tokenizer.eos_token_id
        theirs = genai_greedy(og, model, adapters, ids, 24, eos)
        assert theirs == ours and len(ours) > 5


@pytest.mark.parametrize("mode", ["norms", "full", "lora"])
def test_merged_hf_folder_loads_with_same_loss(make_bundle, tmp_path, mode):
    from transformers import AutoModelForCausalLM

    bundle = make_bundle(mode)
    tensors, values = trained(bundle, tmp_path)
    out = handoff(bundle, tmp_path / f"hf-{mode}", tensors, fmt="hf")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask, _ = batch()
    want = onnx_loss(bundle, values)
    with torch.no_grad():
        for row in range(len(ids)):
            n = int(mask[row].sum())
            x = torch.tensor(ids[row : row + 1, :n])
            assert abs(model(input_ids=x, labels=x).loss.item() - float(want[row])) < 1e-4


def test_edgezo_handoff_cli(make_bundle, tmp_path):
    import subprocess
    import sys

    from click.testing import CliRunner

    from edgezo.cli import main

    bundle = make_bundle("norms")
    tensors, _ = trained(bundle, tmp_path)
    args = ["handoff", "--bundle", str(bundle), "--tensors", str(tensors), "--format", "hf"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.safetensors").is_file()
    r = CliRunner().invoke(
        main,
        [
            "handoff",
            "--bundle",
            str(bundle),
            "--format",
            "onnx_adapter",
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert r.exit_code != 0 and "LoRA" in r.output
    code = (
        "import sys, edgezo.cli.handoff, exporters.handoff; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
