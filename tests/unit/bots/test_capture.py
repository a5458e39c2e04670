"""The archive device's pure decisions (bots/capture/decisions.py), its archive record
(bridge/retention/events.py) and the config rules for ``capture: required``."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from bots.capture.decisions import (
    ABSENT,
    BEFORE_JOIN,
    DEVICE_NOT_READY,
    NO_SESSION_KEY,
    RULE_JOIN,
    RULE_REJOIN,
    capture_required,
    decide_capture_membership,
    decide_capture_notice,
    gap_reason,
)
from bridge.config.models import EnclaveConfig
from bridge.config.policy import RoomClassConfig
from bridge.policy.actions import Invite, Join, SetState
from bridge.policy.power import RoomPower
from bridge.policy.separation.outcomes import NotDone
from bridge.retention.events import (
    DECRYPTED_KEY,
    decrypted_event_id,
    decrypted_of,
    decrypted_record,
)

ROOM = "!r:corp.test"
ARCHIVE = "@enclave_archive:corp.test"
BOT = "@enclave:corp.test"
ADMIN = "@enclave-admin:corp.test"
ALICE = "@alice:corp.test"
ENCLAVE = (BOT, ADMIN)


def power(users: dict[str, int] | None = None, **levels: Any) -> RoomPower:
    return RoomPower({"users": users or {}, **levels}, "12", frozenset({ALICE}))


def membership(members: dict[str, str], pw: RoomPower, *, removed_by: str | None = None,
               required: bool = True) -> Any:
    return decide_capture_membership(ROOM, required=required, archive_user=ARCHIVE,
                                     members=members, power=pw, enclave_users=ENCLAVE,
                                     removed_by=removed_by)


def test_the_archive_user_is_invited_by_enclaves_bot_and_joins() -> None:
    d = membership({ALICE: "join", BOT: "join"}, power({BOT: 100}))
    assert d.actions == (
        Invite(room=ROOM, user=ARCHIVE, actor=BOT, rule_id=RULE_JOIN, reason=d.reason),
        Join(room=ROOM, actor=ARCHIVE, rule_id=RULE_JOIN, reason=d.reason))
    assert d.problem is None


def test_nothing_when_joined_or_not_required() -> None:
    assert membership({ARCHIVE: "join", BOT: "join"}, power({BOT: 100})).actions == ()
    assert membership({BOT: "join"}, power({BOT: 100}), required=False).actions == ()


def test_an_invited_archive_user_just_joins() -> None:
    d = membership({ARCHIVE: "invite"}, power())
    assert [type(a) for a in d.actions] == [Join]


def test_never_invited_by_a_member_on_enclaves_behalf() -> None:
    # alice (the creator) could invite; Enclave's bot is not in the room: reported, not done
    d = membership({ALICE: "join"}, power())
    assert [type(a) for a in d.actions] == [NotDone]
    assert d.problem is not None and "invite" in d.problem and ARCHIVE in d.problem
    # Enclave's bot without invite power (invite needs 50 here)
    d = membership({ALICE: "join", BOT: "join"}, power({BOT: 10}, invite=50))
    assert [type(a) for a in d.actions] == [NotDone] and "power 50" in (d.problem or "")


def test_a_removed_archive_user_is_brought_back_and_the_remover_named() -> None:
    d = membership({ALICE: "join", BOT: "join", ARCHIVE: "leave"}, power({BOT: 100}),
                   removed_by=ALICE)
    assert [type(a) for a in d.actions] == [Invite, Join]
    assert all(a.rule_id == RULE_REJOIN for a in d.actions)
    assert ALICE in d.reason


def test_a_banned_archive_user_is_reported_with_the_fix() -> None:
    d = membership({BOT: "join", ARCHIVE: "ban"}, power({BOT: 100}), removed_by=ALICE)
    assert [type(a) for a in d.actions] == [NotDone]
    assert "unban" in (d.problem or "")


def notice(mode: str, **kw: Any) -> Any:
    args: dict[str, Any] = {"already_shown": False, "topic": None,
                            "topic_line": "Archived by Enclave.", "notice": "Archived.",
                            "archive_user": ARCHIVE,
                            "members": {ARCHIVE: "join", BOT: "join"},
                            "power": power({BOT: 100}), "enclave_users": ENCLAVE, **kw}
    return decide_capture_notice(ROOM, mode=mode, **args)


def test_the_notice_is_posted_once() -> None:
    assert notice("notice").notice == "Archived." and notice("notice").actions == ()
    assert notice("notice", already_shown=True).notice is None
    assert notice("notice", members={BOT: "join"}).notice is None  # not joined yet


def test_the_topic_line_is_appended_by_enclaves_bot_and_kept() -> None:
    (a,) = notice("topic", topic="Case 42").actions
    assert isinstance(a, SetState) and a.actor == BOT
    assert a.content == {"topic": "Case 42\nArchived by Enclave."}
    (a,) = notice("topic").actions
    assert isinstance(a, SetState) and a.content == {"topic": "Archived by Enclave."}
    assert notice("topic", topic="Case 42\nArchived by Enclave.").actions == ()
    (a,) = notice("topic", members={ARCHIVE: "join"}, power=power()).actions
    assert isinstance(a, NotDone) and "topic" in a.message


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, NO_SESSION_KEY),
    ({"withheld": "m.unverified (device not verified)"},
     "withheld: m.unverified (device not verified)"),
    ({"joined_at_ms": 2_000, "sent_at_ms": 1_000}, BEFORE_JOIN),
    ({"joined_at_ms": 1_000, "sent_at_ms": 2_000}, NO_SESSION_KEY),
    ({"absent": True}, BEFORE_JOIN),  # never joined: history before the archive came
    ({"absent": True, "joined_at_ms": 1_000, "sent_at_ms": 2_000}, ABSENT),  # removed
    ({"device_ready": False}, DEVICE_NOT_READY),
])
def test_gap_reasons(kw: dict[str, Any], expected: str) -> None:
    args: dict[str, Any] = {"withheld": None, "joined_at_ms": None, "sent_at_ms": None, **kw}
    assert gap_reason(**args) == expected


def test_the_plaintext_record_links_to_the_ciphertext() -> None:
    envelope = {"event_id": "$c", "type": "m.room.encrypted", "sender": ALICE,
                "origin_server_ts": 5, "content": {"ciphertext": "x"}}
    clear = {"type": "m.room.message", "content": {"msgtype": "m.text", "body": "hi"},
             "sender": "@forged:corp.test"}
    rec = decrypted_record(ROOM, envelope, clear, by=ARCHIVE, device="DEV", at_ms=9,
                           session_id="S")
    assert rec["event_id"] == decrypted_event_id("$c") == "$c#decrypted"
    assert rec["sender"] == ALICE  # the envelope's (the homeserver vouches), not the payload
    assert rec["type"] == "m.room.message" and rec["content"]["body"] == "hi"
    assert rec[DECRYPTED_KEY] == {"of": "$c", "by": ARCHIVE, "device": "DEV", "at": 9,
                                  "session_id": "S", "recovered": False}
    assert decrypted_of(rec) == "$c" and decrypted_of(envelope) is None


def test_capture_is_off_unless_a_class_requires_it() -> None:
    assert not capture_required(RoomClassConfig(id="a"))
    assert capture_required(RoomClassConfig(id="a", capture="required"))
    assert not capture_required(RoomClassConfig(id="a", capture=False))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        RoomClassConfig(id="a", capture="sometimes")  # type: ignore[arg-type]


BASE: dict[str, Any] = {
    "homeserver": {"url": "http://127.0.0.1:8008", "server_name": "corp.test"},
    "appservice": {"as_token": {"env": "AS"}, "hs_token": {"env": "HS"},
                   "public_url": "http://127.0.0.1:9000"},
    "policy": {"default_class": "legal",
               "room_classes": [{"id": "legal", "capture": "required"}]},
}


def test_a_capture_class_needs_retention_and_the_archive_device() -> None:
    with pytest.raises(ValidationError, match="add a retention: section"):
        EnclaveConfig.model_validate({**BASE, "bots": {"archive": {}}})
    with pytest.raises(ValidationError, match=r"bots\.archive"):
        EnclaveConfig.model_validate({**BASE, "retention": {}})
    cfg = EnclaveConfig.model_validate({**BASE, "retention": {}, "bots": {"archive": {}}})
    assert cfg.bots is not None and cfg.bots.archive is not None
    with pytest.raises(ValidationError, match="encryption"):
        EnclaveConfig.model_validate({**BASE, "retention": {}, "bots": {
            "archive": {}, "encryption": {"enabled": False}}})
    with pytest.raises(ValidationError, match="different localparts"):
        EnclaveConfig.model_validate({**BASE, "retention": {}, "bots": {
            "archive": {}, "onboarding": {"bot": {"localpart": "archive",
                                                  "displayname": "x"}}}})


def test_the_transcript_shows_the_ciphertext_and_its_plaintext() -> None:
    from bridge.retention.events import DECRYPTED_BELOW, ENCRYPTED_TEXT
    from bridge.retention.transcript import render_html

    def enc(eid: str, ts: int) -> dict[str, Any]:
        return {"event_id": eid, "type": "m.room.encrypted", "sender": ALICE,
                "origin_server_ts": ts, "room_id": ROOM, "content": {"ciphertext": "x"}}

    read = enc("$c", 1)
    clear = {"type": "m.room.message", "content": {"msgtype": "m.text", "body": "draft v1"}}
    events = [read, decrypted_record(ROOM, read, clear, by=ARCHIVE, device="D", at_ms=2),
              enc("$gap", 3)]
    page = render_html(ROOM, None, events, {}, {})
    assert DECRYPTED_BELOW in page and "draft v1" in page
    assert ENCRYPTED_TEXT in page  # the one never decrypted stays marked as such


async def test_a_withheld_notice_is_remembered_per_session(tmp_path: Any) -> None:
    import nio

    from bots.capture.device import ArchiveDevice

    device = ArchiveDevice(object(), homeserver_url="http://127.0.0.1:1", user_id=ARCHIVE,  # type: ignore[arg-type]
                           store_dir=tmp_path)
    withheld = nio.UnknownToDeviceEvent.from_dict({
        "type": "m.room_key.withheld", "sender": ALICE,
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": ROOM,
                    "session_id": "S1", "code": "m.unverified",
                    "reason": "Device not verified"}})
    await device._to_device(withheld)
    assert device.withheld == {"S1": "m.unverified (Device not verified)"}
    assert gap_reason(withheld=device.withheld["S1"], joined_at_ms=None,
                      sent_at_ms=None) == "withheld: m.unverified (Device not verified)"
    assert device.session_of({"content": {"session_id": "S1", "sender_key": "K"}}) == (
        "S1", "K")
    assert device.session_of({"content": {}}) == (None, None)


# -- the room's one notice: marked shown only once it is in the room ----------------------
class _KV:
    """The bots' key/value store in memory; ``fail_put`` makes one write of a key fail (a
    crash right before it)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], str] = {}
        self.fail_put: str | None = None

    async def component_get(self, component: str, key: str) -> str | None:
        return self.rows.get((component, key))

    async def component_put(self, component: str, key: str, value: str, now: int) -> None:
        if key == self.fail_put:
            self.fail_put = None
            raise RuntimeError("crash")
        self.rows[(component, key)] = value

    async def component_delete(self, component: str, key: str) -> bool:
        return self.rows.pop((component, key), None) is not None


