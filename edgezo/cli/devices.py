"""``edgezo devices``: list the device profiles, show one, or detect this machine.

Registered on the main ``edgezo`` group by ``edgezo/cli/main.py``; usable on its own as a click
command (``devices.main()``).
"""

from __future__ import annotations

from typing import IO, Any

import click
import yaml

from ..device.profiles import DeviceProfile, list_profiles
from ..device.resolve import load_profile
from ..errors import EdgezoError


class _UserError(click.ClickException):
    """An :class:`EdgezoError` shown as ``edgezo``'s other commands show it: exit status 2."""

    exit_code = 2

    def __init__(self, error: EdgezoError):
        super().__init__(error.what)
        self.fix = error.fix

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True, file=file)
        if self.fix:
            click.echo(f"  fix: {self.fix}", err=True, file=file)


#: Families listed first, in this order; others follow alphabetically.
FAMILY_ORDER = ("laptop", "desktop", "raspberry-pi", "jetson")


def _mib(mb: int | None) -> str:
    return "-" if mb is None else f"{mb:,} MiB"


def _sort_key(p: DeviceProfile) -> tuple[int, str, int, str]:
    rank = FAMILY_ORDER.index(p.family) if p.family in FAMILY_ORDER else len(FAMILY_ORDER)
    return (rank, p.family, p.memory_budget_mb, p.name)


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600 and s % 3600 == 0:
        return f"{int(s // 3600)} h"
    if s >= 60 and s % 60 == 0:
        return f"{int(s // 60)} min"
    return f"{s:g} s"


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def profile_row(p: DeviceProfile) -> dict[str, str]:
    """The table cells for one profile."""
    return {
        "NAME": p.name,
        "FAMILY": p.family,
        "MEMORY": _mib(p.memory_budget_mb),
        "GPU MEM": _mib(p.gpu_memory_mb) + (" (shared)" if p.unified_memory else ""),
        "PROVIDERS": ">".join(_short(x) for x in p.providers),
        "PRECISION": p.precision,
        "BATCH x SEQ": f"{p.max_batch_size} x {p.max_seq_len}",
        "EVALS": "-" if p.eval_budget is None else f"{p.eval_budget:,}",
        "TIME": _duration(p.time_budget_s),
    }


def format_table(rows: list[dict[str, str]]) -> str:
    """Left-aligned columns separated by two spaces, with a header row."""
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    return "\n".join(lines)


def _show(name: str) -> str:
    p = load_profile(name)
    if p.source is not None and p.source.is_file():
        header = f"# {p.source}\n"
        return header + p.source.read_text()
    return yaml.safe_dump(p.to_dict(), sort_keys=False)


def _detect_report() -> str:
    from ..device.detect import detect_machine, suggest_profile

    info = detect_machine()
    rows = info.describe()
    width = max(len(label) for label, _ in rows)
    lines = ["This machine:"]
    lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
    profile, reason = suggest_profile(info)
    lines += [
        "",
        f"Suggested profile: {profile.name}  ({profile.description})",
        f"  why: {reason}",
        f"  use: --device {profile.name}   (details: edgezo devices --show {profile.name})",
    ]
    return "\n".join(lines)


@click.command("devices")
@click.option(
    "--detect",
    "detect_",
    is_flag=True,
    help="Inspect this machine and suggest a profile, saying why.",
)
@click.option(
    "--show",
    "show",
    metavar="NAME",
    help="Print one profile's YAML (a name, a family or a path to a YAML file).",
)
def devices(detect_: bool, show: str | None) -> None:
    """List the device profiles: memory, providers, precision and session budgets.

    Pass a profile to any run with --device NAME, a family (--device jetson picks the board it
    detects) or a path to your own YAML file (see docs/guides/devices.md).
    """
    try:
        if show:
            click.echo(_show(show).rstrip("\n"))
            if not detect_:
                return
            click.echo()
        if detect_:
            click.echo(_detect_report())
            return
        profiles = sorted(list_profiles(), key=_sort_key)
        click.echo(format_table([profile_row(p) for p in profiles]))
        click.echo(
            "\nMEMORY is the edgezo process's budget; GPU MEM the GPU provider's share "
            "(shared: out of MEMORY).\nEVALS and TIME cap one session ('-' = unlimited). "
            "More: --show NAME; this machine: --detect."
        )
    except EdgezoError as e:
        raise _UserError(e) from None


main = devices

if __name__ == "__main__":  # pragma: no cover
    devices()
