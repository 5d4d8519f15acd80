"""The eNTK fidelity tool (tools/entk.py) and the runtime-only q advisor (tools/advise_q.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"edgezo_tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def entk():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return _tool("entk")


def test_entk_error_falls_with_q_as_the_jl_law_at_every_width(entk):
    qs = [1, 8, 64]
    rows = entk.study([4, 64], qs, seeds=2, kinds=("gaussian", "rademacher"), probe_ns=(4,))
    ds = {r.d for r in rows}
    assert max(ds) / min(ds) > 40  # widths 4 and 64: d spans well over an order of magnitude
    for r in rows:
        assert r.errors[0] > r.errors[1] > r.errors[2], r
        # error ≈ sqrt((1 + r)/q), r = (tr K)²/‖K‖_F² the effective rank (≤ N·k = 16), at
        # every d: Gaussian exactly in expectation, Rademacher no larger
        for q, e in zip(qs, r.errors, strict=True):
            assert 0.6 < e / (r.theory / math.sqrt(q)) < 1.4, (r, q)
        assert 1 <= r.r <= 16


def test_entk_same_kernel_any_d_same_error(entk):
    """J and [J, J, …, J]/√c (c = 100 copies: 100× the parameters) have the same eNTK; the ZO
    kernel's error is then the same, whatever d is."""
    import torch

    x = torch.randn(4, entk.IN_DIM, generator=torch.Generator().manual_seed(0))
    j = entk.jacobian(entk.mlp(4, 4, seed=4), x)
    j_big = np.tile(j, (1, 100)) / 10.0
    k = entk.entk(j)
    assert np.allclose(entk.entk(j_big), k, rtol=1e-9)
    for kind in ("gaussian", "rademacher"):
        rms = []
        for jj in (j, j_big):
            u = entk.projections(jj, kind, seed=1, q=256)
            rms.append([math.sqrt(np.mean(entk.block_sq_errors(u, k, q))) for q in (1, 4, 16)])
        ratio = np.array(rms[0]) / np.array(rms[1])
        assert np.all(np.abs(np.log(ratio)) < math.log(1.3)), (kind, rms)


def test_entk_zo_kernel_converges_to_the_entk(entk):
    import torch

    x = torch.randn(3, entk.IN_DIM, generator=torch.Generator().manual_seed(0))
    j = entk.jacobian(entk.mlp(16, 2, seed=1), x)
    k = entk.entk(j)
    errs = []
    for q in (16, 4096):
        u = entk.projections(j, "sphere", seed=3, q=q)
        errs.append(entk.rel_error(u, k, q))
    assert errs[1] < 0.1 and errs[1] < errs[0] / 4, errs
    # and K̂ is exactly the outer product of the projections: diagonal ≥ 0, symmetric
    u = entk.projections(j, "rademacher", seed=0, q=8)
    kh = u @ u.T / 8
    assert np.allclose(kh, kh.T) and np.all(np.diag(kh) >= 0)


def test_advise_q_runs_on_a_tiny_bundle(make_bundle, tmp_path, capsys):
    advise_q = _tool("advise_q")
    bundle = make_bundle("lora")
    data = tmp_path / "notes.jsonl"
    lines = [f"note {i}: the tea was hot and the run was {i + 3} km." for i in range(12)]
    data.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    advice = advise_q.main(
        [
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--qs",
            "1",
            "4",
            "--trials",
            "3",
            "--batch-size",
            "2",
            "--max-length",
            "24",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert [r["q"] for r in advice.rows] == [1, 4]
    for r in advice.rows:
        assert tuple(r) == advise_q.COLUMNS
        assert r["fwd_per_step"] == 2 * r["q"]
        assert 0.0 <= r["same_sign"] <= 1.0 and 0.0 <= r["held_sign"] <= 1.0
    assert advice.suggested_q in (None, 1, 4)
    # 3 trials × (2·max q estimation + 2 base + 2 per measured step: 4 blocks of 1, 1 of 4)
    assert advice.evaluations == 3 * (2 * 4 + 2 + 2 * (4 + 1))
    assert [r["n"] for r in advice.rows] == [12, 3]
    assert advice.extrapolated_q is None or advice.extrapolated_q > 0
    assert "suggestion" in out and "held_sign" in out and "extrapolation" in out
