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


def message_content(markdown: str, *, notice: bool = False,
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``m.room.message`` content: the Markdown as ``body``, HTML as ``formatted_body``.

    ``notice`` makes it an ``m.notice`` (what bots send so other bots do not answer)."""
    content: dict[str, Any] = {
        "msgtype": "m.notice" if notice else "m.text",
        "body": markdown,
        "format": "org.matrix.custom.html",
        "formatted_body": render_html(markdown),
    }
    if extra:
        content.update(extra)
    return content
