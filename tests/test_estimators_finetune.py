"""The new estimators and optimisers through the real fine-tuning loop on the tiny exported
Llama: the ledger replays to the trained tensors bit for bit, and records what replay needs."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgezo.bundle import load_bundle
from edgezo.config import FinetuneConfig
from edgezo.train import finetune
from edgezo.zo.ledger import Ledger


@pytest.mark.parametrize(
    "kw",
    [
        dict(estimator="dap", optimizer="adam", direction="sphere", lr=1e-2),
        dict(
            estimator="p4",
            level_schedule="zipf",
            optimizer="sign",
            direction="gaussian",
            q=2,
            momentum=0.5,
            perturbation="inplace",
            lr=1e-3,
        ),
        dict(estimator="p3", optimizer="sgd", direction="rademacher", mu_floor=5e-3, lr=3e-3),
        dict(estimator="fzoo", optimizer="sgd", direction="sphere", q=3, momentum=0.9, lr=1e-2),
    ],
)
def test_finetune_then_replay_bit_exactly(make_bundle, tmp_path, kw):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in ["the cat sat on the mat.", "a dog ran in the park."] * 6
        )
    )
    bundle = make_bundle("lora")
    cfg = FinetuneConfig(
        bundle=str(bundle),
        data=str(data),
        out=str(tmp_path / "run"),
        steps=6,
        batch_size=4,
        max_length=24,
        eval_every=0,
        checkpoint_every=3,
        mu=1e-2,
        seed=1,
        threads=1,
        **kw,
    )
    summary = finetune(cfg, log=lambda *a, **k: None, progress=False)
    records = [
        json.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()[1:]
    ]
    assert summary.train_evaluations == sum(len(r["losses"]) for r in records)
    if kw["estimator"] in ("p3", "p4"):
        assert all("mu_floor_hits" in r and "levels" in r for r in records)
    engine = load_bundle(bundle).replay(Ledger.read(tmp_path / "run" / "ledger.jsonl"))
    trained = load_file(str(tmp_path / "run" / "trained.safetensors"))
    for name, t in engine.params.state_dict().items():
        assert np.array_equal(t, trained[name]), name
