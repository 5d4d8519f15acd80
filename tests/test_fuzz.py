"""Fuzzing the readers of user-given and on-disk files: any input is read into a valid object or
refused with an EdgezoError (what + fix), never another exception.

Bounded for CI (a few hundred examples per reader, the whole file in well under 30 s); run
``pytest tests/test_fuzz.py --hypothesis-seed=N`` with ``HYPOTHESIS_PROFILE=long`` to look
harder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgezo.bundle import Manifest, load_bundle
from edgezo.config import FinetuneConfig
from edgezo.configio import parse_overrides
from edgezo.data import read_jsonl
from edgezo.device.profiles import load_profile_file
from edgezo.errors import EdgezoError
from edgezo.zo.engine import EngineSettings, ZOEngine
from edgezo.zo.ledger import Ledger
from edgezo.zo.params import TensorSpec

settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


_SCRATCH = Path(tempfile.mkdtemp(prefix="edgezo-fuzz-"))


def fresh_file(data: bytes, name: str) -> Path:
    """``data`` in ``name`` (overwritten by every example) in this module's scratch folder."""
    p = _SCRATCH / name
    p.unlink(missing_ok=True)
    p.write_bytes(data)
    return p


@pytest.fixture(scope="module", autouse=True)
def _clean_scratch():
    yield
    shutil.rmtree(_SCRATCH, ignore_errors=True)


def edgezo_or_ok(fn, *args):
    """Call ``fn``: a result or an EdgezoError with a fix are both fine."""
    try:
        return fn(*args)
    except EdgezoError as e:
        assert e.what and e.fix, e
        return None


# -- JSONL data --------------------------------------------------------------------------------

records = st.one_of(
    st.fixed_dictionaries({"text": json_values}),
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values}),
    st.dictionaries(st.sampled_from(["text", "prompt", "completion", "label", "x"]), json_values),
    st.dictionaries(
        st.sampled_from(["step", "losses", "g", "lr", "mu", "heldout", "status"]), json_values
    ),
    json_values,
)


@PROFILE
@given(st.lists(records, max_size=6), st.binary(max_size=40), st.booleans())
def test_jsonl_reader(lines, noise, add_noise):
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in lines).encode()
    if add_noise:
        cut = len(noise) % (len(text) + 1)
        text = text[:cut] + noise + text[cut:]
    out = edgezo_or_ok(read_jsonl, fresh_file(text, "d.jsonl"))
    if out is not None:
        assert all(isinstance(r, dict) for _, r in out)


@PROFILE
@given(st.binary(max_size=200))
def test_jsonl_reader_on_bytes(data):
    edgezo_or_ok(read_jsonl, fresh_file(data, "d.jsonl"))


# -- overrides and YAML configs ----------------------------------------------------------------

KEYS = ["lr", "mu", "steps", "seed", "data", "q", "estimator", "clip", "learning_rate", "x-y"]
yaml_specials = st.sampled_from(
    [
        "@x",
        "!!python/object/apply:os.system ['true']",
        "&a 1",
        "*a",
        "!!binary aGk=",
        "[1, 2",
        "{a: 1}",
        ".nan",
        ".inf",
        "~",
        "0x1f",
        "1e400",
        "2001-01-01",
        "!!set {a}",
        "'",
        '"',
        "|",
    ]
)


@PROFILE
@given(
    st.lists(
        st.tuples(
            st.sampled_from(KEYS) | st.text(max_size=6), yaml_specials | st.text(max_size=12)
        ),
        max_size=5,
    )
)
def test_overrides_parse_and_load(pairs):
    items = [f"{k}={v}" for k, v in pairs]
    parsed = edgezo_or_ok(parse_overrides, items)
    if parsed is not None:
        edgezo_or_ok(FinetuneConfig.load, None, parsed)


@PROFILE
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=5))
def test_finetune_yaml_of_any_values(mapping):
    text = yaml.safe_dump(mapping, allow_unicode=True).encode()
    edgezo_or_ok(FinetuneConfig.load, str(fresh_file(text, "run.yaml")))


@PROFILE
@given(
    st.binary(max_size=120) | st.text(max_size=120).map(str.encode) | yaml_specials.map(str.encode)
)
def test_yaml_files_of_any_bytes(data):
    edgezo_or_ok(FinetuneConfig.load, str(fresh_file(data, "run.yaml")))
    edgezo_or_ok(load_profile_file, fresh_file(data, "board.yaml"))


PROFILE_KEYS = [
    "name",
    "description",
    "family",
    "memory_budget_mb",
    "providers",
    "detect",
    "max_batch_size",
    "threads",
    "cpu_arena",
    "time_budget_s",
    "gpu_memory_mb",
]


@PROFILE
@given(st.dictionaries(st.sampled_from(PROFILE_KEYS), json_values, max_size=6))
def test_device_profiles_of_any_values(over):
    base = {
        "name": "b",
        "description": "d",
        "family": "f",
        "memory_budget_mb": 100,
        "providers": ["CPUExecutionProvider"],
        **over,
    }
    text = yaml.safe_dump(base, allow_unicode=True).encode()
    edgezo_or_ok(load_profile_file, fresh_file(text, "board.yaml"))


# -- the ledger --------------------------------------------------------------------------------

SPECS = [TensorSpec("w", (6,))]
ESTIMATORS = ["central", "onesided", "dap", "p3", "p4"]


