"""Encoder classification bundles (tiny random BERT): export in every mode, parity, head
initialisation, fine-tuning on a separable toy set, eval loss + accuracy, label and task errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.config import FinetuneConfig  # noqa: E402
from edgezo.errors import DataError, EdgezoError  # noqa: E402
from edgezo.evaluate import evaluate  # noqa: E402
from edgezo.train import finetune  # noqa: E402
from exporters import export_bundle  # noqa: E402

LABELS = ["sweet", "sour", "salty"]
#: three classes written with disjoint letters: separable by a head over mean-pooled states
WORDS = {"sweet": "abcdef", "sour": "ghijkl", "salty": "mnopqr"}


@pytest.fixture(scope="module")
def cls_bundle(tiny_bert_dir, tmp_path_factory):
    """``cls_bundle(mode="head", **kw)``: a tiny BERT classification bundle, cached."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("cls")

    def make(mode: str = "head", **kw) -> Path:
        key = repr((mode, sorted(kw.items())))
        if key not in cache:
            cache[key] = export_bundle(
                tiny_bert_dir,
                root / f"{mode}-{len(cache)}",
                task="classification",
                labels=kw.pop("labels", LABELS),
                mode=mode,
                progress=None,
                **kw,
            )
        return cache[key]

    return make


def toy_data(path: Path, n: int, seed: int, as_ids: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = i % len(LABELS)
            letters = WORDS[LABELS[k]]
            text = " ".join("".join(rng.choice(list(letters), 4)) for _ in range(3))
            f.write(json.dumps({"text": text, "label": k if as_ids else LABELS[k]}) + "\n")
    return path


def session_of(bundle: Path):
    return ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])


def test_head_bundle_manifest_and_zero_head(cls_bundle):
    b = load_bundle(cls_bundle("head"))
    m = b.manifest
    assert m.task == "classification" and m.labels == LABELS
    assert [(s.name, s.shape, s.role) for s in m.trainable] == [
        ("classifier.weight", (3, 32), "head"),
        ("classifier.bias", (3,), "head"),
    ]
    assert [(o.name, o.shape) for o in m.outputs] == [
        ("loss", ("batch",)),
        ("logits", ("batch", 3)),
    ]
    assert [i.shape for i in m.inputs] == [("batch", "sequence"), ("batch", "sequence"), ("batch",)]
    assert m.architecture["head_init"] == "zero"
    assert m.parity["max_abs_diff"] < 1e-5 and m.parity["logits_max_abs_diff"] < 1e-5
    values = b.initial_trainable()
    assert not values["classifier.weight"].any() and not values["classifier.bias"].any()
    # a zero head: every class equally likely, loss ln(3)
    ids = np.array([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]])
    loss, logits = session_of(b.path).run(
        None,
        {
            "input_ids": ids,
            "attention_mask": (ids != 0).astype(np.int64),
            "labels": np.array([0, 2]),
            **values,
        },
    )
    np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
    assert not logits.any()


def test_random_head_init(cls_bundle):
    b = load_bundle(cls_bundle("head", head_init="random"))
    w = b.initial_trainable()["classifier.weight"]
    assert b.manifest.architecture["head_init"] == "random"
    assert 0.005 < float(w.std()) < 0.05


@pytest.mark.parametrize(
    ("mode", "count", "name"),
    [
        ("lora", 10, "bert.encoder.layer.1.attention.self.value.lora_B.weight"),
        ("norms", 12, "bert.embeddings.LayerNorm.weight"),
        ("full", 37, "bert.embeddings.word_embeddings.weight"),
    ],
)
def test_modes_train_the_head_too(cls_bundle, mode, count, name):
    m = load_bundle(cls_bundle(mode)).manifest
    names = [s.name for s in m.trainable]
    assert len(names) == count and name in names
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert not any("key.bias" in n for n in names)  # no effect through softmax: left frozen
    assert m.parity["sensitivity_min_change"] > 0


