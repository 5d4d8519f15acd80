"""ONNX Runtime session that evaluates the per-example loss at the values in a feed buffer.

CPU provider: every trainable input is bound once, through IOBinding, to an ``OrtValue`` that
shares memory with its view of ``FlatParams.feed``; writing a perturbed point into ``feed`` is
all it takes for the next run to see it (no copies, no per-run feed dictionary of hundreds of
tensors).

CUDA provider: every trainable input is a device buffer bound once; before each run the feed
buffer is copied to the device (:meth:`LossRunner.upload_feed`, one host-to-device copy per
tensor).

``RuntimeOptions.device_perturbation``: θ itself lives in device buffers and is perturbed and
updated there by a small graph (:mod:`edgezo.device_perturb`, attached to the ZO engine); only
a direction's raw bits cross to the device. On the CPU provider the "device" is host memory
owned by ONNX Runtime (the same code path, used to test it).

Micro-batching (``RuntimeOptions.micro_batch``): a batch with more rows than that is run as
consecutive slices of its rows, and the per-example losses are concatenated. The loss of a
batch is the mean of its per-example losses, so a ZO step sees the same mean (ONNX Runtime may
round the last bits of a row differently at another batch shape; see tests/test_limits.py).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .errors import BundleError, ConfigError, EdgezoWarning
from .zo.params import FlatParams

if TYPE_CHECKING:
    from .vocab_subset import VocabSubset

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: CPU flags of int8 dot-product instructions (x86 VNNI / AMX, Arm dot product)
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
_noted: set[str] = set()


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or None where unknown."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def int8_support(flags: set[str] | None = None) -> tuple[bool | None, str]:
    """(whether this CPU has int8 dot-product instructions — None: unknown, the reason)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None, "the CPU's feature flags are unknown (no /proc/cpuinfo)"
    have = [f for f in INT8_FLAGS if f in flags]
    if have:
        return True, f"the CPU has {', '.join(have)}"
    return False, f"the CPU has none of {', '.join(INT8_FLAGS)} (int8 dot-product instructions)"


def saturates_s8(flags: set[str] | None) -> bool:
    """Whether ONNX Runtime's u8 × s8 kernels saturate on this CPU: an x86 CPU without VNNI
    (AVX2 or SSE) multiplies with ``pmaddubsw``, which sums pairs of u8 × s8 products into 16
    bits and clips them (255 · 127 · 2 > 32,767). Full-range s8 weights then give wrong sums;
    weights of at most 63 in magnitude (``s7``) or stored as u8 (``u8``, a u8 × u8 kernel) do
    not. Measured on an AMD EPYC with AVX2 only: a 512×576 × 576×1536 product with s8 weights
    is off by 11% of its largest value, with s7 or u8 weights by 1–2%."""
    if not flags or "sse2" not in flags:  # not x86 (Arm's kernels widen before they add)
        return False
    return not any(f in flags for f in INT8_FLAGS)


def int8_weights_for(flags: set[str] | None) -> str:
    """The int8 weight format for a CPU with these flags: ``s8`` where its int8 kernels are
    exact, else ``u8``."""
    return "u8" if saturates_s8(flags) else "s8"


def precision_note(bundle_dir: Path, flags: set[str] | None = None) -> str | None:
    """Check an int8 bundle in ``bundle_dir`` against this CPU: raise :class:`BundleError` when
    its weights would saturate the CPU's int8 kernels (wrong losses, see :func:`saturates_s8`);
    return a note when the CPU has no int8 dot-product instructions (it runs in ONNX Runtime's
    generic kernels, which may be slower than fp32); None otherwise."""
    try:
        manifest = json.loads((bundle_dir / "manifest.json").read_text())
        precision = manifest.get("precision")
        fmt = (manifest.get("quantization") or {}).get("weights_format", "s8")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(precision, str) or not precision.startswith("int8"):
        return None
    flags = cpu_flags() if flags is None else flags
    if fmt == "s8" and saturates_s8(flags):
        raise BundleError(
            f"bundle {bundle_dir} stores full-range int8 weights ({precision}), which this x86 "
            "CPU without VNNI cannot multiply exactly: ONNX Runtime's u8 x s8 kernels saturate "
            "there, so every loss would be wrong",
            "re-export it on this machine with `edgezo export --precision int8` (its weights "
            "are then stored as u8 for this CPU), or with --precision fp32",
        )
    ok, reason = int8_support(flags)
    if ok is not False or fmt != "s8":
        return None
    return (
        f"bundle {bundle_dir} computes in {precision}, but {reason}: it runs in generic kernels, "
        "which may be slower than fp32; re-export it with `edgezo export --precision fp32` and "
        "compare (`python tools/bench_forward.py`)"
    )


