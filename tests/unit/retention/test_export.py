"""Export of the archive: the pure renderers (HTML transcript, EML) and their helpers."""

from __future__ import annotations

import email
import re
from email import policy as email_policy
from typing import Any

import pytest

from bridge.kernel.relations import edit_target, redaction_target, reply_to, thread_root
from bridge.kernel.timestamps import iso_utc
from bridge.retention.events import (
    DELETED_TEXT,
    ENCRYPTED_TEXT,
    anchor,
    attachment_mxc,
    display_names,
    is_attachment,
    plain_text,
    room_name,
    safe_name,
)
from bridge.retention.export import (
    event_marks,
    media_extension,
    message_id,
    render_eml,
)
from bridge.retention.transcript import membership_line, render_html

ROOM = "!room:corp.example.com"
ALICE = "@alice:corp.example.com"
BOB = "@bob:corp.example.com"
T0 = 1_714_560_000_000  # 2024-05-01T10:40:00Z


def ev(eid: str, sender: str, content: dict[str, Any], *, type: str = "m.room.message",
       ts: int = T0, **extra: Any) -> dict[str, Any]:
    return {"event_id": eid, "room_id": ROOM, "sender": sender, "type": type,
            "origin_server_ts": ts, "content": content, **extra}


def text(eid: str, sender: str, body: str, ts: int = T0, **content: Any) -> dict[str, Any]:
    return ev(eid, sender, {"msgtype": "m.text", "body": body, **content}, ts=ts)


def member(user: str, membership: str, *, sender: str | None = None, name: str | None = None,
           prev: dict[str, Any] | None = None, ts: int = T0, **content: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"membership": membership, **content}
    if name is not None:
        c["displayname"] = name
    e = ev(f"$m-{user}-{membership}-{ts}", sender or user, c, type="m.room.member", ts=ts,
           state_key=user)
    if prev is not None:
        e["unsigned"] = {"prev_content": prev}
    return e


# -- helpers --------------------------------------------------------------------------------
REL_CASES = [
    # (content, reply_to, thread_root, edit_target)
    ({"body": "x"}, None, None, None),
    ({"m.relates_to": {"m.in_reply_to": {"event_id": "$p"}}}, "$p", None, None),
    ({"m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "is_falling_back": True,
                       "m.in_reply_to": {"event_id": "$prev"}}}, "$prev", "$root", None),
    ({"m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"}}, None, None, "$orig"),
    ({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$a", "key": "+1"}},
     None, None, None),
    ({"m.relates_to": "garbage"}, None, None, None),
    ({"m.relates_to": {"m.in_reply_to": {"event_id": 5}}}, None, None, None),
]


@pytest.mark.parametrize(("content", "reply", "root", "edit"), REL_CASES)
def test_relations(content: dict[str, Any], reply: str | None, root: str | None,
                   edit: str | None) -> None:
    e = ev("$e", ALICE, content)
    assert (reply_to(e), thread_root(e), edit_target(e)) == (reply, root, edit)


@pytest.mark.parametrize(("event", "target"), [
    ({"type": "m.room.redaction", "redacts": "$x", "content": {}}, "$x"),
    ({"type": "m.room.redaction", "content": {"redacts": "$y"}}, "$y"),  # room v11
    ({"type": "m.room.message", "redacts": "$x", "content": {}}, None),
])
def test_redaction_target(event: dict[str, Any], target: str | None) -> None:
    assert redaction_target(event) == target


@pytest.mark.parametrize(("type_", "content", "mxc", "attachment"), [
    ("m.room.message", {"msgtype": "m.image", "body": "a.png", "url": "mxc://s/a"},
     "mxc://s/a", True),
    ("m.room.message", {"msgtype": "m.file", "body": "f", "file": {"url": "mxc://s/f"}},
     "mxc://s/f", True),
    ("m.room.message", {"msgtype": "m.video", "url": "mxc://s/v"}, "mxc://s/v", True),
    ("m.room.message", {"msgtype": "m.audio", "url": "mxc://s/au"}, "mxc://s/au", True),
    ("m.sticker", {"body": "cat", "url": "mxc://s/st"}, "mxc://s/st", True),
    ("m.room.message", {"msgtype": "m.text", "body": "hi", "url": "mxc://s/t"},
     "mxc://s/t", False),
    ("m.room.message", {"msgtype": "m.image", "url": "javascript:alert(1)"}, None, False),
    ("m.room.message", {"msgtype": "m.image", "url": 7}, None, False),
    ("m.room.message", {"msgtype": "m.image"}, None, False),
])
def test_attachment_detection(type_: str, content: dict[str, Any], mxc: str | None,
                              attachment: bool) -> None:
    e = ev("$e", ALICE, content, type=type_)
    assert attachment_mxc(e) == mxc
    assert is_attachment(e) is attachment


