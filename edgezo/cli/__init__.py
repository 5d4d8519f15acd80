"""The ``edgezo`` command: one click group (:mod:`edgezo.cli.main`) and a module per family of
commands. Runtime commands never import torch; ``export`` and ``compare`` import the exporters
only when they run."""

from .main import main

__all__ = ["main"]
