"""Relations (reply, thread, edit, redaction) and the reply fallback, as the spec has them."""

from __future__ import annotations

from typing import Any

import pytest

from bots.commands import ParsedCommand, parse_command
from bridge.kernel.relations import (
    edit_target,
    is_redacted,
    is_thread_fallback,
    redaction_target,
    replacement_problem,
    reply_relation,
    reply_to,
    strip_reply_fallback,
    thread_root,
)
from bridge.retention.events import plain_text


def ev(rel: Any = None, **top: Any) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": "x"}
    if rel is not None:
        content["m.relates_to"] = rel
    return {"type": "m.room.message", "content": content, **top}


REPLY = {"m.in_reply_to": {"event_id": "$p"}}
THREAD = {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": True,
          "m.in_reply_to": {"event_id": "$last"}}
THREAD_REPLY = {**THREAD, "is_falling_back": False, "m.in_reply_to": {"event_id": "$q"}}
EDIT = {"rel_type": "m.replace", "event_id": "$old"}


@pytest.mark.parametrize(("event", "reply", "fallback", "root", "edit"), [
    (ev(), None, False, None, None),
    (ev(REPLY), "$p", False, None, None),
    (ev(THREAD), "$last", True, "$root", None),
    (ev(THREAD_REPLY), "$q", False, "$root", None),
    (ev(EDIT), None, False, None, "$old"),
    (ev("junk"), None, False, None, None),
    (ev({"m.in_reply_to": "$p"}), None, False, None, None),
    (ev({"rel_type": "m.thread", "event_id": 5}), None, False, None, None),
    ({"type": "m.room.message", "content": None}, None, False, None, None),
])
def test_relations(event: dict[str, Any], reply: str | None, fallback: bool, root: str | None,
                   edit: str | None) -> None:
    assert reply_to(event) == reply
    assert is_thread_fallback(event) is fallback
    assert thread_root(event) == root
    assert edit_target(event) == edit


@pytest.mark.parametrize(("event", "target"), [
    ({"type": "m.room.redaction", "redacts": "$a", "content": {}}, "$a"),
    ({"type": "m.room.redaction", "content": {"redacts": "$b"}}, "$b"),  # room v11
    ({"type": "m.room.redaction", "content": {}}, None),
    ({"type": "m.room.message", "redacts": "$a", "content": {}}, None),
])
def test_redaction_target(event: dict[str, Any], target: str | None) -> None:
    assert redaction_target(event) == target


def test_is_redacted() -> None:
    assert is_redacted({"unsigned": {"redacted_because": {}}})
    assert not is_redacted({"unsigned": {}}) and not is_redacted({"unsigned": "x"})


@pytest.mark.parametrize(("body", "stripped"), [
    # the spec's fallback: quoted parent, one blank line, the reply
    ("> <@bob:x> original\n> more\n\nmy answer", "my answer"),
    ("> <@bob:x> original\n>\n> after an empty quoted line\n\nanswer", "answer"),
    ("> <@bob:x> q\n\nline one\n\nline two", "line one\n\nline two"),
    # only one blank line belongs to the fallback; the rest is the reply's
    ("> <@bob:x> q\n\n\nindented answer", "\nindented answer"),
    # no blank line after the quote: the author's own quote, kept
    ("> a quote I typed\nand my words", "> a quote I typed\nand my words"),
    ("> just a quote", "> just a quote"),
    # not starting with "> ": nothing to strip
    (">no space\n\nx", ">no space\n\nx"),
    ("plain", "plain"),
    ("", ""),
])
def test_strip_reply_fallback(body: str, stripped: str) -> None:
    assert strip_reply_fallback(body) == stripped


@pytest.mark.parametrize("body", [
    "> <@bot:x> 📣 Policy\n> more\n\n!ack",
    "> <@bot:x> q\n\n\n!ack",
    "> a quote I typed\n!ack",
])
def test_bots_and_transcripts_read_a_reply_alike(body: str) -> None:
    """The bots' command parser and the transcript see the same text after the fallback
    (before the kernel, the bots also dropped a quote with no blank line after it)."""
    event = ev(REPLY)
    event["content"]["body"] = body
    text = plain_text(event)
    cmd = parse_command(body)
    if text.strip().startswith("!ack"):
        assert cmd == ParsedCommand("ack", "")
    else:
        assert cmd is None


def test_a_reply_relation_reads_back() -> None:
    """What the bots write as a reply is what the kernel reads as one."""
    event = {"content": {"body": "ok", "m.relates_to": reply_relation("$q")}}
    assert reply_to(event) == "$q"


def _m(sender: str, **content: Any) -> dict[str, Any]:
    return {"type": "m.room.message", "sender": sender, "content": content}


_EDIT = {"m.relates_to": {"rel_type": "m.replace", "event_id": "$o"},
         "m.new_content": {"body": "new"}}


@pytest.mark.parametrize("original,edit,problem", [
    (_m("@a"), _m("@a", **_EDIT), None),
    (_m("@a"), _m("@b", **_EDIT), "not sent by the original sender"),
    (_m("@a"), {**_m("@a", **_EDIT), "type": "m.sticker"}, "not the original's event type"),
    ({**_m("@a"), "state_key": ""}, _m("@a", **_EDIT), "a state event"),
    (_m("@a", **{"m.relates_to": {"rel_type": "m.replace", "event_id": "$x"}}),
     _m("@a", **_EDIT), "the original is itself an edit"),
    (_m("@a"), _m("@a", **{"m.relates_to": _EDIT["m.relates_to"]}), "no m.new_content"),
    ({"type": "m.room.encrypted", "sender": "@a", "content": {}},
     {"type": "m.room.encrypted", "sender": "@a",
      "content": {"m.relates_to": _EDIT["m.relates_to"]}}, None),
])
def test_replacement_problem(original: dict[str, Any], edit: dict[str, Any],
                             problem: str | None) -> None:
    assert replacement_problem(original, edit) == problem
