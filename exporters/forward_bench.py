"""Forward timings of bundles and of PyTorch eager, measured side by side without interference.

The two frameworks' thread pools slow each other in one process (spinning workers), so each
framework runs in its own child process (``python -m exporters.forward_bench --serve SPEC``),
kept alive for the whole measurement: the parent sends one command at a time on the child's
standard input and reads one JSON line back. Rounds alternate over every side (a side = one
bundle graph, or one PyTorch mode), with a short pause between, so the machine's noise falls
on all alike; each figure is the median over rounds.

Sides:

- ``onnx``: a bundle's ``model.onnx`` (the full-graph forward) or its ``suffix.onnx`` fed the
  batch's cached prefix rows (``graph="suffix"``: what a ZO step evaluates when the frozen
  prefix is cached), CPU provider (or another listed provider), at its initial tensors;
- ``torch``: the source model's own Hugging Face forward with ``labels`` and the bundle's LoRA,
  under ``inference_mode``: ``fp32``, ``autocast`` (bf16 autocast, fp32 weights) or ``bf16``
  (bf16 weights).

Used by ``tools/bench_forward.py`` and ``edgezo compare`` (``exporters/compare.py``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TORCH_MODES = ("fp32", "autocast", "bf16")
PAUSE_S = 0.2  # between sides: lets the previous side's spinning threads go to sleep


@dataclass
class Side:
    label: str
    kind: str  # onnx | torch
    bundle: str
    graph: str = "model"  # onnx: model | suffix
    provider: str = "CPUExecutionProvider"
    mode: str = "fp32"  # torch: fp32 | autocast | bf16
    source: str | None = None  # torch: the source model (folder or .gguf)
    tensors: str | None = None  # trained tensors (safetensors) [default: the bundle's initial]


@dataclass
class Settings:
    batch: int = 8
    seq: int = 64
    threads: int = 2
    seed: int = 0
    heldout: str | None = None  # JSONL of held-out notes (None: no held-out loss)
    heldout_max: int = 64  # notes scored at most
    extra: dict[str, Any] = field(default_factory=dict)


def timing_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def heldout_batches(bundle, path: str, batch: int, limit: int) -> list[dict[str, np.ndarray]]:
    from tokenizers import Tokenizer

    from edgezo.data import eval_batches, read_jsonl, tokenize_for

    tok = Tokenizer.from_file(str(bundle.path / bundle.manifest.tokenizer.file))
    records = read_jsonl(path)[:limit]
    examples = tokenize_for(bundle.manifest, records, tok, 128, where=path)
    pad = bundle.manifest.tokenizer.pad_token_id or 0
    return list(eval_batches(examples, batch, pad))


# -- the children ------------------------------------------------------------------------------


class OnnxSide:
    def __init__(self, side: Side, st: Settings):
        import onnxruntime as ort

        from edgezo.bundle import load_bundle

        self.bundle = b = load_bundle(side.bundle, verify=False)
        self.side = side
        self.st = st
        self.tensors = trainable_values(b, side.tensors)
        self.feeds = timing_batch(int(b.manifest.architecture["vocab_size"]), st.batch, st.seq)
        self.opts = ort.SessionOptions()
        self.opts.intra_op_num_threads = st.threads
        self.opts.log_severity_level = 3
        self.full = self._session(b.model_path)
        if side.graph == "suffix":
            stages = b.manifest.stages
            if not stages:
                raise ValueError(f"bundle {side.bundle} has no frozen-prefix split")
            prefix = self._session(b.path / stages["prefix"])
            self.cached = stages["cached"]
            self.direct = stages["suffix_inputs"]
            rows = prefix.run(self.cached, {k: self.feeds[k] for k in prefix_inputs(prefix)})
            self.suffix_feeds = {
                **dict(zip(self.cached, rows, strict=True)),
                **{k: self.feeds[k] for k in self.direct},
                **self.tensors,
            }
            self.run_path = b.path / stages["suffix"]
            self.run_sess = self._session(self.run_path)
        else:
            self.run_path = b.model_path
            self.run_sess = self.full
            self.suffix_feeds = None

    def _session(self, path: Path, opts=None):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), opts or self.opts, providers=[self.side.provider])
        if self.side.provider not in sess.get_providers():
            raise ValueError(f"{self.side.provider} fell back to {sess.get_providers()}")
        return sess

    def forward(self) -> np.ndarray:
        feeds = self.suffix_feeds or {**self.feeds, **self.tensors}
        return self.run_sess.run(["loss"], feeds)[0]

    def losses(self) -> np.ndarray:
        """Per-example losses of the timing batch on the full graph."""
        return self.full.run(["loss"], {**self.feeds, **self.tensors})[0]

    def heldout(self, batches) -> float:
        losses = [self.full.run(["loss"], {**b, **self.tensors})[0] for b in batches]
        return float(np.concatenate(losses).astype(np.float64).mean())

    def profile(self, runs: int = 3) -> dict[str, float]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.st.threads
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(self.st.extra.get("tmp", ".")) / "ort_profile")
        sess = self._session(self.run_path, opts)  # the graph this side times
        feeds = self.suffix_feeds or {**self.feeds, **self.tensors}
        for _ in range(runs):
            sess.run(["loss"], feeds)
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0))
        total = sum(per_op.values()) or 1.0
        return {k: v / total for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


def trainable_values(bundle, tensors: str | None) -> dict[str, np.ndarray]:
    if tensors is None:
        return bundle.initial_trainable()
    from .handoff import load_tensors

    return load_tensors(bundle, tensors)


def prefix_inputs(sess) -> list[str]:
    return [i.name for i in sess.get_inputs()]


class TorchSide:
    """The source model's own forward with ``labels`` and the bundle's LoRA."""

    _models: dict[tuple[str, str], Any] = {}
    pass_position_ids = True

    def __init__(self, side: Side, st: Settings):
        import torch

        from edgezo.bundle import load_bundle

        self.torch = torch
        self.side = side
        self.bundle = b = load_bundle(side.bundle, verify=False)
        torch.set_num_threads(st.threads)
        self.model = self._model(side, b)
        feeds = timing_batch(int(b.manifest.architecture["vocab_size"]), st.batch, st.seq)
        self.feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def _model(self, side: Side, b):
        import copy

        torch = self.torch
        key = (side.source, "bf16" if side.mode == "bf16" else "fp32")
        if key in self._models:
            return self._models[key]
        base_key = (side.source, "fp32")
        if base_key not in self._models:
            self._models[base_key] = self._load(side.source, b)
        if key != base_key:
            self._models[key] = copy.deepcopy(self._models[base_key]).to(torch.bfloat16)
        return self._models[key]

    def _load(self, source: str, b):
        torch = self.torch
        from safetensors.numpy import load_file

        from .load import load_causal_lm
        from .lora import apply_lora
        from .trainables import FROZEN_LORA_A

        loaded = load_causal_lm(source)
        model = loaded.model.eval()
        TorchSide.pass_position_ids = loaded.arch.pass_position_ids
        m = b.manifest
        if m.trainable_mode == "lora":
            layers = m.lora.get("layers")
            apply_lora(
                model,
                tuple(m.lora["targets"]),
                int(m.lora["rank"]),
                float(m.lora["alpha"]),
                torch.Generator().manual_seed(int(m.exporter.get("seed", 0))),
                excluded=loaded.arch.lora_excluded,
                layers=tuple(layers) if layers else None,
            )
        values = {}
        if (b.path / FROZEN_LORA_A).is_file():
            values.update(load_file(str(b.path / FROZEN_LORA_A)))
        values.update(trainable_values(b, self.side.tensors))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, v in values.items():
                if name in params:
                    params[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
        return model

    def _context(self):
        import contextlib

        torch = self.torch
        if self.side.mode == "autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self) -> float:
        torch = self.torch
        with torch.inference_mode(), self._context():
            out = self.model(**self.feeds, use_cache=False)
        return float(out.loss)

    def _per_example(self, batches) -> np.ndarray:
        """Per-example losses (the bundle's definition: ``exporters.loss``)."""
        torch = self.torch
        from .loss import CausalLMLossGraph

        graph = CausalLMLossGraph(self.model, [], self.pass_position_ids)
        losses = []
        with torch.inference_mode(), self._context():
            for b in batches:
                ids, mask, labels = (
                    torch.as_tensor(b[k]) for k in ("input_ids", "attention_mask", "labels")
                )
                losses.append(graph(ids, mask, labels, [])[0].float().numpy())
        return np.concatenate(losses)

    def losses(self) -> np.ndarray:
        return self._per_example([self.feeds])

    def heldout(self, batches) -> float:
        return float(self._per_example(batches).astype(np.float64).mean())


def serve(spec: dict) -> None:
    """A child: builds its sides, then answers ``time|heldout|profile <label>`` lines."""
    st = Settings(**spec["settings"])
    sides = {}
    for s in spec["sides"]:
        side = Side(**s)
        try:
            sides[side.label] = (OnnxSide if side.kind == "onnx" else TorchSide)(side, st)
            sides[side.label].forward()  # warm-up: arenas, kernel choice
        except Exception as e:  # reported, the other sides go on
            sides[side.label] = f"{type(e).__name__}: {e}"
    print(json.dumps({"ready": {k: (v if isinstance(v, str) else None) for k, v in sides.items()}}))
    sys.stdout.flush()
    batches = None
    for line in sys.stdin:
        cmd, _, label = line.strip().partition(" ")
        if cmd == "quit":
            break
        obj = sides[label]
        try:
            if cmd == "time":
                t = time.perf_counter()
                out = obj.forward()
                reply = {"s": time.perf_counter() - t, "loss": float(np.mean(out))}
            elif cmd == "losses":
                reply = {"losses": [float(x) for x in obj.losses()]}
            elif cmd == "heldout":
                if batches is None:
                    batches = heldout_batches(obj.bundle, st.heldout, st.batch, st.heldout_max)
                reply = {"heldout": obj.heldout(batches)}
            elif cmd == "profile":
                reply = {"profile": obj.profile()}
            else:
                reply = {"error": f"unknown command {cmd!r}"}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply))
        sys.stdout.flush()


