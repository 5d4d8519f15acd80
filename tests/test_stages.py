"""Frozen-prefix caching: a head bundle is split exactly, and training on the cached suffix
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
from edgezo.train import finetune  # noqa: E402
from edgezo.zo.ledger import Ledger  # noqa: E402
from exporters import export_bundle  # noqa: E402
from exporters.stages import find_cut  # noqa: E402

LABELS = ["sweet", "sour", "salty"]
WORDS = {"sweet": "abcdef", "sour": "ghijkl", "salty": "mnopqr"}


@pytest.fixture(scope="module")
def bundles(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    return {
        mode: export_bundle(
            tiny_bert_dir,
            root / mode,
            task="classification",
            labels=LABELS,
            mode=mode,
            progress=None,
        )
        for mode in ("head", "lora")
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("stages-data")
    rng = np.random.default_rng(0)
    paths = []
    for name, n in (("train", 36), ("held", 12)):
        p = d / f"{name}.jsonl"
        with open(p, "w") as f:
            for i in range(n):
                k = i % 3
                words = [
                    ("".join(rng.choice(list(WORDS[LABELS[k]]), 4)))
                    for _ in range(rng.integers(1, 5))
                ]  # lengths vary: padding varies
                f.write(json.dumps({"text": " ".join(words), "label": LABELS[k]}) + "\n")
        paths.append(p)
    return paths


def test_head_bundle_is_split_at_the_pooled_embedding(bundles):
    b = load_bundle(bundles["head"])  # verifies the hashes of prefix.onnx and suffix.onnx too
    st = b.manifest.stages
    assert st and {st["prefix"], st["suffix"]} <= set(b.manifest.files)
    assert len(st["cached"]) == 1 and st["suffix_inputs"] == ["labels"]
    model = onnx.load(str(b.model_path))
    cached, direct = find_cut(
        model, {s.name for s in b.manifest.trainable}, {"input_ids", "attention_mask"}
    )
    assert cached == st["cached"] and direct == ["labels"]
    suffix = onnx.load(str(b.path / st["suffix"]))
    assert len(suffix.graph.node) < len(model.graph.node) / 10  # the encoder is not in it
    assert not load_bundle(bundles["lora"]).manifest.stages  # LoRA reaches into the encoder


def run(bundle, data, out, **kw):
    cfg = FinetuneConfig(
        bundle=str(bundle),
        data=str(data[0]),
        eval_data=str(data[1]),
        out=str(out),
        steps=30,
        batch_size=6,
        lr=0.05,
        mu=1e-3,
        q=2,
        estimator="onesided",
        optimizer="adam",
        eval_every=0,
        threads=1,
        seed=0,
        **kw,
    )
    return finetune(cfg, log=lambda *a: None, progress=False)


def test_cached_run_follows_the_full_graph_run(bundles, data, tmp_path):
    cached = run(bundles["head"], data, tmp_path / "cached")
    full = run(bundles["head"], data, tmp_path / "full", cache_prefix=False)
    assert cached.prefix_forward_calls > 0 and full.prefix_forward_calls == 0
    a = Ledger.read(Path(cached.out) / "ledger.jsonl").records
    b = Ledger.read(Path(full.out) / "ledger.jsonl").records
    assert len(a) == len(b) == 30
    # the same losses up to float32 summation order (rows cached at another padding)
    np.testing.assert_allclose(a[0]["losses"], b[0]["losses"], rtol=0, atol=1e-5)
    assert cached.heldout_before == pytest.approx(full.heldout_before, abs=1e-5)
    assert cached.heldout_after == pytest.approx(full.heldout_after, abs=1e-3)
    assert cached.heldout_after < cached.heldout_before - 0.05  # and it learns
    assert cached.heldout_accuracy_after == full.heldout_accuracy_after


def test_cache_rows_attach_one_row_per_example(bundles, data):
    from edgezo.data import read_jsonl, tokenize_for
    from edgezo.runner import RuntimeOptions

    b = load_bundle(bundles["head"])
    examples = tokenize_for(b.manifest, read_jsonl(data[1]), b.tokenizer(), 32)
    (rows,), calls = prefix_cache.cache_rows(b, [examples], 5, 0, RuntimeOptions(threads=1))
    assert calls == 3 and len(rows) == len(examples)
    name = b.manifest.stages["cached"][0]
    assert all(r.features[name].shape == (32,) for r in rows)  # tiny BERT: hidden 32
    assert [r.target for r in rows] == [e.target for e in examples]


def test_single_class_training_data_is_warned_about(bundles, data, tmp_path):
    one = tmp_path / "one.jsonl"
    lines = [ln for ln in Path(data[0]).read_text().splitlines() if '"sweet"' in ln]
    one.write_text("\n".join(lines) + "\n")
    logged = []
    finetune(
        FinetuneConfig(
            bundle=str(bundles["head"]),
            data=str(one),
            eval_data=str(data[1]),
            out=str(tmp_path / "r"),
            steps=2,
            lr=0.05,
            mu=1e-3,
            threads=1,
        ),
        log=logged.append,
        progress=False,
    )
    warning = [x for x in logged if "every training example" in x]
    assert warning and "'sweet'" in warning[0] and "sour" in warning[0]


def test_plan_dry_run_and_generate_know_a_classifier(bundles):
    from edgezo.device.plan import _probe
    from edgezo.errors import BundleError
    from edgezo.generate import require_generation

    probe = _probe(str(bundles["head"]), True, 1, [[2, 8]], False)
    assert probe["forward_peaks"] and probe["forward_peaks"][0] > 0
    with pytest.raises(BundleError, match="is a classifier"):
        require_generation(load_bundle(bundles["head"]))