@dataclass(frozen=True)
class RuntimeOptions:
    provider: str | None = "cpu"  # cpu | cuda; None: the first available of ``providers``
    threads: int = 0  # 0: ONNX Runtime's default (all physical cores)
    cpu_arena: bool = True
    gpu_mem_limit_mb: int | None = None  # used where provider_options has no entry (API use)
    device_id: int = 0
    #: a device profile's providers in order of preference; when set (and ``provider`` is
    #: None) the first available one is used, falling back with a note
    providers: tuple[str, ...] = ()
    micro_batch: int | None = None  # most rows per forward call; None: the whole batch
    #: keep θ on the provider's device and perturb it there (edgezo.device_perturb.attach)
    device_perturbation: bool = False
    #: extra CUDA provider options as (key, value) pairs, e.g. (("use_tf32", "0"),)
    cuda_options: tuple[tuple[str, str], ...] = ()
    #: options per provider, ((provider, ((key, value), ...)), ...): a profile's provider_options
    provider_options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


#: providers that take a device_id
_GPU_PROVIDERS = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "TensorrtExecutionProvider",
)


def provider_list(provider: str, options: RuntimeOptions) -> list:
    """ONNX Runtime's ``providers`` argument: the chosen provider with its options (device,
    the profile's options incl. its memory cap), then the CPU provider for the ops it lacks."""
    if provider == "CPUExecutionProvider":
        return ["CPUExecutionProvider"]
    profile = dict(options.provider_options)
    opts: dict[str, str | int] = {}
    if provider in _GPU_PROVIDERS:
        opts["device_id"] = options.device_id
    if provider in profile:
        opts.update(dict(profile[provider]))
    elif provider in ("CUDAExecutionProvider", "ROCMExecutionProvider"):  # no profile
        opts["arena_extend_strategy"] = "kSameAsRequested"
        if options.gpu_mem_limit_mb:
            opts["gpu_mem_limit"] = int(options.gpu_mem_limit_mb) << 20
    if provider == "CUDAExecutionProvider":
        opts.update(dict(options.cuda_options))
    return [(provider, opts) if opts else provider, "CPUExecutionProvider"]


def choose_provider(
    preferred: tuple[str, ...] | list[str], available: list[str] | None = None
) -> tuple[str, str | None]:
    """The first of ``preferred`` this onnxruntime has, and a note when it is not the first."""
    available = list(ort.get_available_providers() if available is None else available)
    for p in preferred:
        if p in available:
            if p == preferred[0]:
                return p, None
            missing = [x for x in preferred[: list(preferred).index(p)]]
            fix = (
                "install onnxruntime-gpu (pip install onnxruntime-gpu) to use the GPU"
                if "CUDAExecutionProvider" in missing
                else "install an onnxruntime build that has it"
            )
            return p, (
                f"{', '.join(missing)} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}); falling back to {p}. To use "
                f"{missing[0]}: {fix}"
            )
    raise ConfigError(
        f"none of the profile's providers {', '.join(preferred)} is available "
        f"(this onnxruntime has: {', '.join(available)})",
        "add CPUExecutionProvider to the profile's providers, or install onnxruntime",
    )


