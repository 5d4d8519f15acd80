"""The measurement stages of ``tools/gpu_check.py``; each returns a JSON-able dict.

Every stage takes a :class:`Ctx`: the provider standing for the GPU (``cuda``, or ``cpu`` in
``--cpu-dry-run``), the torch device, the bundles (SmolLM2 rebuilt from its GGUF, or tiny
ones), the batch shape and repeat counts. Timings are medians; forwards and steps of one
bundle are timed interleaved in one process, so the machine's noise falls on both alike.

- ``env``: versions, providers, GPU; a CUDA session smoke test;
- ``tests``: the ``gpu``-marked pytest tests;
- ``parity``: per-example and held-out loss, CPU vs the GPU provider, fp32 (TF32 on and off);
  N ZO steps on each provider (θ difference); replay and re-run bit-exactness per provider;
- ``timing``: forward and ZO step per bundle (default LoRA-FA suffix, LoRA on every block,
  full), host vs device perturbation, a breakdown of the step, the feed copy per evaluation;
- ``fp16``: the fp16 base against fp32 — held-out loss and forward time;
- ``torch``: PyTorch eager forward (fp32, bf16 autocast, bf16 weights) and a MeZO step on
  the same GPU, LoRA on every block and full, against edgezo's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass
class Ctx:
    provider: str  # the provider measured as "the GPU": cuda, or cpu in a dry run
    torch_device: str  # cuda | cpu
    bundles: dict[str, str]  # default, lora-all, full, lora-all-fp16
    data: str  # JSONL text (batches and held-out loss)
    torch_model: dict = field(default_factory=dict)  # {"hf_dir"} or {"store", "config", "index"}
    tiny: str | None = None  # tiny bundles for the gpu-marked tests
    batch: tuple[int, int] = (8, 64)
    repeats: int = 10
    steps: int = 20  # ZO steps of the parity runs
    threads: int = 0  # CPU provider threads (0: all cores)
    dry_run: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Ctx:
        d = dict(d)
        d["batch"] = tuple(d["batch"])
        return cls(**d)


def _median(fn: Callable[[], object], n: int) -> float:
    fn()  # warm-up: arenas, kernel selection
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ort():
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA / cuDNN from the nvidia pip packages
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a missing optional library is reported later
            pass
    return ort


# -- data -------------------------------------------------------------------------------------


def random_examples(vocab: int, rows: int, seq: int, seed: int = 0):
    """Full-length examples of random tokens (timing: exactly rows × seq)."""
    from edgezo.data import Example

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(rows, seq))
    return [
        Example(tuple(int(x) for x in r), tuple(int(x) for x in r), i + 1)
        for i, r in enumerate(ids)
    ]


def text_examples(bundle, path: str, max_length: int):
    from edgezo.data import read_jsonl, tokenize_for

    return tokenize_for(bundle.manifest, read_jsonl(path), bundle.tokenizer(), max_length)


def _options(ctx: Ctx, provider: str, **kw):
    from edgezo.runner import RuntimeOptions

    return RuntimeOptions(provider=provider, threads=ctx.threads, **kw)


def loss_runner(bundle, params, ctx: Ctx, provider: str, examples, suffix: bool, **kw):
    """(runner, batches-maker) for ``bundle``: the full graph, or its suffix over cached rows."""
    from edgezo import prefix_cache
    from edgezo.data import collate
    from edgezo.runner import LossRunner
    from edgezo.train import BATCH_INPUTS

    opts = _options(ctx, provider, **kw)
    pad = bundle.manifest.tokenizer.pad_token_id
    if suffix:
        (examples,), _ = prefix_cache.cache_rows(
            bundle, [examples], 16, pad, _options(ctx, provider)
        )
        path, inputs = prefix_cache.suffix_path(bundle), prefix_cache.suffix_inputs(bundle)
    else:
        path, inputs = bundle.model_path, BATCH_INPUTS
    runner = LossRunner(path, params, inputs, opts)
    return runner, examples, (lambda ex: collate(ex, pad))


def _vocab(bundle) -> int:
    return int(bundle.manifest.architecture["vocab_size"])


def _load(name: str):
    from edgezo.bundle import load_bundle

    return load_bundle(name, verify=False)


# -- env ----------------------------------------------------------------------------------------


def stage_env(ctx: Ctx) -> dict:
    out: dict = {"python": sys.version.split()[0], "machine": platform.machine()}
    out["cpu_count"] = os.cpu_count()
    ort = _ort()
    out["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__}
    out["providers"] = ort.get_available_providers()
    try:
        from onnxruntime.capi import build_and_package_info as info

        out["onnxruntime"]["cuda_version"] = getattr(info, "cuda_version", None)
    except ImportError:
        pass
    out["numpy"] = np.__version__
    for mod in ("torch", "transformers", "onnx"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    out["smoke"] = smoke_test(ctx.provider)
    return out


def smoke_test(provider: str) -> dict:
    """A MatMul + Add graph on ``provider`` against numpy: does the provider really run?"""
    from onnx import TensorProto, helper

    ort = _ort()
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y0"]),
            helper.make_node("Add", ["y0", "x"], ["y"]),
        ],
        "smoke",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    full = PROVIDER_NAMES[provider]
    try:
        s = ort.InferenceSession(m.SerializeToString(), providers=[full, "CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 64, 64), dtype=np.float32)
    y = s.run(None, {"x": x, "w": w})[0]
    err = float(np.max(np.abs(y - (x.astype(np.float64) @ w + x))))
    return {
        "ok": s.get_providers()[0] == full and err < 1e-2,
        "session_providers": s.get_providers(),
        "max_abs_err": err,
        "provider_options": _jsonable(s.get_provider_options()),
    }


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# -- tests --------------------------------------------------------------------------------------


def stage_tests(ctx: Ctx) -> dict:
    env = dict(os.environ)
    if ctx.tiny:
        env["EDGEZO_GPU_BUNDLES"] = ctx.tiny
    env["EDGEZO_GPU_TEST_PROVIDER"] = ctx.provider  # cpu in a dry run: the tests run, on CPU
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "tests/test_cuda.py",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t, 1),
        "summary": tail[-1] if tail else "",
        "tail": tail[-40:],
    }


# -- parity -------------------------------------------------------------------------------------


def _per_example(bundle, ctx, provider, examples, suffix=False, **kw):
    from edgezo.zo.params import FlatParams

    params = FlatParams(bundle.manifest.trainable, inplace=True)
    params.load(bundle.initial_trainable())
    runner, ex, collate = loss_runner(bundle, params, ctx, provider, examples, suffix, **kw)
    b = ctx.batch[0]
    losses = [runner.losses(collate(ex[i : i + b]), heldout=True) for i in range(0, len(ex), b)]
    return np.concatenate(losses).astype(np.float64), runner


def stage_parity(ctx: Ctx) -> dict:
    out: dict = {"loss": {}, "training": {}}
    for name in ("default", "lora-all", "full"):
        if name not in ctx.bundles:
            continue
        bundle = _load(ctx.bundles[name])
        held = text_examples(bundle, ctx.data, ctx.batch[1])
        cpu, _ = _per_example(bundle, ctx, "cpu", held)
        row = {"examples": len(held), "heldout_cpu": float(cpu.mean())}
        variants = {"default_options": {}}
        if ctx.provider == "cuda":
            variants["tf32_off"] = {"cuda_options": (("use_tf32", "0"),)}
        for label, kw in variants.items():
            try:
                gpu, runner = _per_example(bundle, ctx, ctx.provider, held, **kw)
            except Exception as e:  # noqa: BLE001 - e.g. an option this build lacks
                row[label] = {"error": f"{type(e).__name__}: {e}"}
                continue
            row[label] = {
                "heldout_gpu": float(gpu.mean()),
                "heldout_abs_diff": abs(float(gpu.mean() - cpu.mean())),
                "per_example_max_abs_diff": float(np.max(np.abs(gpu - cpu))),
                "provider_options": _jsonable(runner.session.get_provider_options()),
            }
        out["loss"][name] = row
    if "default" in ctx.bundles:
        out["training"] = training_parity(ctx)
    return out


def _finetune(ctx: Ctx, bundle: str, provider: str, out: Path) -> dict:
    from edgezo.config import FinetuneConfig
    from edgezo.train import finetune

    cfg = FinetuneConfig(
        bundle=bundle,
        data=ctx.data,
        out=str(out),
        steps=ctx.steps,
        batch_size=ctx.batch[0],
        max_length=ctx.batch[1],
        provider=provider,
        eval_every=0,
        lr=0.2,
        mu=1e-2,
        seed=1,
        autotune=False,
        threads=ctx.threads or None,
    )
    t = time.perf_counter()
    s = finetune(cfg, log=lambda *a: None, progress=False)
    from safetensors.numpy import load_file

    return {
        "summary": {"heldout_before": s.heldout_before, "heldout_after": s.heldout_after},
        "seconds": time.perf_counter() - t,
        "theta": load_file(str(out / "trained.safetensors")),
    }


def training_parity(ctx: Ctx) -> dict:
    """N ZO steps of the default bundle (edgezo finetune, cached prefix) on CPU and the GPU."""
    import shutil
    import tempfile

    from edgezo.zo.ledger import Ledger

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        runs = {
            "cpu": _finetune(ctx, ctx.bundles["default"], "cpu", tmp / "cpu"),
            "gpu": _finetune(ctx, ctx.bundles["default"], ctx.provider, tmp / "gpu"),
            "gpu_again": _finetune(ctx, ctx.bundles["default"], ctx.provider, tmp / "gpu2"),
        }
        a, b, c = (
            np.concatenate([r["theta"][k].ravel() for k in sorted(r["theta"])])
            for r in runs.values()
        )
        bundle = _load(ctx.bundles["default"])
        replayed = bundle.replay(Ledger.read(tmp / "gpu" / "ledger.jsonl"))
        theta_replay = np.concatenate(
            [replayed.params.state_dict()[k].ravel() for k in sorted(runs["gpu"]["theta"])]
        )
        led = {
            k: [
                r["losses"]
                for r in Ledger.read(tmp / d / "ledger.jsonl").records
                if "losses" in r and r.get("g")
            ]
            for k, d in (("cpu", "cpu"), ("gpu", "gpu"))
        }
        step_loss = np.abs(np.array(led["gpu"]) - np.array(led["cpu"]))
        scale = max(float(np.max(np.abs(a))), 1e-30)
        return {
            "steps": ctx.steps,
            "trainable_values": int(a.size),
            "theta_max_abs_diff_cpu_vs_gpu": float(np.max(np.abs(a - b))),
            "theta_max_rel_diff_cpu_vs_gpu": float(np.max(np.abs(a - b)) / scale),
            "theta_bitwise_equal_fraction": float(np.mean(a.view(np.uint32) == b.view(np.uint32))),
            "loss_max_abs_diff_per_evaluation": float(step_loss.max()),
            "heldout_after": {k: r["summary"]["heldout_after"] for k, r in runs.items()},
            "gpu_rerun_bitwise_equal": bool(np.array_equal(b.view(np.uint32), c.view(np.uint32))),
            "replay_on_host_bitwise_equal_gpu": bool(
                np.array_equal(b.view(np.uint32), theta_replay.view(np.uint32))
            ),
            "seconds": {k: r["seconds"] for k, r in runs.items()},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- timing -------------------------------------------------------------------------------------


class Timer:
    """Accumulates seconds per label while wrapping an object's methods."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def wrap(self, obj, method: str, label: str) -> None:
        fn = getattr(obj, method)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t

        setattr(obj, method, timed)


