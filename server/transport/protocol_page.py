"""docs/protocol.md as a page a person reads, linked from the API page: rendered here, on the
server, by markdown-it-py with raw HTML off, so the page needs no script. Headings get the ids
GitHub gives them, so the contents' links and any `#section` link work on both."""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

STYLESHEET = Path(__file__).resolve().parent / "protocol_page.css"
STYLESHEET_PATH = "/docs/protocol.css"
RAW_PATH = "/docs/protocol.md"
# What GitHub keeps of a heading's text in its id: letters, digits, `_`, `-` and spaces (then `-`).
_DROPPED_FROM_SLUG = re.compile(r"[^\w\- ]")
_ALIGNED = re.compile(r"text-align:(left|right|center)")

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{stylesheet}">
</head>
<body>
<nav><a href="/docs">API page</a> · <a href="{raw}">Markdown source</a></nav>
<main>
{body}</main>
</body>
</html>
"""


def heading_slug(text: str, taken: dict[str, int]) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as `-`, and `-1`, `-2`,
    ... after an id already given on the page."""
    slug = _DROPPED_FROM_SLUG.sub("", text.strip().lower()).replace(" ", "-")
    seen = taken.get(slug, 0)
    taken[slug] = seen + 1
    return slug if seen == 0 else f"{slug}-{seen}"


def _plain_text(inline: Token) -> str:
    return "".join(child.content for child in inline.children or () if child.type in ("text", "code_inline"))


def _heading_ids_and_no_inline_style(state: StateCore) -> None:
    """Ids on headings; a table column's alignment as a class, since the page's CSP refuses inline style."""
    taken: dict[str, int] = {}
    tokens = state.tokens
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and index + 1 < len(tokens):
            token.attrSet("id", heading_slug(_plain_text(tokens[index + 1]), taken))
        elif token.type in ("th_open", "td_open"):
            style = str(token.attrGet("style") or "")
            if style:
                token.attrs.pop("style", None)
                aligned = _ALIGNED.search(style)
                if aligned:
                    token.attrSet("class", f"align-{aligned.group(1)}")


def _markdown() -> MarkdownIt:
    # CommonMark with tables and strikethrough (as GitHub shows the file); raw HTML stays text.
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    md.core.ruler.push("heading_ids", _heading_ids_and_no_inline_style)
    return md


def _title(markdown: str) -> str:
    first = next((line for line in markdown.splitlines() if line.startswith("# ")), "# Protocol")
    return first.removeprefix("# ").strip()


@functools.lru_cache(maxsize=2)
def _rendered(path: Path, modified_ns: int) -> str:
    """The page for one version of the file (a changed file has another mtime: rendered again)."""
    markdown = path.read_text(encoding="utf-8")
    return PAGE.format(
        title=html.escape(_title(markdown)),
        stylesheet=STYLESHEET_PATH,
        raw=RAW_PATH,
        body=_markdown().render(markdown),
    )


def render_page(path: Path) -> str:
    """The HTML page of the Markdown file at `path` (FileNotFoundError when it is absent)."""
    return _rendered(path, path.stat().st_mtime_ns)