def test_onnx_logits_match_mean_pooled_torch(cls_bundle, tiny_bert_dir):
    """Independent of the exporter's own check: BertModel -> masked mean -> linear."""
    from transformers import BertModel

    b = load_bundle(cls_bundle("head"))
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (3, 32)).astype(np.float32)
    bias = rng.normal(0, 0.5, 3).astype(np.float32)
    ids = rng.integers(3, 50, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    _, logits = session_of(b.path).run(
        None,
        {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": np.array([0, 1]),
            "classifier.weight": w,
            "classifier.bias": bias,
        },
    )
    enc = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    with torch.no_grad():
        h = enc(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    m = torch.tensor(mask).unsqueeze(-1).float()
    ref = ((h * m).sum(1) / m.sum(1)).numpy() @ w.T + bias
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_finetune_head_lowers_loss_and_eval_reports_accuracy(cls_bundle, tmp_path):
    bundle = cls_bundle("head")
    train = toy_data(tmp_path / "train.jsonl", 60, seed=0)
    held = toy_data(tmp_path / "held.jsonl", 30, seed=1, as_ids=True)  # ids work as labels
    cfg = FinetuneConfig(
        bundle=str(bundle),
        data=str(train),
        eval_data=str(held),
        out=str(tmp_path / "run"),
        steps=60,
        batch_size=8,
        q=4,
        estimator="onesided",
        optimizer="adam",
        lr=0.05,
        mu=1e-3,
        eval_every=0,
        checkpoint_every=60,
    )
    s = finetune(cfg, log=lambda _line: None, progress=False)
    assert s.heldout_after < s.heldout_before - 0.2
    assert s.heldout_accuracy_before == pytest.approx(1 / 3)  # zero head: argmax picks class 0
    assert s.heldout_accuracy_after >= 0.9
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("heldout_accuracy" in e for e in evals if e["kind"] == "eval")
    r = evaluate(str(bundle), str(held), run_dir=str(tmp_path / "run"))
    assert r["task"] == "classification" and r["examples"] == 30 and r["perplexity"] is None
    assert r["loss"] == pytest.approx(s.heldout_after, rel=1e-6)
    assert r["accuracy"] == pytest.approx(s.heldout_accuracy_after)
    # the eval CLI prints both
    from click.testing import CliRunner

    from edgezo.cli import main

    out = CliRunner().invoke(main, ["eval", "--run", str(tmp_path / "run"), "--data", str(held)])
    assert out.exit_code == 0, out.output
    assert "accuracy" in out.output and f"{r['loss']:.4f}" in out.output


def test_unknown_label_names_line_label_and_known_labels(cls_bundle, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc", "label": "sweet"}\n{"text": "ghi", "label": "bitter"}\n')
    with pytest.raises(
        DataError,
        match=r"bad.jsonl:2: label 'bitter' is not one of .*"
        r"0=sweet, 1=sour, 2=salty",
    ):
        evaluate(str(cls_bundle("head")), str(bad))
    bad.write_text('{"text": "abc", "label": 3}\n')
    with pytest.raises(DataError, match="label 3 is not one of"):
        evaluate(str(cls_bundle("head")), str(bad))


def test_task_mismatch_errors(cls_bundle, make_bundle, tmp_path):
    lm_data = tmp_path / "lm.jsonl"
    lm_data.write_text('{"text": "just some notes"}\n')
    with pytest.raises(DataError, match=r"lm.jsonl:1 has no \"label\".*classification bundle"):
        evaluate(str(cls_bundle("head")), str(lm_data))
    labelled = toy_data(tmp_path / "labelled.jsonl", 3, seed=0)
    with pytest.raises(DataError, match="classification data, but this bundle is a causal"):
        evaluate(str(make_bundle("lora")), str(labelled))


def test_export_errors(tiny_bert_dir, tiny_hf_dir, tmp_path):
    with pytest.raises(EdgezoError, match="an encoder"):
        export_bundle(tiny_bert_dir, tmp_path / "a", progress=None)  # task causal_lm
    with pytest.raises(EdgezoError, match="a causal LM"):
        export_bundle(
            tiny_hf_dir, tmp_path / "b", task="classification", labels=LABELS, progress=None
        )
    with pytest.raises(EdgezoError, match="two or more distinct label names"):
        export_bundle(
            tiny_bert_dir, tmp_path / "c", task="classification", labels=["a", "a"], progress=None
        )
    with pytest.raises(EdgezoError, match="not one for classification"):
        export_bundle(
            tiny_bert_dir,
            tmp_path / "d",
            task="classification",
            labels=LABELS,
            mode="scales",
            progress=None,
        )
    with pytest.raises(EdgezoError, match="do not apply to task classification"):
        export_bundle(
            tiny_bert_dir,
            tmp_path / "e",
            task="classification",
            labels=LABELS,
            quantize="int8",
            progress=None,
        )
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_cli_export_with_labels_from_file(tiny_bert_dir, tmp_path):
    from click.testing import CliRunner

    from edgezo.cli import main

    data = toy_data(tmp_path / "d.jsonl", 6, seed=0)
    out = tmp_path / "bundle"
    r = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(tiny_bert_dir),
            "--out",
            str(out),
            "--task",
            "classification",
            "--labels-from",
            str(data),
        ],
    )
    assert r.exit_code == 0, r.output
    m = load_bundle(out).manifest
    assert m.labels == LABELS and m.trainable_mode == "head"
    r = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(tiny_bert_dir),
            "--out",
            str(tmp_path / "x"),
            "--task",
            "classification",
        ],
    )
    assert r.exit_code == 2 and "needs the label set" in r.output


