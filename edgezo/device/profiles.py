"""Device profiles: what a run may use on one class of device.

A profile is one YAML file in ``devices/`` (``devices/jetson-orin-nano.yaml``) that becomes one
validated :class:`DeviceProfile`: the memory budget for the edgezo process, the ONNX Runtime
execution providers in order of preference, threads, batch and sequence caps, the preferred
bundle precision and the per-session budgets (forward evaluations, wall-clock seconds). Its
``detect`` hints let :mod:`edgezo.device.detect` suggest it for the machine it runs on.

``--device`` accepts a profile name, a path to your own YAML file, or a family (``jetson``):
:func:`load_profile` resolves all three. Loading goes through :func:`edgezo.configio.from_dict`,
so unknown keys are rejected with a did-you-mean and every error names the field and the fix.

Memory figures are MiB (what ``free -m`` shows).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..configio import from_dict, load_yaml
from ..errors import ConfigError

#: Environment variable naming a folder of profiles to use instead of the shipped ``devices/``.
DEVICES_DIR_ENV = "EDGEZO_DEVICES_DIR"

PRECISIONS = ("fp32", "int8", "int4")

#: Execution provider names ONNX Runtime knows (``onnxruntime.get_all_providers()`` plus a few
#: that older or vendor builds ship). Kept static so loading a profile never imports onnxruntime.
KNOWN_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
    "VitisAIExecutionProvider",
    "QNNExecutionProvider",
    "NnapiExecutionProvider",
    "VSINPUExecutionProvider",
    "JsExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "RknpuExecutionProvider",
    "WebNNExecutionProvider",
    "WebGpuExecutionProvider",
    "XnnpackExecutionProvider",
    "CANNExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "AzureExecutionProvider",
    "CPUExecutionProvider",
)

#: Providers that allocate in GPU memory: a profile listing one must set ``gpu_memory_mb``.
GPU_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
    "WebGpuExecutionProvider",
)

_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class DetectHints:
    """How :func:`edgezo.device.detect.suggest_profile` recognises a machine this profile suits.

    A profile matches a machine when every hint it sets holds; a profile that sets none is
    only ever used by name.
    """

    model: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "substrings of the board model (/proc/device-tree/model), case-insensitive; "
            'e.g. ["Orin Nano"]'
        },
    )
    gpu_name: tuple[str, ...] = field(
        default=(),
        metadata={"help": 'substrings of a discrete NVIDIA GPU name, e.g. ["RTX 4090"]'},
    )
    discrete_gpu: bool | None = field(
        default=None,
        metadata={"help": "true: needs a discrete NVIDIA GPU; false: needs none; null: either"},
    )
    memory_mb: tuple[int | None, ...] | None = field(
        default=None,
        metadata={
            "help": "[min, max] total system memory in MiB, inclusive; null for an open bound"
        },
    )
    fallback: bool = field(
        default=False,
        metadata={"help": "suggest this profile when no other profile matches the machine"},
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        for key in ("model", "gpu_name"):
            for s in getattr(self, key):
                if not isinstance(s, str) or not s.strip():
                    problems.append(f"detect.{key} holds {s!r}; write non-empty strings")
        if self.memory_mb is not None:
            r = self.memory_mb
            if len(r) != 2:
                problems.append(
                    f"detect.memory_mb is {list(r)}; write [min, max] in MiB, null for no bound"
                )
            elif any(v is not None and v < 0 for v in r):
                problems.append(f"detect.memory_mb is {list(r)}; bounds must be >= 0")
            elif r[0] is not None and r[1] is not None and r[0] > r[1]:
                problems.append(f"detect.memory_mb is {list(r)}; write the smaller bound first")
        if problems:
            raise ConfigError("\n".join(problems), "fix the detect hints named above")

    @property
    def is_empty(self) -> bool:
        """True when no hint is set (the profile is only used by name)."""
        return not (
            self.model
            or self.gpu_name
            or self.discrete_gpu is not None
            or self.memory_mb is not None
            or self.fallback
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready values (only the hints that are set)."""
        out: dict[str, Any] = {}
        if self.model:
            out["model"] = list(self.model)
        if self.gpu_name:
            out["gpu_name"] = list(self.gpu_name)
        if self.discrete_gpu is not None:
            out["discrete_gpu"] = self.discrete_gpu
        if self.memory_mb is not None:
            out["memory_mb"] = list(self.memory_mb)
        if self.fallback:
            out["fallback"] = True
        return out


