"""The KV-cache decoding graph: same greedy tokens as the recompute path and as Hugging Face
``generate``; added to an older bundle without changing its fingerprint; stop strings,
streaming, chat pieces, seeded sampling."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgezo.bundle import MANIFEST, fingerprint_of, load_bundle
from edgezo.errors import EdgezoError
from edgezo.generate import TextGenerator

PROMPTS = ["the cat", "a", "we bake bread on sunday. the dog"]


@pytest.fixture(scope="module")
def bundle_path(make_bundle):
    return make_bundle("lora")


def _moved(bundle, seed=0, scale=0.3):
    """Tensors away from the initial point (LoRA B starts at zero)."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in bundle.initial_trainable().items()
    }


def test_export_writes_decoder(bundle_path):
    b = load_bundle(bundle_path)
    d = b.manifest.decoder
    assert d is not None and d["graph"] in b.manifest.files
    assert (d["num_layers"], d["num_kv_heads"], d["head_dim"]) == (2, 2, 8)
    assert d["parity_vs_loss_graph"]["max_abs_logit_diff"] < 1e-4


def test_kv_cache_greedy_equals_recompute(bundle_path):
    b = load_bundle(bundle_path)
    kv, full = TextGenerator(b), TextGenerator(b, kv_cache=False)
    assert kv.decoder is not None and full.decoder is None
    values = _moved(b)
    for g in (kv, full):
        g.params.load(values)
    for prompt in PROMPTS:
        a, c = kv.generate(prompt, 40), full.generate(prompt, 40)
        assert a.token_ids == c.token_ids and len(a.token_ids) > 10
        # a sequence outgrowing max_length is re-read from its last tokens, as recompute does
        a, c = kv.generate(prompt, 30, max_length=8), full.generate(prompt, 30, max_length=8)
        assert a.token_ids == c.token_ids


def test_kv_cache_greedy_equals_hf_generate(bundle_path, tiny_hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    b = load_bundle(bundle_path)
    gen = TextGenerator(b)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        ours = gen.generate(prompt, 24)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=b.manifest.tokenizer.eos_token_id,
                pad_token_id=0,
            )
        hf = out[0, len(ids) :].tolist()
        if hf and hf[-1] == b.manifest.tokenizer.eos_token_id:
            hf = hf[:-1]
        assert ours.token_ids == hf


def test_stream_stop_and_sampling(bundle_path):
    b = load_bundle(bundle_path)
    gen = TextGenerator(b)
    gen.params.load(_moved(b, 1))
    full = gen.generate(PROMPTS[2], 30)
    pieces = list(gen.stream(PROMPTS[2], 30))
    assert "".join(pieces) == full.text and len(pieces) > 1
    stop = full.text[5:7]
    cut = gen.generate(PROMPTS[2], 30, stop=[stop])
    assert cut.stopped_at_stop and cut.text == full.text[: full.text.find(stop)]
    assert "".join(gen.stream(PROMPTS[2], 30, stop=[stop])) == cut.text
    s1 = gen.generate(PROMPTS[0], 20, temperature=1.5, top_k=10, top_p=0.9, seed=7)
    s2 = gen.generate(PROMPTS[0], 20, temperature=1.5, top_k=10, top_p=0.9, seed=7)
    s3 = gen.generate(PROMPTS[0], 20, temperature=1.5, top_k=10, top_p=0.9, seed=8)
    assert s1.token_ids == s2.token_ids != s3.token_ids


def test_decoder_only_keeps_fingerprint(make_bundle, tmp_path):
    from edgezo.cli.export import export

    old = tmp_path / "old"
    shutil.copytree(make_bundle("lora", decoder=False, lora_freeze_a=True), old)
    before = load_bundle(old)
    assert before.manifest.decoder is None
    assert "decoder" not in json.loads((old / MANIFEST).read_text())
    gen = TextGenerator(before)
    assert gen.decoder is None and "decoder-only" in gen.notes[0]
    values = _moved(before, 2)
    gen.params.load(values)
    slow = gen.generate(PROMPTS[0], 20).token_ids
    r = CliRunner().invoke(export, ["--decoder-only", "--bundle", str(old)])
    assert r.exit_code == 0, r.output
    after = load_bundle(old)
    assert after.manifest.decoder is not None
    assert after.fingerprint == before.fingerprint == fingerprint_of(before.manifest)
    fast = TextGenerator(after)
    fast.params.load(values)
    assert fast.decoder is not None and fast.generate(PROMPTS[0], 20).token_ids == slow
    with pytest.raises(EdgezoError, match="no decoding graph"):
        TextGenerator(load_bundle(make_bundle("lora", decoder=False)), kv_cache=True)


def test_chat_template_pieces(tiny_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from exporters import export_causal_lm

    model = tmp_path / "chat-model"
    shutil.copytree(tiny_hf_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(model)
    out = export_causal_lm(model, tmp_path / "b", progress=None)
    b = load_bundle(out)
    assert b.manifest.decoder["chat"] == {"prefix": "<user>", "suffix": "\n<assistant>"}
    gen = TextGenerator(b)
    assert gen.encode("hi", chat=True) == gen.encode("<user>hi\n<assistant>")
    assert gen.generate("hi", 8, chat=True).prompt_tokens == len(
        gen.encode("<user>hi\n<assistant>")
    )


def test_chat_without_template(bundle_path):
    with pytest.raises(EdgezoError, match="chat template"):
        TextGenerator(load_bundle(bundle_path)).encode("hi", chat=True)


def test_personalizer_generate(bundle_path, tmp_path):
    from edgezo import Personalizer

    p = Personalizer(bundle_path, app_dir=tmp_path / "app")
    seen = []
    text = p.generate(PROMPTS[0], 12, on_text=seen.append)
    assert (
        text
        == "".join(seen)
        == TextGenerator(load_bundle(bundle_path)).generate(PROMPTS[0], 12).text
    )
