"""The docs stay true to the repository: README.md and docs/.

- every repository path they name (in `code`, in code blocks, or as a link) exists, and every
  link's #anchor names a heading of its page;
- every dotted ``edgezo.``/``exporters.`` name in `code` is a module, or a name defined in one;
- every page under docs/ is linked from docs/README.md;
- the generated reference (docs/reference/config.md, cli.md) is what the code generates now;
- every benchmark page gives its date, machine, commit and command;
- nothing committed points outside the project.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
#: the first component of a repository path as the docs write them (relative to the root)
TOP = ("edgezo", "exporters", "tools", "tests", "devices", "docs", ".ci")
TOP_FILES = ("README.md", "pyproject.toml")
#: folders the tools write into (ignored by git): named in the docs, absent from a checkout
OUTPUTS = ("tools/out/",)

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_DIRS = "|".join(map(re.escape, TOP))
_PATH = re.compile(rf"^(?:(?:{_DIRS})/[\w./*-]*|{'|'.join(map(re.escape, TOP_FILES))})$")
_DOTTED = re.compile(r"^(edgezo|exporters)(\.[A-Za-z_]\w*)+$")


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _code(text: str) -> list[str]:
    """The text of every code block and inline code span."""
    blocks = _FENCE.findall(text)
    rest = _FENCE.sub("", text)
    return blocks + _SPAN.findall(rest)


def _tokens(code: str) -> list[str]:
    return [t.strip(".,:;()[]'\"") for t in re.split(r"[\s=]+", code) if t]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


def _resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return (page if not path else (page.parent / path).resolve()), anchor


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_named_path_exists(page: Path) -> None:
    missing = []
    for code in _code(page.read_text(encoding="utf-8")):
        for tok in _tokens(code):
            if not _PATH.match(tok) or tok.startswith(OUTPUTS):
                continue
            found = list(REPO.glob(tok)) if "*" in tok else [REPO / tok]
            if found and all(p.exists() for p in found):
                continue
            module, _, name = tok.rpartition(".")  # tools/x.func: a name in tools/x.py
            source = REPO / f"{module}.py"
            if not (source.is_file() and _defines(source.read_text(), name)):
                missing.append(tok)
    assert not missing, f"{_rel(page)} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        path, anchor = _resolve(page, target)
        if not path.exists():
            broken.append(target)
        elif anchor and (path.suffix != ".md" or anchor not in _anchors(path)):
            broken.append(target)
    assert not broken, f"{_rel(page)} has broken links: {broken}"


def _defines(source: str, name: str) -> bool:
    return bool(
        re.search(
            rf"^\s*(?:class|def)\s+{name}\b|^\s*{name}\s*[:=]|\bimport .*\b{name}\b", source, re.M
        )
    )


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_dotted_name_is_in_the_code(page: Path) -> None:
    unknown = []
    for code in _code(page.read_text(encoding="utf-8")):
        for tok in _tokens(code):
            if not _DOTTED.match(tok):
                continue
            parts, module = tok.split("."), None
            for k in range(len(parts), 0, -1):
                base = REPO.joinpath(*parts[:k])
                for f in (base.with_suffix(".py"), base / "__init__.py"):
                    if f.is_file():
                        module, rest = f, parts[k:]
                        break
                if module:
                    break
            if module is None or (rest and not _defines(module.read_text(), rest[0])):
                unknown.append(tok)
    assert not unknown, f"{_rel(page)} names what the code does not have: {unknown}"


def test_every_docs_page_is_in_the_index() -> None:
    index = DOCS / "README.md"
    linked = {_resolve(index, t)[0] for t in _links(index)}
    pages = [p for p in DOCS.rglob("*.md") if p != index]
    assert pages
    unlisted = [_rel(p) for p in pages if p.resolve() not in linked]
    assert not unlisted, f"link these pages from docs/README.md: {unlisted}"


def test_generated_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_reference", REPO / "tools" / "gen_reference.py"
    )
    gen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gen
    spec.loader.exec_module(gen)
    assert gen.stale() == [], "run python tools/gen_reference.py and commit docs/reference/"


def test_the_generated_recipe_table_lists_every_mode() -> None:
    from edgezo.bundle import TRAINABLE_MODES

    text = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    table = text[text.index("## Recipes") :]
    for key in (*TRAINABLE_MODES, "lora_fa"):
        assert f"| `{key}` |" in table


BENCHMARKS = sorted((DOCS / "benchmarks").glob("*.md"))
#: a commit hash: backticked, or bare when it holds a letter and a digit (not a plain number)
_COMMIT = re.compile(r"`([0-9a-f]{7,40})`|\b((?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40})\b")


def _commits(text: str) -> set[str]:
    return {a or b for a, b in _COMMIT.findall(text)}


@pytest.mark.parametrize("page", BENCHMARKS, ids=_rel)
def test_benchmark_pages_say_when_where_what_and_how(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert re.search(r"\b20\d\d\b", text), "a date"
    assert re.search(r"machine", text, re.I), "the machine"
    assert re.search(r"commit", text, re.I) and _commits(text), "a commit"
    assert re.search(r"`(?:python|edgezo) [^`]+`", text), "the command"


def test_benchmark_commits_exist() -> None:
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True)
    if git.returncode != 0:
        pytest.skip("not a git checkout")
    cited = set().union(*(_commits(p.read_text()) for p in BENCHMARKS))
    unknown = [
        h
        for h in sorted(cited)
        if subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{h}^{{commit}}"], capture_output=True
        ).returncode
    ]
    assert not unknown, f"benchmark pages cite commits git does not know: {unknown}"


def test_the_readme_stays_short() -> None:
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_nothing_points_outside_the_project() -> None:
    outside = ("papers" + ".md", "../" + "shared", "/work" + "/shared")
    offenders = []
    for root in (*TOP, *TOP_FILES):
        base = REPO / root
        files = [base] if base.is_file() else base.rglob("*") if base.is_dir() else []
        for f in files:
            if f.suffix not in (".py", ".md", ".toml", ".yaml", ".txt", "") or not f.is_file():
                continue
            if "out" in f.relative_to(REPO).parts[:2] or "__pycache__" in f.parts:
                continue
            text = f.read_text(encoding="utf-8", errors="ignore")
            offenders += [f"{f.relative_to(REPO)}: {s}" for s in outside if s in text]
    assert not offenders, offenders
