"""Every bad input: one clear message naming the file (and line) and the fix, exit 2, and
nothing already written is overwritten or lost."""

import json
import shutil
import subprocess
import sys

import pytest

from edgezo.bundle import load_bundle
from edgezo.errors import BundleError


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "edgezo.cli", *args], capture_output=True, text=True
    )


@pytest.fixture
def bundle_copy(make_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(make_bundle("lora"), dst)
    return dst


@pytest.fixture
def good_data(tmp_path):
    p = tmp_path / "good.jsonl"
    p.write_text(
        "".join(json.dumps({"text": f"note {i} about the garden."}) + "\n" for i in range(12))
    )
    return p


def finetune_args(bundle, data, out, *extra):
    return [
        "finetune",
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "3",
        "--max-length",
        "32",
        "--no-progress",
        *extra,
    ]


def test_missing_bundle(tmp_path, good_data):
    r = cli(*finetune_args(tmp_path / "nope", good_data, tmp_path / "o"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        load_bundle(bundle_copy)


def test_hash_mismatch(bundle_copy, good_data, tmp_path):
    f = bundle_copy / "trainable.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    r = cli(*finetune_args(bundle_copy, good_data, tmp_path / "o"))
    assert r.returncode == 2
    assert "trainable.safetensors does not match its sha256" in r.stderr


def test_truncated_file(bundle_copy):
    f = bundle_copy / "model.onnx"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated or was changed"):
        load_bundle(bundle_copy)


def test_unknown_manifest_version(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99.*reads version 1"):
        load_bundle(bundle_copy)


def test_corrupted_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{oops")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"text": "ok"}\n{broken\n', r"bad\.jsonl:2 is not valid JSON"),
        ('{"text": "ok"}\n{"txt": "typo"}\n', r"bad\.jsonl:2 has neither"),
        ("\n\n", "holds no examples"),
    ],
)
def test_bad_data_files(make_bundle, tmp_path, content, match):
    import re

    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    r = cli(*finetune_args(make_bundle("lora"), p, tmp_path / "o"))
    assert r.returncode == 2
    assert re.search(match, r.stderr), r.stderr


def test_all_labels_masked(make_bundle, tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [{"text": f"fine line {i}"} for i in range(10)]
    lines.insert(3, {"prompt": "x" * 200, "completion": "y"})
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = cli(*finetune_args(make_bundle("lora"), p, tmp_path / "o"))
    assert r.returncode == 2
    assert "bad.jsonl:4: no token left to learn from" in r.stderr


def test_existing_run_is_not_overwritten(make_bundle, good_data, tmp_path):
    out = tmp_path / "run"
    assert cli(*finetune_args(make_bundle("lora"), good_data, out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli(*finetune_args(make_bundle("lora"), good_data, out))
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--resume" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_checkpoint_of_another_bundle(make_bundle, good_data, tmp_path):
    out = tmp_path / "run"
    assert cli(*finetune_args(make_bundle("lora"), good_data, out)).returncode == 0
    other = make_bundle("norms")
    cfg = (out / "config.yaml").read_text().replace(str(make_bundle("lora")), str(other))
    (out / "config.yaml").write_text(cfg)
    r = cli(*finetune_args(other, good_data, out, "--resume"))
    assert r.returncode == 2
    assert "was written for bundle" in r.stderr or "belongs to bundle" in r.stderr
    assert "fix:" in r.stderr


def test_resume_without_a_run(make_bundle, good_data, tmp_path):
    r = cli(*finetune_args(make_bundle("lora"), good_data, tmp_path / "empty", "--resume"))
    assert r.returncode == 2 and "holds no run" in r.stderr