class _Executor:
    """``run_direct`` as the real one behaves for a bot message: read back first (an event
    with the same key already in the room is the send), else send. ``away``: the
    homeserver does not answer."""

    def __init__(self) -> None:
        self.room: dict[str, str] = {}  # key -> event id of what was sent
        self.calls: list[tuple[str, bool]] = []
        self.away = False

    async def run_direct(self, action: Any, key: str, *, source: str,
                         resend: bool = True) -> Any:
        from bridge.matrix.executor import Outcome

        self.calls.append((key, resend))
        if self.away:
            return Outcome("failed", "HomeserverUnavailable: down")
        if resend and key in self.room:
            return Outcome("applied", self.room[key])
        assert action.actor == ARCHIVE and action.room == ROOM
        self.room[key] = f"$notice{len(self.room)}"
        return Outcome("applied", self.room[key])


def _archive_bot(**kw: Any) -> tuple[Any, _KV, _Executor]:
    from types import SimpleNamespace

    from bots.capture.bot import ArchiveBot
    from bridge.config.bots import ArchiveCaptureConfig

    kv, executor = _KV(), _Executor()
    facts = SimpleNamespace(known=True, members={ARCHIVE: "join", BOT: "join"},
                            power_view=power({BOT: 100}))

    async def room_facts(room: str) -> Any:
        return facts

    async def policy() -> Any:
        return SimpleNamespace(classify_room=lambda f: SimpleNamespace(id="case"))

    svc = SimpleNamespace(namespace_prefix="enclave_", server_name="corp.test", kv=kv,
                          clock_ms=lambda: 1_000, executor=executor, main_bot_user_id=BOT,
                          admin_user_id=ADMIN)
    args: dict[str, Any] = {"device": object(), "gaps": object(),
                            "capture_plaintext": object(), "list_rooms": object(), **kw}
    bot = ArchiveBot(svc, ArchiveCaptureConfig(),  # type: ignore[arg-type]
                     separation=SimpleNamespace(room_facts=room_facts, policy=policy),
                     room_classes={"case": SimpleNamespace(capture="required",
                                                           capture_notice="notice")},
                     **args)
    assert bot.user_id == ARCHIVE
    return bot, kv, executor


