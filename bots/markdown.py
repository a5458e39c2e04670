"""Markdown -> Matrix message content (``body`` plus ``formatted_body`` HTML).

CommonMark with tables and strikethrough; raw HTML in the source is escaped, not passed
through, so a template or a webhook payload cannot inject markup. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(
    ["table", "strikethrough"])


def render_html(markdown: str) -> str:
    """The HTML of a Markdown text (raw HTML escaped; unsafe link schemes left as text)."""
    return _MD.render(markdown).strip()


_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def plain_body(markdown: str) -> str:
    """The plain-text ``body`` of a Markdown text: its backslash escapes resolved (outside
    code, where a backslash is literal), so a client without HTML shows ``[click](url)``,
    not ``\\[click\\](url)``."""
    out: list[str] = []
    i, n = 0, len(markdown)
    while i < n:
        c = markdown[i]
        if c == "\\" and i + 1 < n and markdown[i + 1] in _PUNCT:
            out.append(markdown[i + 1])  # CommonMark: an escaped ASCII punctuation mark
            i += 2
        elif c == "`":
            run = (n - i) - len(markdown[i:].lstrip("`"))
            end = markdown.find(markdown[i:i + run], i + run)
            while end != -1 and (markdown[end + run:end + run + 1] == "`"
                                 or markdown[end - 1] == "`"):
                end = markdown.find(markdown[i:i + run], end + 1)
            if end == -1:  # no closing run: the backticks are text
                out.append(markdown[i:i + run])
                i += run
            else:  # a code span (or fence): kept as written
                out.append(markdown[i:end + run])
                i = end + run
        else:
            out.append(c)
            i += 1
    return "".join(out)


def message_content(markdown: str, *, notice: bool = False,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``m.room.message`` content: the Markdown as ``body`` (escapes resolved), HTML as
    ``formatted_body``.

    ``notice`` makes it an ``m.notice`` (what bots send so other bots do not answer)."""
    content: dict[str, Any] = {
        "msgtype": "m.notice" if notice else "m.text",
        "body": plain_body(markdown),
        "format": "org.matrix.custom.html",
        "formatted_body": render_html(markdown),
    }
    if extra:
        content.update(extra)
    return content