def _check_provider_options(bad, options, providers: list) -> None:
    """provider_options: a mapping from a listed provider to scalar option values."""
    if not isinstance(options, dict):
        bad(
            f"provider_options is {type(options).__name__}, not a mapping",
            "write it as {ProviderName: {option: value}}",
        )
        return
    for name, opts in options.items():
        if name not in providers:
            bad(
                f"provider_options names {name!r}, which providers does not list",
                f"use one of {', '.join(map(str, providers))}, or add {name} to providers",
            )
        if not isinstance(opts, dict):
            bad(
                f"provider_options.{name} is {type(opts).__name__}, not a mapping",
                "write it as {option: value}",
            )
            continue
        for k, v in opts.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                bad(
                    f"provider_options.{name}.{k} is {v!r}; options are names with a "
                    "string or number value",
                    "write the value as ONNX Runtime documents it, e.g. '1' or HEURISTIC",
                )
            elif k in ("gpu_mem_limit", "trt_max_workspace_size", "device_id"):
                bad(
                    f"provider_options.{name}.{k} is set by edgezo",
                    "use gpu_memory_mb for the memory limit (device_id comes from the runtime)",
                )


@dataclass(frozen=True)
class DeviceProfile:
    """The caps and budgets of one device class; one YAML file in ``devices/``."""

    name: str = field(metadata={"help": "profile name, the file name without .yaml"})
    description: str = field(metadata={"help": "one line: the device and what the caps assume"})
    family: str = field(
        metadata={"help": "device family, e.g. jetson, laptop, desktop, raspberry-pi"}
    )
    memory_budget_mb: int = field(
        metadata={
            "help": "MiB the edgezo process may use (CPU RAM; on unified-memory boards all of "
            "it), leaving headroom for the OS and other apps"
        }
    )
    providers: tuple[str, ...] = field(
        metadata={
            "help": "ONNX Runtime execution providers in order of preference, ending with "
            "CPUExecutionProvider"
        }
    )
    gpu_memory_mb: int | None = field(
        default=None,
        metadata={
            "help": "MiB the GPU provider may allocate (its arena limit); null for CPU-only. On "
            "unified memory this is a share of memory_budget_mb"
        },
    )
    provider_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "options per execution provider, as ONNX Runtime names them, e.g. "
            "{CUDAExecutionProvider: {cudnn_conv_algo_search: HEURISTIC}}; each key must be one "
            "of providers. gpu_memory_mb already sets the CUDA/ROCm arena limit"
        },
    )
    unified_memory: bool = field(
        default=False,
        metadata={
            "help": "CPU and GPU share one memory (Jetson): gpu_memory_mb counts against "
            "memory_budget_mb"
        },
    )
    threads: int = field(
        default=0, metadata={"help": "ONNX Runtime intra-op threads; 0 = all cores"}
    )
    cpu_arena: bool = field(
        default=True,
        metadata={"help": "ONNX Runtime CPU memory arena: ~20% faster, ~200 MB more memory"},
    )
    max_batch_size: int = field(
        default=8, metadata={"help": "largest batch run in one forward; larger ones micro-batch"}
    )
    max_seq_len: int = field(default=512, metadata={"help": "longest sequence, in tokens"})
    precision: Literal["fp32", "int8", "int4"] = field(
        default="fp32", metadata={"help": "preferred bundle precision: fp32, int8 or int4"}
    )
    eval_budget: int | None = field(
        default=None,
        metadata={"help": "forward evaluations per session; null = unlimited"},
    )
    time_budget_s: float | None = field(
        default=None,
        metadata={"help": "wall-clock seconds per session; null = unlimited"},
    )
    checkpoint_every: int = field(
        default=100, metadata={"help": "steps between checkpoints of the trained tensors"}
    )
    detect: DetectHints = field(
        default_factory=DetectHints,
        metadata={"help": "hints for `edgezo devices --detect` (see docs/guides/devices.md)"},
    )
    source: Path | None = field(
        default=None,
        init=False,
        compare=False,
        repr=False,
        metadata={"help": "the YAML file this profile was loaded from, if any"},
    )

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []

        def bad(what: str, fix: str) -> None:
            problems.append((what, fix))

        if isinstance(self.detect, dict) or self.detect is None:
            try:
                hints = from_dict(DetectHints, self.detect or {}, where="detect")
            except ConfigError as e:
                bad(e.what, e.fix or "fix the detect hints")
                hints = DetectHints()
            object.__setattr__(self, "detect", hints)
        if isinstance(self.providers, list):
            object.__setattr__(self, "providers", tuple(self.providers))
        if self.provider_options is None:
            object.__setattr__(self, "provider_options", {})

        if not isinstance(self.name, str) or not _SLUG.match(self.name):
            bad(
                f"name {self.name!r} is not a valid profile name",
                "use lowercase letters, digits, '-', '_' or '.', e.g. my-board",
            )
        if not isinstance(self.description, str) or not self.description.strip():
            bad("description is empty", "say in one line which device this is for")
        if not isinstance(self.family, str) or not _SLUG.match(self.family):
            bad(
                f"family {self.family!r} is not a valid family name",
                "use a lowercase word such as jetson, laptop, desktop or raspberry-pi",
            )
        _positive_int(
            bad,
            "memory_budget_mb",
            self.memory_budget_mb,
            "set the MiB edgezo may use, e.g. 60% of the machine's memory",
        )
        if self.gpu_memory_mb is not None:
            _positive_int(
                bad,
                "gpu_memory_mb",
                self.gpu_memory_mb,
                "set the MiB the GPU provider may use, or null for CPU-only",
            )

        providers = list(self.providers)
        if not providers:
            bad("providers is empty", "list at least CPUExecutionProvider")
        for i, p in enumerate(providers):
            if p not in KNOWN_PROVIDERS:
                guess = _provider_guess(p)
                hint = f" (did you mean {guess!r}?)" if guess else ""
                bad(
                    f"providers[{i}] {p!r} is not an ONNX Runtime execution provider{hint}",
                    "use names as onnxruntime.get_available_providers() prints them: "
                    + ", ".join(("CUDAExecutionProvider", "CPUExecutionProvider", "...")),
                )
        dupes = sorted({p for p in providers if providers.count(p) > 1})
        if dupes:
            bad(f"providers lists {', '.join(dupes)} more than once", "list each provider once")
        if providers and providers[-1] != "CPUExecutionProvider":
            bad(
                f"providers ends with {providers[-1]!r}, not CPUExecutionProvider",
                "add CPUExecutionProvider last: it runs the ops other providers lack",
            )
        _check_provider_options(bad, self.provider_options, providers)
        gpu = [p for p in providers if p in GPU_PROVIDERS]
        unknown = [p for p in providers if p not in KNOWN_PROVIDERS]
        if gpu and self.gpu_memory_mb is None:
            bad(
                f"gpu_memory_mb is null but providers lists {gpu[0]}",
                "set gpu_memory_mb to the MiB the GPU provider may use, or drop the GPU provider",
            )
        if not gpu and not unknown and self.gpu_memory_mb is not None:
            bad(
                f"gpu_memory_mb is {self.gpu_memory_mb} but providers lists no GPU provider",
                "set gpu_memory_mb: null for a CPU-only profile, or add e.g. CUDAExecutionProvider",
            )
        if (
            self.unified_memory
            and _is_int(self.gpu_memory_mb)
            and _is_int(self.memory_budget_mb)
            and self.gpu_memory_mb > self.memory_budget_mb  # type: ignore[operator]
        ):
            bad(
                f"gpu_memory_mb ({self.gpu_memory_mb}) exceeds memory_budget_mb "
                f"({self.memory_budget_mb}) on unified memory",
                "on unified memory the GPU share comes out of memory_budget_mb: lower it",
            )

        if not _is_int(self.threads) or self.threads < 0:
            bad(
                f"threads is {self.threads!r}; it must be 0 or more",
                "use 0 for all cores or a count",
            )
        _positive_int(bad, "max_batch_size", self.max_batch_size, "use 1 or more")
        _positive_int(bad, "max_seq_len", self.max_seq_len, "use 1 or more tokens")
        if self.precision not in PRECISIONS:
            bad(
                f"precision is {self.precision!r}, not one of {', '.join(PRECISIONS)}",
                "use fp32 for a full-precision bundle, int8 or int4 for a quantised one",
            )
        if self.eval_budget is not None:
            _positive_int(
                bad,
                "eval_budget",
                self.eval_budget,
                "use a positive number of forward calls, or null for unlimited",
            )
        if self.time_budget_s is not None and not (
            isinstance(self.time_budget_s, (int, float))
            and not isinstance(self.time_budget_s, bool)
            and self.time_budget_s > 0
        ):
            bad(
                f"time_budget_s is {self.time_budget_s!r}",
                "use a positive number of seconds, or null for unlimited",
            )
        _positive_int(bad, "checkpoint_every", self.checkpoint_every, "use 1 or more steps")
        if not isinstance(self.cpu_arena, bool):
            bad(f"cpu_arena is {self.cpu_arena!r}", "use true or false")
        if not isinstance(self.unified_memory, bool):
            bad(f"unified_memory is {self.unified_memory!r}", "use true or false")

        if len(problems) == 1:
            raise ConfigError(*problems[0])
        if problems:
            raise ConfigError(
                f"{len(problems)} problems\n"
                + "\n".join(f"  {what}\n    fix: {fix}" for what, fix in problems),
                "fix each field named above",
            )

    # -- views ---------------------------------------------------------------------------------

    @property
    def uses_gpu(self) -> bool:
        """True when a GPU provider is listed."""
        return any(p in GPU_PROVIDERS for p in self.providers)

    def to_dict(self) -> dict[str, Any]:
        """Plain values in file order, ready for ``yaml.safe_dump``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            if f.name == "detect":
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def with_overrides(self, overrides: dict[str, Any], where: str = "--device") -> DeviceProfile:
        """A copy with ``overrides`` (e.g. from ``key=value`` on the command line) applied.

        Unknown keys and bad values raise :class:`ConfigError` as when loading a file.
        """
        merged = {**self.to_dict(), **overrides}
        out = from_dict(DeviceProfile, merged, where=f"{where} {self.name}")
        object.__setattr__(out, "source", self.source)
        return out

    def session_options(self) -> dict[str, dict[str, str]]:
        """Each listed provider's ONNX Runtime options: the memory cap ``gpu_memory_mb`` sets
        (an arena that grows only by what is requested, so the cap holds), then the profile's
        own ``provider_options``. The one place a profile becomes provider options."""
        out: dict[str, dict[str, str]] = {}
        for p in self.providers:
            opts: dict[str, str] = {}
            if p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider"):
                if self.gpu_memory_mb is not None:
                    opts["gpu_mem_limit"] = str(self.gpu_memory_mb * 2**20)
                opts["arena_extend_strategy"] = "kSameAsRequested"
            elif p == "TensorrtExecutionProvider" and self.gpu_memory_mb is not None:
                opts["trt_max_workspace_size"] = str(self.gpu_memory_mb * 2**20)
            for k, v in (self.provider_options.get(p) or {}).items():
                opts[k] = str(int(v)) if isinstance(v, bool) else str(v)
            out[p] = opts
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(bad: Any, name: str, value: Any, fix: str) -> None:
    if not _is_int(value) or value <= 0:
        bad(f"{name} is {value!r}; it must be a positive integer", fix)


def _provider_guess(p: Any) -> str | None:
    if not isinstance(p, str):
        return None
    for cand in (p, p + "ExecutionProvider", p.replace("Provider", "ExecutionProvider")):
        for known in KNOWN_PROVIDERS:
            if cand.lower() == known.lower():
                return known
    close = difflib.get_close_matches(p, KNOWN_PROVIDERS, n=1, cutoff=0.6)
    return close[0] if close else None


# -- finding and loading profiles ------------------------------------------------------------------


def profiles_dir() -> Path:
    """The folder of shipped profiles.

    Looked up in order: ``$EDGEZO_DEVICES_DIR``; ``devices/`` beside the package in a source
    checkout or editable install; ``edgezo/devices/`` inside an installed package; and
    ``<prefix>/share/edgezo/devices``. Raises :class:`ConfigError` when none holds profiles.
    """
    env = os.environ.get(DEVICES_DIR_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise ConfigError(
                f"{DEVICES_DIR_ENV}={env} is not a folder",
                "point it at a folder of device profile YAML files, or unset it",
            )
        return p
    here = Path(__file__).resolve().parent.parent  # the edgezo package
    candidates = []
    if (here.parent / "pyproject.toml").is_file():  # source checkout / editable install
        candidates.append(here.parent / "devices")
    candidates += [here / "devices", Path(sys.prefix) / "share" / "edgezo" / "devices"]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.yaml")):
            return c
    raise ConfigError(
        "no device profiles found (looked in " + ", ".join(str(c) for c in candidates) + ")",
        f"reinstall edgezo, set {DEVICES_DIR_ENV} to a folder of profile YAMLs, "
        "or pass --device path/to/profile.yaml",
    )


def profile_names(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the profiles in ``directory`` (default :func:`profiles_dir`), without loading."""
    d = Path(directory) if directory is not None else profiles_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