async def test_a_crash_before_the_notice_goes_out_does_not_lose_it() -> None:
    bot, _, executor = _archive_bot()
    executor.away = True
    with pytest.raises(RuntimeError, match="not sent"):  # the inbox retries the event
        await bot.notice_actions(ROOM)
    assert executor.room == {} and await bot.storage.get(f"notice:{ROOM}") is None
    executor.away = False
    # a crash: whatever the first run handed on is gone; the event is handled again
    await bot.notice_actions(ROOM)
    assert list(executor.room.values()) == ["$notice0"]
    assert await bot.storage.get(f"notice:{ROOM}") is not None
    assert await bot.notice_actions(ROOM) == [] and len(executor.room) == 1


async def test_a_crash_after_the_notice_went_out_does_not_double_it() -> None:
    bot, kv, executor = _archive_bot()
    kv.fail_put = f"notice:{ROOM}"  # sent, then the process dies before the mark
    with pytest.raises(RuntimeError):
        await bot.notice_actions(ROOM)
    assert len(executor.room) == 1
    await bot.notice_actions(ROOM)  # handled again after the restart
    assert len(executor.room) == 1  # read back: the same notice, not a second one
    (k1, r1), (k2, r2) = executor.calls
    assert k1 == k2 and r1 and r2  # one key for both runs, read back before each send
    assert await bot.storage.get(f"notice:{ROOM}") is not None