def test_the_plateau_rule_keeps_a_fast_head_run_learning(cls_bundle, tmp_path):
    # a head run makes hundreds of cheap steps between held-out evaluations and soon stalls;
    # the plateau rule once halved its learning rate at nearly every evaluation (to 2.6e-87):
    # now it waits for its patience, decays a bounded number of times and stops at a floor
    bundle = cls_bundle("head")
    train = toy_data(tmp_path / "train.jsonl", 60, seed=0)
    held = toy_data(tmp_path / "held.jsonl", 30, seed=1)
    cfg = FinetuneConfig(
        bundle=str(bundle),
        data=str(train),
        eval_data=str(held),
        out=str(tmp_path / "run"),
        steps=1500,
        batch_size=8,
        lr=0.05,
        mu=1e-3,
        eval_every=10,
        checkpoint_every=500,
    )
    s = finetune(cfg, log=lambda _line: None, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    decays = [r for r in rows if r["kind"] == "plateau"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) > 100 and len(decays) == s.lr_decays <= cfg.plateau_max_decays
    assert s.lr_last >= cfg.lr * cfg.plateau_min_lr_ratio
    assert s.heldout_accuracy_after >= 0.9


def test_lora_on_the_last_layers_gets_a_frozen_prefix_split(tiny_bert_dir, tmp_path):
    """LoRA(-FA) on the last encoder layer only: the manifest names the layer, A stays frozen,
    and the bundle carries a prefix/suffix split whose suffix reproduces the full graph's loss
    (checked by the exporter) and on which finetune trains with the prefix run once."""
    from exporters.classification import export_classifier

    out = export_classifier(
        tiny_bert_dir,
        tmp_path / "lora-last1",
        LABELS,
        mode="lora",
        lora_layers="last:1",
        lora_freeze_a=True,
        progress=None,
    )
    m = load_bundle(out).manifest
    assert m.lora == {
        "rank": 8,
        "alpha": 16.0,
        "targets": ["query", "value"],
        "layers": [1],
        "freeze_a": True,
    }
    assert [s.name for s in m.trainable] == [
        "bert.encoder.layer.1.attention.self.query.lora_B.weight",
        "bert.encoder.layer.1.attention.self.value.lora_B.weight",
        "classifier.weight",
        "classifier.bias",
    ]
    assert m.stages is not None and (out / m.stages["suffix"]).is_file()
    assert m.stages["split_max_diff"] < 1e-4
    # the cut is inside the encoder, after layer 0; the frozen A's product x·A is cached
    # with it (LoRA-FA), nothing a trainable tensor reaches is
    assert any("layer.0" in n for n in m.stages["cached"])
    assert not any("lora_B" in n or "classifier" in n for n in m.stages["cached"])
    train = toy_data(tmp_path / "train.jsonl", 60, seed=0)
    held = toy_data(tmp_path / "held.jsonl", 30, seed=1)
    cfg = FinetuneConfig(
        bundle=str(out),
        data=str(train),
        eval_data=str(held),
        out=str(tmp_path / "run"),
        steps=40,
        batch_size=8,
        q=4,
        estimator="onesided",
        optimizer="adam",
        lr=0.05,
        mu=1e-3,
        eval_every=0,
        checkpoint_every=40,
    )
    s = finetune(cfg, log=lambda _line: None, progress=False)
    assert s.prefix_forward_calls > 0  # the rows were cached: training ran the suffix
    assert s.heldout_after < s.heldout_before - 0.1


def test_lora_placement_needs_lora_mode(tiny_bert_dir, tmp_path):
    from exporters.classification import export_classifier

    with pytest.raises(EdgezoError, match="--mode lora"):
        export_classifier(
            tiny_bert_dir, tmp_path / "x", LABELS, mode="head", lora_layers="last:1", progress=None
        )


def test_the_classification_default_is_the_measured_head_recipe(tiny_bert_dir, tmp_path):
    """The default that beat full fine-tuning by backprop at 30 s on the topic sample
    (docs/benchmarks/quality.md): an export without --mode trains the zero head alone over
    a cached encoder (the suffix reads one pooled row per example), and finetune's recipe for
    it is one-sided q=8 with Adam and the lr race. A change to any of these is a change of the
    measured default and must be measured again."""
    from edgezo.session import resolve_recipe

    out = export_bundle(
        tiny_bert_dir, tmp_path / "default", task="classification", labels=LABELS, progress=None
    )
    b = load_bundle(out)
    m = b.manifest
    assert m.trainable_mode == "head" and m.architecture["head_init"] == "zero"
    assert [s.role for s in m.trainable] == ["head", "head"]
    assert m.stages is not None and len(m.stages["cached"]) == 1
    (cached,) = m.stages["cached"]
    assert m.stages["cached_shapes"][cached][-1] == 32  # [batch, hidden]: the pooled row
    assert len(m.stages["cached_shapes"][cached]) == 2
    cfg, auto_lr, auto_mu = resolve_recipe(FinetuneConfig(bundle=str(out)), b)
    assert (cfg.optimizer, cfg.estimator, cfg.q, cfg.batch_size) == ("adam", "onesided", 8, 8)
    assert (cfg.lr, cfg.mu, cfg.steps) == (1e-2, 1e-3, 2000)
    assert auto_lr and auto_mu  # the race and the μ check pick from there


def test_export_bundle_passes_lora_placement_to_classifiers(tiny_bert_dir, tmp_path):
    """`edgezo export --task classification --lora-layers last:1 --lora-freeze-a` reaches the
    classifier exporter (it was refused as a causal-LM option)."""
    out = export_bundle(
        tiny_bert_dir,
        tmp_path / "fa",
        task="classification",
        labels=LABELS,
        mode="lora",
        lora_layers="last:1",
        lora_freeze_a=True,
        progress=None,
    )
    m = load_bundle(out).manifest
    assert m.lora["layers"] == [1] and m.lora["freeze_a"] is True
    assert all("lora_B" in t.name or "classifier" in t.name for t in m.trainable)
