"""``edgezo plan``'s analytic memory model against a real ONNX Runtime run.

The activations of a causal LM's loss forward are dominated by [rows × vocabulary] float
blocks; the model counts ``LOGIT_COPIES`` of them (fitted to SmolLM2-135M and Gemma 3 270M,
docs/benchmarks/plan-memory.md). A tiny model with a large vocabulary (so the logits dwarf
everything else, as in a 262k-vocabulary model) is exported and its forwards measured in a
fresh process at two shapes: the growth of the measured peak between them must match the
model's to within 25% with the CPU arena (without it, malloc'd blocks come and go and the
model must not undercount), and the whole analytic peak must be within 25% of the measured
one (without the arena: at or above it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.device.plan import (  # noqa: E402
    LOGIT_COPIES,
    MIB,
    activation_bytes,
    estimate,
    head_weight_bytes,
    tied_head_fold_bytes,
)

VOCAB, HIDDEN = 32768, 128
SHAPES = [[4, 64], [8, 64]]


@pytest.fixture(scope="module")
def big_vocab_bundle(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    from exporters import export_causal_lm
    from tests.conftest import build_tiny_model_from, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("big-vocab")
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    build_tiny_model_from("llama", settings).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=build_tiny_tokenizer(),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    out = tmp_path_factory.mktemp("big-vocab-bundle") / "b"
    return export_causal_lm(folder, out, mode="lora", progress=None, decoder=False)


def _measure(bundle, arena: bool) -> dict:
    """Load + two forwards at each shape in a fresh process (the dry run's own probe)."""
    code = (
        "import json, sys; from edgezo.device.plan import _probe; "
        "print(json.dumps([_probe(sys.argv[1], a, 1, [s, s], False) "
        "for a, s in json.loads(sys.argv[2])]))"
    )
    runs = json.dumps([[arena, s] for s in SHAPES])
    r = subprocess.run(
        [sys.executable, "-c", code, str(bundle), runs], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_activation_model_counts_the_logit_blocks():
    arch = {"vocab_size": 1000, "hidden_size": 16, "num_attention_heads": 1}
    for arena in (True, False):
        a = activation_bytes(arch, 2, 8, arena)
        b = activation_bytes({**arch, "vocab_size": 2000}, 2, 8, arena)
        # +1000 vocabulary entries over 16 rows: LOGIT_COPIES blocks, plus the head term
        head = head_weight_bytes({**arch, "vocab_size": 2000}) - head_weight_bytes(arch)
        extra = b - a - 4 * 16 * 1000 * LOGIT_COPIES[arena]
        assert extra == pytest.approx(head * (0.28 if arena else 0.0))
    assert LOGIT_COPIES[True] > LOGIT_COPIES[False] >= 3  # head output, cast, log-softmax


@pytest.mark.parametrize("arena", [True, False])
def test_plan_matches_a_measured_large_vocabulary_forward(big_vocab_bundle, arena):
    b = load_bundle(big_vocab_bundle)
    arch = b.manifest.architecture
    assert arch["vocab_size"] == VOCAB and tied_head_fold_bytes(b) == 4 * VOCAB * HIDDEN
    small, large = _measure(big_vocab_bundle, arena)
    grew = max(large["forward_peaks"]) - max(small["forward_peaks"])
    model_grew = activation_bytes(arch, *SHAPES[1], arena) - activation_bytes(
        arch, *SHAPES[0], arena
    )
    # 256 more rows × 32,768 entries × 4 bytes = 32 MiB per block
    if arena:  # the arena keeps what it took: the growth is steady
        assert grew == pytest.approx(model_grew, rel=0.25), (grew / MIB, model_grew / MIB)
    else:  # malloc'd blocks come and go (1.5-4 blocks measured): the model is the upper end
        block = 4 * 256 * VOCAB
        assert block <= grew <= 1.1 * model_grew, (grew / MIB, model_grew / MIB)
    kw = dict(device="x", budget_mb=10**6, batch_size=8, max_length=64, micro_batch=8)
    plan = estimate(b, optim_buffers=0, inplace=False, cpu_arena=arena, **kw)
    measured = max(large["load_peak"], *large["forward_peaks"]) / MIB
    if arena:
        assert plan.peak_mb == pytest.approx(measured, rel=0.25)
    else:  # an upper end, not an undercount
        assert measured <= plan.peak_mb <= 1.5 * measured
