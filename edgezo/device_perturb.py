"""θ kept on the execution provider's device and perturbed there: feed = θ + c·z in one small
ONNX graph run by the same provider, with z expanded on the device from its raw bits.

On CUDA the host path costs, per evaluation, a pass over θ on the CPU (θ ⊕ c·z into the feed
buffer) and a host-to-device copy of the whole feed; for full fine-tuning (134.5M values,
538 MB) both dwarf a GPU forward. Here θ lives in device buffers; per direction the host only
generates its raw form — Rademacher: ``dim / 8`` bytes of Philox bits; Gaussian / sphere: one
uint16 table index per value and the 65,536-entry value table — and copies that (32× / 2×
fewer bytes than the feed). The graph expands it (a ``Gather`` from a table: ±1 rows for the
bits, the value table for the indices) and computes, per trainable tensor,
``out = θ + (z · float32(c))``: the same two float32 roundings as the host's ``v *= c;
out = x + v``, so the result equals the host path bit for bit (a test checks it on the CPU
provider; ``tools/gpu_check.py`` on CUDA). Directions stay regenerable anywhere: z is still the
counter-based generator's (``edgezo.zo.directions``), only expanded elsewhere.

Two sets of device buffers, A and B, hold θ and the perturbed feed; an update writes
θ + c·z into the feed set and the two swap roles, so θ is never perturbed in place (the
host's copy-mode arithmetic, which replay reproduces). The host master is *not* kept up to
date during steps: :meth:`DeviceParams.pull` copies θ back (checkpoints, the end of a run),
:meth:`DeviceParams.push` sends a changed master.

Supported (checked by :func:`attach`): plain directions (no DAP), ZO-SGD without momentum or
weight decay (clipping is fine), no tensors marked positive (their ``exp`` would not match the
host's bit for bit), copy-mode settings (``EngineSettings.inplace`` false). Building the graph
needs the ``onnx`` package (``pip install onnx``); the runtime otherwise does not.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .errors import ConfigError
from .zo.directions import Directions
from .zo.params import FlatParams
from .zo.perturb import Displacement, Vector, VectorSource

if TYPE_CHECKING:
    from .runner import LossRunner, RuntimeOptions
    from .zo.engine import ZOEngine

DEVICE_TYPES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
_CACHED_DIRECTIONS = 8  # raw directions kept on the device (≥ the q of a step)


def _pm1_rows() -> np.ndarray:
    """[256, 8] float32: row b holds ±1 for bits 0..7 of byte b (little-endian, as unpackbits)."""
    b = np.arange(256, dtype=np.uint8)[:, None]
    bits = np.unpackbits(b, axis=1, bitorder="little")
    return bits.astype(np.float32) * 2.0 - 1.0


def build_apply_graph(params: FlatParams, kind: str) -> bytes:
    """The ONNX model ``out.i = theta.i + z_i · c`` for every trainable tensor i.

    Inputs: ``theta.i`` (float32, tensor i's shape), ``c`` (float32 scalar), and the raw
    direction: ``bits`` (uint8 [ceil(dim/8)]) for Rademacher, or ``indices`` (uint16 [dim]) and
    ``table`` (float32 [65536]) for Gaussian and sphere. z is expanded once (flat), sliced per
    tensor, multiplied by c, added to θ: the order of the host's float32 arithmetic.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ConfigError(
            "device-side perturbation builds a small ONNX graph and needs the onnx package",
            "pip install onnx",
        ) from None
    f32 = TensorProto.FLOAT
    inits = []
    nodes = []
    if kind == "rademacher":
        inputs = [helper.make_tensor_value_info("bits", TensorProto.UINT8, ["nbytes"])]
        inits.append(numpy_helper.from_array(_pm1_rows(), "pm1_rows"))
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
        nodes += [
            helper.make_node("Cast", ["bits"], ["bits32"], to=TensorProto.INT32),
            helper.make_node("Gather", ["pm1_rows", "bits32"], ["z8"], axis=0),
            helper.make_node("Reshape", ["z8", "flat"], ["z"]),
        ]
    else:
        inputs = [
            helper.make_tensor_value_info("indices", TensorProto.UINT16, ["dim"]),
            helper.make_tensor_value_info("table", f32, [65536]),
        ]
        nodes += [
            helper.make_node("Cast", ["indices"], ["indices32"], to=TensorProto.INT32),
            helper.make_node("Gather", ["table", "indices32"], ["z"], axis=0),
        ]
    inputs.append(helper.make_tensor_value_info("c", f32, []))
    inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"))
    outputs = []
    for i, (spec, (a, b)) in enumerate(zip(params.specs, params.offsets, strict=True)):
        shape = list(spec.shape)
        inputs.append(helper.make_tensor_value_info(f"theta.{i}", f32, shape))
        outputs.append(helper.make_tensor_value_info(f"out.{i}", f32, shape))
        inits += [
            numpy_helper.from_array(np.array([a], dtype=np.int64), f"start.{i}"),
            numpy_helper.from_array(np.array([b], dtype=np.int64), f"end.{i}"),
            numpy_helper.from_array(np.array(shape, dtype=np.int64), f"shape.{i}"),
        ]
        nodes += [
            helper.make_node("Slice", ["z", f"start.{i}", f"end.{i}", "axis0"], [f"s.{i}"]),
            helper.make_node("Reshape", [f"s.{i}", f"shape.{i}"], [f"r.{i}"]),
            helper.make_node("Mul", [f"r.{i}", "c"], [f"m.{i}"]),
            helper.make_node("Add", [f"theta.{i}", f"m.{i}"], [f"out.{i}"]),
        ]
    graph = helper.make_graph(nodes, "edgezo_apply", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by every onnxruntime edgezo supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


class DeviceParams:
    """Two sets of per-tensor device buffers (θ and the feed) and the graph that moves between
    them. ``reading`` is the set the loss session reads next; the runner binds both sets once.
    """

    def __init__(self, params: FlatParams, provider: str, options: RuntimeOptions):
        if provider not in DEVICE_TYPES:
            raise ConfigError(
                f"device-side perturbation runs on the CPU or CUDA provider, not {provider}",
                "use provider cpu or cuda, or turn device_perturbation off",
            )
        if params.dim == 0:
            raise ConfigError(
                "device-side perturbation needs trainable tensors; this graph has none",
                "turn device_perturbation off for this session",
            )
        self.params = params
        self.provider = provider
        self.options = options
        self.device = DEVICE_TYPES[provider]
        self.sets: list[list[ort.OrtValue]] = [
            [
                ort.OrtValue.ortvalue_from_shape_and_type(
                    list(s.shape), np.float32, self.device, options.device_id
                )
                for s in params.specs
            ]
            for _ in range(2)
        ]
        self.theta_set = 0
        self.reading = 0
        self.dirs: Directions | None = None
        self._session: ort.InferenceSession | None = None
        self._io: list[ort.IOBinding] = []
        self._raw: OrderedDict[Vector, list[ort.OrtValue]] = OrderedDict()
        self._spare: list[list[ort.OrtValue]] = []
        self.push()

    # -- host <-> device ----------------------------------------------------------------------

    def push(self) -> None:
        """θ on the device := the host master (after the host changed it)."""
        for ov, view in zip(self.sets[self.theta_set], self._views(), strict=True):
            ov.update_inplace(view)
        self.reading = self.theta_set

    def pull(self) -> None:
        """The host master (and feed) := θ on the device, bit for bit."""
        for ov, view in zip(self.sets[self.theta_set], self._views(), strict=True):
            view[...] = ov.numpy()
        self.params.sync_feed()

    def _views(self) -> list[np.ndarray]:
        return list(self.params.views(self.params.master).values())

    # -- the graph ----------------------------------------------------------------------------

    def use(self, dirs: Directions) -> None:
        """Build the apply graph for ``dirs``' kind and bind it to both buffer sets."""
        if dirs.dim != self.params.dim:
            raise ConfigError(
                f"directions of dimension {dirs.dim} do not fit {self.params.dim} trainable values",
                "attach the engine that owns these parameters",
            )
        self.dirs = dirs
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # no fusions: each node is the one float32 operation the host performs
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if self.provider == "CUDAExecutionProvider":
            providers = [
                ("CUDAExecutionProvider", {"device_id": self.options.device_id}),
                "CPUExecutionProvider",
            ]
        model = build_apply_graph(self.params, dirs.kind)
        self._session = ort.InferenceSession(model, so, providers=providers)
        self._io = []
        for src in (0, 1):
            io = self._session.io_binding()
            for i, (a, b) in enumerate(zip(self.sets[src], self.sets[1 - src], strict=True)):
                io.bind_ortvalue_input(f"theta.{i}", a)
                io.bind_ortvalue_output(f"out.{i}", b)
            self._io.append(io)
        self._raw.clear()

    def _raw_values(self, u: Vector) -> list[ort.OrtValue]:
        """u's raw direction on the device (generated on the host once per vector)."""
        if u.extra:
            raise ConfigError(
                "device-side perturbation moves along plain directions only; this estimator "
                "combines several (dap)",
                "use estimator central, onesided, p3 or p4, or turn device_perturbation off",
            )
        if u in self._raw:
            self._raw.move_to_end(u)
            return self._raw[u]
        dirs = self.dirs if u.kind in (None, self.dirs.kind) else None
        if dirs is None:
            raise ConfigError(
                f"device-side perturbation expands {self.dirs.kind} directions, not {u.kind}",
                "turn device_perturbation off for this estimator",
            )
        if dirs.kind == "rademacher":
            host = [dirs.packed_bits(u.step, u.index)]
        else:
            host = [dirs.table_indices(u.step, u.index), dirs.value_table(u.step, u.index)]
        if len(self._raw) >= _CACHED_DIRECTIONS:
            self._spare.append(self._raw.popitem(last=False)[1])
        if self._spare:  # reuse a device buffer rather than allocate one per direction
            values = self._spare.pop()
            for ov, arr in zip(values, host, strict=True):
                ov.update_inplace(arr)
        else:
            values = [
                ort.OrtValue.ortvalue_from_numpy(arr, self.device, self.options.device_id)
                for arr in host
            ]
        self._raw[u] = values
        return values

    def _apply(self, u: Vector, c: float) -> None:
        """feed set := θ set + z(u) · float32(c)."""
        if self._session is None:
            raise ConfigError(
                "the device parameters have no directions yet",
                "call edgezo.device_perturb.attach(engine, runner) before stepping",
            )
        io = self._io[self.theta_set]
        names = ("bits",) if self.dirs.kind == "rademacher" else ("indices", "table")
        for name, ov in zip(names, self._raw_values(u), strict=True):
            io.bind_ortvalue_input(name, ov)
        io.bind_cpu_input("c", np.array(c, dtype=np.float32))
        self._session.run_with_iobinding(io)

    # -- what the perturber and the optimiser call --------------------------------------------

    def perturb(self, u: Vector, c: float) -> None:
        """The next evaluation reads θ + c·u."""
        self._apply(u, c)
        self.reading = 1 - self.theta_set

    def use_theta(self) -> None:
        """The next evaluation reads θ itself (no copy: the loss reads the θ set)."""
        self.reading = self.theta_set

    def move_theta(self, u: Vector, c: float) -> None:
        """θ ← θ + c·u (written into the feed set, which becomes θ)."""
        self._apply(u, c)
        self.theta_set = 1 - self.theta_set
        self.reading = self.theta_set


class DevicePerturber:
    """The :class:`edgezo.zo.perturb.Perturber` interface over :class:`DeviceParams`."""

    def __init__(self, device: DeviceParams, vectors: VectorSource):
        self.device = device
        self.vectors = vectors
        self.params = vectors.params
        self.dirs = vectors.dirs

    def to(self, u: Vector, c: float) -> None:
        self.device.perturb(u, c)

    def reset(self) -> None:
        """Nothing to undo: θ was not touched (the next ``to``/``at_theta`` picks the set)."""

    def release(self) -> None:
        """Like :meth:`reset`: θ is never displaced, so there is no displacement to hand on."""
        return None

    def at_theta(self) -> None:
        self.device.use_theta()


class DeviceSGD:
    """ZO-SGD's update θ ← θ ⊕ (−η g_i / q)·u_i applied on the device (plain SGD only).

    Wraps the engine's host optimiser for its settings (clipping); the coefficient is the
    host's ``-lr * g_i / q`` cast to float32, so θ follows the host path bit for bit.
    """

    name = "sgd"
    fuses_restore = False

    def __init__(self, host, device: DeviceParams):
        self.host = host
        self.device = device

    def update(
        self,
        us: list[Vector],
        g: list[float],
        lr: float,
        displacement: Displacement | None = None,
    ) -> None:
        self.settle(displacement)
        gs = self.host.clipped(g)
        q = len(gs)
        for u, gi in zip(us, gs, strict=True):
            self.device.move_theta(u, -lr * gi / q)

    def settle(self, displacement: Displacement | None) -> None:
        """θ on the device is never displaced (:meth:`DevicePerturber.release` gives None)."""
        if displacement is not None:
            raise ValueError("a device perturbation never leaves θ displaced")

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return 0


def attach(engine: ZOEngine, runner: LossRunner) -> DeviceParams:
    """Move ``engine``'s steps onto ``runner``'s device buffers; returns them.

    ``runner`` must have been made with ``RuntimeOptions(device_perturbation=True)`` over
    ``engine.params``. After this, ``engine.step`` perturbs and updates θ on the device;
    ``engine.params.master`` is stale until :meth:`DeviceParams.pull`.
    """
    dev = runner.device
    if dev is None or dev.params is not engine.params:
        raise ConfigError(
            "the runner keeps no device parameters for this engine",
            "make the LossRunner over engine.params with RuntimeOptions(device_perturbation=True)",
        )
    s = engine.settings
    problems = []
    if s.inplace:
        problems.append("perturbation in place (use perturbation=copy: θ is not moved in place)")
    if s.optimizer != "sgd" or s.momentum or s.weight_decay:
        problems.append(
            f"optimizer {s.optimizer} with momentum {s.momentum:g} and weight decay "
            f"{s.weight_decay:g} (only plain sgd runs on the device)"
        )
    if s.estimator == "dap":
        problems.append("estimator dap (it combines several directions)")
    if engine.params.positive_ranges:
        problems.append("tensors marked positive (their exp would not match the host's)")
    if engine.perturber.vectors.scale is not None:
        problems.append(f"mu_scale {s.mu_scale!r} (per-tensor factors are applied on the host)")
    if problems:
        raise ConfigError(
            "device-side perturbation does not support: " + "; ".join(problems),
            "change those settings, or turn device_perturbation off (the host path runs all)",
        )
    dev.use(engine.dirs)
    dev.push()
    engine.perturber = DevicePerturber(dev, engine.perturber.vectors)
    engine.optimizer = DeviceSGD(engine.optimizer, dev)
    return dev