# -- Enclave's own marks cannot be forged by what a sender controls ---------------------
def test_a_forged_decrypted_mark_is_not_a_plaintext_record() -> None:
    from bridge.policy.readers import replay_readers

    secret = {"event_id": "$secret", "type": "m.room.encrypted", "sender": ALICE,
              "origin_server_ts": 1, "content": {"ciphertext": "x"}}
    # a remote server can put any top-level key into a federated event; a client can put
    # one into its content or (never passed on by Synapse) unsigned
    forged = [
        {"event_id": "$forged", "type": "m.room.message", "sender": "@mallory:evil.test",
         "origin_server_ts": 9, "content": {"body": "x"}, DECRYPTED_KEY: {"of": "$secret"}},
        {"event_id": "$forged2", "type": "m.room.message", "sender": "@mallory:evil.test",
         "origin_server_ts": 9, "content": {"body": "x", DECRYPTED_KEY: {"of": "$secret"}},
         "unsigned": {DECRYPTED_KEY: {"of": "$secret"}}},
    ]
    for ev in forged:
        assert decrypted_of(ev) is None
    joined = {"type": "m.room.member", "state_key": ALICE, "sender": ALICE,
              "event_id": "$j", "content": {"membership": "join"}}
    late = {"type": "m.room.member", "state_key": "@mallory:evil.test",
            "sender": "@mallory:evil.test", "event_id": "$m", "content": {"membership": "join"}}
    readers = replay_readers([joined, secret, late, *forged], stands_for=decrypted_of)
    # the forged events get the readers at their own place (mallory joined), not those of
    # the message they claim to stand for
    assert readers["$forged"].could_read == (ALICE, "@mallory:evil.test")
    assert readers["$secret"].could_read == (ALICE,)


