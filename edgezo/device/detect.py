"""Inspect the current machine and suggest a device profile, without torch.

Probes, each optional and each injectable so tests can fake any machine:

- board: ``/proc/device-tree/model`` (Jetson, Raspberry Pi and other device-tree boards) and
  ``/etc/nv_tegra_release`` (any Jetson, with its L4T release), read under ``root``;
- laptop or not: ``/sys/class/dmi/id/chassis_type`` and ``psutil.sensors_battery()``;
- NVIDIA GPUs: NVML through ``pynvml`` (the ``nvidia-ml-py`` package) when importable, else
  ``nvidia-smi --query-gpu=name,memory.total`` when on PATH;
- CPU cores and memory: ``psutil``;
- ONNX Runtime's ``get_available_providers()``.

:func:`detect_machine` gathers a :class:`MachineInfo`; :func:`suggest_profile` picks a profile
and says why. How profiles are matched is in ``docs/guides/devices.md``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .profiles import DeviceProfile, list_profiles

#: Files naming the board, relative to ``root``; the first readable one wins.
MODEL_FILES = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")
TEGRA_RELEASE_FILE = "etc/nv_tegra_release"
CHASSIS_FILE = "sys/class/dmi/id/chassis_type"
#: SMBIOS chassis types of portable machines: portable, laptop, notebook, sub-notebook,
#: convertible, detachable.
LAPTOP_CHASSIS = frozenset({8, 9, 10, 14, 31, 32})

#: A profile fits a machine when its memory budget is at most this share of the machine's memory
#: (and, for a discrete GPU, its GPU budget at most ``GPU_FIT`` of the card's memory).
MEMORY_FIT = 0.75
GPU_FIT = 0.9
#: The budgets suggested when the chosen profile does not fit.
MEMORY_SUGGEST = 0.6
GPU_SUGGEST = 0.8

MIB = 2**20


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML or nvidia-smi reports it."""

    name: str
    memory_mb: int | None = None
    integrated: bool = False  # a Jetson's GPU shares the board's memory


