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


# -- configs and overrides -------------------------------------------------------------------


def invoke(*args):
    from click.testing import CliRunner

    from edgezo.cli.main import main

    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def refused(r, *needles):
    """Exit 2, one error with a fix, no traceback, and each needle in the message."""
    assert isinstance(r.exception, SystemExit) and r.exit_code == 2, (r.exception, r.output)
    assert r.stderr.count("error:") == 1 and "fix:" in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_common_names_suggest_the_field(make_bundle, good_data, tmp_path):
    args = finetune_args(make_bundle("lora"), good_data, tmp_path / "o")
    refused(invoke(*args, "learning_rate=0.01"), "unknown key 'learning_rate' (did you mean 'lr'?)")
    refused(invoke(*args, "num_steps=3"), "(did you mean 'steps'?)")
    refused(invoke(*args, "epsilon=1e-3"), "(did you mean 'mu'?)")


def test_every_problem_is_listed_at_once(make_bundle, good_data, tmp_path):
    r = invoke(
        *finetune_args(make_bundle("lora"), good_data, tmp_path / "o"),
        "learning_rate=0.01",
        "q=many",
        "estimator=spsa",
    )
    refused(r, "3 problems", "learning_rate", "q must be an integer", "estimator must be one of")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data=@x", "data file @x does not exist"),
        ("seed=!!python/object/apply:os.system ['echo pwned']", "seed must be an integer"),
        ("lr=*alias", "lr must be a number"),
        ("lr=.nan", "lr must be a finite number"),
        ("out=runs/a: b", ""),  # a mapping in YAML: kept as the string given
    ],
)
def test_yaml_special_override_values(make_bundle, good_data, tmp_path, override, needle):
    from edgezo.configio import parse_overrides

    key, value = override.split("=", 1)
    if not needle:
        assert parse_overrides([override]) == {key: value}
        return
    args = [a for a in finetune_args(make_bundle("lora"), good_data, tmp_path / "o")]
    if key == "data":
        args = args[:3] + args[5:]  # drop --data: the override gives it
    refused(invoke(*args, override), needle)


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "is empty"),
        (b"# only a comment\n", "is empty"),
        (b"steps: 3\nlr: \xe9\n", "not UTF-8"),
    ],
)
def test_config_files_empty_or_not_utf8(make_bundle, good_data, tmp_path, content, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(content)
    args = finetune_args(make_bundle("lora"), good_data, tmp_path / "o")
    refused(invoke(*args, "--config", str(cfg)), needle)


# -- runs: killed, corrupted, foreign, older -------------------------------------------------


@pytest.fixture
def done_run(make_bundle, good_data, tmp_path):
    out = tmp_path / "run"
    r = invoke(*finetune_args(make_bundle("lora"), good_data, out, "checkpoint_every=2"))
    assert r.exit_code == 0, r.output
    return out


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_resumed_run_with_an_emptied_config_is_refused(done_run, make_bundle, good_data):
    (done_run / "config.yaml").write_text("")
    before = files(done_run)
    refused(invoke("finetune", "--resume", "--out", str(done_run), "--no-progress"), "is empty")
    assert files(done_run) == before


def test_a_ledger_line_from_another_run_stops_the_resume(
    done_run, make_bundle, good_data, tmp_path
):
    other = tmp_path / "other"
    args = finetune_args(make_bundle("lora"), good_data, other, "--steps", "4", "seed=5")
    assert invoke(*args).exit_code == 0
    foreign = (other / "ledger.jsonl").read_text().splitlines()[4]  # its step 3
    with open(done_run / "ledger.jsonl", "a") as f:
        f.write(foreign + "\n")
    before = files(done_run)
    r = invoke("finetune", "--resume", "--out", str(done_run), "--steps", "5", "--no-progress")
    refused(r, "ledger.jsonl:5 does not follow the lines before it")
    assert files(done_run) == before


def test_a_bit_flip_in_trained_tensors_is_an_error(done_run, good_data):
    f = done_run / "trained.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x04
    f.write_bytes(bytes(raw))
    refused(
        invoke("eval", "--run", str(done_run), "--data", str(good_data)),
        "does not match the checksum",
        "edgezo replay",
    )


def test_identical_runs_write_identical_trained_tensors(done_run, make_bundle, good_data, tmp_path):
    again = tmp_path / "again"
    assert (
        invoke(
            *finetune_args(make_bundle("lora"), good_data, again, "checkpoint_every=2")
        ).exit_code
        == 0
    )
    for name in ("trained.safetensors", "checkpoint.safetensors"):
        assert (again / name).read_bytes() == (done_run / name).read_bytes(), name


def killed(run):
    """What a SIGKILL after a checkpoint leaves: no trained tensors, no summary."""
    (run / "trained.safetensors").unlink()
    (run / "summary.json").unlink()
    return run


def test_replay_check_on_a_killed_run_compares_with_its_checkpoint(done_run, tmp_path):
    r = invoke("replay", "--run", str(killed(done_run)), "--out", str(tmp_path / "t"), "--check")
    assert r.exit_code == 0, r.output
    assert "bit-identical to the run's checkpoint at step 3" in r.output


def test_replay_check_with_nothing_to_compare(done_run, tmp_path):
    (killed(done_run) / "checkpoint.safetensors").unlink()
    r = invoke("replay", "--run", str(done_run), "--out", str(tmp_path / "t"), "--check")
    refused(r, "no trained.safetensors and no checkpoint", "--resume")


def test_replay_check_catches_a_changed_checkpoint(done_run, tmp_path):
    import numpy as np

    from edgezo.zo.checkpoint import load_tensors, save_tensors_atomic

    ckpt = killed(done_run) / "checkpoint.safetensors"
    t, meta = load_tensors(ckpt)
    t["master"] = t["master"] + np.float32(1e-3)  # rewritten with a valid checksum
    save_tensors_atomic(ckpt, t, meta)
    r = invoke("replay", "--run", str(done_run), "--out", str(tmp_path / "t"), "--check")
    assert r.exit_code == 1 and "DIFFERS from the run's checkpoint" in r.output


def test_eval_on_a_killed_run_says_what_to_do(done_run, good_data):
    r = invoke("eval", "--run", str(killed(done_run)), "--data", str(good_data))
    refused(r, "has no trained.safetensors yet", "--resume", "edgezo replay")


def test_a_run_of_an_older_edgezo_replays_but_does_not_resume(done_run, tmp_path):
    """edgezo 0.1 recorded a fingerprint of the files alone and wrote unchained ledgers."""
    import json

    from edgezo.bundle import legacy_fingerprint_of, load_bundle

    ledger = done_run / "ledger.jsonl"
    lines = [json.loads(x) for x in ledger.read_text().splitlines()]
    b = load_bundle(lines[0]["bundle_path"])
    lines[0].update(version=1, bundle=legacy_fingerprint_of(b.manifest))
    for rec in lines[1:]:
        rec.pop("chain")
    ledger.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from edgezo.errors import EdgezoWarning

    with pytest.warns(EdgezoWarning, match="older edgezo"):  # the note
        r = invoke("replay", "--run", str(done_run), "--out", str(tmp_path / "t"), "--check")
    assert r.exit_code == 0 and "bit-identical" in r.output, r.output
    before = files(done_run)
    r = invoke("finetune", "--resume", "--out", str(done_run), "--steps", "5", "--no-progress")
    refused(r, "written by an older edgezo", "edgezo replay")
    assert files(done_run) == before