def time_bundle(ctx: Ctx, name: str, device: bool, steps: int) -> dict:
    """Forward and ZO step of one bundle on the GPU provider, host or device perturbation."""
    from edgezo.device_perturb import attach
    from edgezo.zo.engine import EngineSettings, choose_inplace

    bundle = _load(ctx.bundles[name])
    suffix = bool(bundle.manifest.stages)
    rows, seq = ctx.batch
    inplace = False if device else choose_inplace("auto", bundle.manifest.trainable_size * 4)
    engine = bundle.engine(EngineSettings(seed=0, inplace=inplace))
    examples = random_examples(_vocab(bundle), rows, seq)
    runner, ex, collate = loss_runner(
        bundle, engine.params, ctx, ctx.provider, examples, suffix, device_perturbation=device
    )
    batch = collate(ex)
    if device:
        attach(engine, runner)
    timer = Timer()
    timer.wrap(engine.perturber, "to", "perturb")
    timer.wrap(engine.optimizer, "update", "update")
    timer.wrap(runner, "losses", "forwards")
    if not device:
        timer.wrap(runner, "upload_feed", "feed_copy")

    def step(k: int) -> None:
        engine.step(k, 1e-7, 1e-3, lambda: runner.mean_loss(batch))

    step(0)  # warm-up (kernels, raw-direction buffers)
    fwd, st, parts = [], [], []
    for k in range(1, steps + 1):
        engine.perturber.at_theta()
        t = time.perf_counter()
        runner.losses(batch)
        fwd.append(time.perf_counter() - t)
        timer.t.clear()
        t = time.perf_counter()
        step(k)
        st.append(time.perf_counter() - t)
        parts.append(dict(timer.t))
    forward, step_s = statistics.median(fwd), statistics.median(st)
    evals = engine.estimator.evals_per_step
    # the forward above includes the feed copy on the host path: report both
    out = {
        "bundle": name,
        "trainable_values": engine.params.dim,
        "path": "device perturbation"
        if device
        else ("host, in place" if inplace else "host, copy"),
        "graph": "suffix (cached prefix)" if suffix else "full",
        "batch": [rows, seq],
        "forward_s": forward,
        "step_s": step_s,
        "evals_per_step": evals,
        "step_ratio": step_s / (evals * forward),
        "step_breakdown_s": {k: statistics.median(p.get(k, 0.0) for p in parts) for k in parts[0]},
    }
    if not device and runner._device_values:
        copy = _median(runner.upload_feed, ctx.repeats)
        nbytes = engine.params.dim * 4
        out["feed_copy_s"] = copy
        out["feed_copy_gb_s"] = nbytes / copy / 1e9
        out["pure_forward_s"] = forward - copy
        out["step_ratio_vs_pure_forward"] = step_s / (evals * (forward - copy))
    return out


