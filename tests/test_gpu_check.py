"""tools/gpu_check.py on CPU: the carry plan's pieces, the report, and the whole run in
``--cpu-dry-run`` (the CPU provider standing in for CUDA, tiny bundles)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import gpu_check_pack as pack  # noqa: E402

# -- the lean CUDA library ------------------------------------------------------------------


def _elf_with_fatbin(entries: list[tuple[int, bytes]]) -> bytes:
    """A minimal ELF64: a null section, .shstrtab and one .nv_fatbin container."""
    body = b""
    for arch, payload in entries:  # one fatbin entry: 64-byte header + payload
        head = bytearray(64)
        struct.pack_into("<HHIQ", head, 0, 2, 0x101, 64, len(payload))
        struct.pack_into("<I", head, 28, arch)
        body += bytes(head) + payload
    fatbin = struct.pack("<IHHQ", pack.FATBIN_MAGIC, 1, 16, len(body)) + body
    names = b"\0.shstrtab\0.nv_fatbin\0"
    data = bytearray(64)
    str_off = len(data)
    data += names
    fb_off = len(data)
    data += fatbin
    sh_off = len(data)
    sections = [(0, 0, 0, 0), (1, 3, str_off, len(names)), (11, 1, fb_off, len(fatbin))]
    for name, typ, off, size in sections:
        data += struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
    struct.pack_into("<Q", data, 0x28, sh_off)
    struct.pack_into("<HHH", data, 0x3A, 64, len(sections), 1)
    return bytes(data)


def test_strip_keeps_one_architecture_and_restore_gives_the_original(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [(80, rng.bytes(1000)), (90, rng.bytes(700)), (120, rng.bytes(300))]
    src = tmp_path / "lib.so"
    src.write_bytes(_elf_with_fatbin(payloads))
    entries = list(pack.fatbin_entries(src.read_bytes()))
    assert [(size, arch) for _, size, arch in entries] == [(1000, 80), (700, 90), (300, 120)]
    info = pack.strip_cuda_library(src, tmp_path / "s.so", 90, tmp_path / "removed.xz")
    data = (tmp_path / "s.so").read_bytes()
    (o80, n80, _), (o90, n90, _), (o120, n120, _) = entries
    assert data[o90 : o90 + n90] == payloads[1][1]  # the kept code, untouched
    assert data[o80 : o80 + n80] == bytes(n80) and data[o120 : o120 + n120] == bytes(n120)
    assert len(data) == src.stat().st_size and info["zeroed_bytes"] == 1300
    pack.restore_cuda_library(tmp_path / "s.so", tmp_path / "removed.xz")
    assert (tmp_path / "s.so").read_bytes() == src.read_bytes()
    with pytest.raises(SystemExit, match="no sm_75 code"):
        pack.strip_cuda_library(src, tmp_path / "t.so", 75)


# -- bundles rebuilt from a GGUF ------------------------------------------------------------


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of transformers' reverse_permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_recipe_rebuilds_bundles_byte_for_byte(make_bundle, tiny_hf_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from edgezo.bundle import load_bundle

    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.attention.head_count", 4)
    w.add_uint32("llama.attention.head_count_kv", 2)
    for name, t in state.items():
        if "q_proj" in name:
            t = _llama_cpp_permute(t, 4)
        elif "k_proj" in name:
            t = _llama_cpp_permute(t, 2)
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    store = tmp_path / "store"
    recipe = pack.Recipe(pack.Gguf(path), store / "blobs", say=lambda s: None, min_bytes=512)
    for mode in ("lora", "full"):
        recipe.add_bundle(make_bundle(mode), mode)
    recipe.write(
        store,
        {"gguf": {"name": "tiny.gguf", "bytes": path.stat().st_size, "sha256": pack.sha256(path)}},
    )
    from_gguf = sum(n for f in recipe.files for _o, n, src in f["segments"] if "gguf" in src)
    assert from_gguf > 0.8 * sum(
        f["bytes"]
        for f in recipe.files
        if "full/" in f["path"] and f["path"].endswith(".safetensors")
    )
    used_ops = {
        json.dumps(src["ops"])
        for f in recipe.files
        for _o, _n, src in f["segments"]
        if "gguf" in src
    }
    assert any('"perm"' in o for o in used_ops) and any('"T"' in o for o in used_ops)
    pack.split(path, [path.stat().st_size // 2, -1], [store, store])
    done = pack.rebuild(store, tmp_path / "rebuilt", say=lambda s: None)
    assert set(done.values()) == {"rebuilt"}
    for mode in ("lora", "full"):
        load_bundle(tmp_path / "rebuilt" / mode, verify=True)  # every sha256 of the manifest


def test_assemble_notices_a_missing_part(tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(np.random.default_rng(1).bytes(10_000))
    a, b = tmp_path / "a", tmp_path / "b"
    pack.split(src, [4000, -1], [a, b])
    store = tmp_path / "store"
    pack.stash(a, store)
    with pytest.raises(SystemExit, match="missing part"):
        pack.assemble(store, "big.bin", 10_000, pack.sha256(src))
    pack.stash(b, store)
    assert (
        pack.assemble(store, "big.bin", 10_000, pack.sha256(src)).read_bytes() == src.read_bytes()
    )


# -- the report -----------------------------------------------------------------------------


def _stage(result):
    return {"status": "ok", "seconds": 1.0, "result": result}


def test_report_states_each_target_and_keeps_partial_results(tmp_path):
    run = {
        "bundle": "full",
        "path": "device perturbation",
        "graph": "full",
        "trainable_values": 134_515_008,
        "forward_s": 0.010,
        "step_s": 0.031,
        "evals_per_step": 2,
        "step_ratio": 1.55,
        "step_breakdown_s": {"perturb": 0.004, "forwards": 0.02, "update": 0.003},
    }
    lora = {**run, "bundle": "lora-all", "path": "host, copy", "step_s": 0.021, "step_ratio": 1.05}
    res = tmp_path / "results"
    res.mkdir()
    (res / "meta.json").write_text(
        json.dumps({"date": "2026-12-02", "commit": "abc", "command": "x"})
    )
    (res / "timing.json").write_text(json.dumps(_stage({"runs": [run, lora]})))
    (res / "parity.json").write_text(
        json.dumps({"status": "timeout", "seconds": 180, "error": "killed after 180 s"})
    )
    tor = {
        "lora_all_fp32": {"mezo_step_s": 0.05, "forward_s": 0.02},
        "full_fp32": {"mezo_step_s": 0.02},
    }
    (res / "torch.json").write_text(json.dumps(_stage(tor)))
    report = gpu_check.write_report(res, [tmp_path / "out"])
    targets = {t["what"]: t for t in report["summary"]["targets"]}
    assert targets["step ratio, full (device perturbation)"]["met"] is False  # 1.55 > 1.5
    assert targets["step ratio, lora-all (host, copy)"]["met"] is True
    assert targets["ZO step vs PyTorch-eager MeZO step, lora-all (s)"]["met"] is True
    assert targets["ZO step vs PyTorch-eager MeZO step, full (s)"]["met"] is False
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| parity | timeout (killed after 180 s) |" in md
    assert "| env | not run |" in md
    assert "| step ratio, full (device perturbation) | 1.55 | 1.5 | NO |" in md
    assert (
        json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]["timing"]["status"]
        == "ok"
    )


# -- the whole run, CPU standing in for CUDA ------------------------------------------------


def test_cpu_dry_run_runs_every_stage(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu_check.py"),
            "run",
            "--cpu-dry-run",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in report["stages"].items()} == dict.fromkeys(
        gpu_check.ORDER, "ok"
    )
    st = {k: v["result"] for k, v in report["stages"].items()}
    paths = {(r["bundle"], r["path"]) for r in st["timing"]["runs"]}
    assert ("full", "device perturbation") in paths and ("default", "host, copy") in paths
    assert all(r["step_ratio"] > 0 for r in st["timing"]["runs"])
    assert st["parity"]["training"]["replay_on_host_bitwise_equal_gpu"] is True
    assert st["tests"]["returncode"] == 0 and "passed" in st["tests"]["summary"]
    assert st["fp16"]["heldout_rel_diff"] < 1e-2
    assert (
        abs(st["torch"]["lora_all_fp32"]["loss_mean"] - st["torch"]["lora_all_onnx_loss_mean"])
        < 1e-3
    )
    assert "CPU DRY RUN" in (out / "gpu_check.md").read_text()
