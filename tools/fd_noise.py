"""Finite differences against rounding: does a bundle's loss stay smooth in its trainables?

A ZO step estimates a slope from f(θ + μz) − f(θ). In a float32 graph that difference is the
slope times μ plus curvature; in a graph that quantises activations at run time (int8 with
``--precision-scope all``) it is dominated by rounding, whatever μ. For each bundle this prints
one-sided estimates along seeded sphere directions at several μ, against the first bundle's
central estimate at a small μ (the reference slope), on a batch of the sample notes::

    python tools/fd_noise.py --bundle fp32=B_FP32 --bundle int8-all=B_INT8 --mu 1e-3,1e-2,1e-1

Runtime only (numpy, onnxruntime, tokenizers); the full ``model.onnx`` is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgezo.bundle import load_bundle  # noqa: E402
from edgezo.defaults import default_data  # noqa: E402


def batch(bundle, examples: int, tokens: int) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle.path / "tokenizer.json"))
    vocab = int(bundle.manifest.architecture["vocab_size"])
    with open(default_data()[0], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f][:examples]
    rows = [[i for i in tok.encode(t).ids if i < vocab][:tokens] for t in texts]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)}


def measure(
    paths: dict[str, Path],
    mus: list[float],
    directions: int,
    examples: int,
    tokens: int,
    threads: int,
    seed: int,
) -> dict:
    import onnxruntime as ort

    bundles = {k: load_bundle(p) for k, p in paths.items()}
    first = next(iter(bundles.values()))
    specs = [(t.name, tuple(t.shape)) for t in first.manifest.trainable]
    for k, b in bundles.items():
        if [(t.name, tuple(t.shape)) for t in b.manifest.trainable] != specs:
            raise SystemExit(f"{k}: its trainable tensors differ from the first bundle's")
    d = sum(int(np.prod(s)) for _, s in specs)
    rng = np.random.default_rng(seed)
    init = first.initial_trainable()
    theta = np.concatenate([init[n].ravel() for n, _ in specs]).astype(np.float32)
    theta = theta + rng.standard_normal(d).astype(np.float32) * 0.01  # off the LoRA B = 0 point
    dirs = []
    for _ in range(directions):
        u = rng.standard_normal(d)
        dirs.append((u * np.sqrt(d) / np.linalg.norm(u)).astype(np.float32))
    feed0 = batch(first, examples, tokens)

    def feed(x: np.ndarray) -> dict[str, np.ndarray]:
        out, o = dict(feed0), 0
        for n, s in specs:
            k = int(np.prod(s))
            out[n] = x[o : o + k].reshape(s)
            o += k
        return out

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    result: dict = {"dim": d, "directions": directions, "bundles": {}}
    ref = None
    for k, b in bundles.items():
        s = ort.InferenceSession(str(b.model_path), so, providers=["CPUExecutionProvider"])

        def loss(x: np.ndarray, s=s) -> float:
            return float(np.mean(s.run(["loss"], feed(x))[0]))

        if ref is None:  # the reference slope: the first bundle, central, small μ
            h = 1e-3
            ref = np.array([(loss(theta + h * u) - loss(theta - h * u)) / (2 * h) for u in dirs])
            result["reference"] = ref.tolist()
        f0 = loss(theta)
        rows = []
        for mu in mus:
            g = np.array([(loss(theta + mu * u) - f0) / mu for u in dirs])
            err = float(np.sqrt(np.mean((g - ref) ** 2)) / np.sqrt(np.mean(ref**2)))
            rows.append({"mu": mu, "estimates": g.tolist(), "rms_error_rel": err})
        result["bundles"][k] = rows
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", action="append", required=True, help="[LABEL=]PATH, repeatable")
    p.add_argument("--mu", default="1e-3,1e-2,3e-2,1e-1")
    p.add_argument("--directions", type=int, default=4)
    p.add_argument("--examples", type=int, default=4, help="sample notes in the batch")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    paths = {}
    for item in a.bundle:
        label, _, path = item.rpartition("=")
        paths[label or Path(path).name] = Path(path)
    mus = [float(x) for x in a.mu.split(",")]
    r = measure(paths, mus, a.directions, a.examples, a.tokens, a.threads, a.seed)
    ref = np.array(r["reference"])
    print(
        f"{r['dim']:,} trainable values, {a.directions} sphere directions, batch of "
        f"{a.examples} sample notes; reference slope ({next(iter(paths))}, central, μ 1e-3): "
        + " ".join(f"{x:+.4f}" for x in ref)
    )
    print("| bundle | μ | one-sided estimates | RMS error / RMS slope |")
    print("|---|---|---|---|")
    for k, rows in r["bundles"].items():
        for row in rows:
            est = " ".join(f"{x:+.4f}" for x in row["estimates"])
            print(f"| {k} | {row['mu']:g} | {est} | {row['rms_error_rel']:.3g} |")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