@pytest.mark.parametrize(("event", "expected"), [
    (text("$a", ALICE, "plain"), "plain"),
    (text("$a", ALICE, "> <@bob:x> original\n> more\n\nmy answer",
          **{"m.relates_to": {"m.in_reply_to": {"event_id": "$p"}}}), "my answer"),
    # not a reply: a quote the user typed stays
    (text("$a", ALICE, "> quoted\n\nmine"), "> quoted\n\nmine"),
    (text("$a", ALICE, "* fixed", **{"m.new_content": {"body": "fixed!"},
                                    "m.relates_to": {"rel_type": "m.replace",
                                                     "event_id": "$o"}}), "fixed!"),
    (text("$a", ALICE, "* fixed", **{"m.relates_to": {"rel_type": "m.replace",
                                                     "event_id": "$o"}}), "fixed"),
    (text("$a", ALICE, "<b>x</b>", format="org.matrix.custom.html",
          formatted_body="<script>bad()</script>"), "<b>x</b>"),
    (ev("$a", ALICE, {"ciphertext": "abc"}, type="m.room.encrypted"), ENCRYPTED_TEXT),
])
def test_plain_text(event: dict[str, Any], expected: str) -> None:
    assert plain_text(event) == expected


def test_display_names_latest_wins_and_leave_keeps_name() -> None:
    events = [
        member(ALICE, "join", name="Alice"),
        member(BOB, "join", name="Bob"),
        member(ALICE, "join", name="Alice Liddell", ts=T0 + 1),
        member(BOB, "leave", ts=T0 + 2),
        member("@carol:x", "join", name="   "),
        text("$t", ALICE, "not a member event"),
    ]
    assert display_names(events) == {ALICE: "Alice Liddell", BOB: "Bob"}


@pytest.mark.parametrize(("events", "expected"), [
    ([], None),
    ([ev("$n1", ALICE, {"name": "Old"}, type="m.room.name", state_key=""),
      ev("$n2", ALICE, {"name": "New"}, type="m.room.name", state_key="")], "New"),
    ([ev("$a", ALICE, {"alias": "#ops:x"}, type="m.room.canonical_alias", state_key="")],
     "#ops:x"),
    ([ev("$n", ALICE, {"name": "Odd"}, type="m.room.name", state_key="x")], None),
    ([ev("$n1", ALICE, {"name": "Named"}, type="m.room.name", state_key=""),
      ev("$a", ALICE, {"alias": "#ops:x"}, type="m.room.canonical_alias", state_key="")],
     "Named"),
])
def test_room_name(events: list[dict[str, Any]], expected: str | None) -> None:
    assert room_name(events) == expected


NAMES = {ALICE: "Alice", BOB: "Bob"}


@pytest.mark.parametrize(("event", "line"), [
    (member(ALICE, "join"), "Alice (@alice:corp.example.com) joined"),
    (member(ALICE, "join", name="Al", prev={"membership": "join", "displayname": "Alice"}),
     "Alice (@alice:corp.example.com) changed their display name to Al"),
    (member(BOB, "invite", sender=ALICE),
     "Alice (@alice:corp.example.com) invited Bob (@bob:corp.example.com)"),
    (member(BOB, "leave"), "Bob (@bob:corp.example.com) left"),
    (member(BOB, "leave", prev={"membership": "invite"}),
     "Bob (@bob:corp.example.com) rejected the invitation"),
    (member(BOB, "leave", sender=ALICE, reason="spam"),
     "Alice (@alice:corp.example.com) removed Bob (@bob:corp.example.com): spam"),
    (member(BOB, "ban", sender=ALICE),
     "Alice (@alice:corp.example.com) banned Bob (@bob:corp.example.com)"),
    (member(BOB, "leave", sender=ALICE, prev={"membership": "ban"}),
     "Alice (@alice:corp.example.com) unbanned Bob (@bob:corp.example.com)"),
    (member("@zed:x", "knock"), "@zed:x asked to join"),
])
def test_membership_line(event: dict[str, Any], line: str) -> None:
    assert membership_line(event, NAMES) == line


