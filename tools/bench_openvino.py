"""ONNX Runtime's OpenVINO execution provider against the CPU provider on a bundle's
``model.onnx``: median forward time of an 8×64 batch of random tokens (5 alternating rounds) and
the mean loss of each, side by side.

Needs ``onnxruntime-openvino`` in its own environment (it replaces the ``onnxruntime`` wheel)::

    python -m venv /tmp/ov && /tmp/ov/bin/pip install onnxruntime-openvino numpy
    /tmp/ov/bin/python tools/bench_openvino.py BUNDLE

A precision OpenVINO cannot run on the CPU makes ONNX Runtime fall back to the CPU provider; the
row then says so.
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort

b = sys.argv[1]
batch, seq = 8, 64
m = json.load(open(f"{b}/manifest.json"))
rng = np.random.default_rng(0)
vocab = m["architecture"]["vocab_size"]
ids = rng.integers(3, vocab, (batch, seq)).astype(np.int64)
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
for t in m["trainable"]:
    feed[t["name"]] = np.zeros(t["shape"], np.float32)


def sess(provider, opts=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(
        f"{b}/model.onnx",
        so,
        providers=[(provider, opts or {})] if opts is not None else [provider],
    )


sides = {"cpu-ep": sess("CPUExecutionProvider")}
for hint in ["f32", "bf16"]:
    try:
        s = sess(
            "OpenVINOExecutionProvider",
            {
                "device_type": "CPU",
                "precision": "FP32" if hint == "f32" else "BF16",
                "num_of_threads": "2",
            },
        )
        ran = "OpenVINOExecutionProvider" in s.get_providers()
        sides[f"openvino-{hint}" + ("" if ran else " (fell back to the CPU provider)")] = s
    except Exception as e:
        print(hint, "failed", str(e)[:300])
loss = {}
for k, s in sides.items():
    out = s.run(["loss"], feed)[0]
    loss[k] = float(np.mean(out))
    s.run(["loss"], feed)
ts = {k: [] for k in sides}
for _round in range(5):
    for k, s in sides.items():
        t = time.perf_counter()
        s.run(["loss"], feed)
        ts[k].append(time.perf_counter() - t)
base = np.median(ts["cpu-ep"])
for k in sides:
    print(
        f"{k}: median {np.median(ts[k]):.3f} s ({base / np.median(ts[k]):.2f}x cpu-ep)  "
        f"mean loss {loss[k]:.5f} (vs cpu-ep {loss[k] - loss['cpu-ep']:+.2e})"
    )
print("providers:", ort.get_available_providers(), "ort", ort.__version__)