def good_ledger(path: Path, estimator: str, steps: int = 3) -> bytes:
    settings_ = EngineSettings(seed=1, estimator=estimator, q=1)
    engine = ZOEngine(SPECS, lambda: {"w": np.ones(6, np.float32)}, settings_)
    led = Ledger.create(
        path, {"bundle": "fp2-x", "bundle_path": "b", "engine": settings_.to_dict()}
    )
    f = engine.params.feed
    for t in range(steps):
        led.append(engine.step(t, 0.01, 0.01, lambda: float(np.sum(f.astype(np.float64) ** 2))))
    led.close()
    return path.read_bytes()


def read_and_replay(path: Path) -> None:
    """What resume and replay do with a ledger: read it, then redo its steps."""
    led = Ledger.read(path, repair=True)
    engine = ZOEngine(
        SPECS, lambda: {"w": np.ones(6, np.float32)}, EngineSettings.from_dict(led.header["engine"])
    )
    from edgezo.guard import GuardSettings, HeldoutGuard
    from edgezo.zo.replay import replay

    replay(engine, led)
    HeldoutGuard.from_ledger(GuardSettings(eval_every=1), 1.0, led.records)


@PROFILE
@given(
    st.sampled_from(ESTIMATORS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    st.booleans(),
)
def test_ledger_with_flipped_bytes(estimator, flips, unchain):
    path = fresh_file(b"", "ledger.jsonl")
    path.unlink()
    raw = bytearray(good_ledger(path, estimator))
    if unchain:  # a version 1 ledger: the field checks alone stand between bytes and replay
        lines = [json.loads(x) for x in raw.decode().splitlines()]
        lines[0]["version"] = 1
        for r in lines[1:]:
            r.pop("chain")
        raw = bytearray("".join(json.dumps(x) + "\n" for x in lines).encode())
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    path.write_bytes(bytes(raw))
    edgezo_or_ok(read_and_replay, path)


@PROFILE
@given(st.sampled_from(ESTIMATORS), st.lists(json_values | records, min_size=1, max_size=3))
def test_ledger_with_foreign_lines(estimator, extra):
    """Lines of any JSON value, appended to a version 1 ledger (no chain to catch them)."""
    path = fresh_file(b"", "ledger.jsonl")
    path.unlink()
    lines = [json.loads(x) for x in good_ledger(path, estimator, 2).decode().splitlines()]
    lines[0]["version"] = 1
    for r in lines[1:]:
        r.pop("chain")
    body = [json.dumps(x) for x in lines]
    for k, v in enumerate(extra):  # some get the next step number, to pass the order check
        if isinstance(v, dict) and k % 2 == 0:
            v = {**v, "step": 2 + k}
        body.append(json.dumps(v, allow_nan=True))
    path.write_text("\n".join(body) + "\n")
    edgezo_or_ok(read_and_replay, path)


@PROFILE
@given(st.binary(max_size=300))
def test_ledger_of_any_bytes(data):
    edgezo_or_ok(Ledger.read, fresh_file(data, "ledger.jsonl"), True)


# -- the manifest ------------------------------------------------------------------------------


def manifest_dict() -> dict:
    """A manifest with every optional part (stages, prompt, lora, files) filled in."""
    return {
        "task": "prompt_classification",
        "architecture": {"model_type": "llama", "vocab_size": 52, "hidden_size": 32},
        "trainable_mode": "lora",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        "trainable": [
            {"name": "a", "shape": [4, 2], "dtype": "float32", "role": "lora_a", "positive": False}
        ],
        "outputs": [{"name": "loss", "dtype": "float32", "shape": ["batch"]}],
        "tokenizer": {"file": "tokenizer.json", "pad_token_id": 0, "eos_token_id": 1},
        "lora": {"rank": 2, "alpha": 4.0, "targets": ["q_proj"], "freeze_a": False},
        "labels": ["yes", "no"],
        "prompt": {
            "template": "{text} ->",
            "label_words": ["yes", "no"],
            "label_token_ids": [3, 4],
        },
        "stages": {
            "prefix": "prefix.onnx",
            "suffix": "suffix.onnx",
            "cached": ["h"],
            "suffix_inputs": ["labels"],
            "cached_sequence_axes": {"h": [1]},
        },
        "files": {
            n: {"sha256": "0" * 64, "bytes": 1}
            for n in [
                "model.onnx",
                "trainable.safetensors",
                "tokenizer.json",
                "prefix.onnx",
                "suffix.onnx",
            ]
        },
        "format": "edgezo-bundle",
        "format_version": 1,
    }


def test_the_fuzzed_manifest_is_valid_to_start_with():
    assert Manifest.from_json(manifest_dict()).labels == ["yes", "no"]


def paths(value, prefix=()):
    """Every path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


ALL_PATHS = list(paths(manifest_dict()))[1:]


@PROFILE
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), json_values), min_size=1, max_size=3))
def test_manifest_with_any_field_replaced(edits):
    d = manifest_dict()
    for path, value in edits:
        node = d
        try:
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier edit removed the parent
            continue
    m = edgezo_or_ok(Manifest.from_json, d)
    if m is not None:  # what loads is what the runtime may rely on
        assert all(isinstance(s.shape, tuple) for s in m.trainable)
        m.paths()


@PROFILE
@given(json_values)
def test_manifest_of_any_json(value):
    edgezo_or_ok(Manifest.from_json, value)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-bundle")


@PROFILE
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_bundle_folder_with_any_manifest_bytes(bundle_dir, data):
    (bundle_dir / "manifest.json").write_bytes(data)
    edgezo_or_ok(load_bundle, bundle_dir)