def stage_timing(ctx: Ctx) -> dict:
    out: dict = {"runs": []}
    plan = [
        ("default", False),
        ("default", True),
        ("lora-all", False),
        ("lora-all", True),
        ("full", True),
        ("full", False),
    ]
    for name, device in plan:
        if name not in ctx.bundles:
            continue
        steps = ctx.repeats if not (name == "full" and not device) else max(3, ctx.repeats // 3)
        try:
            out["runs"].append(time_bundle(ctx, name, device, steps))
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
            out["runs"].append(
                {"bundle": name, "device": device, "error": f"{type(e).__name__}: {e}"}
            )
    full = {r["path"]: r for r in out["runs"] if r.get("bundle") == "full" and "error" not in r}
    host = next((r for p, r in full.items() if p.startswith("host")), None)
    if host is not None:
        b = host["step_breakdown_s"]
        out["full_host_dominant"] = max(
            ("host perturbation", b.get("perturb", 0.0) + b.get("update", 0.0)),
            ("feed copy", b.get("feed_copy", 0.0)),
            ("forwards (without the copy)", b.get("forwards", 0.0) - b.get("feed_copy", 0.0)),
            key=lambda kv: kv[1],
        )[0]
    return out


# -- fp16 ---------------------------------------------------------------------------------------


def stage_fp16(ctx: Ctx) -> dict:
    out: dict = {}
    ref = ctx.bundles.get("lora-all")
    half = ctx.bundles.get("lora-all-fp16")
    if not (ref and half):
        return {"skipped": "no fp16 bundle"}
    for label, path in (("fp32", ref), ("fp16", half)):
        bundle = _load(path)
        held = text_examples(bundle, ctx.data, ctx.batch[1])
        try:
            losses, runner = _per_example(bundle, ctx, ctx.provider, held)
        except Exception as e:  # noqa: BLE001 - e.g. a provider without fp16 kernels
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            continue
        batch = runner_batch(bundle, ctx)
        out[label] = {
            "heldout": float(losses.mean()),
            "nan": bool(np.isnan(losses).any()),
            "forward_s": _median(lambda r=runner, b=batch: r.losses(b), ctx.repeats),
        }
    if "heldout" in out.get("fp16", {}) and "heldout" in out.get("fp32", {}):
        out["heldout_rel_diff"] = abs(out["fp16"]["heldout"] / out["fp32"]["heldout"] - 1.0)
        out["speedup"] = out["fp32"]["forward_s"] / out["fp16"]["forward_s"]
    return out


def runner_batch(bundle, ctx: Ctx) -> dict:
    from edgezo.data import collate

    return collate(
        random_examples(_vocab(bundle), *ctx.batch), bundle.manifest.tokenizer.pad_token_id
    )


# -- PyTorch eager ----------------------------------------------------------------------------


def torch_model(ctx: Ctx):
    """The Hugging Face model on the torch device (fp32), from a folder or the GGUF recipe."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = ctx.torch_model
    if "hf_dir" in spec:
        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from gpu_check_pack import load_tensors

        config = AutoConfig.from_pretrained(spec["config"])
        with torch.random.fork_rng(devices=[]):  # from_config draws its (overwritten) init
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_tensors(Path(spec["store"]), Path(spec["index"]))
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(
                f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model.to(ctx.torch_device).eval()


def _torch_graph(ctx: Ctx, bundle, model):
    """edgezo's own loss wrapper (exporters.loss) over ``model`` with the bundle's trainables."""
    import torch

    from exporters.architectures import get_architecture
    from exporters.lora import apply_lora
    from exporters.loss import CausalLMLossGraph

    m = bundle.manifest
    arch = get_architecture(m.architecture["model_type"])
    names = [s.name for s in m.trainable]
    if m.trainable_mode == "lora":
        layers = m.lora.get("layers")
        apply_lora(
            model,
            tuple(m.lora["targets"]),
            int(m.lora["rank"]),
            float(m.lora["alpha"]),
            torch.Generator().manual_seed(0),
            excluded=arch.lora_excluded,
            layers=tuple(layers) if layers else None,
        )
        model.to(ctx.torch_device)
        init = bundle.initial_trainable()
        values = [
            torch.from_numpy(np.ascontiguousarray(init[n])).to(ctx.torch_device) for n in names
        ]
    else:  # full: the model's own parameters (the bundle's initial values are the same)
        own = dict(model.named_parameters())
        values = [own[n].detach() for n in names]
    return CausalLMLossGraph(model, names, arch.pass_position_ids).eval(), values


def _sync(ctx: Ctx) -> None:
    import torch

    if ctx.torch_device == "cuda":
        torch.cuda.synchronize()


def torch_mezo_step(ctx: Ctx, params, loss_fn, seed: int, mu: float = 1e-3, lr: float = 1e-7):
    """One MeZO step (Malladi et al.): z regenerated from a seed, in place, 2 forwards."""
    import torch

    def perturb(scale: float) -> None:
        g = torch.Generator(device=ctx.torch_device).manual_seed(seed)
        for p in params:
            z = torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
            p.add_(z, alpha=scale)

    perturb(mu)
    plus = loss_fn()
    perturb(-2 * mu)
    minus = loss_fn()
    perturb(mu)
    grad = float((plus - minus) / (2 * mu))
    perturb(-lr * grad)


def _torch_timings(ctx: Ctx, graph, params, batch, steps: int) -> dict:
    """Forward (inference mode) and MeZO step of ``graph`` with trainables ``params``."""
    import torch

    def loss():
        with torch.inference_mode():
            return graph(*batch, params)[0].float().mean()

    def fwd():
        r = loss()
        _sync(ctx)
        return r

    step = [0]

    def mezo():
        step[0] += 1
        with torch.inference_mode():
            torch_mezo_step(ctx, params, loss, step[0])
        _sync(ctx)

    out = {"loss_mean": float(fwd()), "forward_s": _median(fwd, ctx.repeats)}
    out["mezo_step_s"] = _median(mezo, steps)
    return out


def stage_torch(ctx: Ctx) -> dict:
    """PyTorch eager on the same device, through edgezo's own loss wrapper (exporters.loss)."""
    import torch

    out: dict = {"device": ctx.torch_device, "torch": torch.__version__}
    if ctx.torch_device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    lora = _load(ctx.bundles["lora-all"])
    ids = runner_batch(lora, ctx)
    batch = [
        torch.from_numpy(ids[k]).to(ctx.torch_device)
        for k in ("input_ids", "attention_mask", "labels")
    ]
    graph, values = _torch_graph(ctx, lora, torch_model(ctx))
    out["lora_all_fp32"] = _torch_timings(ctx, graph, values, batch, ctx.repeats)
    onnx_losses, _ = _per_example(
        lora, ctx, ctx.provider, random_examples(_vocab(lora), *ctx.batch)
    )
    out["lora_all_onnx_loss_mean"] = float(onnx_losses.mean())  # the same batch, the bundle

    def autocast():
        with torch.inference_mode(), torch.autocast(ctx.torch_device, dtype=torch.bfloat16):
            graph(*batch, values)
        _sync(ctx)

    out["lora_all_bf16_autocast_forward_s"] = _median(autocast, ctx.repeats)
    graph.to(torch.bfloat16)
    values16 = [v.to(torch.bfloat16) for v in values]
    out["lora_all_bf16_weights"] = _torch_timings(ctx, graph, values16, batch, ctx.repeats)
    graph = values = values16 = None  # free the LoRA model before loading the full one
    if "full" in ctx.bundles:  # every parameter trained: the same wrapper, all tensors as inputs
        full = _load(ctx.bundles["full"])
        graph, params = _torch_graph(ctx, full, torch_model(ctx))
        out["full_trainable_values"] = int(sum(p.numel() for p in params))
        out["full_fp32"] = _torch_timings(ctx, graph, params, batch, max(3, ctx.repeats // 2))
    return out


STAGES: dict[str, Callable[[Ctx], dict]] = {
    "env": stage_env,
    "tests": stage_tests,
    "timing": stage_timing,
    "parity": stage_parity,
    "fp16": stage_fp16,
    "torch": stage_torch,
}