@dataclass(frozen=True)
class MachineInfo:
    """What detection found; ``None`` where a probe was unavailable."""

    board_model: str | None = None
    tegra_release: str | None = None
    cpu_cores: int | None = None
    physical_cores: int | None = None
    memory_mb: int | None = None
    gpus: tuple[GpuInfo, ...] = ()
    gpu_source: str | None = None
    providers: tuple[str, ...] | None = None
    is_laptop: bool | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_jetson(self) -> bool:
        """A Jetson: L4T is installed or the board model names one."""
        if self.tegra_release:
            return True
        m = (self.board_model or "").lower()
        return "jetson" in m or bool(re.search(r"\b(orin|thor|xavier)\b", m))

    @property
    def is_raspberry_pi(self) -> bool:
        """A Raspberry Pi, from the board model."""
        return "raspberry pi" in (self.board_model or "").lower()

    @property
    def is_board(self) -> bool:
        """A single-board computer or module (device tree or L4T present)."""
        return bool(self.board_model or self.tegra_release)

    @property
    def discrete_gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs with their own memory (not a Jetson's integrated GPU)."""
        return tuple(g for g in self.gpus if not g.integrated)

    @property
    def family(self) -> str | None:
        """``jetson``, ``raspberry-pi``, ``laptop`` or ``desktop``; ``None`` for another board."""
        if self.is_jetson:
            return "jetson"
        if self.is_raspberry_pi:
            return "raspberry-pi"
        if self.is_board:
            return None
        return "laptop" if self.is_laptop else "desktop"

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) rows for a person to read."""
        rows = []
        board = self.board_model or ("a Jetson (model unknown)" if self.is_jetson else "-")
        if self.tegra_release:
            board += f"  ({self.tegra_release})"
        rows.append(("board", board))
        rows.append(("family", self.family or "unknown"))
        if self.cpu_cores:
            phys = f" ({self.physical_cores} physical)" if self.physical_cores else ""
            rows.append(("CPU", f"{self.cpu_cores} cores{phys}"))
        else:
            rows.append(("CPU", "unknown"))
        rows.append(("memory", f"{self.memory_mb:,} MiB" if self.memory_mb else "unknown"))
        if self.gpus:
            for g in self.gpus:
                mem = f", {g.memory_mb:,} MiB" if g.memory_mb else ""
                kind = ", integrated" if g.integrated else ""
                rows.append(("GPU", f"{g.name}{mem}{kind}  [{self.gpu_source}]"))
        else:
            rows.append(("GPU", "no NVIDIA GPU found"))
        prov = ", ".join(self.providers) if self.providers is not None else "onnxruntime missing"
        rows.append(("ORT providers", prov))
        for n in self.notes:
            rows.append(("note", n))
        return rows


# -- probes -------------------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    text = text.replace("\x00", "").strip()
    return text or None


def read_board_model(root: Path = Path("/")) -> str | None:
    """The device-tree model string (``NVIDIA Jetson Orin Nano Developer Kit``), if any."""
    for rel in MODEL_FILES:
        text = _read_text(root / rel)
        if text:
            return text
    return None


def read_tegra_release(root: Path = Path("/")) -> str | None:
    """The L4T release from ``/etc/nv_tegra_release``, e.g. ``L4T R36.4.0``; None off Jetson."""
    text = _read_text(root / TEGRA_RELEASE_FILE)
    if text is None:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if m:
        return f"L4T R{m.group(1)}.{m.group(2)}"
    return "L4T " + text.splitlines()[0].lstrip("# ").strip()


def read_chassis_laptop(root: Path = Path("/")) -> bool | None:
    """True when the SMBIOS chassis type is a portable one; None when unknown."""
    text = _read_text(root / CHASSIS_FILE)
    if text is None or not text.isdigit():
        return None
    return int(text) in LAPTOP_CHASSIS


def has_battery() -> bool | None:
    """True when psutil sees a battery, False when it sees none, None when it cannot tell."""
    try:
        import psutil

        return psutil.sensors_battery() is not None
    except Exception:  # noqa: BLE001 - missing psutil, unsupported platform, odd sysfs
        return None


def cpu_counts() -> tuple[int | None, int | None]:
    """(logical, physical) core counts."""
    try:
        import psutil

        return psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)
    except ImportError:
        import os

        return os.cpu_count(), None


def total_memory_mb() -> int | None:
    """Total system memory in MiB (what ``free -m`` shows)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total // MIB)
    except Exception:  # noqa: BLE001
        return None


