"""Data too small for a held-out split, and single-class label sets: a warning and a sane
fallback, not a crash or a silent meaningless figure."""

import json

import pytest

from edgezo.config import FinetuneConfig
from edgezo.train import MIN_HELDOUT, finetune


@pytest.fixture(scope="module")
def lora_bundle(make_bundle):
    return make_bundle("lora")


def test_too_few_examples_train_on_all_and_say_what_the_figure_means(lora_bundle, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"text": f"note number {i}."}) + "\n" for i in range(7)))
    lines = []
    s = finetune(
        FinetuneConfig(
            bundle=str(lora_bundle),
            data=str(data),
            out=str(tmp_path / "r"),
            steps=3,
            batch_size=2,
            lr=1e-3,
            mu=1e-2,
            threads=1,
        ),
        log=lines.append,
        progress=False,
    )
    warning = [x for x in lines if "too few to hold out" in x]
    assert warning and "--eval-data" in warning[0] and f"at least {MIN_HELDOUT}" in warning[0]
    assert "7 training / 7 held-out" in " ".join(lines)  # evaluated on the training examples
    assert s.steps == 3


def test_enough_examples_are_split_without_warning(lora_bundle, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"note number {i}."}) + "\n" for i in range(30)))
    lines = []
    finetune(
        FinetuneConfig(
            bundle=str(lora_bundle),
            data=str(data),
            out=str(tmp_path / "r"),
            steps=1,
            batch_size=2,
            lr=1e-3,
            mu=1e-2,
            threads=1,
        ),
        log=lines.append,
        progress=False,
    )
    assert not [x for x in lines if "warning" in x]
    assert "24 training / 6 held-out" in " ".join(lines)