def load_profile_file(path: str | os.PathLike) -> DeviceProfile:
    """Load one profile YAML file; errors name the file, the field and the fix."""
    path = Path(path)
    data = load_yaml(path)
    profile = from_dict(DeviceProfile, data, where=f"{path}: profile")
    object.__setattr__(profile, "source", path)
    return profile


def list_profiles(directory: str | os.PathLike | None = None) -> list[DeviceProfile]:
    """Every profile in ``directory`` (default :func:`profiles_dir`), sorted by name.

    A file whose ``name`` differs from its file name is an error: ``--device NAME`` finds
    profiles by file name.
    """
    d = Path(directory) if directory is not None else profiles_dir()
    out = []
    for path in sorted(d.glob("*.yaml")):
        profile = load_profile_file(path)
        if profile.name != path.stem:
            raise ConfigError(
                f"{path}: name is {profile.name!r} but the file is {path.name}",
                f"rename the file to {profile.name}.yaml or set name: {path.stem}",
            )
        out.append(profile)
    return out


def families(profiles: list[DeviceProfile]) -> dict[str, list[DeviceProfile]]:
    """Profiles grouped by family, each group smallest memory budget first."""
    out: dict[str, list[DeviceProfile]] = {}
    for p in sorted(profiles, key=lambda p: (p.memory_budget_mb, p.name)):
        out.setdefault(p.family, []).append(p)
    return out
