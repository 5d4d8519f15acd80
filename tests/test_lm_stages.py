"""LoRA on a causal LM's last blocks (``--lora-layers``) and the frozen-prefix cache of the
blocks before them: the split is exact at any padding, and training on the cached suffix
follows the same losses as training on the full graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edgezo import prefix_cache  # noqa: E402
from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.config import FinetuneConfig  # noqa: E402
from edgezo.data import collate, pad_rows, read_jsonl, tokenize_for  # noqa: E402
from edgezo.errors import EdgezoError  # noqa: E402
from edgezo.runner import LossRunner, RuntimeOptions  # noqa: E402
from edgezo.train import finetune  # noqa: E402
from edgezo.zo.ledger import Ledger  # noqa: E402
from edgezo.zo.params import FlatParams  # noqa: E402
from exporters.lora import layer_index, resolve_layers  # noqa: E402


@pytest.mark.parametrize(
    "spec, want",
    [
        ("all", (0, 1, 2, 3)),
        ("last:1", (3,)),
        ("last:4", (0, 1, 2, 3)),
        ("1-2", (1, 2)),
        ("3,0", (0, 3)),
        ("0,2-3", (0, 2, 3)),
        ((2, 3), (2, 3)),
    ],
)
def test_resolve_layers(spec, want):
    assert resolve_layers(spec, [0, 1, 2, 3]) == want


@pytest.mark.parametrize(
    "spec, says",
    [
        ("last:5", "at most last:4"),
        ("last:0", "cannot read"),
        ("7", "no block"),
        ("first", "cannot read"),
        ("2-1", "no block"),
    ],
)
def test_resolve_layers_refuses_with_a_hint(spec, says):
    with pytest.raises(EdgezoError) as e:
        resolve_layers(spec, [0, 1, 2, 3])
    text = f"{e.value.what} / {e.value.fix}"
    assert says in text and "--lora-layers" in text


def test_layer_index():
    assert layer_index("model.layers.27.self_attn.q_proj.lora_A.weight") == 27
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None


@pytest.fixture(scope="module")
def last1(make_bundle):
    return make_bundle("lora", lora_layers="last:1")


def test_last_block_bundle_is_split_before_it(last1, make_bundle):
    b = load_bundle(last1)  # checks the hashes of prefix.onnx and suffix.onnx too
    m = b.manifest
    assert m.lora["layers"] == [1]
    assert {layer_index(s.name) for s in m.trainable} == {1}
    st = m.stages
    assert st and {st["prefix"], st["suffix"]} <= set(m.files)
    # masks and position ids are recomputed in the suffix from the text inputs
    assert set(st["suffix_inputs"]) <= {"input_ids", "attention_mask", "labels"}
    assert "labels" in st["suffix_inputs"]
    assert all(axes for axes in st["cached_sequence_axes"].values())
    suffix = onnx.load(str(b.path / st["suffix"]))
    full = onnx.load(str(b.model_path))
    assert len(suffix.graph.node) < len(full.graph.node)
    # block 0's arithmetic is cached (its cheap rotary-table nodes may be recomputed)
    assert not any("layers.0/" in n.name and n.op_type == "MatMul" for n in suffix.graph.node)
    # one LM-head matmul, on the rows with a target and each example's last row
    assert sum(n.op_type == "MatMul" and "lm_head" in n.name for n in full.graph.node) == 1
    # adapters in every block leave nothing to cache
    assert not load_bundle(make_bundle("lora")).manifest.stages


def test_suffix_on_cached_rows_equals_the_full_graph(last1, memo_data):
    b = load_bundle(last1)
    examples = tokenize_for(b.manifest, read_jsonl(memo_data[0]), b.tokenizer(), 32)[:7]
    pad = b.manifest.tokenizer.pad_token_id
    opts = RuntimeOptions(threads=1)
    (rows,), calls = prefix_cache.cache_rows(b, [examples], 3, pad, opts)
    assert calls == 3 and len(rows) == len(examples)
    name = next(n for n, a in b.manifest.stages["cached_sequence_axes"].items() if a == [1])
    assert all(r.features[name].shape[0] == len(r.input_ids) for r in rows)  # own length
    # each row owns its memory: a view would keep its whole padded batch output alive
    held = [v for r in rows for v in r.features.values() if not prefix_cache.is_stand_in(v)]
    assert held and all(v.base is None for v in held)
    rng = np.random.default_rng(1)
    params = FlatParams(list(b.manifest.trainable))
    params.load(
        {
            k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
            for k, v in b.initial_trainable().items()
        }
    )
    full = LossRunner(b.model_path, params, ["input_ids", "attention_mask", "labels"], opts)
    suffix = LossRunner(prefix_cache.suffix_path(b), params, prefix_cache.suffix_inputs(b), opts)
    # batches of other compositions than the caching chunks: rows are re-padded per batch
    for chunk in (rows[:4], rows[2:7], rows[5:6]):
        tokens = [e for e in examples if any(e.line == r.line for r in chunk)]
        want = full.losses(collate(tokens, pad))
        got = suffix.losses(collate(chunk, pad))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_tensors_read_only_for_their_shape_hold_no_rows(last1, memo_data, tmp_path):
    """The suffix asks some cached hidden states only for their shape: those rows are
    stand-ins in memory and absent from the file on disk, and the losses do not change."""
    from edgezo.data import is_stand_in, row_nbytes

    b = load_bundle(last1)
    st = b.manifest.stages
    only = st["shape_only"]
    assert only and set(only) < set(st["cached"])
    suffix = onnx.load(str(b.path / st["suffix"]), load_external_data=False)
    for n in only:
        readers = {node.op_type for node in suffix.graph.node if n in node.input}
        assert readers and readers <= {"Shape", "Size"}
    examples = tokenize_for(b.manifest, read_jsonl(memo_data[0]), b.tokenizer(), 32)[:5]
    pad = b.manifest.tokenizer.pad_token_id
    opts = RuntimeOptions(threads=1)
    (ram,), _ = prefix_cache.cache_rows(b, [examples], 3, pad, opts)
    held = 0
    for e in ram:
        for n, row in e.features.items():
            assert is_stand_in(row) == (n in only)
            held += row_nbytes(row)
        assert e.features[only[0]].shape[0] == len(e.input_ids)  # the example's own shape
    assert prefix_cache.rows_mb([ram]) == held / 2**20 > 0
    (disk,), _ = prefix_cache.cache_rows(b, [examples], 3, pad, opts, max_mb=1e-6, folder=tmp_path)
    assert prefix_cache.on_disk([disk])
    assert (tmp_path / prefix_cache.ROWS_FILE).stat().st_size == held
    assert all(is_stand_in(e.features[n]) for e in disk for n in only)
    params = FlatParams(list(b.manifest.trainable))
    params.load({k: v + np.float32(0.05) for k, v in b.initial_trainable().items()})
    suffix_run = LossRunner(
        prefix_cache.suffix_path(b), params, prefix_cache.suffix_inputs(b), opts
    )
    full = LossRunner(b.model_path, params, ["input_ids", "attention_mask", "labels"], opts)
    want = full.losses(collate(examples, pad))
    for rows in (ram, disk):
        np.testing.assert_allclose(suffix_run.losses(collate(rows, pad)), want, rtol=0, atol=1e-5)


def test_pad_rows_zero_pads_every_axis():
    a, b = np.ones((2, 3), np.float32), np.full((4, 1), 2, np.float32)
    out = pad_rows([a, b])
    assert out.shape == (2, 4, 3)
    assert out[0, :2, :].sum() == 6 and out[0, 2:].sum() == 0
    assert out[1, :, 0].tolist() == [2, 2, 2, 2] and out[1, :, 1:].sum() == 0
    same = pad_rows([a, a])
    assert same.shape == (2, 2, 3)


def run(bundle, data, out, log=lambda *a: None, resume=False, **kw):
    kw = {"steps": 12, **kw}
    cfg = FinetuneConfig(
        bundle=str(bundle),
        data=str(data[0]),
        eval_data=str(data[1]),
        out=str(out),
        batch_size=4,
        lr=0.01,
        mu=1e-2,
        q=2,
        estimator="onesided",
        optimizer="sgd",
        momentum=0.9,
        eval_every=0,
        threads=1,
        seed=0,
        **kw,
    )
    return finetune(cfg, log=log, progress=False, resume=resume)


def test_cached_lm_run_follows_the_full_graph_run(last1, memo_data, tmp_path):
    cached = run(last1, memo_data, tmp_path / "cached")
    full = run(last1, memo_data, tmp_path / "full", cache_prefix=False)
    assert cached.prefix_forward_calls > 0 and full.prefix_forward_calls == 0
    a = Ledger.read(Path(cached.out) / "ledger.jsonl").records
    b = Ledger.read(Path(full.out) / "ledger.jsonl").records
    assert len(a) == len(b) == 12
    # the same θ: the same losses up to float32 summation order; the two trajectories then
    # drift apart (each step amplifies a difference about 2x: 5e-7 at step 0, 2.5e-4 at 11)
    np.testing.assert_allclose(a[0]["losses"], b[0]["losses"], rtol=0, atol=1e-5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["losses"], y["losses"], rtol=0, atol=1e-3)
    assert cached.heldout_before == pytest.approx(full.heldout_before, abs=1e-5)
    assert cached.heldout_after == pytest.approx(full.heldout_after, abs=1e-3)
    assert cached.heldout_after < cached.heldout_before  # and it learns


def test_a_cache_over_its_cap_goes_to_a_memory_mapped_file(last1, memo_data, tmp_path):
    """Past cache_prefix_mb the rows go to the run folder's prefix_rows.bin (memory-mapped):
    the same losses as the full graph; a resume maps the file again without one prefix
    forward call."""
    logged: list[str] = []
    capped = run(last1, memo_data, tmp_path / "r", cache_prefix_mb=0.001, log=logged.append)
    said = [x for x in logged if "frozen prefix computed once" in x]
    assert said and "on disk, memory-mapped" in said[0] and "cache_prefix_mb=0.001" in said[0]
    assert capped.prefix_forward_calls > 0
    index = json.loads((tmp_path / "r" / prefix_cache.INDEX_FILE).read_text())
    assert index["bytes"] == (tmp_path / "r" / prefix_cache.ROWS_FILE).stat().st_size > 0
    full = run(last1, memo_data, tmp_path / "full", cache_prefix=False)
    a = Ledger.read(Path(capped.out) / "ledger.jsonl").records
    b = Ledger.read(Path(full.out) / "ledger.jsonl").records
    np.testing.assert_allclose(a[0]["losses"], b[0]["losses"], rtol=0, atol=1e-5)
    assert capped.heldout_before == pytest.approx(full.heldout_before, abs=1e-5)

    again = run(last1, memo_data, tmp_path / "r", cache_prefix_mb=0.001, steps=14, resume=True)
    assert again.prefix_forward_calls == 0  # the file's key matched: mapped, not recomputed
    assert len(Ledger.read(Path(again.out) / "ledger.jsonl").records) == 14


def test_rows_on_disk_are_keyed_by_bundle_and_data(last1, memo_data, tmp_path):
    b = load_bundle(last1)
    examples = tokenize_for(b.manifest, read_jsonl(memo_data[0]), b.tokenizer(), 32)[:7]
    pad = b.manifest.tokenizer.pad_token_id
    opts = RuntimeOptions(threads=1)
    (ram,), _ = prefix_cache.cache_rows(b, [examples], 3, pad, opts)
    assert not prefix_cache.on_disk([ram])
    with pytest.raises(prefix_cache.CacheTooLarge):  # no folder: the caller runs the full graph
        prefix_cache.cache_rows(b, [examples], 3, pad, opts, max_mb=1e-6)
    (disk,), calls = prefix_cache.cache_rows(
        b, [examples], 3, pad, opts, max_mb=1e-6, folder=tmp_path
    )
    assert calls == 3 and prefix_cache.on_disk([disk])
    for r, d in zip(ram, disk, strict=True):
        for name in r.features:
            np.testing.assert_array_equal(r.features[name], d.features[name])
    (mapped,), calls = prefix_cache.cache_rows(
        b, [examples], 3, pad, opts, max_mb=1e-6, folder=tmp_path
    )
    assert calls == 0 and prefix_cache.on_disk([mapped])
    # other data (one example fewer): stale, rebuilt
    (fewer,), calls = prefix_cache.cache_rows(
        b, [examples[:6]], 3, pad, opts, max_mb=1e-6, folder=tmp_path
    )
    assert calls == 2 and len(fewer) == 6
    # a damaged file (size differs from the index) is not read: rebuilt
    with open(tmp_path / prefix_cache.ROWS_FILE, "ab") as f:
        f.write(b"x")
    (_rebuilt,), calls = prefix_cache.cache_rows(
        b, [examples[:6]], 3, pad, opts, max_mb=1e-6, folder=tmp_path
    )
    assert calls == 2
    # another bundle's fingerprint gives another key
    other = prefix_cache.rows_key(load_bundle(last1), ("x",), [examples])
    assert other != prefix_cache.rows_key(b, tuple(b.manifest.stages["cached"]), [examples])


def test_freeze_a_trains_b_alone_and_caches_the_a_projection(make_bundle):
    from safetensors.numpy import load_file

    from edgezo.config import FinetuneConfig, recipe_key

    b = load_bundle(make_bundle("lora", lora_layers="last:1", lora_freeze_a=True))
    m = b.manifest
    assert m.lora["freeze_a"] is True and {s.role for s in m.trainable} == {"lora_b"}
    frozen = load_file(str(b.path / "lora_a.safetensors"))  # listed and hashed in the manifest
    assert "lora_a.safetensors" in m.files
    assert set(frozen) == {s.name.replace("lora_B.", "lora_A.") for s in m.trainable}
    assert all(np.abs(v).max() > 0 for v in frozen.values())  # A is random, not zero
    # x·Aᵀ no longer depends on a trainable tensor: it is cached with the block's input
    assert any("lora_A" in n for n in m.stages["cached"])
    assert recipe_key(m.trainable_mode, m.lora) == "lora_fa"
    assert recipe_key("lora", {"rank": 8}) == "lora" and recipe_key("head") == "head"
    assert FinetuneConfig().resolved("lora_fa").lr > FinetuneConfig().resolved("lora").lr
    # held-out batches as small as the training ones: the LM head's activations set the peak
    assert FinetuneConfig().resolved("lora_fa").eval_batch_size == 4
    assert FinetuneConfig().resolved("lora").eval_batch_size == 16
    assert FinetuneConfig(eval_batch_size=8).resolved("lora_fa").eval_batch_size == 8


def test_edgezo_export_places_adapters(tiny_hf_dir, tmp_path):
    """``edgezo export`` takes the exporter's LoRA placement options too."""
    from click.testing import CliRunner

    from edgezo.cli import main

    out = tmp_path / "placed"
    r = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(tiny_hf_dir),
            "--out",
            str(out),
            "--lora-layers",
            "last:1",
            "--lora-freeze-a",
        ],
    )
    assert r.exit_code == 0, r.output
    m = load_bundle(out).manifest
    assert m.lora["layers"] == [1] and m.lora["freeze_a"] is True
    assert {s.role for s in m.trainable} == {"lora_b"} and m.stages