def resolve_provider(name: str) -> str:
    if name not in PROVIDERS:
        raise ConfigError(f"provider {name!r} is unknown", f"use one of: {', '.join(PROVIDERS)}")
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

    def __init__(
        self,
        model_path: Path,
        params: FlatParams,
        batch_inputs: list[str],
        options: RuntimeOptions = RuntimeOptions(),
    ):
        self.params = params
        self.options = options
        self.notes: list[str] = []  # e.g. a provider fallback, for the caller to print
        if options.provider is None and options.providers:
            self.provider, note = choose_provider(options.providers)
            if note:
                self.notes.append(note)
        else:
            self.provider = resolve_provider(options.provider or "cpu")
        self.session = self._open(model_path)
        if self.provider == "CPUExecutionProvider":
            note = precision_note(Path(model_path).parent)
            if note:
                self.notes.append(note)
                if note not in _noted:  # once per process and bundle
                    _noted.add(note)
                    warnings.warn(EdgezoWarning(note), stacklevel=2)
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
        self.model_name = Path(model_path).name
        # (subset, its session, its binding) once use_vocab_subset is called
        self._subset: tuple[VocabSubset, ort.InferenceSession, ort.IOBinding] | None = None
        self.evaluations = 0  # loss evaluations for training steps
        self.eval_evaluations = 0  # loss evaluations for held-out evaluation
        self.forward_calls = 0  # session runs (a micro-batched evaluation makes several)
        self._device_values: list[tuple[ort.OrtValue, np.ndarray]] = []
        self.device = None  # DeviceParams when θ lives on the device
        names = list(params.feed_views())
        if options.device_perturbation:
            from .device_perturb import DeviceParams

            self.device = DeviceParams(params, self.provider, options)
            self._sets_io = [self._bind(names, values) for values in self.device.sets]
        else:
            on_cuda = self.provider == "CUDAExecutionProvider"
            bound = []
            for view in params.feed_views().values():
                if on_cuda:
                    ov = ort.OrtValue.ortvalue_from_numpy(view, "cuda", options.device_id)
                    self._device_values.append((ov, view))
                else:
                    ov = ort.OrtValue.ortvalue_from_numpy(view)  # shares the numpy memory
                bound.append(ov)
            self._bound = bound
            self.io = self._bind(names, bound)

    def _open(self, model_path: Path) -> ort.InferenceSession:
        options = self.options
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = options.cpu_arena
        so.log_severity_level = 3
        providers = provider_list(self.provider, options)
        try:
            return ort.InferenceSession(str(model_path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(
                f"ONNX Runtime cannot load {model_path}: {e}", "re-export the bundle"
            ) from None

    def use_vocab_subset(self, subset: VocabSubset) -> str | None:
        """Run training losses (``losses(heldout=False)``) on ``subset``'s graph from now on;
        held-out losses and other outputs keep this runner's graph. Returns why not, or None.

        The second session binds the same θ buffers, so both see every perturbation."""
        if self.device is not None or self.provider != "CPUExecutionProvider":
            return "it runs on the CPU provider with θ on the host only"
        session = self._open(subset.graph)
        extra = {subset.input: subset.rows, subset.weights_input: subset.log_weights}
        wanted = {i.name for i in self.session.get_inputs()} | set(extra)
        if {i.name for i in session.get_inputs()} != wanted:
            raise BundleError(
                f"{subset.graph.name} does not take the inputs of {self.model_name} plus "
                f"{', '.join(extra)}",
                "re-export the bundle; its graphs come from different exports",
            )
        names = [*self.params.feed_views(), *extra]
        values = [*self._bound, *(ort.OrtValue.ortvalue_from_numpy(v) for v in extra.values())]
        self._subset = (subset, session, self._bind_on(session, names, values))
        return None

    @property
    def vocab_subset(self) -> VocabSubset | None:
        """The subset training losses run over (:meth:`use_vocab_subset`), or None."""
        return None if self._subset is None else self._subset[0]

    def use_whole_vocabulary(self) -> None:
        """Training losses back on this runner's own graph."""
        self._subset = None

    def _bind(self, names: list[str], values: list[ort.OrtValue]) -> ort.IOBinding:
        return self._bind_on(self.session, names, values)

    @staticmethod
    def _bind_on(
        session: ort.InferenceSession, names: list[str], values: list[ort.OrtValue]
    ) -> ort.IOBinding:
        io = session.io_binding()
        for name, ov in zip(names, values, strict=True):
            io.bind_ortvalue_input(name, ov)
        return io

    def upload_feed(self) -> None:
        """CUDA (host perturbation): copy ``params.feed`` to the bound device buffers."""
        for ov, view in self._device_values:
            ov.update_inplace(view)

    def _training_io(self) -> ort.IOBinding:
        """The binding of the loss session whose trainable inputs hold the point to evaluate."""
        if self.device is None:
            self.upload_feed()
            return self.io
        if self.device.dirs is None:
            raise ConfigError(
                "this runner keeps θ on the device but no ZO engine is attached to it",
                "call edgezo.device_perturb.attach(engine, runner) first",
            )
        return self._sets_io[self.device.reading]

    def losses(self, batch: dict[str, np.ndarray], heldout: bool = False) -> np.ndarray:
        """Per-example losses (float32 [batch]) at the current ``params.feed`` (with device
        perturbation: at the point the attached engine set on the device).

        ``heldout`` counts the call as evaluation rather than training work. A batch of more
        rows than ``options.micro_batch`` runs as several forward calls on slices of its rows.
        """
        io = self._training_io()
        session = self.session
        if heldout:
            self.eval_evaluations += 1
        else:
            self.evaluations += 1
            if self._subset is not None:
                subset, session, io = self._subset
                batch = {**batch, "labels": subset.labels(batch["labels"])}
        rows = len(batch[self.batch_inputs[0]])
        micro = self.options.micro_batch or rows
        parts = []
        for a in range(0, rows, micro):
            for name in self.batch_inputs:
                io.bind_cpu_input(name, np.ascontiguousarray(batch[name][a : a + micro]))
            io.bind_output("loss")
            session.run_with_iobinding(io)
            self.forward_calls += 1
            parts.append(io.copy_outputs_to_cpu()[0])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Next-token logits (float32 [batch, vocab]) at each row's last attended position,
        at the current ``params.feed``: the graph's ``next_logits`` output (``edgezo generate``).
        """
        if "next_logits" not in {o.name for o in self.session.get_outputs()}:
            raise BundleError(
                "this bundle's graph has no `next_logits` output (it was exported by an older "
                "edgezo), so it cannot generate text",
                "re-export the bundle with `edgezo export` of this edgezo version",
            )
        return self.outputs(batch, ("next_logits",), heldout=False)[0]

    def outputs(
        self, batch: dict[str, np.ndarray], names: tuple[str, ...], heldout: bool = True
    ) -> list[np.ndarray]:
        """The graph outputs ``names`` at the current ``params.feed`` (evaluation: loss and
        ``logits``/``next_logits``), micro-batched like :meth:`losses`.

        Uses its own binding, so the training path keeps binding ``loss`` alone; never counted
        as training work (``heldout``: counted as a held-out evaluation).
        """
        known = {o.name for o in self.session.get_outputs()}
        missing = [n for n in names if n not in known]
        if missing:
            raise BundleError(
                f"this bundle's graph has no output {', '.join(missing)} "
                f"(outputs: {', '.join(sorted(known))})",
                "re-export the bundle with `edgezo export` of this edgezo version",
            )
        self._training_io()  # uploads the feed / checks the device state
        self.eval_evaluations += int(heldout)
        values = self._bound if self.device is None else self.device.sets[self.device.reading]
        io = self._bind(list(self.params.feed_views()), values)
        rows = len(batch[self.batch_inputs[0]])
        micro = self.options.micro_batch or rows
        parts: list[list[np.ndarray]] = []
        for a in range(0, rows, micro):
            for name in self.batch_inputs:
                io.bind_cpu_input(name, np.ascontiguousarray(batch[name][a : a + micro]))
            for name in names:
                io.bind_output(name)
            self.session.run_with_iobinding(io)
            self.forward_calls += 1
            parts.append(io.copy_outputs_to_cpu())
        return [p[0] if len(parts) == 1 else np.concatenate(p) for p in zip(*parts, strict=True)]

    def mean_loss(self, batch: dict[str, np.ndarray]) -> float:
        return float(np.mean(self.losses(batch), dtype=np.float64))
