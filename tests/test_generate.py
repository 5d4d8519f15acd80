"""`edgezo generate`: next-token logits from the loss graph, greedy/sampled continuations."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from edgezo.bundle import MANIFEST, load_bundle
from edgezo.errors import EdgezoError
from edgezo.generate import TextGenerator, generate, pick_token

PROMPT = "the cat sat"


@pytest.fixture(scope="module")
def bundle_path(make_bundle):
    return make_bundle("lora")


@pytest.fixture(scope="module")
def gen(bundle_path):
    # the recompute path (the loss graph's next_logits); the KV cache: tests/test_decode.py
    return TextGenerator(load_bundle(bundle_path), kv_cache=False)


@pytest.fixture(scope="module")
def trained_file(bundle_path, tmp_path_factory):
    """The initial tensors with every LoRA B set to sizeable random values."""
    b = load_bundle(bundle_path)
    values = b.initial_trainable()
    rng = np.random.default_rng(0)
    for s in b.manifest.trainable:
        if s.role == "lora_b":
            values[s.name] = rng.normal(0, 1.0, s.shape).astype(np.float32)
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    save_file(values, str(path))
    return path


def _batch(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.full_like(ids, -100)}


def test_manifest_lists_next_logits(bundle_path):
    m = load_bundle(bundle_path).manifest
    assert [(o.name, tuple(o.shape)) for o in m.outputs] == [
        ("loss", ("batch",)),
        ("next_logits", ("batch", "vocab")),
    ]
    assert m.parity["next_logits_max_abs_diff"] <= m.parity["tolerance"]


def test_greedy_is_deterministic_and_matches_step_by_step_reference(gen):
    a = gen.generate(PROMPT, max_new_tokens=12)
    b = gen.generate(PROMPT, max_new_tokens=12)
    assert a == b
    ids = gen.encode(PROMPT)
    ref = []
    for _ in range(12):
        logits = gen.runner.next_logits(_batch([ids]))[0]
        token = int(np.argmax(logits))
        if token == gen.spec.eos_token_id:
            break
        ref.append(token)
        ids = ids + [token]
    assert a.token_ids == ref
    assert a.text == gen.tokenizer.decode(ref, skip_special_tokens=True)


def test_right_padding_picks_each_rows_last_position(gen):
    short, long = gen.encode("ab"), gen.encode("hello there")
    both = gen.runner.next_logits(_batch([short, long]))
    np.testing.assert_allclose(both[0], gen.runner.next_logits(_batch([short]))[0], atol=1e-5)
    np.testing.assert_allclose(both[1], gen.runner.next_logits(_batch([long]))[0], atol=1e-5)


def test_next_logits_match_pytorch(gen, tiny_hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    for text in (PROMPT, "hello, world!"):
        ids = gen.encode(text)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
        ours = gen.next_logits(ids)  # initial tensors: LoRA B = 0, the base model
        assert ours.shape == ref.shape
        assert np.max(np.abs(ours - ref)) < 1e-4


def test_sampling_reproducible_with_seed_and_differs_across_seeds(gen):
    # the tiny random model is very peaked: a high temperature makes the draws matter
    runs = [
        gen.generate(PROMPT, max_new_tokens=16, temperature=20.0, seed=s).token_ids
        for s in (1, 1, 2, 3)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2] or runs[0] != runs[3]
    state = np.random.get_state()[1].copy()
    gen.generate(PROMPT, max_new_tokens=4, temperature=1.0, rng=np.random.default_rng(5))
    assert np.array_equal(np.random.get_state()[1], state)  # the global generator is untouched


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    rng = np.random.default_rng(0)
    assert {pick_token(logits, 2.0, top_k=1, rng=rng) for _ in range(20)} == {1}
    assert {pick_token(logits, 1.0, top_p=0.5, rng=rng) for _ in range(50)} <= {1, 3}
    assert pick_token(logits) == 1


def test_eos_stops(gen, monkeypatch):
    eos = gen.spec.eos_token_id
    real = gen.next_logits
    calls = []

    def forced(ids):
        calls.append(1)
        logits = real(ids).copy()
        if len(calls) == 3:
            logits[eos] = logits.max() + 10
        return logits

    monkeypatch.setattr(gen, "next_logits", forced)
    out = gen.generate(PROMPT, max_new_tokens=20)
    assert out.stopped_at_eos and len(out.token_ids) == 2 and len(calls) == 3
    assert eos not in out.token_ids


def test_trained_tensors_change_the_output(bundle_path, trained_file):
    base = generate(bundle_path, PROMPT, max_new_tokens=12)
    trained = generate(bundle_path, PROMPT, tensors=trained_file, max_new_tokens=12)
    assert base.token_ids != trained.token_ids


def test_prefix_is_truncated(gen):
    out = gen.generate("abcdefghij" * 5, max_new_tokens=2, max_length=8)
    assert out.prompt_tokens == 8


def test_old_bundle_without_next_logits_is_refused(bundle_path, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundle_path, old)
    raw = json.loads((old / MANIFEST).read_text())
    raw["outputs"] = [o for o in raw["outputs"] if o["name"] == "loss"]
    (old / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(EdgezoError, match="re-export"):
        generate(old, PROMPT, max_new_tokens=2)


def test_cli_generate_and_compare(bundle_path, trained_file):
    from edgezo.cli import main

    r = CliRunner().invoke(
        main,
        ["generate", "--bundle", str(bundle_path), "--prompt", PROMPT, "--max-new-tokens", "6"],
    )
    assert r.exit_code == 0, r.output
    assert r.output.rstrip("\n") == generate(bundle_path, PROMPT, max_new_tokens=6).text
    r = CliRunner().invoke(
        main,
        [
            "generate",
            "--bundle",
            str(bundle_path),
            "--tensors",
            str(trained_file),
            "--prompt",
            PROMPT,
            "--compare",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--top-k",
            "5",
            "--seed",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "trained (" in r.output and "initial (bundle" in r.output


def test_generate_imports_no_torch():
    code = (
        "import sys, edgezo.generate, edgezo.cli; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_generate_reports_a_quantised_decoder(make_bundle):
    from edgezo.cli import main

    path = make_bundle("lora", lora_freeze_a=True, decoder_precision="int8")
    r = CliRunner().invoke(
        main, ["generate", "--bundle", str(path), "--prompt", PROMPT, "--max-new-tokens", "6"]
    )
    assert r.exit_code == 0, r.output
    assert "frozen weights are int8 (weight-only MatMulNBits" in r.stderr
    assert r.stdout.rstrip("\n") == generate(path, PROMPT, max_new_tokens=6).text


def test_bench_generate_times_bundles_side_by_side(make_bundle, tmp_path):
    """tools/bench_generate.py with two named bundles and a plain one: each timed in its own
    child, the greedy agreement with the fp32 reference printed (tiny run, no Hugging Face)."""
    fp32 = make_bundle("lora", lora_freeze_a=True)
    int4 = make_bundle("lora", lora_freeze_a=True, decoder_precision="int4")
    out = tmp_path / "bench.json"
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_generate.py"
    cmd = [sys.executable, str(tool), "--bundle", f"int4={int4}"]
    cmd += ["--bundle", str(fp32), "--rounds", "1", "--reps", "1", "--new-tokens", "6"]
    cmd += ["--no-hf", "--json", str(out)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = json.loads(out.read_text())
    assert set(res["median_tok_per_s"]) == {"kv:int4", "kv:fp32", "edgezo_recompute"}
    assert all(v > 0 for v in res["median_tok_per_s"].values())
    flat = " ".join(text.split())
    assert "greedy tokens agreeing with kv:fp32" in flat and "kv:int4 = " in flat
    fp32_tokens = res["runs"]["kv:fp32"][0]["tokens"]
    assert res["runs"]["edgezo_recompute"][0]["tokens"] == fp32_tokens  # same fp32 model
    assert f"edgezo_recompute {len(fp32_tokens)}/{len(fp32_tokens)}" in flat
    forced = res["forced"]["int4"]
    assert forced["of"] == len(fp32_tokens) and 0 <= forced["top1_agree"] <= forced["of"]
    assert "teacher-forced top-1 agreement" in text
