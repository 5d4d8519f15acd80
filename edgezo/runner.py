"""ONNX Runtime session that evaluates the per-example loss at the values in a feed buffer.

CPU provider: every trainable input is bound once, through IOBinding, to an ``OrtValue`` that
shares memory with its view of ``FlatParams.feed``; writing a perturbed point into ``feed`` is
all it takes for the next run to see it (no copies, no per-run feed dictionary of hundreds of
tensors).

CUDA provider: every trainable input is a device buffer bound once; before each run the feed
buffer is copied to the device (``update_inplace``), one host-to-device copy per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError, ConfigError
from .params import FlatParams

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class RuntimeOptions:
    provider: str = "cpu"
    threads: int = 0  # 0: ONNX Runtime's default (all physical cores)
    cpu_arena: bool = True
    gpu_mem_limit_mb: int | None = None
    device_id: int = 0


def resolve_provider(name: str) -> str:
    if name not in PROVIDERS:
        raise ConfigError(
            f"provider {name!r} is unknown", f"use one of: {', '.join(PROVIDERS)}"
        )
    full = PROVIDERS[name]
    available = ort.get_available_providers()
    if full not in available:
        raise ConfigError(
            f"the {full} is not available in this onnxruntime build "
            f"(available: {', '.join(available)})",
            "install onnxruntime-gpu for CUDA, or run with --provider cpu",
        )
    return full


class LossRunner:
    """Evaluates ``loss[batch]`` of a bundle's graph at the values in ``params.feed``."""

    def __init__(self, model_path: Path, params: FlatParams, batch_inputs: list[str],
                 options: RuntimeOptions = RuntimeOptions()):
        self.params = params
        self.options = options
        self.provider = resolve_provider(options.provider)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = options.cpu_arena
        so.log_severity_level = 3
        providers: list = ["CPUExecutionProvider"]
        if self.provider == "CUDAExecutionProvider":
            cuda_opts: dict = {"device_id": options.device_id,
                               "arena_extend_strategy": "kSameAsRequested"}
            if options.gpu_mem_limit_mb:
                cuda_opts["gpu_mem_limit"] = int(options.gpu_mem_limit_mb) << 20
            providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(
                f"ONNX Runtime cannot load {model_path}: {e}", "re-export the bundle"
            ) from None
        graph_inputs = {i.name for i in self.session.get_inputs()}
        wanted = set(batch_inputs) | {s.name for s in params.specs}
        if graph_inputs != wanted:
            raise BundleError(
                f"{model_path} inputs do not match its manifest: graph only "
                f"{sorted(graph_inputs - wanted)[:5]}, manifest only "
                f"{sorted(wanted - graph_inputs)[:5]}",
                "re-export the bundle; the manifest and the graph come from different exports",
            )
        self.batch_inputs = list(batch_inputs)
        self.evaluations = 0  # forward calls for training steps
        self.eval_evaluations = 0  # forward calls for held-out evaluation
        self.io = self.session.io_binding()
        self._device_values: list[tuple[ort.OrtValue, np.ndarray]] = []
        self._bound: list[ort.OrtValue] = []
        on_cuda = self.provider == "CUDAExecutionProvider"
        for name, view in params.feed_views().items():
            if on_cuda:
                ov = ort.OrtValue.ortvalue_from_numpy(view, "cuda", options.device_id)
                self._device_values.append((ov, view))
            else:
                ov = ort.OrtValue.ortvalue_from_numpy(view)  # shares the numpy memory
            self._bound.append(ov)
            self.io.bind_ortvalue_input(name, ov)

    def losses(self, batch: dict[str, np.ndarray], heldout: bool = False) -> np.ndarray:
        """Per-example losses (float32 [batch]) at the current ``params.feed``.

        ``heldout`` counts the call as evaluation rather than training work.
        """
        for ov, view in self._device_values:
            ov.update_inplace(view)
        for name in self.batch_inputs:
            self.io.bind_cpu_input(name, batch[name])
        self.io.bind_output("loss")
        self.session.run_with_iobinding(self.io)
        if heldout:
            self.eval_evaluations += 1
        else:
            self.evaluations += 1
        return self.io.copy_outputs_to_cpu()[0]

    def mean_loss(self, batch: dict[str, np.ndarray]) -> float:
        return float(np.mean(self.losses(batch), dtype=np.float64))
