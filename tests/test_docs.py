"""The README and docs/: the README stays a short first page, links and named files resolve, the Notes a page
points at exist, and the generated pages (configuration, command line) match what their generators write."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gen_cli_docs  # noqa: E402
import gen_config_docs  # noqa: E402

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
TWO_COMMANDS = "```bash\nbash tools/install.sh && python3 -m offload train\npython3 -m pytest\n```\n"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?:offload|native|bench|tools|tests|docs)/[\w./-]*")
NOTE_IN_FILE = re.compile(r"Note \[([^\]]+)\] in `([^`]+)`")
NOTE = re.compile(r"Note \[([^\]]+)\]")


def _ids(pages: list[Path]) -> list[str]:
    return [p.relative_to(ROOT).as_posix() for p in pages]


def _prose(page: Path) -> str:
    """A page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)


def _flat(text: str) -> str:
    """Text with line breaks, indentation and comment leaders folded into single spaces, so that a name wrapped
    over two lines (of Markdown or of a comment) reads as one."""
    lines = (re.sub(r"^\s*(?:#|//|\*)?\s*", "", line) for line in text.splitlines())
    return " ".join(" ".join(lines).split())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            slug, n = _slug(line.lstrip("#")), 1
            while slug in anchors:  # GitHub numbers repeated headings
                slug, n = f"{_slug(line.lstrip('#'))}-{n}", n + 1
            anchors.add(slug)
    return anchors


def test_readme_starts_with_the_two_commands():
    assert README.read_text().startswith(TWO_COMMANDS)


def test_readme_is_a_short_first_page():
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; details belong in docs/"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_repository_paths_exist(page):
    missing = [span for span in CODE_SPAN.findall(_prose(page))
               if REPO_PATH.fullmatch(span) and not (ROOT / span).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_notes_exist(page):
    text = _flat(_prose(page))
    sources = {p: _flat(p.read_text()) for d in ("offload", "native") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".cpp", ".h", ".inc") and p.is_file()}
    problems = []
    for title, path in NOTE_IN_FILE.findall(text):
        source = sources.get(ROOT / path)
        if source is None:
            problems.append(f"Note [{title}] in {path}: no such source file")
        elif f"Note [{title}]" not in source:
            problems.append(f"Note [{title}] is not in {path}")
    everywhere = " ".join(sources.values())
    named = set(NOTE.findall(CODE_SPAN.sub("", text)))  # (`Note [title]` in backticks is not a reference)
    problems += [f"Note [{title}] is in no source file" for title in named if f"Note [{title}]" not in everywhere]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(sorted(problems))


def test_configuration_page_is_generated():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == gen_config_docs.render(), \
        "docs/configuration.md is stale: run python3 tools/gen_config_docs.py"


def test_cli_page_is_generated():
    page = ROOT / "docs" / "cli.md"
    assert page.read_text() == gen_cli_docs.render(), "docs/cli.md is stale: run python3 tools/gen_cli_docs.py"


def test_every_config_field_has_a_docstring_entry():
    from offload.config import Config, IOConfig

    class Undocumented(IOConfig):
        """A subclass whose docstring names no field."""

    for cls in (Config, IOConfig):
        gen_config_docs.field_docs(cls)  # raises when a field has no entry
    with pytest.raises(ValueError, match="no docstring entry for backend, block_size"):
        gen_config_docs.field_docs(Undocumented)
