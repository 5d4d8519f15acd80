"""Hostile and broken bundles through the real CLI: every case exits 2 with one message and a
fix, no traceback, and nothing already on disk is overwritten.

Each case is a small mutation of a tiny exported bundle — a path that leaves the folder, a
symlink, ONNX external data pointing elsewhere, a manifest of the wrong shape, tensors that
cannot be trained, a changed file — walked through ``finetune``, ``eval`` and ``replay``
(the latter with a run made on the intact bundle). Cases that keep the file hashes right
(``rehash``) reach the checks behind the hash check.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgezo.cli.main import main

MANIFEST = "manifest.json"


def sha(p: Path) -> dict:
    return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}


def edit(b: Path, fn: Callable[[dict], object]) -> None:
    m = json.loads((b / MANIFEST).read_text())
    fn(m)
    (b / MANIFEST).write_text(json.dumps(m, indent=1))


def rehash(b: Path, *names: str) -> None:
    """Record the current hashes of ``names`` in the manifest (as an attacker would)."""
    edit(b, lambda m: m["files"].update({n: sha(b / n) for n in names}))


def write_manifest_text(text: str):
    return lambda b, out: (b / MANIFEST).write_text(text)


def set_field(path: tuple, value):
    def fn(b, out):
        def go(m):
            node = m
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value

        edit(b, go)

    return fn


def listed_outside(name_of: Callable[[Path], str]):
    def fn(b, out):
        secret = out / "secret.txt"
        secret.write_text("not yours")
        name = name_of(secret)
        edit(b, lambda m: m["files"].update({name: sha(secret)}))

    return fn


def tokenizer_outside(b, out):
    shutil.copy(b / "tokenizer.json", out / "tokenizer.json")
    name = os.path.relpath(out / "tokenizer.json", b)
    edit(b, lambda m: (m["tokenizer"].update(file=name), m["files"].update({name: sha(b / name)})))


def symlinked(name: str):
    def fn(b, out):
        shutil.move(b / name, out / name)
        (b / name).symlink_to(out / name)

    return fn


def symlinked_folder(b, out):
    (out / "sub").mkdir()
    shutil.copy(b / "tokenizer.json", out / "sub" / "tokenizer.json")
    (b / "sub").symlink_to(out / "sub", target_is_directory=True)
    name = "sub/tokenizer.json"
    edit(b, lambda m: (m["tokenizer"].update(file=name), m["files"].update({name: sha(b / name)})))


def external_data(location: Callable[[Path, Path], str], listed: bool):
    """One initializer of model.onnx moved to external data at ``location``; hashes right."""

    def fn(b, out):
        onnx = pytest.importorskip("onnx")
        from onnx import TensorProto

        model = onnx.load(str(b / "model.onnx"))
        t = model.graph.initializer[0]
        loc, data = location(b, out), t.raw_data
        Path(os.path.normpath(b / loc)).write_bytes(data)  # b / an absolute path is that path
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", loc), ("offset", "0"), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        onnx.save(model, str(b / "model.onnx"))
        rehash(b, "model.onnx", *([loc] if listed else []))

    return fn


def tensors_with(change: Callable[[dict], None], positive: bool = False):
    def fn(b, out):
        from safetensors.numpy import load_file, save_file

        t = load_file(str(b / "trainable.safetensors"))
        change(t)
        save_file(t, str(b / "trainable.safetensors"))
        rehash(b, "trainable.safetensors")
        if positive:  # LoRA B starts at zero: as a multiplicative tensor it is refused
            edit(b, lambda m: m["trainable"][1].update(positive=True))

    return fn


def first(t: dict) -> str:
    return sorted(t)[0]


def flip_byte(name: str):
    def fn(b, out):
        raw = bytearray((b / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (b / name).write_bytes(bytes(raw))

    return fn


def garbage(name: str, data: bytes):
    def fn(b, out):
        (b / name).write_bytes(data)
        rehash(b, name)

    return fn


ALL = ("finetune", "eval", "replay")
#: id -> (mutation(bundle, outside), message regex, commands)
CASES: dict[str, tuple[Callable, str, tuple[str, ...]]] = {
    # paths that leave the bundle folder
    "files-parent": (listed_outside(lambda s: f"../{s.parent.name}/{s.name}"), r"\(\.\.\)", ALL),
    "files-absolute": (listed_outside(str), "is an absolute path", ALL),
    "tokenizer-file-parent": (tokenizer_outside, r"leaves the bundle folder", ALL),
    "model-symlink-outside": (symlinked("model.onnx"), "leads outside the bundle folder", ALL),
    "tokenizer-symlink-outside": (symlinked("tokenizer.json"), "leads outside", ALL),
    "folder-symlink-outside": (symlinked_folder, "leads outside the bundle folder", ALL),
    "external-data-parent": (
        external_data(lambda b, out: f"../{out.name}/w.bin", listed=False),
        "keeps its data in",
        ALL,
    ),
    "external-data-absolute": (
        external_data(lambda b, out: str(out / "w.bin"), listed=False),
        "is an absolute path",
        ALL,
    ),
    "external-data-unlisted": (
        external_data(lambda b, out: "w.bin", listed=False),
        "does not list",
        ALL,
    ),
    # manifests of the wrong shape
    "manifest-list": (write_manifest_text("[]"), "holds a JSON list", ALL),
    "manifest-null": (write_manifest_text("null"), "holds a JSON null", ALL),
    "manifest-string": (write_manifest_text('"bundle"'), "not an edgezo manifest", ALL),
    "manifest-deep": (write_manifest_text("[" * 100_000), "nests too deeply|not valid JSON", ALL),
    "manifest-not-utf8": (
        lambda b, out: (b / MANIFEST).write_bytes(b'{"task": "\xe9"}'),
        "not UTF-8",
        ALL,
    ),
    "manifest-duplicate-key": (
        lambda b, out: (b / MANIFEST).write_text(
            (b / MANIFEST).read_text().replace('"task"', '"task": "causal_lm", "task"', 1)
        ),
        "repeats the key",
        ALL,
    ),
    "inputs-a-string": (set_field(("inputs",), "input_ids"), "inputs must be a list", ALL),
    "trainable-empty": (set_field(("trainable",), []), "trainable is empty", ALL),
    "trainable-shape-negative": (
        set_field(("trainable", 0, "shape"), [-8, 32]),
        "dimensions must be >= 1",
        ALL,
    ),
    "trainable-shape-strings": (
        set_field(("trainable", 0, "shape"), ["8", 32]),
        r"trainable\[0\]\.shape\[0\] must be an integer",
        ALL,
    ),
    "trainable-role": (set_field(("trainable", 0, "role"), "magic"), "role is 'magic'", ALL),
    "pad-null": (set_field(("tokenizer", "pad_token_id"), None), "pad_token_id is null", ALL),
    "pad-outside-vocab": (
        set_field(("tokenizer", "pad_token_id"), 10**6),
        "outside the vocabulary",
        ALL,
    ),
    "eos-a-string": (set_field(("tokenizer", "eos_token_id"), "1"), "eos_token_id", ALL),
    "files-a-list": (set_field(("files",), []), "files must be a mapping", ALL),
    "sha-not-hex": (set_field(("files", "model.onnx", "sha256"), "z" * 64), "64 lowercase", ALL),
    "format-version-string": (set_field(("format_version",), "1"), "format version '1'", ALL),
    "unknown-key": (set_field(("decoders",), {"file": "x"}), "unknown key 'decoders'", ALL),
    "task-unknown": (set_field(("task",), "translation"), "task is 'translation'", ALL),
    # tensors that cannot be trained from
    "tensor-nan": (
        tensors_with(lambda t: t[first(t)].__setitem__((0, 0), np.nan)),
        "NaN or infinite",
        ("finetune", "eval"),
    ),
    "tensor-inf": (
        tensors_with(lambda t: t[first(t)].__setitem__((0, 0), np.inf)),
        "NaN or infinite",
        ("finetune", "eval"),
    ),
    "tensor-absurd": (
        tensors_with(lambda t: t[first(t)].__setitem__((0, 0), 1e30)),
        "beyond 1e",
        ("finetune", "eval"),
    ),
    "tensor-float64": (
        tensors_with(lambda t: t.update({first(t): t[first(t)].astype(np.float64)})),
        "F64",
        ALL,
    ),
    "tensor-wrong-shape": (
        tensors_with(lambda t: t.update({first(t): t[first(t)][:1]})),
        "the manifest says F32",
        ALL,
    ),
    "tensor-missing": (tensors_with(lambda t: t.pop(first(t))), "holds nothing for", ALL),
    "positive-with-zeros": (
        tensors_with(lambda t: None, positive=True),
        "must stay positive",
        ("finetune", "eval"),
    ),
    # files changed, truncated, corrupt
    "model-bit-flip": (flip_byte("model.onnx"), "does not match its sha256", ALL),
    "tensors-truncated": (
        lambda b, out: (b / "trainable.safetensors").write_bytes(b"\0" * 10),
        "truncated or was changed",
        ALL,
    ),
    "tokenizer-corrupt": (
        garbage("tokenizer.json", b'{"version": "1.0", "model": 7}'),
        "cannot read the tokenizer",
        ("finetune", "eval"),
    ),
    "tensors-garbage": (garbage("trainable.safetensors", b"\xff" * 64), "cannot read", ALL),
    "model-garbage-with-location": (
        garbage("model.onnx", b"\x3a\x05location\xff\xff"),
        "not a valid ONNX model",
        ALL,
    ),
    "model-not-onnx": (
        garbage("model.onnx", b"not a model"),
        "ONNX Runtime cannot load|was written for bundle",  # replay needs no session
        ALL,
    ),
    # a manifest edit that leaves a loadable bundle: another bundle for the run's ledger
    "manifest-edited": (
        set_field(("exporter", "seconds"), 1.0),
        "was written for bundle",
        ("replay",),
    ),
}


@pytest.fixture(scope="module")
def base(make_bundle, tmp_path_factory):
    b = tmp_path_factory.mktemp("base") / "bundle"
    shutil.copytree(make_bundle("lora"), b)
    return b


@pytest.fixture(scope="module")
def run_dir(base, memo_data, tmp_path_factory):
    """A finished run on the intact bundle (the ledger the replay cases use)."""
    out = tmp_path_factory.mktemp("run") / "run"
    r = invoke("finetune", *finetune_args(base, memo_data[0], out))
    assert r.exit_code == 0, r.output
    return out


def finetune_args(bundle, data, out):
    return [
        "--bundle", str(bundle), "--data", str(data), "--out", str(out), "--steps", "2",
        "--max-length", "24", "--no-progress", "--lr", "1e-3", "--mu", "1e-2",
        "--threads", "1", "checkpoint_every=1",
    ]  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def snapshot(*folders: Path) -> dict[str, bytes]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bundle(case, base, run_dir, memo_data, tmp_path):
    mutate, message, commands = CASES[case]
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    shutil.copytree(base, bundle)
    outside.mkdir()
    mutate(bundle, outside)
    before = snapshot(bundle, outside, run_dir)
    data = str(memo_data[0])
    for command in commands:
        out = tmp_path / f"out-{command}"
        args = {
            "finetune": ["finetune", *finetune_args(bundle, data, out)],
            "eval": ["eval", "--bundle", str(bundle), "--data", data, "--max-length", "24"],
            "replay": ["replay", "--run", str(run_dir), "--bundle", str(bundle), "--out", str(out)],
        }[command]
        r = invoke(*args)
        assert isinstance(r.exception, SystemExit), (command, r.exception, r.output)
        assert r.exit_code == 2, (command, r.output)
        err = r.stderr
        assert err.count("error:") == 1 and "fix:" in err, (command, err)
        assert "Traceback" not in r.output, (command, r.output)
        assert re.search(message, err), (command, message, err)
        assert not (out / "ledger.jsonl").exists() and not (out.is_file()), command
    assert snapshot(bundle, outside, run_dir) == before  # nothing overwritten


def test_the_intact_bundle_passes_every_command(base, run_dir, memo_data, tmp_path):
    """The cases above fail because of their mutation, not because the commands do."""
    assert invoke("eval", "--bundle", str(base), "--data", str(memo_data[0])).exit_code == 0
    r = invoke("replay", "--run", str(run_dir), "--out", str(tmp_path / "t"), "--check")
    assert r.exit_code == 0 and "bit-identical" in r.output, r.output
