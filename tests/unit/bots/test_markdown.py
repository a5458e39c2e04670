"""The plain ``body`` of a Markdown message: escapes resolved, code kept as written."""

from __future__ import annotations

import pytest

from bots.announcements.spec import escape_markdown, fill_webhook
from bots.markdown import message_content, plain_body


@pytest.mark.parametrize(
    ("markdown", "plain"),
    [
        pytest.param(r"\[click\]\(https://x.example/a\_b\)", "[click](https://x.example/a_b)",
                     id="escaped-link"),
        pytest.param(r"db1 is at \*99%\*", "db1 is at *99%*", id="escaped-emphasis"),
        pytest.param(r"back\\slash", "back\\slash", id="escaped-backslash"),
        pytest.param(r"not \an escape", r"not \an escape", id="backslash-before-letter"),
        pytest.param(r"code `\[x\]` and \[y\]", r"code `\[x\]` and [y]", id="code-span"),
        pytest.param(r"``a`b`` \* `x", r"``a`b`` * `x", id="double-ticks-and-unclosed"),
        pytest.param("```\nfence \\*\n```\nafter \\*", "```\nfence \\*\n```\nafter *",
                     id="fence"),
        pytest.param(r"\`not code\`", "`not code`", id="escaped-backticks"),
        pytest.param("**bold** stays Markdown", "**bold** stays Markdown", id="markdown"),
        pytest.param("", "", id="empty"),
    ],
)
def test_plain_body(markdown: str, plain: str) -> None:
    assert plain_body(markdown) == plain


def test_a_webhook_payload_is_plain_in_body_and_inert_in_html() -> None:
    text = fill_webhook("Alert: {{s}}", {"s": "see [click](https://evil.example) *now*"})
    content = message_content(text)
    assert content["body"] == "Alert: see [click](https://evil.example) *now*"
    assert "\\" not in content["body"]
    assert "<a " not in content["formatted_body"] and "<em>" not in content["formatted_body"]
    assert plain_body(escape_markdown("a\\b")) == "a\\b"
