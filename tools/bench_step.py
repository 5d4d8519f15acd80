"""Speed and memory of a ZO step against plain inference, measured side by side in one run.

For one bundle and batch shape it prints:

- forward time (median over runs) of the loss graph at θ;
- ZO step time (median over steps): perturbation, 2q forwards, update — forwards and steps
  are timed interleaved in one process, so the shared machine's noise falls on both alike;
- step ratio = step ÷ (forward evaluations per step × forward time): the overhead of ZO
  beyond its forward passes (1.00 = none);
- peak RSS of a fine-tuning process vs an inference-only process on the same bundle and batch,
  each measured in its own fresh child process (``VmHWM``), and their ratio.

With ``--suffix`` the edgezo side runs ``suffix.onnx`` on the batch's cached prefix rows (what
``edgezo finetune`` runs when the bundle caches its frozen prefix) instead of ``model.onnx``.
With ``--torch-mezo`` a third child runs a PyTorch-eager MeZO loop (Malladi et al.: seeded
Gaussian z regenerated from its seed, θ ± μz, two forwards of the model's own forward with
``labels`` under ``inference_mode``, in-place update) on the same trainable tensors (the
bundle's LoRA) and batch, and the ZO steps/s of both are printed side by side.

Usage::

    python tools/bench_step.py --bundle BUNDLE [--batch 8 --seq 64 --threads 2 --steps 10]
        [--suffix] [--torch-mezo [--model SRC]]

The edgezo children never import torch, like the runtime.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))


def _batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def _vocab(bundle) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle.path / bundle.manifest.tokenizer.file)).get_vocab_size()


def child(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: 'infer' (forwards only) or 'finetune' (ZO steps)."""
    from edgezo.bundle import load_bundle
    from edgezo.runner import LossRunner, RuntimeOptions
    from edgezo.zo.engine import EngineSettings, choose_inplace
    from edgezo.zo.params import FlatParams

    if args.child == "mezo":
        return mezo_child(args)
    bundle = load_bundle(args.bundle, verify=False)
    batch = _batch(_vocab(bundle), args.batch, args.seq)
    opts = RuntimeOptions(threads=args.threads)
    out: dict = {"role": args.child}
    graph, batch = _graph(bundle, batch, opts, args.suffix)
    if args.child == "infer":
        params = FlatParams(bundle.manifest.trainable, inplace=True)  # one buffer: θ
        params.load(bundle.initial_trainable())
        runner = LossRunner(graph, params, list(batch), opts)
        runner.losses(batch)  # warm-up
        times = []
        for _ in range(args.forwards):
            t = time.perf_counter()
            runner.losses(batch)
            times.append(time.perf_counter() - t)
        out["forward_s"] = statistics.median(times)
    else:
        trainable_bytes = bundle.manifest.trainable_size * 4
        settings = EngineSettings(
            seed=0,
            direction=args.direction,
            q=args.q,
            momentum=args.momentum,
            inplace=choose_inplace(args.perturbation, trainable_bytes),
        )
        engine = bundle.engine(settings)
        runner = LossRunner(graph, engine.params, list(batch), opts)
        runner.losses(batch)  # warm-up
        engine.step(0, 1e-6, 1e-3, lambda: runner.mean_loss(batch))
        # forwards and steps interleaved, so the machine's noise falls on both alike
        fwd, steps = [], []
        for s in range(1, max(args.steps, args.forwards) + 1):
            if s <= args.forwards:
                t = time.perf_counter()
                runner.losses(batch)
                fwd.append(time.perf_counter() - t)
            if s <= args.steps:
                t = time.perf_counter()
                engine.step(s, 1e-6, 1e-3, lambda: runner.mean_loss(batch))
                steps.append(time.perf_counter() - t)
        out.update(
            forward_s=statistics.median(fwd),
            step_s=statistics.median(steps),
            evals_per_step=engine.estimator.evals_per_step,
            inplace=settings.inplace,
            trainable=engine.params.dim,
        )
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _graph(bundle, batch: dict, opts, suffix: bool):
    """The graph a step runs and its batch inputs: ``model.onnx``, or ``suffix.onnx`` with the
    batch's prefix rows computed once (as ``edgezo.prefix_cache`` caches them)."""
    from edgezo.runner import LossRunner
    from edgezo.train import BATCH_INPUTS
    from edgezo.zo.params import FlatParams

    if not suffix:
        return bundle.model_path, {k: batch[k] for k in BATCH_INPUTS}
    st = bundle.manifest.stages
    if not st:
        sys.exit(f"--suffix: bundle {bundle.path} has no frozen-prefix split")
    prefix = LossRunner(bundle.path / st["prefix"], FlatParams([]), list(TEXT), opts)
    rows = prefix.outputs({k: batch[k] for k in TEXT}, tuple(st["cached"]), heldout=False)
    feeds = dict(zip(st["cached"], rows, strict=True))
    feeds.update({k: batch[k] for k in st["suffix_inputs"]})
    return bundle.path / st["suffix"], feeds


