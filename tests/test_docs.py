"""The doc check: the README stays a short page for users, links resolve, each table lives once.

This is the one test file that reads documentation wording; no other test asserts on it. It reads
text files only, so it runs in well under a second. The doctests in ``README.md`` and
``docs/*.md`` are run by pytest itself (``--doctest-glob`` in ``pyproject.toml``); the last test
here checks that the configuration still collects every page that holds one.
"""

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCHMARKS = ROOT / "benchmarks" / "README.md"
PAGES = [README, *DOCS, BENCHMARKS]

README_LIMIT = 12_000  # bytes: issue 15 asks for a README of at most 12 KB.

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
TABLE_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(path: Path) -> str:
    """The page without its fenced code blocks: what renders as text, links and tables."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, no punctuation, spaces to hyphens, -1 on repeats."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(prose(path)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def tables(path: Path) -> list[list[str]]:
    """Each markdown table outside code blocks, as its rows (separator left out), stripped."""
    found: list[list[str]] = []
    lines = [line.strip() for line in prose(path).splitlines()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and TABLE_SEPARATOR.match(lines[i + 1]):
            rows = [line]
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            found.append(rows)
    return found


def test_readme_is_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit 12 KB)"


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(INLINE_CODE.sub("", prose(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{relative(page)}: {broken}"


def test_each_table_lives_in_one_file():
    # A header row or a data row that appears in two files is a copied table: copies drift.
    # Within one file, repeats are history (benchmarks/README.md keeps each run's tables).
    where: dict[str, set[str]] = {}
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for table in tables(page):
            for row in table:
                where.setdefault(re.sub(r"\s+", " ", row), set()).add(relative(page))
    copied = {row: sorted(files) for row, files in where.items() if len(files) > 1}
    assert not copied, copied


def test_readme_quotes_no_speed_figure():
    # Measured figures live in benchmarks/README.md only; the README links there.
    ratios = re.findall(r"\b\d+(?:\.\d+)?x\b", prose(README))
    assert not ratios, ratios


def test_readme_states_the_recompile_and_mark_dynamic():
    # The claim that tests/test_losses.py's compile test checks (2 graphs, or 1 with mark_dynamic).
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert "do not recompile when the batch size changes" not in readme
    assert "recompiles once (2 graphs in all)" in readme
    assert "torch._dynamo.mark_dynamic(x, 0)" in readme


def test_every_make_target_the_docs_name_exists():
    makefiles = [ROOT / "Makefile", *ROOT.glob("peers/*.mk")]
    defined = {
        name
        for makefile in makefiles
        for name in re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile.read_text(), re.MULTILINE)
    }
    named = {
        (relative(page), target)
        for page in PAGES
        # `make x` in prose, or a line of a shell block that starts with it.
        for target in re.findall(
            r"(?:`|^)make ([a-z][\w-]*)", page.read_text(encoding="utf-8"), re.MULTILINE
        )
    }
    missing = sorted((page, target) for page, target in named if target not in defined)
    assert not missing, missing


def test_pytest_collects_the_doctests_of_every_page(pytestconfig):
    globs = pytestconfig.getoption("doctestglob")
    testpaths = [ROOT / path for path in pytestconfig.getini("testpaths")]
    for page in [README, *DOCS]:
        if ">>>" not in page.read_text(encoding="utf-8"):
            continue
        # pytest matches a glob without a "/" against the file name, one with it against the path.
        assert any(
            fnmatch.fnmatch(page.as_posix(), f"*/{glob}")
            if "/" in glob
            else fnmatch.fnmatch(page.name, glob)
            for glob in globs
        ), f"{relative(page)} holds doctests that no --doctest-glob matches: {globs}"
        assert any(page == root or root in page.parents for root in testpaths), relative(page)
