"""The CUDA execution provider path (IOBinding with device buffers). Skipped without a GPU."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from edgezo.config import FinetuneConfig
from edgezo.train import finetune

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="no CUDA execution provider (install onnxruntime-gpu on a GPU)",
    ),
]


def test_cuda_matches_cpu(make_bundle, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"note {i} on the fjord."}) + "\n" for i in range(12))
    )
    runs = {}
    for provider in ("cpu", "cuda"):
        runs[provider] = finetune(
            FinetuneConfig(
                bundle=str(make_bundle("lora")),
                data=str(data),
                out=str(tmp_path / provider),
                steps=5,
                batch_size=4,
                max_length=32,
                provider=provider,
                eval_every=0,
            ),
            log=lambda *a: None,
            progress=False,
        )
    # the same directions and data; losses agree to the providers' kernel differences
    assert np.isclose(runs["cpu"].heldout_before, runs["cuda"].heldout_before, atol=1e-4)
    assert np.isclose(runs["cpu"].heldout_after, runs["cuda"].heldout_after, atol=1e-3)
