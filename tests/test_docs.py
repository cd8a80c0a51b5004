"""The documentation holds together: every relative link and anchor in a tracked Markdown file
resolves, every setting is documented, the README stays a front door, and no tracked file points
outside the repository."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
# Tracked files read as text for the path checks (the rest are images and such).
TEXT_SUFFIXES = {
    ".md", ".py", ".js", ".mjs", ".html", ".css", ".conf", ".toml", ".txt", ".example",
    ".yml", ".yaml", ".sql", ".json", ".cfg", ".ini", ".sh",
}  # fmt: skip
TEXT_NAMES = {"Makefile", ".gitignore", "run"}
# Written in pieces, so that this file does not name what it looks for.
OUTSIDE = ("../" + "shared", "/" + "work" + "/")
EXTERNAL_CONTRACT = "PROTOCOL" + ".md"
# Settings read from the environment but not by server/config.py's Settings.
ENVIRONMENT_ONLY = {"PROMETHEUS_MULTIPROC_DIR"}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target), the text holding at most one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def tracked() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True)
    return [ROOT / name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]


def tracked_markdown() -> list[Path]:
    return [path for path in tracked() if path.suffix == ".md"]


def tracked_text() -> list[Path]:
    return [path for path in tracked() if path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES]


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines outside fenced code blocks, with their numbers, inline code spans removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, CODE_SPAN.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lower-cased, punctuation but hyphens dropped,
    each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text.replace("`", "").replace("*", ""))
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a file offers: its headings' slugs (a repeated one gets -1, -2, ...) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text("utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := HEADING.match(line)):
            base = slug(heading.group(2))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
        found.update(HTML_ANCHOR.findall(line))
    return found


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Each relative link of `path` (or of `text`, read as if it were there) to a missing file, or
    to an anchor its target lacks."""
    problems = []
    for number, line in prose_lines(path.read_text("utf-8") if text is None else text):
        for target in LINK.findall(line) + HTML_LINK.findall(line):
            if SCHEME.match(target):
                continue  # http(s), mailto: not this test's to check
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / unquote(file_part)).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not linked.is_relative_to(ROOT) or not linked.exists():
                problems.append(f"{where}: no such file")
            elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors(linked):
                problems.append(f"{where}: no such heading in {linked.relative_to(ROOT)}")
    return problems


def test_the_slug_rule_is_githubs() -> None:
    assert slug("Tools from MCP servers") == "tools-from-mcp-servers"
    assert slug("`join`") == "join"
    assert slug("Long conversations: a request within a budget (issue 30)") == (
        "long-conversations-a-request-within-a-budget-issue-30"
    )
    assert slug("Several processes, rebuilt; crash-safe turns") == "several-processes-rebuilt-crash-safe-turns"
    assert slug("Tool approval — 2026-12-07") == "tool-approval--2026-12-07"
    assert slug("`/readyz` answers 503") == "readyz-answers-503"


def test_a_missing_file_and_a_missing_heading_are_found() -> None:
    page = ROOT / "docs" / "configuration.md"
    written = page.read_text("utf-8")
    assert "](deployment.md#postgresql)" in written and "](../.env.example)" in written
    broken = written.replace("](deployment.md#postgresql)", "](deployment.md#no-such-heading)", 1)
    broken = broken.replace("](../.env.example)", "](../no-such-file.example)", 1)
    problems = broken_links(page, broken)
    assert sorted(problem.split(": ", 1)[1] for problem in problems) == [
        "../no-such-file.example: no such file",
        "deployment.md#no-such-heading: no such heading in docs/deployment.md",
    ]
    same_page = written + "\n[here](#no-such-heading) [there](#storage)\n"
    assert [problem.split(": ", 1)[1] for problem in broken_links(page, same_page)] == [
        "#no-such-heading: no such heading in docs/configuration.md"
    ]


@pytest.mark.parametrize("path", tracked_markdown(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text("utf-8")
    settings = {name.upper() for name in Settings.model_fields} | ENVIRONMENT_ONLY
    undocumented = sorted(name for name in settings if f"`{name}`" not in page)
    assert not undocumented, f"settings missing from docs/configuration.md: {undocumented}"
    # The first cell of each table row names the variables it documents.
    rows = re.findall(r"^\| ((?:`[A-Z0-9_]+`(?:, )?)+) \|", page, re.MULTILINE)
    documented = {name for row in rows for name in re.findall(r"`([A-Z0-9_]+)`", row)}
    assert documented, "no settings table found"
    assert not documented - settings, f"documented but not read: {sorted(documented - settings)}"


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(readme.splitlines()) <= 250
    for phrase in (r"original design", r"\bthe brief\b", r"\bseed\b"):
        assert not re.search(phrase, readme, re.IGNORECASE), phrase
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README does not link docs/{page.name}"


def test_no_tracked_file_points_outside_the_repository() -> None:
    found = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in tracked()
        for needle in OUTSIDE
        if needle.encode() in path.read_bytes()
    ]
    assert not found


def test_no_tracked_file_names_the_contract_by_another_file_than_docs_protocol_md() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked_text()
        for number, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1)
        if EXTERNAL_CONTRACT in line
    ]
    assert not found, f"{len(found)} lines name {EXTERNAL_CONTRACT}: {found}"
