"""``python -m exporters`` (or ``python -m exporters.cli``): the same command as ``edgezo
export`` (:mod:`edgezo.cli.export`, where its options are defined once)."""

from edgezo.cli.errors import run
from edgezo.cli.export import export as main

__all__ = ["main", "run"]

if __name__ == "__main__":
    main(prog_name="python -m exporters.cli")
