"""How every edgezo command ends on bad input: the error and its fix, exit status 2, no
traceback (:class:`edgezo.errors.EdgezoError`); Ctrl-C exits 130 with a line, not a trace."""

from __future__ import annotations

import functools
import sys
import warnings

import click

from ..errors import EdgezoError, EdgezoWarning


def report(e: EdgezoError) -> None:
    click.echo(f"error: {e.what}", err=True)
    if e.fix:
        click.echo(f"  fix: {e.fix}", err=True)


def friendly_errors(fn):
    """Decorate a click command: an EdgezoError prints its message and fix and exits 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgezoError as e:
            report(e)
            sys.exit(2)

    return wrapper


def run(fn, interrupted: str = "interrupted") -> object:
    """Call ``fn()`` like a :func:`friendly_errors` command; Ctrl-C prints ``interrupted``."""
    try:
        return fn()
    except EdgezoError as e:
        report(e)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(interrupted, err=True)
        sys.exit(130)


def notes_as_lines() -> None:
    """Format edgezo's warnings (an old file without a checksum, ...) as ``note: ...`` lines
    instead of Python's file:line format; other warnings keep theirs. Only the format changes,
    so a caller that records warnings (a test, an embedding app) still receives them."""
    original = warnings.formatwarning
    if getattr(original, "_edgezo", False):
        return

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, EdgezoWarning):
            return f"note: {message}\n"
        return original(message, category, filename, lineno, line)

    fmt._edgezo = True
    warnings.formatwarning = fmt
