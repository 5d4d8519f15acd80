"""``edgezo plan``'s load transient leaves out an int4 bundle's memory-mapped fp32 embedding,
which ONNX Runtime does not read at load (issue 17, "Scale": it put the Llama 3.2 3B int4
plan +18% above the measured peak)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.device.plan import (  # noqa: E402
    LOAD_TRANSIENT,
    load_transient_bytes,
    mapped_embedding_bytes,
    weight_bytes,
)


def test_load_transient_leaves_out_the_mapped_embedding(make_bundle):
    b = load_bundle(make_bundle(precision="int4", external_data=True, decoder=False))
    mapped = mapped_embedding_bytes(b)
    assert mapped > 0  # an int4 bundle's embedding is read by its Gather only
    assert load_transient_bytes(b) == pytest.approx((weight_bytes(b) - mapped) * LOAD_TRANSIENT)
    assert load_transient_bytes(b) < weight_bytes(b) * LOAD_TRANSIENT


def test_fp32_tied_bundle_keeps_the_folded_head_transient(make_bundle):
    b = load_bundle(make_bundle(external_data=True, decoder=False))
    assert mapped_embedding_bytes(b) == 0  # the tied head's fold reads all of it
    arch = b.manifest.architecture
    fold = 4.0 * arch["vocab_size"] * arch["hidden_size"]
    assert load_transient_bytes(b) == pytest.approx(max(weight_bytes(b) * LOAD_TRANSIENT, fold))