# -- the parent --------------------------------------------------------------------------------


class Child:
    def __init__(self, sides: list[Side], st: Settings):
        spec = {"settings": asdict(st), "sides": [asdict(s) for s in sides]}
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporters.forward_bench", "--serve", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        self.failed = self._read()["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a benchmark child exited (code {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, cmd: str, label: str) -> dict:
        self.proc.stdin.write(f"{cmd} {label}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def measure(
    sides: list[Side],
    st: Settings,
    repeats: int = 5,
    profile: bool = False,
    log=None,
    losses: bool = False,
) -> dict:
    """Time every side ``repeats`` rounds, alternating; returns ``{"rows": [...], "notes"}``.

    Each row: label, kind, graph/mode, median_s, times, loss (of the timing batch), losses
    (per example, with ``losses``), heldout (when ``st.heldout``), profile (onnx sides, with
    ``profile``), error (a side that failed).
    """
    groups = {"onnx": [s for s in sides if s.kind == "onnx"]}
    groups["torch"] = [s for s in sides if s.kind == "torch"]
    children = {k: Child(v, st) for k, v in groups.items() if v}
    rows = {
        s.label: {"label": s.label, "kind": s.kind, "graph": s.graph, "mode": s.mode, "times": []}
        for s in sides
    }
    try:
        for child in children.values():
            for label, err in child.failed.items():
                if err:
                    rows[label]["error"] = err
        live = [s for s in sides if "error" not in rows[s.label]]
        for r in range(repeats):
            for s in live if r % 2 == 0 else live[::-1]:
                time.sleep(PAUSE_S)
                reply = children[s.kind].ask("time", s.label)
                if "error" in reply:
                    rows[s.label]["error"] = reply["error"]
                    continue
                rows[s.label]["times"].append(reply["s"])
                rows[s.label]["loss"] = reply["loss"]
            if log:
                log(f"round {r + 1}/{repeats} done")
        if losses:  # per-example losses of the timing batch (full graphs), for parity
            for s in live:
                if s.graph == "model" and "error" not in rows[s.label]:
                    reply = children[s.kind].ask("losses", s.label)
                    rows[s.label]["losses"] = reply.get("losses")
                    if "error" in reply:
                        rows[s.label]["error"] = reply["error"]
        if st.heldout:
            for s in live:
                if s.graph == "model" and "error" not in rows[s.label]:
                    reply = children[s.kind].ask("heldout", s.label)
                    rows[s.label]["heldout"] = reply.get("heldout")
        if profile:
            for s in live:
                if s.kind == "onnx" and "error" not in rows[s.label]:
                    rows[s.label]["profile"] = (
                        children["onnx"].ask("profile", s.label).get("profile")
                    )
    finally:
        for child in children.values():
            child.close()
    out = []
    for s in sides:
        row = rows[s.label]
        row["median_s"] = statistics.median(row["times"]) if row["times"] else None
        out.append(row)
    return {"rows": out, "settings": asdict(st), "repeats": repeats}


def format_rows(result: dict, reference: str | None = None) -> str:
    """The table: median, ratios to each PyTorch row, held-out loss vs the first onnx row's."""
    rows = result["rows"]
    st = result["settings"]
    timed = [r for r in rows if r.get("median_s")]
    torch_rows = [r for r in timed if r["kind"] == "torch"]
    base = next((r for r in rows if r["kind"] == "onnx" and r.get("heldout") is not None), None)
    head = f"{'side':<34} {'median s':>9}"
    head += "".join(f" {'vs ' + r['label'][:14]:>17}" for r in torch_rows)
    head += f" {'held-out':>9} {'vs ' + (base['label'][:10] if base else '-'):>13}"
    lines = [
        f"batch {st['batch']}x{st['seq']}, {st['threads']} threads, medians of "
        f"{result['repeats']} alternating rounds",
        head,
    ]
    for r in rows:
        if not r.get("median_s"):
            lines.append(f"{r['label']:<34} failed: {r.get('error')}")
            continue
        line = f"{r['label']:<34} {r['median_s']:>9.4f}"
        line += "".join(f" {t['median_s'] / r['median_s']:>16.2f}x" for t in torch_rows)
        h = r.get("heldout")
        if h is not None:
            rel = (h / base["heldout"] - 1) * 100 if base else 0.0
            line += f" {h:>9.4f} {rel:>+12.2f}%"
        lines.append(line)
    for r in rows:
        if r.get("profile"):
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(r["profile"].items())[:8])
            lines.append(f"profile {r['label']}: {top}")
    return "\n".join(lines)


