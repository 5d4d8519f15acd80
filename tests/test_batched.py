"""The grouped-LoRA graph (exporters/batched.py): G parameter sets in one call = G calls."""

from __future__ import annotations

import numpy as np
import pytest

from edgezo.errors import EdgezoError


@pytest.fixture(scope="module")
def pair(tiny_hf_dir, tmp_path_factory):
    pytest.importorskip("onnx")
    from exporters.batched import export_pair

    return export_pair(tiny_hf_dir, tmp_path_factory.mktemp("grouped"))


def _batch(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ids = rng.integers(3, vocab, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_losses_equal_separate_calls(pair, groups):
    from exporters.batched import check_grouped_parity, grouped_feeds
    from exporters.validate import ort_session

    normal_path, grouped_path, specs, init, info = pair
    rng = np.random.default_rng(groups)
    sets = [
        {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in init.items()}
        for _ in range(groups)
    ]
    normal, grouped = ort_session(normal_path), ort_session(grouped_path)
    batch = _batch(info["vocab_size"])
    got = grouped.run(["loss"], grouped_feeds(batch, sets))[0]
    assert got.shape == (groups, 3)
    want = np.stack([normal.run(["loss"], {**batch, **s})[0] for s in sets])
    np.testing.assert_allclose(got, want, atol=1e-5)
    if groups > 1:  # the sets really differ, so row g must use set g
        assert np.abs(want[0] - want[1]).max() > 1e-3
    assert check_grouped_parity(grouped, normal, batch, sets) <= 1e-5


def test_grouped_parity_check_catches_a_wrong_row(pair):
    from exporters.batched import check_grouped_parity
    from exporters.validate import ort_session

    normal_path, grouped_path, specs, init, info = pair
    rng = np.random.default_rng(0)
    sets = [
        {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in init.items()}
        for _ in range(2)
    ]

    class Swapped:  # a grouped "graph" that returns the rows in the wrong order
        def run(self, names, feeds):
            out = ort_session(grouped_path).run(names, feeds)[0]
            return [out[::-1]]

    with pytest.raises(EdgezoError, match="differ from the separate calls"):
        check_grouped_parity(Swapped(), ort_session(normal_path), _batch(info["vocab_size"]), sets)


def test_grouped_graph_is_lora_only(tiny_hf_dir):
    pytest.importorskip("torch")
    from exporters.batched import make_grouped
    from exporters.load import load_causal_lm

    loaded = load_causal_lm(tiny_hf_dir)
    with pytest.raises(EdgezoError, match="LoRA tensors only"):
        make_grouped(loaded.model, ["model.norm.weight"])
