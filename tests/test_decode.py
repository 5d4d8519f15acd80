"""The KV-cache decoding graph: same greedy tokens as the recompute path and as Hugging Face
``generate``; added to an older bundle without changing its fingerprint; stop strings,
streaming, chat pieces, seeded sampling."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DECODE_PROMPTS, assert_kv_matches_recompute, moved_trainables

from edgezo.bundle import MANIFEST, fingerprint_of, load_bundle
from edgezo.errors import EdgezoError
from edgezo.generate import TextGenerator

PROMPTS = DECODE_PROMPTS


@pytest.fixture(scope="module")
def bundle_path(make_bundle):
    return make_bundle("lora")


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
    assert_kv_matches_recompute(kv, full, b)


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
    gen.params.load(moved_trainables(b, 1))
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
    values = moved_trainables(before, 2)
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


# -- quantised decoding graphs (--decoder-precision int8/int4) --------------------------------

#: largest |logits − fp32 logits| / max|fp32 logits| accepted per precision on the tiny model
#: (measured 0.005 int8, 0.06 int4; a decoder computing zeros or another model gives ~1)
QUANT_LOGIT_BOUND = {"int8": 0.02, "int4": 0.15}


def _decoder_logits(bundle, values, ids):
    """Prefill logits of ``ids`` and of three cached steps after it, with ``values`` fed."""
    gen = TextGenerator(bundle)
    gen.params.load(values)
    dec = gen.decoder
    out = [dec.start(ids[:3])]
    out += [dec.step(t) for t in ids[3:6]]
    return np.stack(out)


@pytest.fixture(scope="module", params=["int8", "int4"])
def quant_bundle(request, make_bundle):
    return request.param, make_bundle("lora", lora_freeze_a=True, decoder_precision=request.param)


def test_quantised_decoder_graph(quant_bundle, make_bundle):
    import onnx

    precision, path = quant_bundle
    b = load_bundle(path)
    d = b.manifest.decoder
    assert d["precision"] == precision and d["files"] == ["decoder.onnx", "decoder.onnx.data"]
    assert set(d["files"]) <= set(b.manifest.files)
    q = d["quantization"]
    assert (q["bits"], q["block_size"], q["accuracy_level"]) == (
        {"int8": 8, "int4": 4}[precision],
        32,
        4,
    )
    assert q["head_untied"] and q["head_quantized"]
    graph = onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    # 2 blocks x (q, k, v, o, gate, up, down) + the untied head
    assert len(nbits) == q["quantized_matmuls"] == 15
    assert all(next(a.i for a in n.attribute if a.name == "bits") == q["bits"] for n in nbits)
    assert any("lm_head" in n.name for n in nbits)
    inits = {t.name for t in graph.initializer}
    fp32_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert fp32_matmuls and all("lora_A" in n for n in fp32_matmuls)  # frozen LoRA A only
    # the trainables are float32 graph inputs with the manifest's names and shapes
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    for s in b.manifest.trainable:
        t = inputs[s.name]
        assert t.elem_type == onnx.TensorProto.FLOAT
        assert tuple(dim.dim_value for dim in t.shape.dim) == tuple(s.shape)
    fp32 = load_bundle(make_bundle("lora", lora_freeze_a=True))
    assert [i.name for i in graph.input] == [
        i.name for i in onnx.load(str(fp32.path / "decoder.onnx")).graph.input
    ]
    parity = d["parity_vs_loss_graph"]
    assert 0 < parity["max_rel_logit_diff"] <= QUANT_LOGIT_BOUND[precision]


def test_quantised_decoder_logits_close_to_fp32_and_trainables_count(quant_bundle, make_bundle):
    precision, path = quant_bundle
    qb, fb = load_bundle(path), load_bundle(make_bundle("lora", lora_freeze_a=True))
    # the same loss graph and trainables: runs and their tensors carry over
    assert qb.manifest.files["model.onnx"] == fb.manifest.files["model.onnx"]
    assert qb.manifest.trainable == fb.manifest.trainable
    ids = TextGenerator(fb).encode(PROMPTS[2])[:6]
    initial = fb.initial_trainable()
    moved = moved_trainables(fb, 3, scale=1.0)
    f0, f1 = _decoder_logits(fb, initial, ids), _decoder_logits(fb, moved, ids)
    q0, q1 = _decoder_logits(qb, initial, ids), _decoder_logits(qb, moved, ids)
    bound = QUANT_LOGIT_BOUND[precision]
    for q, f in ((q0, f0), (q1, f1)):
        assert np.max(np.abs(q - f)) <= bound * np.max(np.abs(f))
        assert np.mean(np.argmax(q, -1) == np.argmax(f, -1)) >= 0.75
    # a trained tensor changes the quantised decoder's output as it changes fp32's
    dq, df = q1 - q0, f1 - f0
    assert np.max(np.abs(df)) > 0.05
    assert np.max(np.abs(dq - df)) <= 2 * bound * np.max(np.abs(df))
    assert TextGenerator(qb).decoder_precision == precision


def test_quantised_check_decoder_fails_beyond_tolerance(quant_bundle, monkeypatch):
    import torch

    from exporters import decode

    precision, path = quant_bundle
    b = load_bundle(path)
    args = (path, b.initial_trainable(), b.manifest.vocab_size)
    ok = decode.check_decoder(*args, torch.Generator().manual_seed(0), 1e-3, precision)
    assert ok["top1_agree"] >= 3 and 0 < ok["max_rel_logit_diff"] <= QUANT_LOGIT_BOUND[precision]
    assert 0 < ok["rms_logit_diff_over_std"] < 1
    monkeypatch.setitem(decode.QUANT_LOGIT_RTOL, precision, ok["max_rel_logit_diff"] / 2)
    with pytest.raises(EdgezoError, match=f"{precision} decoding graph's logits differ"):
        decode.check_decoder(*args, torch.Generator().manual_seed(0), 1e-3, precision)
    # the exact fp32 check refuses the quantised graph: it is what the tolerance is for
    with pytest.raises(EdgezoError, match="does not compute the same model"):
        decode.check_decoder(*args, torch.Generator().manual_seed(0), 1e-3, "fp32")


def test_bad_decoder_precision_is_refused(tiny_hf_dir, tmp_path):
    from edgezo.cli.export import export
    from exporters import export_causal_lm

    with pytest.raises(EdgezoError, match="--decoder-precision as one of: fp32, int8, int4"):
        export_causal_lm(tiny_hf_dir, tmp_path / "a", progress=None, decoder_precision="int3")
    assert not (tmp_path / "a").exists()
    with pytest.raises(EdgezoError, match="quantised"):
        export_causal_lm(
            tiny_hf_dir, tmp_path / "b", progress=None, precision="int4", decoder_precision="int8"
        )
    with pytest.raises(EdgezoError, match="--no-decoder"):
        export_causal_lm(
            tiny_hf_dir, tmp_path / "c", progress=None, decoder=False, decoder_precision="int8"
        )
    r = CliRunner().invoke(
        export,
        ["--model", str(tiny_hf_dir), "--out", str(tmp_path / "d"), "--decoder-precision", "fp16"],
    )
    assert r.exit_code == 2 and "'fp16' is not one of 'fp32', 'int8', 'int4'" in r.output


def test_decoder_only_switches_precision(make_bundle, tmp_path):
    from edgezo.cli.export import export

    folder = tmp_path / "b"
    shutil.copytree(make_bundle("lora"), folder)
    before = load_bundle(folder)
    r = CliRunner().invoke(
        export, ["--decoder-only", "--bundle", str(folder), "--decoder-precision", "int8"]
    )
    assert r.exit_code == 0, r.output
    b = load_bundle(folder)
    assert b.manifest.decoder["precision"] == "int8" and (folder / "decoder.onnx.data").is_file()
    assert b.fingerprint == before.fingerprint
    assert TextGenerator(b).decoder_precision == "int8"
    r = CliRunner().invoke(export, ["--decoder-only", "--bundle", str(folder)])
    assert r.exit_code == 0, r.output
    b = load_bundle(folder)  # verifies every listed file's hash
    assert b.manifest.decoder["precision"] == "fp32"
    assert not (folder / "decoder.onnx.data").exists()  # the int8 weights are gone
    assert "decoder.onnx.data" not in b.manifest.files


def test_manifest_refuses_unknown_decoder_precision(bundle_path, tmp_path):
    from edgezo.errors import BundleError

    folder = tmp_path / "b"
    shutil.copytree(bundle_path, folder)
    m = json.loads((folder / MANIFEST).read_text())
    m["decoder"]["precision"] = "int2"
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="decoder.precision"):
        load_bundle(folder, verify=False)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantised_bundle_gets_a_decoder_of_its_own_width(make_bundle, precision):
    """A quantised LoRA bundle's decoding graph is quantised like its loss graph and checked
    against it; generation then runs on the KV cache, moved by the trained tensors."""
    b = load_bundle(make_bundle("lora", lora_freeze_a=True, precision=precision))
    d = b.manifest.decoder
    assert d is not None and d["precision"] == precision and b.manifest.quantization
    assert {"decoder.onnx", "decoder.onnx.data"} <= set(b.manifest.files)
    parity = d["parity_vs_loss_graph"]  # against the bundle's own (quantised) loss graph
    assert 0 <= parity["max_rel_logit_diff"] <= QUANT_LOGIT_BOUND[precision]
    assert parity["top1_agree"] >= 3  # of the check's 4 steps
    assert parity["reference"].startswith(f"{precision} loss graph")
    gen = TextGenerator(b)
    assert gen.decoder is not None and gen.decoder_precision == precision
    gen.params.load(moved_trainables(b, 2))
    assert len(gen.generate(PROMPTS[0], 8).token_ids) == 8


def test_quantised_decoder_refusals(make_bundle, tiny_hf_dir, tmp_path):
    from exporters import decode, export_causal_lm

    # trained quantisation scales: no decoder by default, a clear refusal when asked for
    scales = load_bundle(make_bundle("scales", quantize="int4"))
    assert scales.manifest.decoder is None
    with pytest.raises(EdgezoError, match="quantisation scales"):
        kw = dict(mode="scales", precision="int4", decoder=True, progress=None)
        export_causal_lm(tiny_hf_dir, tmp_path / "s", **kw)
    with pytest.raises(EdgezoError, match="quantisation scales"):
        decode.add_decoder(scales.path, progress=None)
    # another width than the bundle's
    with pytest.raises(EdgezoError, match="quantised like its loss graph, int8"):
        export_causal_lm(
            tiny_hf_dir, tmp_path / "w", precision="int8", decoder_precision="int4", progress=None
        )


def test_an_optional_decoder_that_does_not_fit_is_left_out(tiny_hf_dir, tmp_path, monkeypatch):
    from exporters import export_causal_lm, load

    real = load.check_export_memory

    def tight(config, source, precision=None, decoder=False, available=None):
        if decoder:  # as if the decoding graph's trace needed more than this machine has
            raise EdgezoError("needs about 9.9 GiB to export", "--no-decoder")
        return real(config, source, precision, decoder, available)

    monkeypatch.setattr(load, "check_export_memory", tight)
    b = load_bundle(export_causal_lm(tiny_hf_dir, tmp_path / "a", progress=None))
    assert b.manifest.decoder is None  # auto: left out, the export went on
    with pytest.raises(EdgezoError, match="--no-decoder"):  # asked for: refused
        export_causal_lm(tiny_hf_dir, tmp_path / "b", decoder=True, progress=None)
