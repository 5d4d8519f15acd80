"""Device profiles (devices/*.yaml): loading, validation, detection and `edgezo devices`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgezo.cli import devices as cli_devices
from edgezo.device import detect
from edgezo.device.detect import GpuInfo, MachineInfo, detect_machine, suggest_profile
from edgezo.device.profiles import DEVICES_DIR_ENV, DeviceProfile, list_profiles, profiles_dir
from edgezo.device.resolve import load_profile
from edgezo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEVICES = REPO / "devices"
DEVICES_GUIDE = REPO / "docs" / "guides" / "devices.md"
SHIPPED = sorted(DEVICES.glob("*.yaml"))
EXPECTED = {
    "laptop-cpu",
    "laptop-gpu",
    "desktop-gpu",
    "jetson-orin-nano",
    "jetson-orin-nx",
    "jetson-agx-orin-32gb",
    "jetson-agx-orin-64gb",
    "jetson-thor",
    "raspberry-pi-5",
}
CPU_ONLY = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def minimal(**over: object) -> dict:
    """A valid profile mapping with ``over`` applied."""
    d: dict = {
        "name": "my-board",
        "description": "a test board",
        "family": "test",
        "memory_budget_mb": 1000,
        "providers": list(CPU_ONLY),
    }
    d.update(over)
    return d


def write_profile(tmp_path: Path, data: dict, name: str = "my-board.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- shipped profiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_profile_loads(path: Path) -> None:
    p = load_profile(str(path))
    assert p.name == path.stem
    assert p.source == path
    # shipped profiles document every value: no field left to its default
    keys = set(yaml.safe_load(path.read_text()))
    fields = set(p.to_dict())
    assert fields <= keys, f"{path.name} leaves {sorted(fields - keys)} to defaults"
    # a comment explains the values
    assert path.read_text().count("#") >= 3
    # the budgets are internally consistent
    if p.unified_memory:
        assert p.gpu_memory_mb is not None and p.gpu_memory_mb < p.memory_budget_mb
    assert p.uses_gpu == (p.gpu_memory_mb is not None)
    assert not p.detect.is_empty, "shipped profiles must be detectable"
    # round trip through to_dict
    assert DeviceProfile.with_overrides(p, {}) == p


def test_the_expected_profiles_ship() -> None:
    assert EXPECTED <= {p.stem for p in SHIPPED}
    assert profiles_dir() == DEVICES
    assert [p.name for p in list_profiles()] == sorted(p.stem for p in SHIPPED)


def test_readme_table_lists_every_profile() -> None:
    readme = DEVICES_GUIDE.read_text()
    for path in SHIPPED:
        assert f"| `{path.stem}` |" in readme, f"add {path.stem} to docs/guides/devices.md"


def test_readme_example_profile_loads(tmp_path: Path) -> None:
    readme = DEVICES_GUIDE.read_text()
    block = re.search(r"```yaml\n(# my-board.yaml\n.*?)```", readme, re.S)
    assert block
    path = tmp_path / "my-board.yaml"
    path.write_text(block.group(1))
    p = load_profile(str(path))
    assert (p.name, p.precision, p.threads) == ("my-board", "int4", 8)


def test_jetson_budgets_leave_headroom() -> None:
    # ~60% of the visible shared memory, as the design asks
    visible = {
        "jetson-orin-nano": 7620,
        "jetson-orin-nx": 15660,
        "jetson-agx-orin-32gb": 30600,
        "jetson-agx-orin-64gb": 62800,
        "jetson-thor": 125000,
    }
    for name, mem in visible.items():
        p = load_profile(name)
        assert 0.5 <= p.memory_budget_mb / mem <= 0.65, name


# -- loading and validation ------------------------------------------------------------------------


def test_user_profile_file_loads_with_defaults(tmp_path: Path) -> None:
    path = write_profile(tmp_path, minimal())
    p = load_profile(str(path))
    assert p.name == "my-board"
    assert p.providers == ("CPUExecutionProvider",)
    assert p.gpu_memory_mb is None and p.threads == 0 and p.precision == "fp32"
    assert p.detect.is_empty
    q = p.with_overrides({"threads": 2, "precision": "int4"})
    assert (q.threads, q.precision, q.source) == (2, "int4", path)


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    data = minimal()
    data["memory_budget"] = data.pop("memory_budget_mb")
    path = write_profile(tmp_path, data)
    with pytest.raises(
        ConfigError, match=r"unknown key 'memory_budget' \(did you mean 'memory_budget_mb'\?\)"
    ):
        load_profile(str(path))


def test_unknown_detect_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write_profile(tmp_path, minimal(detect={"modle": ["X"]}))
    with pytest.raises(
        ConfigError, match=r"detect: unknown key 'modle' \(did you mean 'model'\?\)"
    ):
        load_profile(str(path))


def test_missing_required_field_is_named(tmp_path: Path) -> None:
    data = minimal()
    del data["providers"]
    with pytest.raises(ConfigError, match=r"providers is missing"):
        load_profile(str(write_profile(tmp_path, data)))


@pytest.mark.parametrize(
    "over, message",
    [
        ({"memory_budget_mb": 0}, r"memory_budget_mb is 0; it must be a positive integer"),
        ({"memory_budget_mb": "8GB"}, r"memory_budget_mb must be an integer, got '8GB'"),
        ({"precision": "fp16"}, r"precision must be one of 'fp32', 'int8', 'int4', got 'fp16'"),
        (
            {"providers": ["CUDA", "CPUExecutionProvider"], "gpu_memory_mb": 1000},
            r"providers\[0\] 'CUDA' is not an ONNX Runtime execution provider "
            r"\(did you mean 'CUDAExecutionProvider'\?\)",
        ),
        ({"providers": []}, r"providers is empty"),
        (
            {"providers": ["CUDAExecutionProvider"], "gpu_memory_mb": 1000},
            r"providers ends with 'CUDAExecutionProvider', not CPUExecutionProvider",
        ),
        (
            {"providers": ["CPUExecutionProvider", "CPUExecutionProvider"]},
            r"providers lists CPUExecutionProvider more than once",
        ),
        ({"providers": CUDA}, r"gpu_memory_mb is null but providers lists CUDAExecutionProvider"),
        ({"gpu_memory_mb": 500}, r"gpu_memory_mb is 500 but providers lists no GPU provider"),
        (
            {"providers": CUDA, "gpu_memory_mb": 2000, "unified_memory": True},
            r"gpu_memory_mb \(2000\) exceeds memory_budget_mb \(1000\) on unified memory",
        ),
        ({"threads": -1}, r"threads is -1"),
        ({"max_batch_size": 0}, r"max_batch_size is 0; it must be a positive integer"),
        ({"max_seq_len": -5}, r"max_seq_len is -5"),
        ({"eval_budget": 0}, r"eval_budget is 0"),
        ({"time_budget_s": -1}, r"time_budget_s is -1"),
        ({"checkpoint_every": 0}, r"checkpoint_every is 0"),
        ({"cpu_arena": "yes"}, r"cpu_arena must be true or false, got 'yes'"),
        ({"name": "My Board"}, r"name 'My Board' is not a valid profile name"),
        ({"family": ""}, r"family '' is not a valid family name"),
        ({"description": " "}, r"description is empty"),
        ({"detect": {"memory_mb": [9000, 1000]}}, r"detect.memory_mb is \[9000, 1000\]"),
        ({"detect": {"memory_mb": [1000]}}, r"detect.memory_mb is \[1000\]; write \[min, max\]"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, over: dict, message: str) -> None:
    path = write_profile(tmp_path, minimal(**over))
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(str(path))
    assert str(path) in str(info.value)  # the message names the file
    assert info.value.fix  # and says what to do


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        DeviceProfile(
            name="x",
            description="d",
            family="f",
            memory_budget_mb=-1,
            providers=("CPUExecutionProvider",),
            threads=-2,
            checkpoint_every=0,
        )
    text = str(info.value)
    assert "memory_budget_mb is -1" in text
    assert "threads is -2" in text
    assert "checkpoint_every is 0" in text


def test_direct_construction_validates_precision() -> None:
    with pytest.raises(ConfigError, match=r"precision is 'fp16', not one of fp32, int8, int4"):
        DeviceProfile(
            name="x",
            description="d",
            family="f",
            memory_budget_mb=10,
            providers=("CPUExecutionProvider",),
            precision="fp16",  # type: ignore[arg-type]
        )


def test_override_errors_name_the_field() -> None:
    p = load_profile("laptop-cpu")
    with pytest.raises(ConfigError, match=r"unknown key 'thread' \(did you mean 'threads'\?\)"):
        p.with_overrides({"thread": 2})


def test_provider_options_carry_the_gpu_limit() -> None:
    opts = load_profile("laptop-gpu").session_options()
    assert opts["CUDAExecutionProvider"]["gpu_mem_limit"] == str(6500 * 2**20)
    assert opts["CPUExecutionProvider"] == {}


def test_a_profiles_provider_options_reach_the_session(tmp_path: Path) -> None:
    """Every provider gets its options from the profile, in one place (runtime_options)."""
    from edgezo.device.limits import runtime_options
    from edgezo.runner import provider_list

    write_profile(
        tmp_path,
        minimal(
            providers=[
                "TensorrtExecutionProvider",
                "CUDAExecutionProvider",
                "CPUExecutionProvider",
            ],
            gpu_memory_mb=2048,
            provider_options={
                "TensorrtExecutionProvider": {"trt_fp16_enable": True},
                "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"},
            },
        ),
    )
    opts = runtime_options(load_profile("my-board", directory=tmp_path))
    trt = dict(provider_list("TensorrtExecutionProvider", opts)[:1])["TensorrtExecutionProvider"]
    assert trt == {
        "device_id": 0,
        "trt_max_workspace_size": str(2048 * 2**20),
        "trt_fp16_enable": "1",
    }
    cuda = dict(provider_list("CUDAExecutionProvider", opts)[:1])["CUDAExecutionProvider"]
    assert cuda["gpu_mem_limit"] == str(2048 * 2**20)
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert provider_list("CPUExecutionProvider", opts) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"OpenVINOExecutionProvider": {"x": 1}}, "which providers does not list"),
        ({"CUDAExecutionProvider": {"gpu_mem_limit": 1}}, "use gpu_memory_mb"),
        ({"CUDAExecutionProvider": {"x": [1]}}, "string or number value"),
        ({"CUDAExecutionProvider": 3}, "must be a mapping"),
    ],
)
def test_bad_provider_options_are_refused(tmp_path: Path, options, message) -> None:
    write_profile(
        tmp_path,
        minimal(
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
            gpu_memory_mb=1024,
            provider_options=options,
        ),
    )
    with pytest.raises(ConfigError, match=message):
        load_profile("my-board", directory=tmp_path)


def test_name_must_match_file_name(tmp_path: Path) -> None:
    write_profile(tmp_path, minimal(name="other"), name="my-board.yaml")
    with pytest.raises(ConfigError, match=r"name is 'other' but the file is my-board.yaml"):
        load_profile("my-board", directory=tmp_path)


def test_unknown_device_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("jetson-orin-nan")
    text = str(info.value)
    assert "unknown device 'jetson-orin-nan' (did you mean 'jetson-orin-nano'?)" in text
    for name in EXPECTED:
        assert name in text
    assert "families: desktop, jetson, laptop, raspberry-pi" in text


def test_missing_profile_file_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"device profile file nowhere/x.yaml does not exist"):
        load_profile("nowhere/x.yaml")


def test_profiles_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_profile(tmp_path, minimal())
    monkeypatch.setenv(DEVICES_DIR_ENV, str(tmp_path))
    assert profiles_dir() == tmp_path
    assert load_profile("my-board").name == "my-board"
    monkeypatch.setenv(DEVICES_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"EDGEZO_DEVICES_DIR=.*missing is not a folder"):
        profiles_dir()


# -- fake machines -------------------------------------------------------------------------------


def fake_machine(
    tmp_path: Path,
    *,
    model: str | None = None,
    tegra: str | None = None,
    memory_mb: int | None = 16000,
    gpus: list[GpuInfo] | None = None,
    providers: tuple[str, ...] | None = ("CPUExecutionProvider",),
    battery: bool | None = None,
    chassis: int | None = None,
    cores: tuple[int, int] = (8, 8),
) -> MachineInfo:
    """Run the real detect_machine over a fake root and fake probes."""
    root = tmp_path / "root"
    root.mkdir(parents=True, exist_ok=True)
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    if tegra is not None:
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc/nv_tegra_release").write_text(tegra)
    if chassis is not None:
        (root / "sys/class/dmi/id").mkdir(parents=True, exist_ok=True)
        (root / "sys/class/dmi/id/chassis_type").write_text(f"{chassis}\n")
    return detect_machine(
        root=root,
        nvml=lambda: None,
        nvidia_smi=lambda: gpus,
        cores=lambda: cores,
        memory=lambda: memory_mb,
        providers=lambda: providers,
        battery=lambda: battery,
    )


L4T = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: x\n"
ORT_CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")

MACHINES = {
    "orin-nano": dict(
        model="NVIDIA Jetson Orin Nano Developer Kit",
        tegra=L4T,
        memory_mb=7620,
        gpus=[GpuInfo("Orin (nvgpu)", None)],
        providers=ORT_CUDA,
    ),
    "orin-nx": dict(
        model="NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
        tegra=L4T,
        memory_mb=15660,
        providers=ORT_CUDA,
    ),
    "agx-orin-64": dict(
        model="NVIDIA Jetson AGX Orin Developer Kit",
        tegra=L4T,
        memory_mb=62800,
        providers=ORT_CUDA,
    ),
    "agx-orin-32": dict(
        model="NVIDIA Jetson AGX Orin",
        tegra=L4T,
        memory_mb=30600,
        providers=ORT_CUDA,
    ),
    "thor": dict(
        model="NVIDIA Jetson AGX Thor Developer Kit",
        memory_mb=125000,
        gpus=[GpuInfo("NVIDIA Thor", None)],
        providers=ORT_CUDA,
    ),
    "jetson-no-model": dict(tegra=L4T, memory_mb=15660, providers=ORT_CUDA),
    "pi5": dict(model="Raspberry Pi 5 Model B Rev 1.0", memory_mb=8050),
    "pi4": dict(model="Raspberry Pi 4 Model B Rev 1.5", memory_mb=3800),
    "gpu-desktop": dict(
        memory_mb=64000,
        gpus=[GpuInfo("NVIDIA GeForce RTX 4090", 24564)],
        providers=ORT_CUDA,
    ),
    "gpu-laptop": dict(
        memory_mb=15700,
        gpus=[GpuInfo("NVIDIA GeForce RTX 4070 Laptop GPU", 8188)],
        providers=ORT_CUDA,
        battery=True,
    ),
    "gpu-12gb-desktop": dict(
        memory_mb=32000,
        gpus=[GpuInfo("NVIDIA GeForce RTX 3060", 12288)],
        providers=ORT_CUDA,
    ),
    "laptop": dict(memory_mb=15700, battery=True, chassis=10),
    "other-board": dict(model="Radxa ROCK 5B", memory_mb=15700),
}


@pytest.mark.parametrize(
    "machine, profile, reason",
    [
        ("orin-nano", "jetson-orin-nano", "contains 'Orin Nano'"),
        ("orin-nx", "jetson-orin-nx", "contains 'Orin NX'"),
        ("agx-orin-64", "jetson-agx-orin-64gb", "contains 'AGX Orin'"),
        ("agx-orin-32", "jetson-agx-orin-32gb", "contains 'AGX Orin'"),
        ("thor", "jetson-thor", "contains 'Thor'"),
        ("jetson-no-model", "jetson-orin-nx", "the largest of jetson-orin-nano"),
        ("pi5", "raspberry-pi-5", "contains 'Raspberry Pi 5'"),
        ("pi4", "raspberry-pi-5", "memory_budget_mb about 2,280"),
        ("gpu-desktop", "desktop-gpu", "NVIDIA GPU 'NVIDIA GeForce RTX 4090' (24,564 MiB)"),
        ("gpu-laptop", "laptop-gpu", "RTX 4070 Laptop GPU"),
        ("gpu-12gb-desktop", "laptop-gpu", "the largest of laptop-gpu, desktop-gpu that fits"),
        ("laptop", "laptop-cpu", "no Jetson, Raspberry Pi or NVIDIA GPU found"),
        ("other-board", "laptop-cpu", "no profile names the board 'Radxa ROCK 5B'"),
    ],
)
def test_detection_suggests_the_right_profile(
    tmp_path: Path, machine: str, profile: str, reason: str
) -> None:
    info = fake_machine(tmp_path, **MACHINES[machine])  # type: ignore[arg-type]
    p, why = suggest_profile(info)
    assert p.name == profile, why
    assert reason in why


def test_detected_machine_facts(tmp_path: Path) -> None:
    nano = fake_machine(tmp_path, **MACHINES["orin-nano"])  # type: ignore[arg-type]
    assert nano.family == "jetson"
    assert nano.board_model == "NVIDIA Jetson Orin Nano Developer Kit"  # NUL stripped
    assert nano.tegra_release == "L4T R36.4.0"
    assert nano.gpus[0].integrated and not nano.discrete_gpus
    laptop = fake_machine(tmp_path / "l", **MACHINES["laptop"])  # type: ignore[arg-type]
    assert (laptop.family, laptop.is_laptop) == ("laptop", True)
    pc = fake_machine(tmp_path / "d", memory_mb=8000, battery=False)
    assert pc.family == "desktop"
    pi = fake_machine(tmp_path / "p", **MACHINES["pi5"])  # type: ignore[arg-type]
    assert pi.family == "raspberry-pi"


def test_missing_cuda_provider_is_noted(tmp_path: Path) -> None:
    info = fake_machine(
        tmp_path,
        memory_mb=64000,
        gpus=[GpuInfo("NVIDIA GeForce RTX 4090", 24564)],
        providers=("CPUExecutionProvider",),
    )
    p, why = suggest_profile(info)
    assert p.name == "desktop-gpu"
    assert "CUDAExecutionProvider is not in this onnxruntime" in why
    assert "pip install onnxruntime-gpu" in why


def test_small_gpu_gets_a_lower_gpu_budget(tmp_path: Path) -> None:
    info = fake_machine(tmp_path, gpus=[GpuInfo("NVIDIA GeForce GTX 1660", 6144)])
    p, why = suggest_profile(info)
    assert p.name == "laptop-gpu"
    assert "use a copy of the profile with gpu_memory_mb about 4,915" in why


def test_unknown_memory_picks_the_smallest(tmp_path: Path) -> None:
    info = fake_machine(tmp_path, model="NVIDIA Jetson AGX Orin", memory_mb=None)
    p, why = suggest_profile(info)
    assert p.name == "jetson-agx-orin-32gb"
    assert "memory unknown" in why


def test_no_matching_profile_says_what_to_do(tmp_path: Path) -> None:
    only = DeviceProfile(
        name="x",
        description="d",
        family="f",
        memory_budget_mb=10,
        providers=("CPUExecutionProvider",),
    )
    with pytest.raises(ConfigError, match=r"no device profile matches this machine"):
        suggest_profile(fake_machine(tmp_path), [only])


def test_detect_this_machine_does_not_fail() -> None:
    info = detect_machine()
    assert info.cpu_cores and info.cpu_cores >= 1
    assert info.memory_mb and info.memory_mb > 0
    p, why = suggest_profile(info)
    assert p.name and why


# -- GPU probes ----------------------------------------------------------------------------------


def test_parse_nvidia_smi() -> None:
    text = (
        "NVIDIA GeForce RTX 4090, 24564 MiB\nNVIDIA A100-SXM4-80GB, 81920 MiB\nNVIDIA Thor, [N/A]\n"
    )
    gpus = detect.parse_nvidia_smi(text)
    assert gpus == [
        GpuInfo("NVIDIA GeForce RTX 4090", 24564),
        GpuInfo("NVIDIA A100-SXM4-80GB", 81920),
        GpuInfo("NVIDIA Thor", None),
    ]


def test_query_nvidia_smi_runs_the_documented_command() -> None:
    calls = []

    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA L4, 23034 MiB\n", stderr="")

    gpus = detect.query_nvidia_smi(run=run, which=lambda _: "/usr/bin/nvidia-smi")
    assert gpus == [GpuInfo("NVIDIA L4", 23034)]
    assert calls == [
        ["/usr/bin/nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    ]
    assert detect.query_nvidia_smi(run=run, which=lambda _: None) is None

    def failing(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        raise subprocess.TimeoutExpired(cmd, 10)

    assert detect.query_nvidia_smi(run=failing, which=lambda _: "nvidia-smi") is None


def test_query_nvml_with_a_fake_module(monkeypatch: pytest.MonkeyPatch) -> None:
    class Mem:
        total = 8 * 2**30

    class FakeNvml:
        shut = False

        def nvmlInit(self) -> None: ...
        def nvmlShutdown(self) -> None:
            FakeNvml.shut = True

        def nvmlDeviceGetCount(self) -> int:
            return 1

        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            return i

        def nvmlDeviceGetName(self, h: int) -> bytes:
            return b"NVIDIA GeForce RTX 4060 Laptop GPU"

        def nvmlDeviceGetMemoryInfo(self, h: int) -> Mem:
            return Mem()

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert detect.query_nvml() == [GpuInfo("NVIDIA GeForce RTX 4060 Laptop GPU", 8192)]
    assert FakeNvml.shut


def test_nvml_is_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert detect.query_nvml() is None


# -- families ------------------------------------------------------------------------------------


def test_family_resolves_to_the_detected_board(tmp_path: Path) -> None:
    nx = fake_machine(tmp_path, **MACHINES["orin-nx"])  # type: ignore[arg-type]
    assert load_profile("jetson", machine=nx).name == "jetson-orin-nx"


def test_family_without_a_detected_board_lists_candidates(tmp_path: Path) -> None:
    laptop = fake_machine(tmp_path, **MACHINES["laptop"])  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError,
        match=r"device family 'jetson' could mean 5 profiles, and this machine was not "
        r"detected as one \(it looks like a laptop\)",
    ) as info:
        load_profile("jetson", machine=laptop)
    assert info.value.fix
    assert "--device jetson-orin-nano, --device jetson-orin-nx" in info.value.fix
    assert "--device jetson-thor" in info.value.fix


def test_single_profile_family_resolves_anywhere(tmp_path: Path) -> None:
    laptop = fake_machine(tmp_path, **MACHINES["laptop"])  # type: ignore[arg-type]
    assert load_profile("raspberry-pi", machine=laptop).name == "raspberry-pi-5"


def test_laptop_family_follows_the_gpu(tmp_path: Path) -> None:
    gpu_laptop = fake_machine(tmp_path, **MACHINES["gpu-laptop"])  # type: ignore[arg-type]
    assert load_profile("laptop", machine=gpu_laptop).name == "laptop-gpu"
    laptop = fake_machine(tmp_path / "l", **MACHINES["laptop"])  # type: ignore[arg-type]
    assert load_profile("laptop", machine=laptop).name == "laptop-cpu"


# -- the CLI command -----------------------------------------------------------------------------


def test_cli_lists_every_profile_as_an_aligned_table() -> None:
    result = CliRunner().invoke(cli_devices.devices, [])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines[0]
    assert header.split()[:3] == ["NAME", "FAMILY", "MEMORY"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(SHIPPED)]}
    assert set(rows) == {p.stem for p in SHIPPED}
    col = header.index("PROVIDERS")
    for name, line in rows.items():  # every row's providers start under the header
        assert line[col - 2 : col] == "  " and line[col] != " ", name
    assert "4,600 MiB" in rows["jetson-orin-nano"]
    assert "CUDA>CPU" in rows["jetson-orin-nano"]
    assert "10,000" in rows["jetson-orin-nano"] and "30 min" in rows["jetson-orin-nano"]
    assert "'-' = unlimited" in result.output


def test_cli_show_prints_the_yaml() -> None:
    result = CliRunner().invoke(cli_devices.devices, ["--show", "jetson-orin-nano"])
    assert result.exit_code == 0, result.output
    assert "name: jetson-orin-nano" in result.output
    assert "# ~60% of the shared memory" in result.output  # the comments come along
    body = "\n".join(result.output.splitlines()[1:])
    assert yaml.safe_load(body)["memory_budget_mb"] == 4600


def test_cli_show_unknown_name_fails_with_the_list() -> None:
    result = CliRunner().invoke(cli_devices.devices, ["--show", "orin-nano"])
    assert result.exit_code == 2
    assert "unknown device 'orin-nano'" in result.output
    assert "jetson-orin-nano" in result.output
    assert "Traceback" not in result.output


def test_cli_detect_prints_the_machine_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agx = fake_machine(tmp_path, **MACHINES["agx-orin-64"])  # type: ignore[arg-type]
    monkeypatch.setattr(detect, "detect_machine", lambda: agx)
    result = CliRunner().invoke(cli_devices.devices, ["--detect"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "NVIDIA Jetson AGX Orin Developer Kit  (L4T R36.4.0)" in out
    assert "62,800 MiB" in out
    assert "Suggested profile: jetson-agx-orin-64gb" in out
    assert "why: board model 'NVIDIA Jetson AGX Orin Developer Kit' contains 'AGX Orin'" in out
    assert "--device jetson-agx-orin-64gb" in out


def test_runtime_modules_do_not_import_torch() -> None:
    code = (
        "import sys, edgezo.device.profiles, edgezo.device.detect, edgezo.cli.devices\n"
        "edgezo.device.detect.detect_machine()\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