@pytest.mark.parametrize(("ts", "iso"), [
    (0, "1970-01-01T00:00:00Z"), (T0, "2024-05-01T10:40:00Z"), (None, "?"),
])
def test_iso_utc(ts: int | None, iso: str) -> None:
    assert iso_utc(ts) == iso


def test_safe_names_distinct_and_plain() -> None:
    names = {safe_name(x) for x in ("!a:b", "!a_b", "!a/b", "$x+y/z=")}
    assert len(names) == 4
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


def test_message_id_is_stable_distinct_and_atext() -> None:
    ids = ["$abc:server.org", "$abc%3Aserver.org", "$Ab+/c=_-", "$Ab+/c=_-x"]
    mids = [message_id(i) for i in ids]
    assert len(set(mids)) == len(ids)
    assert message_id(ids[0]) == mids[0]
    for m in mids:
        assert re.fullmatch(r"<[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+@matrix\.invalid>", m)


# -- HTML -----------------------------------------------------------------------------------
def room_events() -> list[dict[str, Any]]:
    t = T0
    return [
        member(ALICE, "join", name="Alice", ts=t),
        member(BOB, "join", name="Bob <b>", ts=t + 1),
        text("$hello", ALICE, "Hello <script>alert(1)</script> & welcome", ts=t + 10,
             format="org.matrix.custom.html", formatted_body="<img src=x onerror=steal()>"),
        text("$reply", BOB, "> <@alice:corp.example.com> Hello\n\nHi back", ts=t + 20,
             **{"m.relates_to": {"m.in_reply_to": {"event_id": "$hello"}}}),
        text("$root", ALICE, "Thread root", ts=t + 30),
        text("$main", BOB, "Main timeline again", ts=t + 40),
        text("$t1", BOB, "first in thread", ts=t + 50,
             **{"m.relates_to": {"rel_type": "m.thread", "event_id": "$root",
                                 "is_falling_back": True,
                                 "m.in_reply_to": {"event_id": "$root"}}}),
        text("$typo", ALICE, "teh original", ts=t + 60),
        text("$e1", ALICE, "* the first fix", ts=t + 70,
             **{"m.new_content": {"msgtype": "m.text", "body": "the first fix"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": "$typo"}}),
        text("$e2", ALICE, "* the final fix", ts=t + 80,
             **{"m.new_content": {"msgtype": "m.text", "body": "the final fix"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": "$typo"}}),
        text("$forged", BOB, "* forged by bob", ts=t + 85,
             **{"m.new_content": {"msgtype": "m.text", "body": "forged by bob"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": "$hello"}}),
        text("$secret", BOB, "oops secret", ts=t + 90),
        ev("$red", ALICE, {"reason": "leak"}, type="m.room.redaction", redacts="$secret",
           ts=t + 95),
        ev("$enc", BOB, {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "zzz"},
           type="m.room.encrypted", ts=t + 100),
        ev("$img", ALICE, {"msgtype": "m.image", "body": "cat.png", "url": "mxc://corp/cat",
                           "info": {"mimetype": "image/png", "size": 2048}}, ts=t + 110),
        ev("$doc", BOB, {"msgtype": "m.file", "body": "plan.pdf",
                         "file": {"url": "mxc://corp/plan"}}, ts=t + 120),
        ev("$react", BOB, {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$img",
                                            "key": "+1"}}, type="m.reaction", ts=t + 125),
        member(BOB, "leave", ts=t + 130),
    ]


def render(events: list[dict[str, Any]] | None = None, **kw: Any) -> str:
    events = room_events() if events is None else events
    return render_html(ROOM, "Ops <team>", events, display_names(events),
                       {"mxc://corp/cat": "../../media/" + "a" * 64}, **kw)


def block(page: str, eid: str) -> str:
    """The HTML of one event's block: from its id to the next event's id."""
    start = page.index(f'id="{anchor(eid)}"')
    nxt = page.find(' id="e-', start + 1)
    return page[start: nxt if nxt != -1 else len(page)]


def test_html_header_names_and_escaping() -> None:
    page = render(since_ms=T0, until_ms=T0 + 86_400_000, generated_ms=T0 + 3_600_000)
    assert page.startswith("<!DOCTYPE html>")
    assert "<h1>Ops &lt;team&gt;</h1>" in page
    assert ROOM in page
    assert "2024-05-01 10:40:00 UTC to 2024-05-02 10:40:00 UTC" in page
    assert "Generated</dt><dd>2024-05-01 11:40:00 UTC" in page
    assert "<style>" in page and "<link" not in page and "<script" not in page
    assert "Hello &lt;script&gt;alert(1)&lt;/script&gt; &amp; welcome" in page
    assert "onerror" not in page  # formatted_body is never rendered
    assert 'class="name">Alice</span> <span class="uid">@alice:corp.example.com' in page
    assert 'class="name">Bob &lt;b&gt;</span>' in page
    assert '<time datetime="2024-05-01T10:40:00Z">' in page


def test_html_attributes_cannot_be_broken_out_of() -> None:
    """Attribute values (file names, media links, marks) are escaped by the template's
    autoescape, quotes included: no event text becomes an attribute or a tag."""
    evil = 'x.png" onmouseover="steal()'
    events = [ev("$f", ALICE, {"msgtype": "m.image", "body": evil, "url": "mxc://corp/cat"}),
              ev("$g", ALICE, {"msgtype": "m.file", "body": "<b>f</b>",
                               "url": 'mxc://corp/x"y'})]
    page = render_html(ROOM, None, events, {}, {"mxc://corp/cat": '../m/"a'},
                       marks={"$f": [('hold" x="', "<i>held</i>")]})
    assert 'onmouseover="' not in page and "<b>f" not in page and "<i>" not in page
    assert 'download="x.png&#34; onmouseover=&#34;steal()"' in page
    assert 'href="../m/&#34;a"' in page and 'href="mxc://corp/x&#34;y"' in page
    assert 'class="mark hold&#34; x=&#34;"' in page


def test_html_without_range_or_clock() -> None:
    page = render([])
    assert "beginning to end" in page
    assert "Generated" not in page
    assert "No events selected." in page


def test_html_reply_quotes_and_links_parent_without_fallback() -> None:
    page = render()
    b = block(page, "$reply")
    assert f'In reply to <a href="#{anchor("$hello")}">Alice</a>' in b
    assert "Hello &lt;script&gt;" in b  # the parent's text, escaped, quoted
    assert "Hi back" in b and "&gt; &lt;@alice" not in b  # fallback stripped


def test_html_reply_to_event_outside_export() -> None:
    page = render([text("$r", BOB, "answer",
                        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$gone"}}})])
    assert "In reply to $gone (not in this export)" in page


def test_html_thread_replies_indented_under_root() -> None:
    page = render()
    root_at = page.index(f'id="{anchor("$root")}"')
    thread_at = page.index('<div class="thread">')
    child_at = page.index(f'id="{anchor("$t1")}"')
    main_at = page.index(f'id="{anchor("$main")}"')
    # root, then its thread (with the reply), then the main timeline continues
    assert root_at < thread_at < child_at < main_at
    assert "Thread: 1 reply" in page[thread_at:child_at]
    assert "in thread" in block(page, "$t1")
    assert "In reply to" not in block(page, "$t1")  # a thread fallback is not a reply


def test_html_thread_with_root_outside_export_is_marked() -> None:
    page = render([text("$t", BOB, "orphan",
                        **{"m.relates_to": {"rel_type": "m.thread", "event_id": "$r0"}})])
    assert "in thread $r0 (root not in this export)" in page
    assert '<div class="thread">' not in page


def test_html_edit_shows_latest_and_keeps_history() -> None:
    page = render()
    b = block(page, "$typo")
    assert "(edited 2024-05-01 10:40:00 UTC)" in b
    latest = b.index("the final fix")
    details = b.index("<details>")
    assert latest < details
    assert "teh original" in b[details:] and "the first fix" in b[details:]
    for eid in ("$e1", "$e2"):  # edits are not separate blocks
        assert f'id="{anchor(eid)}"' not in page
    # Bob cannot edit Alice's message: shown as Bob's own message, Alice's text unchanged
    assert "(edited" not in block(page, "$hello")
    assert "edit of $hello" in block(page, "$forged")


def test_html_redaction_encryption_membership_reactions() -> None:
    page = render()
    b = block(page, "$secret")
    assert f'<div class="msg deleted" id="{anchor("$secret")}"' in page
    who = "Alice (@alice:corp.example.com)"
    assert f"{DELETED_TEXT} by {who} at 2024-05-01 10:40:00 UTC: leak" in b
    body = b[:b.index('<div class="archived">')]
    assert "oops secret" not in body
    assert "archived content before deletion" in b and "oops secret" in b
    # shown, not collapsed: a printout carries the archived text
    assert "<details>" not in b
    assert f'id="{anchor("$red")}"' not in page
    assert ENCRYPTED_TEXT in block(page, "$enc")
    assert "zzz" not in page
    assert '<div class="system"' in page and "Alice (@alice:corp.example.com) joined" in page
    assert "Bob &lt;b&gt; (@bob:corp.example.com) left" in page
    assert "Reactions: +1 Bob &lt;b&gt; (@bob:corp.example.com)" in block(page, "$img")
    assert f'id="{anchor("$react")}"' not in page


def test_html_redaction_of_event_outside_export() -> None:
    page = render([ev("$r", ALICE, {}, type="m.room.redaction", redacts="$old")])
    assert "deleted $old (not in this export)" in page


def test_html_event_arrived_redacted() -> None:
    red = ev("$r", ALICE, {}, type="m.room.redaction", redacts="$x")
    page = render([ev("$x", BOB, {}, unsigned={"redacted_because": red})])
    assert DELETED_TEXT in page and "<details>" not in page


def test_html_attachments_link_copied_media_or_mxc() -> None:
    page = render()
    img = block(page, "$img")
    href = "../../media/" + "a" * 64
    assert f'<a href="{href}" download="cat.png">cat.png</a>' in img
    assert f'<img src="{href}"' in img
    assert "image/png, 2.0 KB" in img
    doc = block(page, "$doc")
    assert '<a href="mxc://corp/plan">plan.pdf</a>' in doc
    assert "not in the archive" in doc


# -- EML ------------------------------------------------------------------------------------
def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email_policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_eml_headers_and_body() -> None:
    e = text("$hello:corp.example.com", ALICE,
             "Hello team, the release is ready for the review on Friday", ts=T0)
    data = render_eml(ROOM, "Ops", e, {ALICE: "Alice Liddell"}, None)
    assert b"\r\n" in data
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Alice Liddell"
    assert msg["From"].addresses[0].addr_spec == "alice@corp.example.com"
    assert msg["To"].addresses[0].addr_spec == "room@corp.example.com"
    assert msg["Date"].datetime.timestamp() == T0 / 1000
    assert msg["Subject"] == "Ops: Hello team, the release is ready for the …"
    assert msg["Message-ID"] == message_id("$hello:corp.example.com")
    assert msg["X-Matrix-Event-ID"] == "$hello:corp.example.com"
    assert msg["X-Matrix-Sender"] == ALICE
    assert msg["In-Reply-To"] is None
    assert msg.get_content().strip() == "Hello team, the release is ready for the review on Friday"


def test_eml_reply_in_thread_references() -> None:
    e = text("$b", BOB, "> <@alice> q\n\nanswer",
             **{"m.relates_to": {"rel_type": "m.thread", "event_id": "$root",
                                 "m.in_reply_to": {"event_id": "$a"}}})
    msg = parse(render_eml(ROOM, None, e, {}, None))
    assert msg["In-Reply-To"] == message_id("$a")
    assert msg["References"] == f"{message_id('$root')} {message_id('$a')}"
    assert msg["Subject"] == f"{ROOM}: answer"  # room id when the room has no name
    assert msg["From"].addresses[0].display_name == BOB


def test_eml_attachment_and_header_injection() -> None:
    e = ev("$img", ALICE, {"msgtype": "m.image", "body": "cat.png", "url": "mxc://c/cat"})
    payload = b"\x89PNG\r\n\x1a\nbinary"
    data = render_eml(ROOM, "Ops\r\nBcc: evil@x", e, {ALICE: "Al\nX-Evil: 1"},
                      (payload, "image/png", "cat.png"))
    msg = parse(data)
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert msg["Subject"] == "Ops Bcc: evil@x: cat.png"
    parts = list(msg.iter_attachments())
    assert len(parts) == 1
    assert parts[0].get_filename() == "cat.png"
    assert parts[0].get_content_type() == "image/png"
    assert parts[0].get_content() == payload


def test_eml_encrypted_redacted_and_odd_ids() -> None:
    enc = ev("$enc", "@weird/name=1:host.example:8448", {"ciphertext": "zzz"},
             type="m.room.encrypted")
    red = ev("$red", BOB, {"reason": "leak"}, type="m.room.redaction", redacts="$enc")
    msg = parse(render_eml("!r:[::1]", "R", enc, {}, None, redaction=red))
    assert msg["From"].addresses[0].addr_spec == "weird/name=1@host.example"
    assert msg["To"].addresses[0].domain == "matrix.invalid"
    assert msg["X-Matrix-Redacted-By"] == BOB
    body = msg.get_content()
    assert body.startswith(f"[{DELETED_TEXT} by {BOB}")
    assert ENCRYPTED_TEXT in body and "zzz" not in body


def test_eml_bad_content_type_falls_back() -> None:
    e = ev("$f", ALICE, {"msgtype": "m.file", "body": "x.bin", "url": "mxc://c/x"})
    msg = parse(render_eml(ROOM, "R", e, {}, (b"data", "not a type", "x.bin")))
    part = next(iter(msg.iter_attachments()))
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_content() == b"data"


def test_html_marks_held_and_purged_messages() -> None:
    page = render(marks={"$hello": [("hold", "legal hold h1 (case C-1)"),
                                    ("gone", "gone from the homeserver (purged x)")]})
    b = block(page, "$hello")
    assert '<span class="mark hold">legal hold h1 (case C-1)</span>' in b
    assert '<span class="mark gone">gone from the homeserver (purged x)</span>' in b
    assert 'class="mark' not in block(page, "$img")


def test_event_marks_from_the_index_and_the_holds() -> None:
    from bridge.policy.retention import Hold
    from bridge.store.base import ArchivedEvent

    def row(eid: str, sender: str, ts: int, purged: int | None) -> ArchivedEvent:
        return ArchivedEvent(eid, ROOM, sender, "m.room.message", None, ts, "s", 1, ts,
                             purged)

    hold = Hold(id="h1", case_id="C-1", reason="r", placed_by="legal", users=frozenset(
        {BOB}), rooms=frozenset(), since_ms=None, until_ms=None, created_at=T0)
    released = Hold(id="h2", case_id="C-2", reason="r", placed_by="legal",
                    users=frozenset(), rooms=frozenset({ROOM}), since_ms=None, until_ms=None,
                    created_at=T0, released_at=T0 + 1, released_by="legal")
    marks = event_marks(ROOM, [row("$a", ALICE, T0, T0 + 5), row("$b", BOB, T0, None),
                               row("$c", ALICE, T0, None)], [hold, released])
    assert marks["$a"] == [("gone", "gone from the homeserver (purged "
                                    "2024-05-01 10:40:00 UTC); archived copy")]
    assert marks["$b"] == [("hold", "legal hold h1 (case C-1)")]
    assert "$c" not in marks


@pytest.mark.parametrize(("ctype", "name", "ext"), [
    ("image/png", "cat.png", ".png"),
    ("image/jpeg; charset=x", None, ".jpg"),
    (None, "report.PDF", ".pdf"),
    ("application/x-unknown-thing", "notes.txt", ".txt"),
    (None, "no-extension", ".bin"),
    (None, "evil.ext/../x", ".bin"),
    (None, None, ".bin"),
])
def test_media_extension(ctype: str | None, name: str | None, ext: str) -> None:
    assert media_extension(ctype, name) == ext


def test_eml_from_is_the_directory_email() -> None:
    e = text("$hello", ALICE, "hi", ts=T0)
    msg = parse(render_eml(ROOM, "Ops", e, {ALICE: "Alice Liddell"}, None,
                           emails={ALICE: "alice.liddell@example.com"}))
    assert msg["From"].addresses[0].addr_spec == "alice.liddell@example.com"
    assert msg["From"].addresses[0].display_name == "Alice Liddell"
    assert msg["X-Matrix-Sender"] == ALICE
    # an address that is not one falls back to the Matrix id's parts
    msg = parse(render_eml(ROOM, "Ops", e, {}, None, emails={ALICE: "not an address\r\n"}))
    assert msg["From"].addresses[0].addr_spec == "alice@corp.example.com"
