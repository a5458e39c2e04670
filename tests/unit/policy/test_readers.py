"""Who could read each message when it was sent: the replay of membership and history
visibility (bridge.policy.readers), as a table."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.policy.readers import replay_readers

A, B, C, D = "@a:x", "@b:x", "@c:x", "@d:x"


def m(user: str, membership: str, by: str | None = None) -> dict[str, Any]:
    return {"type": "m.room.member", "state_key": user, "sender": by or user,
            "content": {"membership": membership}, "event_id": f"$m-{user}-{membership}"}


def vis(value: Any) -> dict[str, Any]:
    return {"type": "m.room.history_visibility", "state_key": "", "sender": A,
            "content": {"history_visibility": value}, "event_id": f"$v-{value}"}


def msg(eid: str, sender: str = A) -> dict[str, Any]:
    return {"type": "m.room.message", "sender": sender, "event_id": eid,
            "content": {"msgtype": "m.text", "body": eid}}


# (case, events, message -> (visibility, joined, invited, could_read, later joiners, anyone))
CASES: list[tuple[str, list[dict[str, Any]], dict[str, tuple[Any, ...]]]] = [
    ("no visibility state is shared; later joiners listed",
     [m(A, "join"), msg("$1"), m(B, "join")],
     {"$1": ("shared", [A], [], [A], [B], False)}),
    ("joined: only members joined at the time",
     [vis("joined"), m(A, "join"), m(B, "invite", A), msg("$1"), m(B, "join"), msg("$2")],
     {"$1": ("joined", [A], [B], [A], [], False),
      "$2": ("joined", [A, B], [], [A, B], [], False)}),
    ("invited: the invited can read from their invite on",
     [vis("invited"), m(A, "join"), m(B, "invite", A), msg("$1"), m(C, "invite", A)],
     {"$1": ("invited", [A], [B], [A, B], [], False)}),
    ("leave, kick and ban remove readers; knock is none",
     [vis("joined"), m(A, "join"), m(B, "join"), m(C, "join"), m(D, "knock"),
      m(B, "leave"), m(C, "ban", A), msg("$1")],
     {"$1": ("joined", [A], [], [A], [], False)}),
    ("a kick (leave sent by another) counts as leave",
     [vis("shared"), m(A, "join"), m(B, "join"), m(B, "leave", A), msg("$1")],
     {"$1": ("shared", [A], [], [A], [], False)}),
    ("visibility changed mid-room: each message under its own",
     [m(A, "join"), msg("$1"), vis("joined"), m(B, "join"), msg("$2"), vis("shared"),
      msg("$3"), m(C, "join")],
     {"$1": ("shared", [A], [], [A], [B, C], False),
      "$2": ("joined", [A, B], [], [A, B], [], False),
      "$3": ("shared", [A, B], [], [A, B], [C], False)}),
    ("world_readable: anyone, later joiners listed",
     [vis("world_readable"), m(A, "join"), msg("$1"), m(B, "join")],
     {"$1": ("world_readable", [A], [], [A], [B], True)}),
    ("left then rejoined later is a later joiner under shared",
     [m(A, "join"), m(B, "join"), m(B, "leave"), msg("$1"), m(B, "join")],
     {"$1": ("shared", [A], [], [A], [B], False)}),
    ("a member at the time who changes profile later is no later joiner",
     [m(A, "join"), m(B, "join"), msg("$1"), m(B, "join")],
     {"$1": ("shared", [A, B], [], [A, B], [], False)}),
    ("state order: the later membership event of a user wins",
     [vis("joined"), m(A, "join"), m(B, "invite", A), m(B, "join"), m(B, "leave"),
      msg("$1")],
     {"$1": ("joined", [A], [], [A], [], False)}),
    ("an unknown visibility value counts as shared",
     [vis("sometimes"), m(A, "join"), msg("$1")],
     {"$1": ("shared", [A], [], [A], [], False)}),
    ("a message before anyone joined has no readers",
     [msg("$0"), m(A, "join")],
     {"$0": ("shared", [], [], [], [A], False)}),
]


@pytest.mark.parametrize("case,events,expected", CASES, ids=[c[0] for c in CASES])
def test_replay(case: str, events: list[dict[str, Any]],
                expected: dict[str, tuple[Any, ...]]) -> None:
    got = replay_readers(events)
    for eid, (v, joined, invited, could, later, anyone) in expected.items():
        r = got[eid]
        assert (r.history_visibility, list(r.joined), list(r.invited), list(r.could_read),
                list(r.later_joiners), r.anyone) == (v, joined, invited, could, later,
                                                      anyone), case


def test_only_non_state_events_and_malformed_skipped() -> None:
    events = [m(A, "join"), {"type": "m.room.member", "state_key": 5, "content": {}},
              {"type": "m.room.member", "state_key": B, "content": "x"}, msg("$1"),
              {"type": "m.room.message", "content": {}}]
    got = replay_readers(events)
    assert set(got) == {"$1"} and got["$1"].joined == (A,)


def test_snapshot_state_counts_like_any_state() -> None:
    snap = {**m(B, "join"), "unsigned": {"org.enclave.snapshot": {"at": "$1"}}}
    assert replay_readers([snap, msg("$1", B)])["$1"].joined == (B,)


def test_a_record_standing_for_another_gets_its_readers() -> None:
    """The archive's plaintext of an encrypted message is written when it was decrypted
    (a late key: after C joined and B left); who could read it is who could read the
    ciphertext when it was sent, not who was there when the key came."""
    plain = {**msg("$1#plain"), "stands_for": "$1"}
    events = [m(A, "join"), m(B, "join"), vis("joined"), msg("$1"), m(C, "join"),
              m(B, "leave"), plain]

    def stands_for(ev: dict[str, Any]) -> str | None:
        return ev.get("stands_for")

    out = replay_readers(events, stands_for=stands_for)
    assert out["$1#plain"].could_read == out["$1"].could_read == (A, B)
    assert out["$1#plain"].event_id == "$1#plain"
    # without the link it would count as a message of its own, at its own place
    assert replay_readers(events)["$1#plain"].could_read == (A, C)
