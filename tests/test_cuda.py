"""The CUDA execution provider: GPU tests (marked ``gpu``, skipped without CUDA) and the CPU
tests of what a machine without a GPU must say.

The GPU tests take their tiny bundles from ``$EDGEZO_GPU_BUNDLES`` when it is set (folders
``lora`` and ``full`` built on the desktop by ``tools/gpu_check.py pack``: the GPU machine may
lack the exporter's versions), else export them here (``make_bundle``).
``EDGEZO_GPU_TEST_PROVIDER=cpu`` runs them with the CPU provider standing in for CUDA
(``tools/gpu_check.py run --cpu-dry-run`` does, to exercise them without a GPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgezo.bundle import load_bundle
from edgezo.config import FinetuneConfig
from edgezo.device.profiles import list_profiles
from edgezo.runner import LossRunner, RuntimeOptions
from edgezo.train import BATCH_INPUTS, finetune
from edgezo.zo.engine import EngineSettings

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
GPU = os.environ.get("EDGEZO_GPU_TEST_PROVIDER", "cuda")  # the provider the gpu tests measure
needs_cuda = pytest.mark.skipif(
    GPU == "cuda" and not HAS_CUDA,
    reason="no CUDA execution provider (install onnxruntime-gpu on a GPU)",
)


@pytest.fixture(scope="module")
def gpu_bundle(request):
    root = os.environ.get("EDGEZO_GPU_BUNDLES")

    def get(mode: str) -> Path:
        if root:
            return Path(root) / mode
        return request.getfixturevalue("make_bundle")(mode)

    return get


def _notes(tmp_path: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"note {i} on the fjord."}) + "\n" for i in range(12))
    )
    return data


def _batch(bundle, rows=4, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, int(bundle.manifest.architecture["vocab_size"]), size=(rows, seq))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


# -- on a GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_finetune_matches_cpu(gpu_bundle, tmp_path):
    runs = {}
    for name, provider in (("cpu", "cpu"), ("gpu", GPU)):
        runs[name] = finetune(
            FinetuneConfig(
                bundle=str(gpu_bundle("lora")),
                data=str(_notes(tmp_path)),
                out=str(tmp_path / name),
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
    assert np.isclose(runs["cpu"].heldout_before, runs["gpu"].heldout_before, atol=1e-4)
    assert np.isclose(runs["cpu"].heldout_after, runs["gpu"].heldout_after, atol=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_cuda_runner_runs_on_cuda_and_sees_each_new_feed(gpu_bundle):
    b = load_bundle(gpu_bundle("full"))
    batch = _batch(b)
    out = {}
    for provider in ("cpu", "gpu"):
        engine = b.engine(EngineSettings(seed=0))
        runner = LossRunner(
            b.model_path,
            engine.params,
            BATCH_INPUTS,
            RuntimeOptions(provider="cpu" if provider == "cpu" else GPU),
        )
        assert runner.session.get_providers()[0] == runner.provider
        first = runner.losses(batch)
        engine.params.feed[:] += np.float32(0.01)  # the next run must see it (an upload)
        out[provider] = (first, runner.losses(batch))
    for k in (0, 1):
        assert np.allclose(out["cpu"][k], out["gpu"][k], atol=1e-4)
    assert not np.allclose(out["gpu"][0], out["gpu"][1])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_cuda_device_perturbation_writes_the_host_points_bit_for_bit(gpu_bundle, direction):
    """θ + c·z expanded on the GPU equals the host's float32 arithmetic bit for bit."""
    from edgezo.device_perturb import attach
    from edgezo.zo.perturb import plain

    b = load_bundle(gpu_bundle("full"))
    settings = EngineSettings(seed=3, direction=direction)
    host = b.engine(settings)
    dev = b.engine(settings)
    opts = RuntimeOptions(provider=GPU, device_perturbation=True)
    runner = LossRunner(b.model_path, dev.params, BATCH_INPUTS, opts)
    state = attach(dev, runner)
    for step, c in ((0, 1e-3), (1, -0.37)):
        u = plain(step, 0)
        host.perturber.to(u, c)
        dev.perturber.to(u, c)
        feed = np.concatenate([v.numpy().ravel() for v in state.sets[state.reading]])
        assert np.array_equal(feed.view(np.uint32), host.params.feed.view(np.uint32))
        state.move_theta(u, c)
        host.perturber.vectors.move(u, c, host.params.master, host.params.master)
    state.pull()
    assert np.array_equal(dev.params.master.view(np.uint32), host.params.master.view(np.uint32))


@pytest.mark.gpu
@needs_cuda
def test_cuda_device_perturbation_steps_match_the_host_path(gpu_bundle):
    """Device and host perturbation on CUDA: the same θ after steps (bit for bit when the
    CUDA forward is deterministic; this test says which)."""
    from edgezo.device_perturb import attach

    b = load_bundle(gpu_bundle("full"))
    batch = _batch(b)
    settings = EngineSettings(seed=7)
    host, dev = b.engine(settings), b.engine(settings)
    hr = LossRunner(b.model_path, host.params, BATCH_INPUTS, RuntimeOptions(provider=GPU))
    dr = LossRunner(
        b.model_path,
        dev.params,
        BATCH_INPUTS,
        RuntimeOptions(provider=GPU, device_perturbation=True),
    )
    state = attach(dev, dr)
    for step in range(4):
        a = host.step(step, 1e-2, 1e-2, lambda: hr.mean_loss(batch))
        d = dev.step(step, 1e-2, 1e-2, lambda: dr.mean_loss(batch))
        assert a["losses"] == d["losses"], "the CUDA forward is not deterministic run to run"
    state.pull()
    assert np.array_equal(dev.params.master.view(np.uint32), host.params.master.view(np.uint32))


# -- without a GPU (CPU tests) ---------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA: nothing to refuse")
def test_finetune_provider_cuda_without_a_gpu_says_how_to_fix(make_bundle, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgezo.cli",
            "finetune",
            "--bundle",
            str(make_bundle("lora")),
            "--data",
            str(_notes(tmp_path)),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--provider",
            "cuda",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert "CUDAExecutionProvider is not available" in r.stderr
    assert "install onnxruntime-gpu" in r.stderr and "--provider cpu" in r.stderr
    assert "Traceback" not in r.stderr


def test_cuda_boards_prefer_cuda_then_fall_back_to_cpu():
    """Every profile with a GPU budget lists CUDA first and ends with the CPU provider."""
    gpus = [p for p in list_profiles() if p.gpu_memory_mb]
    assert {p.family for p in gpus} >= {"jetson", "desktop"}
    for p in gpus:
        assert p.providers[0] == "CUDAExecutionProvider", p.name
        assert p.providers[-1] == "CPUExecutionProvider", p.name
