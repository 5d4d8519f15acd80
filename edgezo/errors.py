"""Errors that tell the user what went wrong and what to do about it."""

from __future__ import annotations


class EdgezoError(Exception):
    """A user-facing error: ``what`` happened, ``fix`` says what to do.

    The CLI prints these without a traceback and exits with status 2.
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        #: the individual problems (``edgezo.configio.Problem``) when the error lists several
        self.problems: list = []
        super().__init__(what if not fix else f"{what}\n  fix: {fix}")


class BundleError(EdgezoError):
    """A bundle folder is missing, corrupted or of an unknown version."""


class DataError(EdgezoError):
    """A data file cannot be used as training or evaluation data."""


class ConfigError(EdgezoError):
    """A configuration value is invalid."""


class CheckpointError(EdgezoError):
    """A checkpoint or ledger does not belong to the run it is used with."""


class EdgezoWarning(UserWarning):
    """Something works but deserves a note: e.g. a file written by an older edgezo that
    carries no checksum, loaded without verifying it."""
