"""The pure E2EE decisions: when the room key must be (re)shared, and who it reached."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bots.crypto import (
    CannotEncrypt,
    DeviceSession,
    EncryptedSender,
    SessionView,
    assess_coverage,
    decide_share,
)
from bots.sending import SendRefused

BOT = "@bot:corp.test"
ANN, BEN = "@ann:corp.test", "@ben:corp.test"


def view(shared_with, *, shared=True, expired=False, unreachable=(), sid="S1"):
    return SessionView(sid, shared, expired, frozenset(shared_with), frozenset(unreachable))


MEMBERS = {BOT: frozenset({"BOTDEV"}), ANN: frozenset({"A1", "A2"}), BEN: frozenset({"B1"})}
ALL = {(ANN, "A1"), (ANN, "A2"), (BEN, "B1")}


def test_no_session_or_unshared_is_shared_without_rotation():
    for session in (None, view(ALL, shared=False)):
        d = decide_share(MEMBERS, BOT, session)
        assert d.share and not d.rotate


def test_a_session_every_member_device_has_is_reused():
    d = decide_share(MEMBERS, BOT, view(ALL))
    assert not d.share and not d.rotate


def test_a_new_device_or_member_rotates():
    d = decide_share(MEMBERS, BOT, view(ALL - {(ANN, "A2")}))
    assert d.share and d.rotate and ANN in d.reason
    d = decide_share(MEMBERS, BOT, view({(ANN, "A1"), (ANN, "A2")}))
    assert d.rotate and BEN in d.reason


def test_a_member_who_left_but_holds_the_key_rotates():
    gone = "@gone:corp.test"
    d = decide_share(MEMBERS, BOT, view(ALL | {(gone, "G1")}))
    assert d.rotate and gone in d.reason


def test_expired_session_rotates():
    assert decide_share(MEMBERS, BOT, view(ALL, expired=True)).rotate


def test_devices_unreachable_for_this_session_do_not_force_rotation_again():
    partial = ALL - {(ANN, "A2")}
    assert not decide_share(MEMBERS, BOT, view(partial, unreachable={(ANN, "A2")})).share


def test_coverage_names_members_without_devices_and_unreached_ones():
    members = {**MEMBERS, "@new:corp.test": frozenset()}
    cover = assess_coverage(members, BOT, frozenset({(ANN, "A1")}))
    assert cover.no_devices == {"@new:corp.test"}
    assert cover.unreached_users == {BEN}  # ann got it on one of her two devices
    assert cover.unreached_devices == {(ANN, "A2"), (BEN, "B1")}
    assert not cover.complete
    assert assess_coverage(MEMBERS, BOT, frozenset(ALL)).complete


def test_the_bot_itself_needs_no_key():
    assert assess_coverage({BOT: frozenset({"OTHER"})}, BOT, frozenset()).complete


def test_cannot_encrypt_carries_room_reason_and_users():
    e = CannotEncrypt("!r", "members without any E2EE device", users=[BEN, ANN])
    assert e.room_id == "!r" and e.users == (ANN, BEN)
    assert "!r" in str(e) and "without any E2EE device" in str(e)
    assert isinstance(e, SendRefused) and e.reason == "members without any E2EE device"
    assert not e.transient


def test_device_session_file_is_private_and_token_not_in_repr(tmp_path):
    path = tmp_path / "session.json"
    s = DeviceSession(BOT, "DEV", "syt_secret_token", "pickle-key")
    s.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DeviceSession.load(path) == s
    assert "syt_secret_token" not in repr(s)
    assert json.loads(path.read_text())["device_id"] == "DEV"
    path.write_text("{not json")
    assert DeviceSession.load(path) is None
    assert DeviceSession.load(tmp_path / "missing.json") is None


def test_the_appservice_sender_cannot_have_a_device(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not let sync"):
        EncryptedSender(None, homeserver_url="http://127.0.0.1:1",  # type: ignore[arg-type]
                        user_id="@enclave:corp.test", store_dir=tmp_path,
                        appservice_sender="@enclave:corp.test")
