"""Resolving ``--device``: a profile name, a YAML path, or a family (detected on this machine).

Kept apart from :mod:`edgezo.device.profiles` (which only loads and validates profile files) so
that detection (:mod:`edgezo.device.detect`, which matches profiles) and resolution (which
asks detection) import in one direction: profiles <- detect <- resolve.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..errors import ConfigError
from . import detect
from .detect import MachineInfo
from .profiles import DeviceProfile, families, list_profiles, load_profile_file, profiles_dir


def _looks_like_path(s: str) -> bool:
    return s.endswith((".yaml", ".yml")) or "/" in s or os.sep in s


def load_profile(
    name_or_path: str,
    *,
    directory: str | os.PathLike | None = None,
    machine: MachineInfo | None = None,
) -> DeviceProfile:
    """Resolve ``--device``: a profile name, a path to a YAML file, or a family.

    - ``jetson-orin-nano`` loads ``devices/jetson-orin-nano.yaml``;
    - ``./my-board.yaml`` loads that file;
    - a family such as ``jetson`` resolves to the profile that
      :func:`edgezo.device.detect.suggest_profile` picks for this machine when it is of that
      family (``machine`` defaults to :func:`edgezo.device.detect.detect_machine`); a family
      with a single profile resolves to it; otherwise a :class:`ConfigError` lists the
      profiles it could mean.

    An unknown name raises a :class:`ConfigError` listing the known names and families.
    """
    s = str(name_or_path).strip()
    if _looks_like_path(s):
        path = Path(s).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"device profile file {path} does not exist",
                "check the path, or pass a profile name (edgezo devices lists them)",
            )
        return load_profile_file(path)
    d = Path(directory) if directory is not None else profiles_dir()
    if (d / f"{s}.yaml").is_file():
        profile = load_profile_file(d / f"{s}.yaml")
        if profile.name != s:
            raise ConfigError(
                f"{d / f'{s}.yaml'}: name is {profile.name!r} but the file is {s}.yaml",
                f"rename the file to {profile.name}.yaml or set name: {s}",
            )
        return profile

    profiles = list_profiles(d)
    groups = families(profiles)
    if s in groups:
        return _resolve_family(s, groups[s], machine)

    known = [p.name for p in profiles]
    close = difflib.get_close_matches(s, known + list(groups), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown device {s!r}{hint}; known devices: {', '.join(known)}; "
        f"families: {', '.join(sorted(groups))}",
        "pass one of these names, a family, or a path to your own YAML "
        "(see docs/guides/devices.md); `edgezo devices --detect` suggests one for this machine",
    )


def _resolve_family(
    family: str, members: list[DeviceProfile], machine: MachineInfo | None
) -> DeviceProfile:
    if len(members) == 1:
        return members[0]
    info = machine if machine is not None else detect.detect_machine()
    if info.family == family:
        profile, _ = detect.suggest_profile(info, members)
        return profile
    found = f"it looks like a {info.family}" if info.family else "its family is unknown"
    raise ConfigError(
        f"device family {family!r} could mean {len(members)} profiles, and this machine was "
        f"not detected as one ({found})",
        "pick one: " + ", ".join(f"--device {p.name}" for p in members),
    )