TEXT = ("input_ids", "attention_mask")


def mezo_child(args: argparse.Namespace) -> dict:
    """PyTorch-eager MeZO on the bundle's trainable tensors (the source model's own forward)."""
    import torch

    from edgezo.bundle import load_bundle
    from exporters.forward_bench import Settings, Side, TorchSide

    bundle = load_bundle(args.bundle, verify=False)
    source = args.model or bundle.manifest.architecture.get("source")
    side = TorchSide(
        Side("mezo", "torch", args.bundle, source=source),
        Settings(batch=args.batch, seq=args.seq, threads=args.threads),
    )
    model, feeds = side.model, side.feeds
    params = dict(model.named_parameters())
    theta = [params[s.name] for s in bundle.manifest.trainable]
    mu, lr = 1e-3, 1e-6

    def loss() -> float:
        with torch.inference_mode():
            return float(model(**feeds, use_cache=False).loss)

    def perturb(seed: int, scale: float) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in theta:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=scale)

    def step(s: int) -> None:
        perturb(s, mu)
        plus = loss()
        perturb(s, -2 * mu)
        minus = loss()
        perturb(s, mu)
        perturb(s, -lr * (plus - minus) / (2 * mu))  # θ -= lr · g · z, z from the same seed

    fwd, steps = [], []
    loss()
    step(0)
    for s in range(1, max(args.steps, args.forwards) + 1):
        if s <= args.forwards:
            t = time.perf_counter()
            loss()
            fwd.append(time.perf_counter() - t)
        if s <= args.steps:
            t = time.perf_counter()
            step(s)
            steps.append(time.perf_counter() - t)
    return {
        "role": "mezo",
        "forward_s": statistics.median(fwd),
        "step_s": statistics.median(steps),
        "evals_per_step": 2,
        "trainable": sum(p.numel() for p in theta),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: argparse.Namespace, role: str) -> dict:
    cmd = [sys.executable, __file__, "--child", role]
    for k, v in vars(args).items():
        if k == "child" or v is None or v is False:
            continue
        cmd.append(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {role} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--forwards", type=int, default=10)
    p.add_argument("--q", type=int, default=1)
    p.add_argument("--direction", default="rademacher")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--perturbation", default="auto")
    p.add_argument("--suffix", action="store_true", help="step on suffix.onnx + cached rows")
    p.add_argument("--torch-mezo", action="store_true", help="also a PyTorch-eager MeZO loop")
    p.add_argument("--model", default=None, help="MeZO's source model [default: manifest's]")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    infer = run_child(args, "infer")
    ft = run_child(args, "finetune")
    mezo = run_child(args, "mezo") if args.torch_mezo else None
    ratio = ft["step_s"] / (ft["evals_per_step"] * ft["forward_s"])
    rss_ratio = ft["peak_rss_mb"] / infer["peak_rss_mb"]
    print(
        f"bundle {args.bundle} ({'suffix.onnx on cached rows' if args.suffix else 'model.onnx'})"
        f": batch {args.batch}x{args.seq}, {args.threads} threads, "
        f"{ft['trainable']:,} trainable values, {args.direction}, q={args.q}, "
        f"momentum={args.momentum}, perturbation {'in place' if ft['inplace'] else 'copy'}"
    )
    print(f"  forward (inference process)   {infer['forward_s']:.4f} s")
    print(f"  forward (fine-tuning process) {ft['forward_s']:.4f} s")
    print(
        f"  ZO step                       {ft['step_s']:.4f} s  "
        f"({ft['evals_per_step']} forward evaluations)"
    )
    print(f"  step ratio step/(evals x fwd) {ratio:.3f}")
    print(f"  peak RSS inference            {infer['peak_rss_mb']:.0f} MB")
    print(f"  peak RSS fine-tuning          {ft['peak_rss_mb']:.0f} MB")
    print(f"  RSS ratio fine-tune/inference {rss_ratio:.3f}")
    figures = {}
    if mezo is not None:
        speedup = mezo["step_s"] / ft["step_s"]
        print(
            f"  PyTorch MeZO step             {mezo['step_s']:.4f} s  (2 forwards of "
            f"{mezo['forward_s']:.4f} s, {mezo['trainable']:,} trainable values)"
        )
        print(f"  ZO steps/s edgezo / MeZO      {speedup:.2f}x")
        figures = {"mezo_step_s": mezo["step_s"], "steps_per_s_vs_mezo": speedup}
    print(
        json.dumps(
            {
                **figures,
                "forward_s": ft["forward_s"],
                "step_s": ft["step_s"],
                "step_ratio": ratio,
                "rss_infer_mb": infer["peak_rss_mb"],
                "rss_finetune_mb": ft["peak_rss_mb"],
                "rss_ratio": rss_ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
