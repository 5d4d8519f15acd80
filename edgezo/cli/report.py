"""``edgezo report --run RUN``: the run's summary table and a plot of its losses."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import friendly_errors


@click.command("report")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="run folder")
@click.option(
    "--png",
    default=None,
    type=click.Path(path_type=Path),
    help="where to write the loss plot [default: RUN/loss.png]",
)
@click.option("--no-plot", is_flag=True, help="print the table only")
@friendly_errors
def report(run_dir, png, no_plot):
    """Print a run's summary (held-out loss before/after, steps, evaluations, seconds, stop
    reason, lr/mu and their changes) and plot its training and held-out loss against steps
    and seconds (needs matplotlib: pip install 'edgezo[report]')."""
    from ..report import load_report, plot

    rep = load_report(run_dir)
    click.echo(rep.table())
    if no_plot:
        return
    path = plot(rep, png or Path(run_dir) / "loss.png")
    if path is None:
        click.echo(
            "note: no plot: matplotlib is not installed (pip install 'edgezo[report]')", err=True
        )
    else:
        click.echo(f"plot: {path}")
