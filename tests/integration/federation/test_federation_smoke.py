"""The federation fixture works: two real homeservers federate, and Enclave on the
corporate one sees what crosses.

* An external contact on the personal server opens a DM (``is_direct``) with a corporate
  user: the invite reaches the corporate user's sync and Enclave's appservice inbox;
  the corporate user joins over federation; messages cross both ways, and Enclave sees
  the external contact's message too.
* A corporate room created with ``m.federate: false`` refuses a personal user's join,
  while a federating corporate room joined the same way admits them.

Latencies are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from ..harness import EnclaveProcess, nio, wait_until
from .conftest import (
    Federation,
    NewUser,
    enclave_inbox_events,
    sync_until,
    wait_invite,
    wait_message,
)

pytestmark = pytest.mark.integration


def quote(room_id: str) -> str:
    return urllib.parse.quote(room_id, safe="")


def _report(what: str, seconds: float) -> None:
    print(f"[federation] {what}: {seconds * 1000:.0f} ms")


async def _wait_enclave_event(enclave: EnclaveProcess, room_id: str,
                              match: Callable[[dict[str, Any]], bool], what: str,
                              ) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        return next((e for e in enclave_inbox_events(enclave, room_id) if match(e)), None)

    return await wait_until(probe, within=30, interval=0.02, what=what,
                            describe=enclave.describe)


async def test_dm_from_personal_contact_reaches_corp_user_and_enclave(
    federation: Federation, enclave_factory: Callable[..., EnclaveProcess],
    new_corp_user: NewUser, new_personal_user: NewUser,
) -> None:
    corp_name, personal_name = federation.corp.server_name, federation.personal.server_name
    assert corp_name.startswith("127.0.0.1:") and personal_name.startswith("127.0.0.2:")
    enclave = enclave_factory(federation.stack)
    await enclave.start()
    await federation.stack.wait_as_up()

    carol = await new_corp_user("carol")
    pat = await new_personal_user("pat")
    assert carol.user_id.endswith(":" + corp_name) and pat.user_id.endswith(":" + personal_name)
    # catch up first, so the next syncs return only what this test causes
    for c in (carol, pat):
        assert isinstance(await c.sync(timeout=0), nio.SyncResponse)

    # -- the DM invite crosses to the corporate server and to Enclave --------------------
    t0 = time.monotonic()
    created = await pat.room_create(is_direct=True, invite=[carol.user_id],
                                    preset=nio.RoomPreset.trusted_private_chat)
    assert isinstance(created, nio.RoomCreateResponse), created
    dm = created.room_id
    t_created = time.monotonic()
    invite = await wait_invite(carol, dm)
    _report("DM invite personal -> corp user's sync (after createRoom returned)",
            time.monotonic() - t_created)
    assert any(isinstance(e, nio.InviteMemberEvent) and e.state_key == carol.user_id
               and e.membership == "invite" for e in invite.invite_state), invite.invite_state

    invite_ev = await _wait_enclave_event(
        enclave, dm,
        lambda e: e.get("type") == "m.room.member" and e.get("state_key") == carol.user_id
        and e.get("content", {}).get("membership") == "invite",
        "the invite in Enclave's inbox")
    _report("DM invite personal -> Enclave inbox (from createRoom call)", time.monotonic() - t0)
    assert invite_ev["sender"] == pat.user_id
    assert invite_ev["content"].get("is_direct") is True, invite_ev
    stripped = invite_ev.get("unsigned", {}).get("invite_room_state", [])
    assert any(s.get("type") == "m.room.create" for s in stripped), invite_ev

    # -- the corporate user joins over federation ---------------------------------------
    t0 = time.monotonic()
    joined = await carol.join(dm)
    assert isinstance(joined, nio.JoinResponse), joined
    _report("corp user's remote join of the DM", time.monotonic() - t0)
    await sync_until(pat, lambda r: any(
        isinstance(e, nio.RoomMemberEvent) and e.state_key == carol.user_id
        and e.membership == "join"
        for e in (r.rooms.join[dm].timeline.events if dm in r.rooms.join else ())),
        what="the corp user's join on the personal side")

    # -- messages both ways ---------------------------------------------------------------
    await sync_until(carol, lambda r: dm in r.rooms.join, what="the DM among joined rooms")
    t0 = time.monotonic()
    sent = await pat.room_send(dm, "m.room.message", {"msgtype": "m.text", "body": "hi from pat"})
    assert isinstance(sent, nio.RoomSendResponse), sent
    seen = await wait_message(carol, dm, "hi from pat")
    _report("message personal -> corp (send call to sync)", time.monotonic() - t0)
    assert seen.sender == pat.user_id and seen.event_id == sent.event_id

    t0 = time.monotonic()
    sent_back = await carol.room_send(dm, "m.room.message",
                                      {"msgtype": "m.text", "body": "hi from carol"})
    assert isinstance(sent_back, nio.RoomSendResponse), sent_back
    seen = await wait_message(pat, dm, "hi from carol")
    _report("message corp -> personal (send call to sync)", time.monotonic() - t0)
    assert seen.sender == carol.user_id and seen.event_id == sent_back.event_id

    # Enclave sees the external contact's message (the room has a corporate member) and
    # its own user's reply.
    for ev_id in (sent.event_id, sent_back.event_id):
        await _wait_enclave_event(enclave, dm, lambda e, i=ev_id: e.get("event_id") == i,
                                  f"message {ev_id} in Enclave's inbox")
    assert enclave.running, enclave.describe()


async def test_unfederated_corp_room_refuses_personal_user(
    federation: Federation, new_corp_user: NewUser, new_personal_user: NewUser,
) -> None:
    corp_name = federation.corp.server_name
    dana = await new_corp_user("dana")
    quinn = await new_personal_user("quinn")

    open_room = await dana.room_create(preset=nio.RoomPreset.public_chat, name="federating")
    closed_room = await dana.room_create(preset=nio.RoomPreset.public_chat, name="corp only",
                                         federate=False)
    for r in (open_room, closed_room):
        assert isinstance(r, nio.RoomCreateResponse), r
    closed_create = await federation.stack.hs(
        "GET", f"/_matrix/client/v3/rooms/{quote(closed_room.room_id)}/state/m.room.create",
        token=dana.access_token)
    assert closed_create.get("m.federate") is False, closed_create

    # Control: the same kind of join, through the same server, works for a federating room
    # (so the refusal below is the room's m.federate, not an unreachable server).
    t0 = time.monotonic()
    assert await federation.join_via(quinn, open_room.room_id, corp_name) == open_room.room_id
    _report("personal user's remote join of a public corp room", time.monotonic() - t0)

    with pytest.raises(RuntimeError) as refused:
        await federation.join_via(quinn, closed_room.room_id, corp_name)
    print(f"[federation] join of the m.federate=false room refused: {refused.value}")
    assert " -> 403" in str(refused.value) and "M_FORBIDDEN" in str(refused.value), \
        refused.value

    members = await federation.stack.hs(
        "GET", f"/_synapse/admin/v1/rooms/{quote(closed_room.room_id)}/members")
    assert quinn.user_id not in members["members"], members
    assert dana.user_id in members["members"], members
