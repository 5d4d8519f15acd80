"""One prepared GPU run of edgezo's CUDA path: everything issue 14 asks, in one JSON + Markdown.

On the desktop (this machine; torch, transformers, onnx)::

    python tools/gpu_check.py pack                 # bundles, recipe, lean ONNX Runtime -> .gpu/
    python tools/gpu_check.py run --cpu-dry-run --out /tmp/gc   # every stage, CPU, tiny bundles

On the GPU machine (plain ``python3`` with numpy; the calls are in docs/guides/gpu-check.md)::

    python3 tools/gpu_check.py setup --part .gpu/p1    # ONNX Runtime for CUDA into /tmp, smoke test
    python3 tools/gpu_check.py stash --part .gpu/p2    # the first half of the GGUF
    python3 tools/gpu_check.py run --part .gpu/p3 --out $OUT    # rebuild bundles, all stages

``run`` rebuilds the bundles (sha256-checked), then runs the stages of
``tools/gpu_check_stages.py`` (env, tests, timing, parity, fp16, torch), each in its own
process with its own time limit, and rewrites the report after every stage, so a stage that
hangs or a call that runs out of time still leaves every figure measured so far. Results
accumulate in /tmp/edgezo-gpu/results: a second ``run --stages ...`` adds to the same report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_pack as pack  # noqa: E402 - stdlib + numpy only, like this file

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/edgezo-gpu")  # survives between calls while the machine stays warm
SITE = WORK / "site"  # onnxruntime-gpu and the gguf package
STORE = WORK / "store"  # carried files
BUNDLES = WORK / "bundles"  # rebuilt bundles
RESULTS = WORK / "results"
ORDER = ("env", "tests", "timing", "parity", "fp16", "torch")
#: seconds per stage on the H200 (real bundles); a stage past its limit is killed and reported
LIMITS = {"env": 60, "tests": 120, "timing": 240, "parity": 180, "fp16": 90, "torch": 150}
TARGETS = {
    "heldout_abs_diff": 1e-3,
    "step_ratio": {"default": 1.10, "lora-all": 1.10, "full": 1.5},
}
DRY = "CPU DRY RUN (the CPU provider stands in for CUDA)"
ORT_WHEEL = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
GGUF_WHEEL = "gguf-0.19.0-py3-none-any.whl"
FALLBACK = "cuda-removed-payloads.xz"


# -- environment of the stage processes ------------------------------------------------------


def stage_env() -> dict[str, str]:
    """PYTHONPATH: the carried packages first (onnxruntime-gpu shadows the CPU build), then
    the repo; LD_LIBRARY_PATH: the CUDA/cuDNN libraries of the nvidia pip packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SITE) if SITE.exists() else "", str(REPO), env.get("PYTHONPATH", "")) if p
    )
    libs = []
    for sp in sys.path:
        root = Path(sp) / "nvidia"
        if root.is_dir():
            libs += sorted({str(p.parent) for p in root.glob("**/lib*.so*")})
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).strip(
        os.pathsep
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- the report ------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def load_results(results: Path) -> dict:
    stages = {}
    for name in ORDER:
        f = results / f"{name}.json"
        if f.exists():
            stages[name] = json.loads(f.read_text())
    meta = results / "meta.json"
    return {"meta": json.loads(meta.read_text()) if meta.exists() else {}, "stages": stages}


def summarize(report: dict) -> dict:
    """Headline figures and the issue's targets, from whatever stages finished."""
    st = {k: v.get("result") for k, v in report["stages"].items() if v.get("status") == "ok"}
    out: dict = {"targets": []}

    def target(what: str, value, limit, ok) -> None:
        out["targets"].append({"what": what, "value": value, "limit": limit, "met": ok})

    for name, row in (st.get("parity") or {}).get("loss", {}).items():
        if "heldout_abs_diff" not in row.get("default_options", {}):
            continue
        d = row["default_options"]["heldout_abs_diff"]
        target(f"held-out loss |GPU - CPU|, {name}", d, TARGETS["heldout_abs_diff"], d <= 1e-3)
    timing = (st.get("timing") or {}).get("runs", [])
    best: dict[str, dict] = {}
    for r in timing:
        if "error" in r:
            continue
        if r["bundle"] not in best or r["step_s"] < best[r["bundle"]]["step_s"]:
            best[r["bundle"]] = r
    for name, r in best.items():
        limit = TARGETS["step_ratio"].get(name)
        if limit is not None:
            target(
                f"step ratio, {name} ({r['path']})",
                r["step_ratio"],
                limit,
                r["step_ratio"] <= limit,
            )
    torch = st.get("torch") or {}
    pairs = (("lora-all", "lora_all_fp32"), ("full", "full_fp32"))
    for name, key in pairs:
        if name in best and key in torch:
            ours, theirs = best[name]["step_s"], torch[key]["mezo_step_s"]
            target(
                f"ZO step vs PyTorch-eager MeZO step, {name} (s)",
                [ours, theirs],
                "faster",
                ours < theirs,
            )
    fp16 = st.get("fp16") or {}
    if "heldout_rel_diff" in fp16:
        out["fp16"] = {"heldout_rel_diff": fp16["heldout_rel_diff"], "speedup": fp16["speedup"]}
    return out


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return " / ".join(_fmt(v) for v in x)
    return str(x)


def render(report: dict) -> str:
    """The Markdown report (docs/benchmarks takes it as is)."""
    meta = report["meta"]
    lines = [
        "# edgezo GPU check",
        "",
        f"- date: {meta.get('date', '?')}; commit {meta.get('commit', '?')}; "
        f"{DRY if meta.get('dry_run') else 'GPU run'}",
        f"- command: `{meta.get('command', '?')}`",
        "",
        "## Stages",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    for name in ORDER:
        s = report["stages"].get(name)
        if s is None:
            lines.append(f"| {name} | not run | |")
        else:
            why = f" ({s['error'].splitlines()[-1][:120]})" if s.get("error") else ""
            lines.append(f"| {name} | {s['status']}{why} | {s.get('seconds', 0):.0f} |")
    summary = report.get("summary") or summarize(report)
    lines += [
        "",
        "## Targets (issue 14)",
        "",
        "| what | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in summary["targets"]:
        lines.append(
            f"| {t['what']} | {_fmt(t['value'])} | {_fmt(t['limit'])} | "
            f"{'yes' if t['met'] else 'NO'} |"
        )
    st = {k: v.get("result") for k, v in report["stages"].items() if v.get("status") == "ok"}
    env = st.get("env")
    if env:
        lines += ["", "## Machine", ""]
        for k in (
            "nvidia_smi",
            "onnxruntime",
            "providers",
            "torch",
            "transformers",
            "numpy",
            "python",
            "cpu_count",
        ):
            lines.append(f"- {k}: {_fmt(env.get(k))}")
        lines.append(f"- smoke test: {_fmt(env.get('smoke'))}")
    timing = (st.get("timing") or {}).get("runs")
    if timing:
        lines += [
            "",
            "## Forward and ZO step on the GPU provider",
            "",
            "| bundle | graph | path | trainable | forward s | step s | evals | ratio "
            "| feed copy s | breakdown s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in timing:
            if "error" in r:
                lines.append(
                    f"| {r['bundle']} | | {'device' if r.get('device') else 'host'} | "
                    f"error: {r['error'][:100]} |||||||"
                )
                continue
            br = ", ".join(f"{k} {v:.4g}" for k, v in r["step_breakdown_s"].items())
            lines.append(
                f"| {r['bundle']} | {r['graph']} | {r['path']} | {r['trainable_values']:,} | "
                f"{r['forward_s']:.4g} | {r['step_s']:.4g} | {r['evals_per_step']} | "
                f"{r['step_ratio']:.3f} | {_fmt(r.get('feed_copy_s', '-'))} | {br} |"
            )
        if "full_host_dominant" in st["timing"]:
            lines.append(
                "\nFull fine-tuning, host path: the step is dominated by "
                f"{st['timing']['full_host_dominant']}."
            )
    parity = st.get("parity")
    if parity:
        lines += [
            "",
            "## Parity, fp32",
            "",
            "| bundle | options | held-out CPU | held-out GPU | abs diff | max per-example diff |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in parity["loss"].items():
            for label, v in row.items():
                if isinstance(v, dict) and "error" in v:
                    lines.append(f"| {name} | {label} | error: {v['error'][:100]} ||||")
                elif isinstance(v, dict):
                    lines.append(
                        f"| {name} | {label} | {row['heldout_cpu']:.6f} | {v['heldout_gpu']:.6f} | "
                        f"{v['heldout_abs_diff']:.2e} | {v['per_example_max_abs_diff']:.2e} |"
                    )
        tr = parity.get("training")
        if tr:
            lines += [
                "",
                f"Training, {tr['steps']} ZO steps of the default bundle (edgezo finetune):",
                "",
            ]
            for k, v in tr.items():
                lines.append(f"- {k}: {_fmt(v)}")
    fp16 = st.get("fp16")
    if fp16:
        lines += ["", "## fp16 base (LoRA on every block)", ""]
        for k, v in fp16.items():
            lines.append(f"- {k}: {_fmt(v)}")
    torch = st.get("torch")
    if torch:
        lines += ["", "## PyTorch eager, same device", ""]
        for k, v in torch.items():
            lines.append(f"- {k}: {_fmt(v)}")
    tests = st.get("tests")
    if tests:
        lines += [
            "",
            "## gpu-marked tests",
            "",
            f"`{tests['command']}`: {tests['summary']} (exit {tests['returncode']})",
        ]
    return "\n".join(lines) + "\n"


def write_report(results: Path, outs: list[Path]) -> dict:
    """Both files into each of ``outs``; a figure the report cannot read costs its table, never
    the raw results (the JSON is written first)."""
    report = load_results(results)
    try:
        report["summary"] = summarize(report)
    except Exception as e:  # noqa: BLE001 - keep the raw results whatever happens
        report["summary"] = {"targets": [], "error": f"{type(e).__name__}: {e}"}
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        try:
            md = render(report)
        except Exception as e:  # noqa: BLE001
            md = f"# edgezo GPU check\n\nnot rendered ({e}); the figures are in gpu_check.json\n"
        (out / "gpu_check.md").write_text(md)
    return report


# -- running stages --------------------------------------------------------------------------


def run_stage(name: str, ctx_path: Path, results: Path, limit: float, outs: list[Path]) -> dict:
    """One stage in its own process, killed after ``limit`` seconds; its record is saved."""
    result = results / f"{name}.result.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "stage",
        name,
        "--ctx",
        str(ctx_path),
        "--result",
        str(result),
    ]
    t = time.perf_counter()
    log = results / f"{name}.log"
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                cmd, env=stage_env(), stdout=f, stderr=subprocess.STDOUT, timeout=limit, cwd=REPO
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    rec: dict = {"seconds": time.perf_counter() - t}
    tail = log.read_text(errors="replace").strip().splitlines()[-30:]
    if code is None:
        rec.update(status="timeout", error=f"killed after {limit:.0f} s", log_tail=tail)
    elif code != 0 or not result.exists():
        rec.update(status="error", error="\n".join(tail) or f"exit {code}", log_tail=tail)
    else:
        rec.update(status="ok", result=json.loads(result.read_text()))
    (results / f"{name}.json").write_text(json.dumps(rec, indent=1, default=str))
    write_report(results, outs)
    print(f"gpu_check: {name}: {rec['status']} in {rec['seconds']:.0f} s", flush=True)
    return rec


def run_stages(
    ctx: dict, stages: list[str], results: Path, outs: list[Path], deadline: float, limits: dict
) -> None:
    results.mkdir(parents=True, exist_ok=True)
    ctx_path = results / "ctx.json"
    ctx_path.write_text(json.dumps(ctx))
    end = time.monotonic() + deadline
    for name in stages:
        left = end - time.monotonic()
        if left < 10:
            rec = {"status": "skipped", "error": "the call's deadline came first", "seconds": 0}
            (results / f"{name}.json").write_text(json.dumps(rec))
            print(f"gpu_check: {name}: skipped (deadline)", flush=True)
            continue
        run_stage(name, ctx_path, results, min(limits[name], left), outs)
    write_report(results, outs)


def stage_main(name: str, ctx_path: Path, result: Path) -> None:
    import gpu_check_stages as stages

    ctx = stages.Ctx.from_json(json.loads(ctx_path.read_text()))
    out = stages.STAGES[name](ctx)
    result.write_text(json.dumps(out, indent=1, default=str))


def _meta(results: Path, dry: bool, argv: list[str], extra: dict | None = None) -> None:
    results.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "command": "python3 tools/gpu_check.py " + " ".join(argv),
        "dry_run": dry,
        **(extra or {}),
    }
    (results / "meta.json").write_text(json.dumps(meta))


# -- commands --------------------------------------------------------------------------------


def cmd_setup(args) -> None:
    """Call 1 on the GPU machine: onnxruntime-gpu (lean) + gguf into /tmp, then a smoke test."""
    t = time.perf_counter()
    pack.stash(Path(args.part), STORE)  # p1 (or, with --restore, the last fallback part)
    pack.install_ort(STORE, SITE)
    if args.restore:  # the fallback: the exact library of the wheel (parts f1..f3 stashed)
        f = json.loads((STORE / "fallback.json").read_text())
        payloads = pack.assemble(STORE, f["name"], f["bytes"], f["sha256"])
        pack.restore_cuda_library(SITE / pack.CUDA_SO, payloads)
        print("gpu_check: CUDA library restored to the wheel's (every architecture)")
    print(f"gpu_check: onnxruntime-gpu unpacked into {SITE} in {time.perf_counter() - t:.0f} s")
    code = (
        "import gpu_check_stages as s, json; "
        "print(json.dumps({'providers': s._ort().get_available_providers(),"
        " 'smoke': s.smoke_test('cuda')}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={
            **stage_env(),
            "PYTHONPATH": stage_env()["PYTHONPATH"] + os.pathsep + str(Path(__file__).parent),
        },
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    print(proc.stdout.strip() or proc.stderr.strip()[-3000:])
    smoke = (
        json.loads(proc.stdout.strip().splitlines()[-1])
        if proc.returncode == 0 and proc.stdout.strip()
        else {}
    )
    ok = bool(smoke.get("smoke", {}).get("ok"))
    print(f"gpu_check: CUDA smoke test {'PASSED' if ok else 'FAILED'}")
    if not ok:
        sys.exit(1)


def cmd_stash(args) -> None:
    t = time.perf_counter()
    files = pack.stash(Path(args.part), STORE)
    print(
        f"gpu_check: stashed {len(files)} files into {STORE} in "
        f"{time.perf_counter() - t:.0f} s: {files[:5]}"
    )


def real_ctx(store: Path, dest: Path) -> dict:
    import gpu_check_stages as stages

    b = {n: str(dest / n) for n in ("default", "lora-all", "full", "lora-all-fp16")}
    ctx = stages.Ctx(
        provider="cuda",
        torch_device="cuda",
        bundles=b,
        data=str(REPO / "edgezo" / "assets" / "notes.jsonl"),
        torch_model={
            "store": str(store),
            "config": str(dest / "hf"),
            "index": str(dest / "hf" / "state_dict.json"),
        },
        tiny=str(store / "tiny"),
    )
    return ctx.to_json()


def cmd_run(args) -> None:
    outs = [Path(args.out)] if args.out else []
    stages = args.stages.split(",") if args.stages else list(ORDER)
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        sys.exit(f"unknown stages {unknown}; choose from {', '.join(ORDER)}")
    if args.cpu_dry_run:
        results = Path(args.results or (Path(args.out or "/tmp") / "gpu-check-results"))
        shutil.rmtree(results, ignore_errors=True)
        _meta(results, True, sys.argv[1:])
        ctx = dry_run_ctx(Path(args.work or results / "work"))
        limits = {k: args.stage_limit or 600 for k in ORDER}
        run_stages(ctx, stages, results, outs, args.deadline or 3600, limits)
        return
    t = time.perf_counter()
    if args.part:
        pack.stash(Path(args.part), STORE)
    print("gpu_check: rebuilding the bundles from the GGUF ...", flush=True)
    files = pack.rebuild(STORE, BUNDLES)
    print(f"gpu_check: bundles ready in {time.perf_counter() - t:.0f} s", flush=True)
    _meta(RESULTS, False, sys.argv[1:], {"rebuilt": files})
    limits = {k: args.stage_limit or v for k, v in LIMITS.items()}
    run_stages(
        real_ctx(STORE, BUNDLES),
        stages,
        RESULTS,
        outs,
        (args.deadline or 560) - (time.perf_counter() - t),
        limits,
    )
    print((outs[0] / "gpu_check.md").read_text() if outs else "")


def dry_run_ctx(work: Path) -> dict:
    """Tiny bundles (built here, once per folder) standing for the real ones, CPU provider."""
    import gpu_check_stages as stages

    bundles = build_tiny_set(work)
    ctx = stages.Ctx(
        provider="cpu",
        torch_device="cpu",
        bundles={k: str(v) for k, v in bundles.items() if k != "hf"},
        data=str(REPO / "edgezo" / "assets" / "notes.jsonl"),
        torch_model={"hf_dir": str(bundles["hf"])},
        tiny=str(work),
        batch=(2, 16),
        repeats=2,
        steps=2,
        threads=1,
        dry_run=True,
    )
    return ctx.to_json()


def build_tiny_set(work: Path) -> dict[str, Path]:
    """The tiny Llama of tests/conftest.py and its bundles: default-like (LoRA-FA, last
    block, prefix split), LoRA on every block, full, fp16 of the LoRA one; gpu tests' too."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    from exporters import export_causal_lm

    hf = work / "hf"
    if not (hf / "config.json").exists():
        tok = build_tiny_tokenizer()
        PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        ).save_pretrained(hf)
        build_tiny_model("llama", vocab_size=tok.get_vocab_size()).save_pretrained(hf)
    jobs = {
        "default": dict(
            mode="lora", lora_targets=("v_proj",), lora_layers="last:1", lora_freeze_a=True
        ),
        "lora-all": dict(mode="lora"),
        "full": dict(mode="full"),
        "lora": dict(mode="lora"),  # what tests/test_cuda.py asks for
    }
    out = {"hf": hf}
    for name, kw in jobs.items():
        if not _current(work / name):
            export_causal_lm(hf, work / name, progress=None, overwrite=True, **kw)
        out[name] = work / name
    if not _current(work / "lora-all-fp16"):
        pack.make_fp16_bundle(work / "lora-all", work / "lora-all-fp16")
    out["lora-all-fp16"] = work / "lora-all-fp16"
    return out


def cmd_pack(args) -> None:
    """Desktop: everything the GPU run needs, as parts that each fit one call."""
    cache, out = Path(args.cache), REPO / args.out
    shutil.rmtree(out, ignore_errors=True)
    parts = [out / f"p{k}" for k in (1, 2, 3)]
    for p in parts:
        p.mkdir(parents=True)
    # p1: onnxruntime-gpu, lean, and the gguf wheel
    for wheel in (ORT_WHEEL, GGUF_WHEEL):
        if not (cache / wheel).exists():
            name, version = wheel.split("-")[:2]
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--python-version",
                    "3.12",
                    "--implementation",
                    "cp",
                    "--platform",
                    "manylinux_2_28_x86_64",
                    "-d",
                    str(cache),
                    f"{name.replace('_', '-')}=={version}",
                ],
                check=True,
            )
    fallback = cache / FALLBACK if args.fallback else None
    ort_info = pack.pack_ort(cache / ORT_WHEEL, parts[0], 90, fallback)
    if fallback is not None:  # f1..f3: the zeroed payloads, in case the driver refuses p1's
        size = fallback.stat().st_size
        fparts = [out / f"f{k}" for k in (1, 2, 3)]
        pack.split(fallback, [size // 3, size // 3, -1], fparts)
        (fparts[-1] / "fallback.json").write_text(
            json.dumps({"name": FALLBACK, "bytes": size, "sha256": pack.sha256(fallback)})
        )
        parts += fparts
    shutil.copyfile(cache / GGUF_WHEEL, parts[0] / GGUF_WHEEL)
    # bundles (exported here once, cached)
    bundles = export_bundles(cache / "bundles")
    from exporters.default import smollm2_gguf

    gguf_path = smollm2_gguf()
    print("gpu_check: matching bundle files against the GGUF ...", flush=True)
    stage = out / "_stage"
    recipe = pack.Recipe(pack.Gguf(gguf_path), stage / "blobs")
    for name, folder in bundles.items():
        recipe.add_bundle(folder, name)
    add_hf_reference(recipe, gguf_path, stage)
    gsize = gguf_path.stat().st_size
    recipe.write(
        stage,
        {
            "gguf": {"name": gguf_path.name, "bytes": gsize, "sha256": pack.sha256(gguf_path)},
            "ort": ort_info,
        },
    )
    half = gsize // 2
    pack.split(gguf_path, [half, -1], [parts[1], parts[2]])
    shutil.move(str(stage / pack.RECIPE), parts[2] / pack.RECIPE)
    shutil.move(str(stage / "blobs"), parts[2] / "blobs")
    shutil.rmtree(stage)
    build_tiny_set(parts[2] / "tiny")
    for p in (parts[2] / "tiny" / "hf",):
        shutil.rmtree(p)
    tree = pack.tree_mib(REPO)
    print(f"gpu_check: working tree {tree:.1f} MiB; blobs {recipe.blob_bytes / 2**20:.1f} MiB")
    worst = 0.0
    for p in parts:
        size = pack.folder_mib(p)
        worst = max(worst, size + tree)
        print(
            f"  {p.relative_to(REPO)}: {size:.1f} MiB "
            f"(+ tree = {size + tree:.1f} of {pack.LIMIT_MIB})"
        )
    if worst > pack.LIMIT_MIB - 1:
        sys.exit("gpu_check: a part does not fit one call; see the sizes above")
    print(f"gpu_check: packed into {out} ({args.out}/ must be ignored by git: .gitignore has it)")


def export_bundles(root: Path) -> dict[str, Path]:
    from exporters import export_causal_lm
    from exporters.default import DEFAULT_LORA, smollm2_gguf

    g = smollm2_gguf()
    jobs = {
        "default": dict(mode="lora", **DEFAULT_LORA),
        "lora-all": dict(mode="lora", lora_rank=8, lora_alpha=16),
        "full": dict(mode="full"),
    }
    out = {}
    for name, kw in jobs.items():
        if not _current(root / name):
            export_causal_lm(g.parent, root / name, gguf_file=g.name, seed=0, overwrite=True, **kw)
        out[name] = root / name
    if not _current(root / "lora-all-fp16"):
        pack.make_fp16_bundle(root / "lora-all", root / "lora-all-fp16")
    out["lora-all-fp16"] = root / "lora-all-fp16"
    return out


def _current(folder: Path) -> bool:
    """A cached bundle this edgezo reads (an older bundle format is exported again)."""
    from edgezo.bundle import load_bundle
    from edgezo.errors import EdgezoError

    try:
        load_bundle(folder, verify=False)
    except EdgezoError:
        return False
    return True


def add_hf_reference(recipe, gguf_path: Path, stage: Path) -> None:
    """The Hugging Face model (config + state dict) for the PyTorch-eager comparison."""
    from exporters.load import load_causal_lm

    loaded = load_causal_lm(gguf_path)
    model = loaded.model
    hf = stage / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(hf)
    recipe.add_file(hf / "config.json", "hf/config.json", [])
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    recipe.add_tensors(state, "hf/state_dict")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="desktop: build the carried parts into .gpu/")
    a.add_argument("--out", default=".gpu")
    a.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "edgezo" / "gpu-check"),
        help="wheels and exported bundles (kept between packs)",
    )
    a.add_argument("--fallback", action="store_true", help="also write the zeroed CUDA payloads")
    for name in ("setup", "stash"):
        s = sub.add_parser(name)
        s.add_argument("--part", required=True)
        if name == "setup":
            s.add_argument(
                "--restore",
                action="store_true",
                help="fallback: put back the CUDA payloads of the stashed f parts",
            )
    r = sub.add_parser("run", help="rebuild the bundles and run the stages")
    r.add_argument("--part", default=None, help="a carried part to stash first")
    r.add_argument("--out", default=None, help="where the report goes ($OUT)")
    r.add_argument("--stages", default=None, help=f"comma list of {', '.join(ORDER)}")
    r.add_argument("--deadline", type=float, default=None, help="seconds for the whole call")
    r.add_argument("--stage-limit", type=float, default=None, help="seconds per stage")
    r.add_argument("--cpu-dry-run", action="store_true", help="CPU provider, tiny bundles")
    r.add_argument("--results", default=None, help="dry run: results folder")
    r.add_argument("--work", default=None, help="dry run: tiny bundles folder (reused)")
    rep = sub.add_parser("report", help="rewrite the report from a results folder")
    rep.add_argument("--results", default=str(RESULTS))
    rep.add_argument("--out", required=True)
    st = sub.add_parser("stage", help=argparse.SUPPRESS)
    st.add_argument("name", choices=ORDER)
    st.add_argument("--ctx", required=True)
    st.add_argument("--result", required=True)
    args = p.parse_args()
    if args.cmd == "pack":
        cmd_pack(args)
    elif args.cmd == "setup":
        cmd_setup(args)
    elif args.cmd == "stash":
        cmd_stash(args)
    elif args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "report":
        write_report(Path(args.results), [Path(args.out)])
    else:
        stage_main(args.name, Path(args.ctx), Path(args.result))


if __name__ == "__main__":
    main()
