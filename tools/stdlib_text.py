"""A second text corpus for ``tools/quality.py --lm-data``: paragraphs of Python's standard
library docstrings, built offline from the running interpreter (nothing downloaded).

The sample notes are one kind of text (short personal notes); a recipe tuned to them might not
hold on another. This writes 240 training and 60 held-out paragraphs (120–400 characters,
no doctest or table lines), shuffled with a fixed seed, as ``{"text": ...}`` JSONL::

    python tools/stdlib_text.py --out /tmp/stdlib-text
    python tools/quality.py --task lm --lm-data /tmp/stdlib-text/train.jsonl \\
        --lm-eval-data /tmp/stdlib-text/heldout.jsonl

The paragraphs depend on the Python version's docstrings (the figures in
docs/benchmarks/quality.md were made with CPython 3.11) and on what the interpreter has
imported (a package's imported submodules are among its attributes): run it as a script, in
a fresh interpreter, for the same corpus every time.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
from pathlib import Path

MODULES = (
    "argparse asyncio collections concurrent.futures contextlib csv dataclasses datetime decimal "
    "difflib email fractions functools gettext heapq http.client imaplib inspect ipaddress "
    "itertools json logging mailbox multiprocessing optparse pathlib pickle pprint queue random "
    "re sched secrets selectors shelve shutil smtplib socket socketserver sqlite3 statistics "
    "string subprocess tarfile tempfile textwrap threading timeit tokenize typing unittest "
    "urllib.request uuid warnings weakref xml.dom.minidom zipfile zoneinfo"
).split()
SKIP = re.compile(r">>>|\|\s|::|^[-=*]")


def paragraphs() -> list[str]:
    """Distinct docstring paragraphs of :data:`MODULES`, in a fixed order."""
    out: list[str] = []
    seen: set[str] = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
        for o in objs:
            if not (inspect.ismodule(o) or inspect.isclass(o) or inspect.isfunction(o)):
                continue
            if not inspect.ismodule(o) and getattr(o, "__module__", name) not in (name, None):
                continue  # documented in its own module
            doc = inspect.getdoc(o)
            for p in re.split(r"\n\s*\n", doc or ""):
                p = " ".join(p.split())
                if 120 <= len(p) <= 400 and not SKIP.search(p) and p not in seen:
                    seen.add(p)
                    out.append(p)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for train/heldout.jsonl")
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    texts = paragraphs()
    if len(texts) < a.train + a.heldout:
        raise SystemExit(f"only {len(texts)} paragraphs; ask for fewer")
    random.Random(a.seed).shuffle(texts)
    a.out.mkdir(parents=True, exist_ok=True)
    parts = {"train.jsonl": texts[: a.train], "heldout.jsonl": texts[a.train : a.train + a.heldout]}
    for file, rows in parts.items():
        with open(a.out / file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in rows)
    print(f"{a.train} training and {a.heldout} held-out paragraphs in {a.out}")


if __name__ == "__main__":
    main()