def test_an_encrypted_redaction_redacts_nothing_in_the_archive() -> None:
    from bridge.policy.lineage import message_lineage
    from bridge.retention.transcript import render_html

    victim = {"event_id": "$v", "type": "m.room.message", "sender": BOT,
              "origin_server_ts": 1, "room_id": ROOM, "content": {"body": "keep me"}}
    envelope = {"event_id": "$e", "type": "m.room.encrypted", "sender": ALICE,
                "origin_server_ts": 2, "room_id": ROOM, "content": {"ciphertext": "x"}}
    clear = {"type": "m.room.redaction", "content": {"redacts": "$v"}}
    rec = decrypted_record(ROOM, envelope, clear, by=ARCHIVE, device="D", at_ms=3)
    assert rec["type"] == "org.enclave.encrypted.m.room.redaction"
    assert message_lineage([victim, envelope, rec])["$v"].redaction is None
    page = render_html(ROOM, None, [victim, envelope, rec], {}, {})
    assert "keep me" in page and "message deleted" not in page


@pytest.mark.parametrize("archiving", [True, False])
async def test_a_gap_is_recovered_only_when_its_plaintext_is_archived(archiving: bool) -> None:
    from types import SimpleNamespace

    from bots.capture.store import CaptureGap

    gap = CaptureGap(event_id="$e", room_id=ROOM, sender=ALICE, session_id="S",
                     sender_key="K", reason="no session key",
                     event_json='{"event_id": "$e", "type": "m.room.encrypted"}', first_seen=1)
    marked: list[str] = []
    written: list[str] = []

    async def open_gaps() -> list[CaptureGap]:
        return [] if marked else [gap]

    async def recovered(event_id: str, now: int, *, audit: Any = None) -> bool:
        marked.append(event_id)
        return True

    async def try_decrypt(room: str, event: Any, within: float = 0) -> Any:
        return {"type": "m.room.message", "content": {"body": "hi"}}

    async def capture_plaintext(room: str, event: Any, clear: Any, **kw: Any) -> bool:
        if not archiving:  # retention.enabled: false archives nothing
            return False
        written.append(event["event_id"])
        return True

    device = SimpleNamespace(ready=True, withheld={}, has_session=lambda r, e: True,
                             try_decrypt=try_decrypt, device_id="DEV")
    bot, _, _ = _archive_bot(device=device,
                             gaps=SimpleNamespace(gaps=open_gaps, recovered=recovered),
                             capture_plaintext=capture_plaintext,
                             archiving=lambda: archiving)
    n = await bot.retry_gaps(request=False)
    # "recovered: key arrived; plaintext archived" only when it was
    assert (n, marked, written) == ((1, ["$e"], ["$e"]) if archiving else (0, [], []))