def probe_cpu_half_kernels(threads: int = 2, m: int = 512, k: int = 576, n: int = 1536) -> dict:
    """Whether ONNX Runtime's CPU provider runs a ``MatMul`` in float16 / bfloat16, and how
    fast against float32 (one [m, k] x [k, n] GEMM, medians of 5)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = {}
    for name, dtype in (("fp32", TensorProto.FLOAT), ("fp16", TensorProto.FLOAT16)):
        g = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "probe",
            [
                helper.make_tensor_value_info("a", dtype, [m, k]),
                helper.make_tensor_value_info("b", dtype, [k, n]),
            ],
            [helper.make_tensor_value_info("c", dtype, [m, n])],
        )
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        np_dtype = np.float32 if name == "fp32" else np.float16
        try:
            sess = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
            feeds = {"a": np.ones((m, k), np_dtype), "b": np.ones((k, n), np_dtype)}
            sess.run(None, feeds)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t)
            out[name] = {"median_s": statistics.median(times)}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    # bfloat16 MatMul: the ONNX standard allows it; probe whether the CPU provider has a kernel
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "probe",
        [
            helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [m, k]),
            helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [k, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.BFLOAT16, [m, n])],
    )
    try:
        ort.InferenceSession(
            helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        out["bf16"] = {"error": "session created; no numpy bfloat16 feed to time it with"}
    except Exception as e:
        out["bf16"] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    del onnx
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m exporters.forward_bench --serve SPEC (a benchmark child)")
