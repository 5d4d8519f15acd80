"""Prompt-based classification with a causal LM (MeZO-style): template + one label word per
class, loss on the label word's first token, accuracy by argmax over the label words."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.config import FinetuneConfig  # noqa: E402
from edgezo.data import IGNORE, collate, read_jsonl, tokenize_for  # noqa: E402
from edgezo.errors import DataError, EdgezoError  # noqa: E402
from edgezo.evaluate import BATCH_INPUTS, score  # noqa: E402
from edgezo.runner import LossRunner  # noqa: E402
from edgezo.train import finetune  # noqa: E402
from edgezo.zo.params import FlatParams  # noqa: E402
from exporters import export_bundle  # noqa: E402

LABELS = ["vowel", "digit"]
WORDS = ["x", "y"]  # the tiny tokenizer is per character: one token each


@pytest.fixture(scope="module")
def prompt_bundle(tiny_hf_dir, tmp_path_factory) -> Path:
    return export_bundle(
        tiny_hf_dir,
        tmp_path_factory.mktemp("pc") / "b",
        task="prompt_classification",
        labels=LABELS,
        template="{text} =",
        label_words=WORDS,
        mode="lora",
        progress=None,
    )


def toy(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = i % 2
            text = "".join(rng.choice(list("aeiou" if k == 0 else "0123456789"), 6))
            f.write(json.dumps({"text": text, "label": LABELS[k]}) + "\n")
    return path


def test_manifest_and_examples(prompt_bundle, tmp_path):
    b = load_bundle(prompt_bundle)
    m = b.manifest
    tok = b.tokenizer()
    assert m.task == "prompt_classification" and m.labels == LABELS
    assert m.prompt["template"] == "{text} ="
    assert m.prompt["label_token_ids"] == [tok.token_to_id("x"), tok.token_to_id("y")]
    assert [o.name for o in m.outputs] == ["loss", "next_logits"]  # the causal LM graph
    (ex,) = tokenize_for(m, read_jsonl(toy(tmp_path / "d.jsonl", 1, 0)), tok, 64)
    prompt = tok.encode(m.prompt["template"].replace("{text}", "x"), add_special_tokens=False)
    assert ex.input_ids[-1] == tok.token_to_id("x") and ex.target == 0
    assert len(ex.input_ids) == len(prompt.ids) - 1 + 6 + 1  # template with 6-char text + word
    assert list(ex.labels[:-1]) == [IGNORE] * (len(ex.labels) - 1)
    assert ex.labels[-1] == ex.input_ids[-1]
    # too long: the start of the text is dropped, the cue and the label word kept
    (short,) = tokenize_for(m, read_jsonl(toy(tmp_path / "d.jsonl", 1, 0)), tok, 5)
    assert len(short.input_ids) == 5 and short.input_ids[-3:] == ex.input_ids[-3:]


def test_eval_loss_from_next_logits_equals_training_loss(prompt_bundle, tmp_path):
    """Eval runs the prompt alone and reads the label word's loss off ``next_logits``; it must
    equal the graph's ``loss`` on prompt + label word (what training minimises)."""
    b = load_bundle(prompt_bundle)
    params = FlatParams(b.manifest.trainable)
    values = b.initial_trainable()
    rng = np.random.default_rng(0)
    values = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in values.items()}
    params.load(values)
    runner = LossRunner(b.model_path, params, BATCH_INPUTS)
    examples = tokenize_for(
        b.manifest, read_jsonl(toy(tmp_path / "d.jsonl", 10, 1)), b.tokenizer(), 64
    )
    pad = b.manifest.tokenizer.pad_token_id
    r = score(runner, examples, 4, pad, b.manifest)
    train_loss = float(np.mean(runner.losses(collate(examples, pad))))
    assert r["loss"] == pytest.approx(train_loss, abs=1e-5)
    assert 0.0 <= r["accuracy"] <= 1.0


def test_finetune_lowers_loss(prompt_bundle, tmp_path):
    cfg = FinetuneConfig(
        bundle=str(prompt_bundle),
        data=str(toy(tmp_path / "t.jsonl", 40, 2)),
        eval_data=str(toy(tmp_path / "h.jsonl", 20, 3)),
        out=str(tmp_path / "run"),
        steps=40,
        batch_size=8,
        q=4,
        estimator="onesided",
        optimizer="adam",
        lr=1e-2,
        mu=1e-2,
        eval_every=0,
        checkpoint_every=40,
    )
    s = finetune(cfg, log=lambda _line: None, progress=False)
    assert s.heldout_after < s.heldout_before
    assert s.heldout_accuracy_before is not None and s.heldout_accuracy_after is not None


def test_prompt_export_errors(tiny_hf_dir, tmp_path):
    kw = {"task": "prompt_classification", "labels": LABELS, "progress": None}
    with pytest.raises(EdgezoError, match="first tokens are not distinct"):
        export_bundle(
            tiny_hf_dir, tmp_path / "a", template="{text} =", label_words=[" a", " b"], **kw
        )  # both start with the space token
    with pytest.raises(EdgezoError, match="no {text} placeholder"):
        export_bundle(tiny_hf_dir, tmp_path / "b", template="topic:", label_words=WORDS, **kw)
    with pytest.raises(EdgezoError, match="2 labels but 1 label words"):
        export_bundle(tiny_hf_dir, tmp_path / "c", template="{text}", label_words=["x"], **kw)
    assert not (tmp_path / "a").exists()


def test_lm_data_for_prompt_bundle_is_refused(prompt_bundle, tmp_path):
    from edgezo.evaluate import evaluate

    p = tmp_path / "lm.jsonl"
    p.write_text('{"prompt": "q", "completion": "a"}\n')
    with pytest.raises(DataError, match="prompt_classification bundle with labels vowel"):
        evaluate(str(prompt_bundle), str(p))