def ort_providers() -> tuple[str, ...] | None:
    """``onnxruntime.get_available_providers()``; None when onnxruntime cannot be imported."""
    try:
        import onnxruntime

        return tuple(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001
        return None


def query_nvml() -> list[GpuInfo] | None:
    """GPUs through NVML (``pip install nvidia-ml-py``); None when NVML is unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            if isinstance(name, bytes):
                name = name.decode()
            try:
                mem: int | None = int(pynvml.nvmlDeviceGetMemoryInfo(h).total // MIB)
            except Exception:  # noqa: BLE001 - integrated GPUs may not report memory
                mem = None
            gpus.append(GpuInfo(name=str(name), memory_mb=mem))
        return gpus
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader`` output."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, mem = line.rpartition(",")
        if not name:
            name, mem = mem, ""
        m = re.search(r"(\d+)\s*(MiB|GiB)?", mem)
        memory = None
        if m:
            memory = int(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)
        gpus.append(GpuInfo(name=name.strip(), memory_mb=memory))
    return gpus


def query_nvidia_smi(
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    which: Callable[[str], str | None] = shutil.which,
) -> list[GpuInfo] | None:
    """GPUs through ``nvidia-smi``; None when it is not on PATH or fails."""
    exe = which("nvidia-smi")
    if not exe:
        return None
    try:
        r = run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return parse_nvidia_smi(r.stdout)


def detect_machine(
    *,
    root: str | Path = "/",
    nvml: Callable[[], list[GpuInfo] | None] = query_nvml,
    nvidia_smi: Callable[[], list[GpuInfo] | None] = query_nvidia_smi,
    cores: Callable[[], tuple[int | None, int | None]] = cpu_counts,
    memory: Callable[[], int | None] = total_memory_mb,
    providers: Callable[[], tuple[str, ...] | None] = ort_providers,
    battery: Callable[[], bool | None] = has_battery,
) -> MachineInfo:
    """Inspect this machine. Every probe can be replaced (tests fake whole machines).

    ``root`` is where the board files are read (``proc/device-tree/model``,
    ``etc/nv_tegra_release``, ``sys/class/dmi/id/chassis_type``); a probe that fails yields
    ``None`` instead of raising.
    """
    root = Path(root)
    notes: list[str] = []
    model = read_board_model(root)
    tegra = read_tegra_release(root)
    logical, physical = cores()

    gpus: list[GpuInfo] | None = nvml()
    source = "NVML" if gpus is not None else None
    if not gpus:
        smi = nvidia_smi()
        if smi is not None:
            gpus, source = smi, "nvidia-smi"
    gpus = gpus or []
    if not gpus:
        source = None
    probe = MachineInfo(board_model=model, tegra_release=tegra)
    if probe.is_jetson:
        gpus = [GpuInfo(g.name, g.memory_mb, integrated=True) for g in gpus]

    chassis = read_chassis_laptop(root)
    bat = battery()
    is_laptop = True if (chassis or bat) else (None if chassis is None and bat is None else False)

    provs = providers()
    if provs is None:
        notes.append("onnxruntime could not be imported: pip install onnxruntime")
    return MachineInfo(
        board_model=model,
        tegra_release=tegra,
        cpu_cores=logical,
        physical_cores=physical,
        memory_mb=memory(),
        gpus=tuple(gpus),
        gpu_source=source,
        providers=provs,
        is_laptop=is_laptop,
        notes=tuple(notes),
    )


# -- suggestion ----------------------------------------------------------------------------------


def _contains_any(text: str | None, needles: Sequence[str]) -> str | None:
    low = (text or "").lower()
    for n in needles:
        if n.lower() in low:
            return n
    return None


def _matches(p: DeviceProfile, info: MachineInfo) -> bool:
    h = p.detect
    if h.is_empty:
        return False
    if h.model and not _contains_any(info.board_model, h.model):
        return False
    discrete = info.discrete_gpus
    if h.gpu_name and not any(_contains_any(g.name, h.gpu_name) for g in discrete):
        return False
    if h.discrete_gpu is not None and h.discrete_gpu != bool(discrete):
        return False
    if h.memory_mb is not None and info.memory_mb is not None:
        lo, hi = h.memory_mb
        if (lo is not None and info.memory_mb < lo) or (hi is not None and info.memory_mb > hi):
            return False
    return True


def _gpu_memory(info: MachineInfo) -> int | None:
    mems = [g.memory_mb for g in info.discrete_gpus if g.memory_mb]
    return max(mems) if mems else None


def fits(p: DeviceProfile, info: MachineInfo) -> bool:
    """Whether ``p``'s budgets fit this machine's memory (unknown memory: assumed to fit)."""
    if info.memory_mb is not None and p.memory_budget_mb > MEMORY_FIT * info.memory_mb:
        return False
    vram = _gpu_memory(info)
    if p.gpu_memory_mb and not p.unified_memory and vram is not None:
        return p.gpu_memory_mb <= GPU_FIT * vram
    return True


def _size(p: DeviceProfile) -> tuple[int, int, str]:
    return (p.memory_budget_mb, p.gpu_memory_mb or 0, p.name)


def _pick(cands: list[DeviceProfile], info: MachineInfo) -> tuple[DeviceProfile, str]:
    """The largest candidate that fits; if none fits (or memory is unknown), the smallest."""
    names = ", ".join(p.name for p in sorted(cands, key=_size))
    if info.memory_mb is None:
        p = min(cands, key=_size)
        why = "" if len(cands) == 1 else f"; memory unknown, so the smallest of {names}"
        return p, why
    fitting = [p for p in cands if fits(p, info)]
    if fitting:
        p = max(fitting, key=_size)
        if len(cands) == 1:
            return p, ""
        return p, f"; the largest of {names} that fits this machine"
    p = min(cands, key=_size)
    return p, "" if len(cands) == 1 else f"; none of {names} fits, so the smallest"


def _caveats(p: DeviceProfile, info: MachineInfo) -> list[str]:
    out = []
    if info.memory_mb is not None and p.memory_budget_mb > MEMORY_FIT * info.memory_mb:
        out.append(
            f"this machine has {info.memory_mb:,} MiB of memory but {p.name} budgets "
            f"{p.memory_budget_mb:,} MiB: use a copy of the profile with memory_budget_mb "
            f"about {int(MEMORY_SUGGEST * info.memory_mb):,}"
        )
    vram = _gpu_memory(info)
    if p.gpu_memory_mb and not p.unified_memory and vram is not None:
        if p.gpu_memory_mb > GPU_FIT * vram:
            out.append(
                f"the GPU has {vram:,} MiB but {p.name} budgets {p.gpu_memory_mb:,} MiB: "
                f"use a copy of the profile with gpu_memory_mb about {int(GPU_SUGGEST * vram):,}"
            )
    if info.providers is not None and p.providers[0] not in info.providers:
        fix = (
            "install the JetPack onnxruntime-gpu wheel"
            if info.is_jetson
            else "pip install onnxruntime-gpu"
        )
        out.append(
            f"{p.providers[0]} is not in this onnxruntime ({', '.join(info.providers)}); "
            f"runs fall back to the next provider: {fix}"
        )
    return out


def suggest_profile(
    info: MachineInfo, profiles: Sequence[DeviceProfile] | None = None
) -> tuple[DeviceProfile, str]:
    """The profile that suits ``info`` and a sentence saying why.

    In order: profiles whose ``detect.model`` names the board; else, on a Jetson or Raspberry
    Pi, the profiles of that family; else, with a discrete NVIDIA GPU, profiles with
    ``detect.discrete_gpu: true``; else other profiles whose hints match; else the
    ``detect.fallback`` profile. Among several, the largest whose budgets fit the machine wins.
    Caveats (too little memory, provider missing from onnxruntime) are appended to the reason.
    """
    pool = list(profiles) if profiles is not None else list_profiles()
    matched = [p for p in pool if _matches(p, info)]

    board = [p for p in matched if p.detect.model]
    family_members = [p for p in pool if info.is_board and info.family == p.family]
    gpu = [p for p in matched if p.detect.discrete_gpu]
    generic = [
        p
        for p in matched
        if not p.detect.model and not p.detect.discrete_gpu and not p.detect.fallback
    ]
    fallback = [p for p in pool if p.detect.fallback]
    mem = f"{info.memory_mb:,} MiB" if info.memory_mb else "unknown memory"

    if board:
        p, extra = _pick(board, info)
        needle = _contains_any(info.board_model, p.detect.model)
        reason = f"board model {info.board_model!r} contains {needle!r} ({mem}){extra}"
    elif family_members:
        p, extra = _pick(family_members, info)
        what = repr(info.board_model) if info.board_model else f"a {info.family} ({mem})"
        reason = f"no profile names the board {what}; {p.name} is a {info.family} profile{extra}"
    elif gpu:
        p, extra = _pick(gpu, info)
        g = max(info.discrete_gpus, key=lambda g: g.memory_mb or 0)
        vram = f"{g.memory_mb:,} MiB" if g.memory_mb else "unknown memory"
        reason = f"NVIDIA GPU {g.name!r} ({vram}) found via {info.gpu_source}{extra}"
    elif generic:
        p, extra = _pick(generic, info)
        reason = f"its detect hints match this machine ({mem}){extra}"
    elif fallback:
        p, extra = _pick(fallback, info)
        if info.board_model:
            seen = f"no profile names the board {info.board_model!r}"
        elif info.discrete_gpus:
            seen = "no GPU profile matches this machine's GPU"
        else:
            seen = "no Jetson, Raspberry Pi or NVIDIA GPU found"
        reason = f"{seen}; {p.name} is the generic profile ({mem}){extra}"
    else:
        raise ConfigError(
            "no device profile matches this machine",
            "pass --device NAME (edgezo devices lists them) or write your own profile",
        )
    caveats = _caveats(p, info)
    if caveats:
        reason += "; note: " + "; ".join(caveats)
    return p, reason
