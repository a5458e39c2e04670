"""The bots' cross-signing identity: the start-up decision (table), the keys (file mode,
signatures a verifier accepts), Element's "owner-signed devices" rule, and coverage counting
only signed devices."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bots.cross_signing import (
    KEYS_FILE,
    RESET_FILE,
    CrossSigningKeys,
    KeysUnreadable,
    decide_identity,
    device_signed_by,
    owner_signed_devices,
    request_reset,
)
from bots.crypto import DeviceSession, assess_coverage

BOT = "@enclave_announce:corp.test"
ANN = "@ann:corp.test"

# (local master, local problem, server master, reset) -> action
CASES = [
    (None, None, None, False, "create"),
    (None, "cross_signing.json: JSONDecodeError", None, False, "create"),
    ("K1", None, "K1", False, "reuse"),
    ("K1", None, None, False, "upload"),
    (None, None, "K1", False, "lost"),
    (None, "cross_signing.json: JSONDecodeError", "K1", False, "lost"),
    ("K1", None, "K2", False, "conflict"),
    (None, None, "K1", True, "replace"),
    ("K1", None, "K2", True, "replace"),
    ("K1", None, "K1", True, "replace"),
]


@pytest.mark.parametrize(("local", "problem", "server", "reset", "action"), CASES)
def test_identity_decision_table(local, problem, server, reset, action):
    d = decide_identity(local_master=local, local_problem=problem, server_master=server,
                        reset_requested=reset, store_dir="/var/lib/enclave/crypto/x", bot=BOT)
    assert d.action == action
    assert d.usable == (action not in ("lost", "conflict"))
    assert d.rule_id == "e2ee.cross_signing"


def test_a_lost_identity_names_the_fix_and_is_never_replaced_silently():
    d = decide_identity(local_master=None, local_problem=None, server_master="K1",
                        reset_requested=False, store_dir="/data/crypto/announce", bot=BOT)
    assert not d.usable
    assert "/data/crypto/announce" in d.reason
    assert f"enclave bots reset-identity {BOT}" in d.reason


def test_keys_file_is_private_round_trips_and_keeps_secrets_out_of_repr(tmp_path: Path):
    keys = CrossSigningKeys.generate()
    path = tmp_path / KEYS_FILE
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert CrossSigningKeys.load(path) == keys
    assert keys.public("master") not in repr(keys) and "master=" not in repr(keys)
    assert CrossSigningKeys.load(tmp_path / "absent.json") is None


@pytest.mark.parametrize("text", ["{", "{}", json.dumps({"master": "AA", "self_signing": "AA",
                                                          "user_signing": "AA"})])
def test_a_broken_keys_file_is_unreadable_not_absent(tmp_path: Path, text: str):
    path = tmp_path / KEYS_FILE
    path.write_text(text)
    with pytest.raises(KeysUnreadable):
        CrossSigningKeys.load(path)


def device_keys(user: str, device: str) -> dict:
    return {"user_id": user, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"curve25519:{device}": "c" * 43, f"ed25519:{device}": "e" * 43},
            "signatures": {user: {f"ed25519:{device}": "s" * 86}}}


def query_for(user: str, keys: CrossSigningKeys, devices: dict[str, dict]) -> dict:
    body = keys.upload_body(user)
    return {"master_keys": {user: body["master_key"]},
            "self_signing_keys": {user: body["self_signing_key"]},
            "device_keys": {user: devices}}


def test_upload_body_chains_to_the_master_key_and_signed_devices_are_recognised():
    keys = CrossSigningKeys.generate()
    d1 = device_keys(ANN, "D1")
    signed = keys.device_signature(d1, ANN)
    # the device's own signature stays on the published keys; the upload adds ours
    published = {**d1, "signatures": {ANN: {**d1["signatures"][ANN],
                                            **signed["signatures"][ANN]}}}
    query = query_for(ANN, keys, {"D1": published, "D2": device_keys(ANN, "D2")})
    assert owner_signed_devices(query, ANN) == frozenset({"D1"})
    assert device_signed_by(published, ANN, keys.public("self_signing"))
    assert not device_signed_by(d1, ANN, keys.public("self_signing"))
    body = keys.upload_body(ANN)
    assert body["master_key"]["usage"] == ["master"]
    assert body["user_signing_key"]["usage"] == ["user_signing"]
    assert f"ed25519:{keys.public('master')}" in body["self_signing_key"]["signatures"][ANN]


def test_forged_or_foreign_signatures_do_not_count():
    keys, other = CrossSigningKeys.generate(), CrossSigningKeys.generate()
    d1 = device_keys(ANN, "D1")
    # signed by another identity's self-signing key
    query = query_for(ANN, keys, {"D1": other.device_signature(d1, ANN)})
    assert owner_signed_devices(query, ANN) == frozenset()
    # a self-signing key not signed by the master key: nothing it signs counts
    bad = query_for(ANN, keys, {"D1": keys.device_signature(d1, ANN)})
    bad["self_signing_keys"][ANN] = {**bad["self_signing_keys"][ANN], "signatures": {}}
    assert owner_signed_devices(bad, ANN) == frozenset()
    # keys altered after signing
    tampered = keys.device_signature(d1, ANN)
    tampered["keys"] = {**tampered["keys"], "curve25519:D1": "x" * 43}
    assert owner_signed_devices(query_for(ANN, keys, {"D1": tampered}), ANN) == frozenset()
    # no cross-signing keys at all
    assert owner_signed_devices({"device_keys": {ANN: {"D1": d1}}}, ANN) == frozenset()


def test_coverage_counts_only_signed_devices_when_asked():
    members = {BOT: frozenset({"B"}), ANN: frozenset({"A1", "A2"}),
               "@ben:corp.test": frozenset({"X1"})}
    signed = {ANN: frozenset({"A2"}), "@ben:corp.test": frozenset()}
    # ann's key reached only her unsigned device: not reached; ben has no signed device
    c = assess_coverage(members, BOT, frozenset({(ANN, "A1"), ("@ben:corp.test", "X1")}),
                        signed)
    assert c.unreached_users == {ANN}
    assert c.unsigned_users == {"@ben:corp.test"}
    assert not c.complete
    c = assess_coverage(members, BOT, frozenset({(ANN, "A2")}),
                        {**signed, "@ben:corp.test": frozenset({"X1"})})
    assert c.unreached_users == {"@ben:corp.test"} and not c.unsigned_users
    # without the rule any device counts (legacy behaviour)
    c = assess_coverage(members, BOT, frozenset({(ANN, "A1"), ("@ben:corp.test", "X1")}))
    assert c.complete


def test_reset_request_is_a_private_marker(tmp_path: Path):
    marker = request_reset(tmp_path / "announce")
    assert marker.name == RESET_FILE and stat.S_IMODE(marker.stat().st_mode) == 0o600


def test_device_session_remembers_how_the_device_authenticates(tmp_path: Path):
    path = tmp_path / "session.json"
    DeviceSession(BOT, "ENCLAVEABC", "", "pk", "appservice").save(path)
    assert DeviceSession.load(path).auth == "appservice"
    # a session file written before MSC4190 support: a device with its own token
    raw = json.loads(path.read_text())
    del raw["auth"]
    path.write_text(json.dumps(raw))
    assert DeviceSession.load(path).auth == "token"


def test_new_invitees_replace_a_session_whose_first_key_they_would_lack():
    from bots.crypto import SessionView, decide_share

    members = {BOT: frozenset({"B"}), ANN: frozenset({"A1"})}
    shared = SessionView("S1", True, False, frozenset({(ANN, "A1")}),
                         for_invited=frozenset({"@ben:corp.test"}))
    # the invitee the session was kept for: reuse
    assert not decide_share(members, BOT, shared, frozenset({"@ben:corp.test"})).share
    # someone invited since the session started: a new session (its first key is kept)
    d = decide_share(members, BOT, shared, frozenset({"@ben:corp.test", "@cy:corp.test"}))
    assert d.share and d.rotate and "@cy:corp.test" in d.reason
    # no invitees at all: unchanged behaviour
    assert not decide_share(members, BOT, shared).share


@pytest.mark.parametrize(("joins", "now", "expected"), [
    ([], 10_000, 0.0),                 # nobody else joined: no wait
    ([1_000], 10_000, 0.0),            # joined long ago
    ([9_000], 10_000, 2.0),            # joined 1 s ago: 2 s more of the 3 s
    ([1_000, 9_500], 10_000, 2.5),     # the latest joiner counts
    ([12_000], 10_000, 3.0),           # a clock ahead of ours: never more than the delay
])
def test_room_key_waits_until_every_member_has_been_joined_a_while(joins, now, expected):
    from bots.crypto import join_settle_wait

    assert join_settle_wait(joins, now, 3_000) == expected