def test_edgezo_export_without_placement_gives_the_measured_layout(tiny_hf_dir, tmp_path):
    """A plain ``edgezo export`` makes the layout the default recipe was measured on."""
    from click.testing import CliRunner

    from edgezo.cli import main

    out = tmp_path / "plain"
    r = CliRunner().invoke(main, ["export", "--model", str(tiny_hf_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "LoRA layout: LoRA-FA r=8 on v_proj of blocks all" in r.output
    m = load_bundle(out).manifest
    assert m.lora["freeze_a"] is True and m.lora["targets"] == ["v_proj"]
    assert m.lora["layers"] == [0, 1]  # a two-block model: every block
    assert {s.role for s in m.trainable} == {"lora_b"}


def test_the_measured_layout_fits_the_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporters.architectures import get_architecture
    from exporters.export import measured_layout

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(cfg)
    assert measured_layout(model, get_architecture("llama")) == (("v_proj",), "last:4", True)
    gpt2 = get_architecture("gpt2")  # no v_proj: its own fused target
    assert measured_layout(model, gpt2)[0] == gpt2.lora_targets


def test_placement_options_need_lora_mode_for_an_encoder(tiny_bert_dir, tmp_path):
    """An encoder takes --lora-layers with --mode lora (tests/test_classification.py); with its
    default head mode there are no adapters to place, which the refusal says."""
    from exporters import export_bundle

    with pytest.raises(EdgezoError, match="--mode is 'head'"):
        export_bundle(
            tiny_bert_dir,
            tmp_path / "x",
            task="classification",
            labels=["a", "b"],
            lora_layers="last:1",
        )


def test_bench_suffix_compares_two_bundles(last1, memo_data):
    import importlib.util

    from click.testing import CliRunner

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_suffix.py"
    spec = importlib.util.spec_from_file_location("edgezo_tool_bench_suffix", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    main = tool.main

    r = CliRunner().invoke(
        main,
        [
            str(last1),
            str(last1),
            "--data",
            str(memo_data[0]),
            "--batches",
            "2",
            "--rounds",
            "2",
            "--threads",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ratio A/B:" in r.output and "max |loss A - loss B| = 0.00e+00" in r.output
