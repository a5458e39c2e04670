"""Separation holds at every door (issue 15): three real homeservers, nio clients.

corporate (gate module + Enclave), personal (the outsiders: ``eve``, ``mel``) and a
partner company's server (every user of it is a partner admitted to ``external`` rooms).
The tests run in file order on one module-scoped setup: first with the gate module, then
(from ``test_gate_off_...`` on) with the corporate Synapse restarted without it, to show
what the reactive layer and Enclave's records hold on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.federation import FederatedPair

from ..directory_helpers import ADMIN_LOCALPART, ensure_enclave_admin
from ..harness import BOT_LOCALPART, EnclaveProcess, Stack, nio, wait_until
from .conftest import CorpStaff, separation_config, started_and_synced
from .test_separation import q, read_notice, wait_left, write_directory

pytestmark = pytest.mark.integration

SECRET = "partner-only: price list v7"


@dataclass
class Trio(CorpStaff):
    pair: FederatedPair
    stack: Stack
    enclave: EnclaveProcess
    config: Path
    gate_secret: Path
    people: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # name->(srv,id,tok)
    clients: list[nio.AsyncClient] = field(default_factory=list)

    def other(self, name: str) -> nio.AsyncClient:
        """An outsider (personal server) or a partner (partner server) as a nio client."""
        server, user_id, token = self.people[name]
        base = (self.pair.personal if server == "personal" else self.pair.partner).base_url
        c = nio.AsyncClient(base, user_id)
        c.access_token, c.user_id = token, user_id
        self.clients.append(c)
        return c

    async def request(self, client: nio.AsyncClient, method: str, path: str,
                      body: Any = None) -> Any:
        server = next(s for s in self.pair.servers if s.base_url == client.homeserver)
        return await asyncio.to_thread(server.request, method, path, body,
                                       client.access_token)

    async def corp(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(self.pair.corp.request, method, path, body,
                                       self.stack.admin_token)

    async def corp_state(self, room_id: str, etype: str) -> dict[str, Any] | None:
        state = await self.corp("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/state")
        return next((e for e in state["state"] if e["type"] == etype
                     and e["state_key"] == ""), None)

    async def corp_membership(self, room_id: str, user: str) -> str | None:
        try:
            state = await self.corp("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/state")
        except RuntimeError:
            return None
        return next((e["content"].get("membership") for e in state["state"]
                     if e["type"] == "m.room.member" and e["state_key"] == user), None)

    async def member_event(self, room_id: str, user: str) -> dict[str, Any] | None:
        """``user``'s current m.room.member event in a corporate room (with its sender)."""
        state = await self.corp("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/state")
        return next((e for e in state["state"] if e["type"] == "m.room.member"
                     and e["state_key"] == user), None)

    async def audit(self, *filters: str) -> list[dict[str, Any]]:
        """Audit records as JSON: ``audit("RULE")`` or ``audit("--room", ID)``."""
        args = filters if filters[0].startswith("--") else ("--rule", *filters)
        r = await self.enclave.cli("audit", *args, "--format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]

    def gate_module(self) -> list[dict[str, Any]]:
        return [{"module": "bridge.gate.module.EnclaveGate", "config": {
            "url": f"http://127.0.0.1:{self.stack.as_port}",
            "secret_path": str(self.gate_secret),
            "enclave_users": [self.uid(BOT_LOCALPART), self.uid(ADMIN_LOCALPART)],
            "timeout_ms": 2000}}]


def trio_policy(partner_server: str) -> dict[str, Any]:
    return {
        "default_class": "internal",
        "room_classes": [
            {"id": "internal", "federate": False},
            {"id": "external", "federate": True,
             "allow": {"partners": True, "guests": True}},
        ],
        "classify": [{"id": "cls-ext-alias", "room_class": "external", "alias": "^#ext-"}],
        "partners": [{"id": "partner-co", "servers": [partner_server],
                      "room_classes": ["external"]}],
        "notify": {"contact": "#it-help"},
        "reconcile": {"interval_minutes": 0},
    }


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    base = tmp_path_factory.mktemp("every-door")
    pair = FederatedPair.create(base / "trio", with_partner=True)
    assert pair.partner is not None
    enclave: EnclaveProcess | None = None
    try:
        stack = Stack.prepare(base / "enclave", synapse=pair.corp)
        gate_secret = base / "gate_secret"
        gate_secret.write_text("gate-" + os.urandom(12).hex() + "\n")
        t = Trio(pair=pair, stack=stack, enclave=None,  # type: ignore[arg-type]
                 config=base / "enclave" / "config.yaml", gate_secret=gate_secret)
        pair.corp.extra_config["modules"] = t.gate_module()
        pair.start()
        print(f"\nthree homeservers started in {pair.start_seconds:.2f} s")
        stack.bootstrap()
        ensure_enclave_admin(stack)
        for name in ("eve", "mel"):
            uid, tok = pair.personal.register_user(f"{name}-{os.urandom(3).hex()}",
                                                   f"pw-{name}")
            t.people[name] = ("personal", uid, tok)
        uid, tok = pair.partner.register_user(f"pat-{os.urandom(3).hex()}", "pw-pat")
        t.people["pat"] = ("partner", uid, tok)
        directory = base / "directory.yaml"
        write_directory(directory)
        stack.write_enclave_config(t.config)
        # retention with its defaults: it posts a notice into rooms (never into DMs)
        separation_config(t.config, directory=directory, gate_secret=gate_secret,
                          policy=trio_policy(pair.partner.server_name), retention={})
        enclave = EnclaveProcess(t.config, stack.as_port)
        t.enclave = enclave
        yield t
    finally:
        if enclave is not None:
            enclave.cleanup()
        pair.stop()


@pytest.fixture
async def door(trio: Trio) -> AsyncIterator[Trio]:
    await started_and_synced(trio.enclave)
    yield trio
    for c in trio.clients:
        with contextlib.suppress(Exception):
            await c.close()
    trio.clients.clear()


async def join_via(t: Trio, client: nio.AsyncClient, room: str, via: str) -> dict[str, Any]:
    """POST /join naming the server to join through; the answer or the error body."""
    path = f"/_matrix/client/v3/join/{q(room)}?server_name={q(via)}"
    try:
        return await t.request(client, "POST", path, {})
    except RuntimeError as e:
        return {"error_text": str(e)}


async def invite_arrives(client: nio.AsyncClient, room_id: str, within: float = 30) -> None:
    async def probe() -> bool:
        resp = await client.sync(timeout=500)
        return isinstance(resp, nio.SyncResponse) and room_id in resp.rooms.invite

    await wait_until(probe, within=within, interval=0, what=f"the invite to {room_id}")


async def texts(t: Trio, client: nio.AsyncClient, room_id: str) -> list[str]:
    """Every message body ``client`` can read in ``room_id``: GET /messages backwards, and
    the room's timeline in a fresh initial sync. (A remote server's /messages may wait on
    federation backfill; a timed-out read counts as nothing read only if the sync, which
    shows a newly joined member the history it may see, shows nothing either.)"""
    server = next(s for s in t.pair.servers if s.base_url == client.homeserver)
    out: list[str] = []
    try:
        body = await asyncio.to_thread(
            server.request, "GET",
            f"/_matrix/client/v3/rooms/{q(room_id)}/messages?dir=b&limit=100", None,
            client.access_token, timeout=10)
        out += [e["content"].get("body", "") for e in body["chunk"]
                if e.get("type") == "m.room.message"]
    except (TimeoutError, RuntimeError) as e:
        print(f"/messages for {client.user_id} in {room_id}: {e}")
    fresh = nio.AsyncClient(client.homeserver, client.user_id)
    fresh.access_token, fresh.user_id = client.access_token, client.user_id
    try:
        resp = await fresh.sync(timeout=0, full_state=True)
        if isinstance(resp, nio.SyncResponse):
            for section in (resp.rooms.join, resp.rooms.leave):
                room = section.get(room_id)
                for ev in room.timeline.events if room else ():
                    if isinstance(ev, nio.RoomMessageText):
                        out.append(ev.body)
    finally:
        await fresh.close()
    return out


async def outsider_brought_in_reads_nothing(t: Trio, partner: nio.AsyncClient,
                                            outsider: nio.AsyncClient, room_id: str) -> None:
    """The partner (remote: no gate is asked) invites a personal contact, who joins the
    moment the invitation arrives and reads the room: :data:`SECRET`, sent before, is not
    there (if the join got in before Enclave withdrew the invitation)."""
    await outsider.sync(timeout=0)
    inv = await partner.room_invite(room_id, outsider.user_id)
    assert isinstance(inv, nio.RoomInviteResponse), inv
    await invite_arrives(outsider, room_id)
    joined = await outsider.join(room_id)
    if isinstance(joined, nio.JoinResponse):
        assert SECRET not in await texts(t, outsider, room_id)


# -- with the gate module ----------------------------------------------------------------------
async def test_staff_cannot_join_an_outsiders_remote_room(door: Trio) -> None:
    eve = door.other("eve")
    alias = f"party-{os.urandom(3).hex()}"
    room = await eve.room_create(alias=alias, visibility=nio.RoomVisibility.public,
                                 preset=nio.RoomPreset.public_chat)
    assert isinstance(room, nio.RoomCreateResponse), room
    bob = await door.staff("bob")
    answer = await join_via(door, bob, f"#{alias}:{door.pair.personal.server_name}",
                            door.pair.personal.server_name)
    # refused before the join exists, with the usual message naming the rule
    text = answer.get("error_text", "")
    assert "403" in text and "builtin.unknown_remote_room" in text and "#it-help" in text, \
        answer
    sent = await bob.room_send(room.room_id, "m.room.message",
                               {"msgtype": "m.text", "body": "work secret"})
    assert isinstance(sent, nio.RoomSendError)
    await asyncio.sleep(1)
    assert "work secret" not in await texts(door, eve, room.room_id)
    members = await eve.joined_members(room.room_id)
    assert bob.user_id not in {m.user_id for m in members.members}
    explain = await door.enclave.cli("explain", "join", bob.user_id, room.room_id)
    assert "DENY" in explain.stdout and "builtin.unknown_remote_room" in explain.stdout, \
        explain.stdout + explain.stderr


async def test_partner_invitation_into_the_partners_room_is_joinable(door: Trio) -> None:
    pat = door.other("pat")
    bob = await door.staff("bob")
    await bob.sync(timeout=0)
    room = await pat.room_create(name="Joint project", invite=[bob.user_id])
    assert isinstance(room, nio.RoomCreateResponse), room
    await invite_arrives(bob, room.room_id)
    joined = await bob.join(room.room_id)
    assert isinstance(joined, nio.JoinResponse), joined  # the approved invitation leads in


async def test_outsider_invited_by_a_partner_cannot_read_history(door: Trio) -> None:
    bob = await door.staff("bob")
    pat, eve = door.other("pat"), door.other("eve")
    room = await bob.room_create(alias=f"ext-{os.urandom(3).hex()}", invite=[pat.user_id],
                                 power_level_override={"invite": 0})
    assert isinstance(room, nio.RoomCreateResponse), room
    hv = await door.corp_state(room.room_id, "m.room.history_visibility")
    assert hv is not None and hv["content"]["history_visibility"] == "joined"
    opened = await bob.room_put_state(room.room_id, "m.room.history_visibility",
                                      {"history_visibility": "shared"})
    assert isinstance(opened, nio.RoomPutStateError), opened
    assert "builtin.history_visibility" in opened.message
    await invite_arrives(pat, room.room_id)
    assert isinstance(await pat.join(room.room_id), nio.JoinResponse)
    sent = await bob.room_send(room.room_id, "m.room.message",
                               {"msgtype": "m.text", "body": SECRET})
    assert isinstance(sent, nio.RoomSendResponse), sent

    async def pat_reads() -> bool:
        return SECRET in await texts(door, pat, room.room_id)

    await wait_until(pat_reads, within=30, what="the partner to receive the message")
    await outsider_brought_in_reads_nothing(door, pat, eve, room.room_id)
    # and the partner cannot open the history up: Enclave puts 'joined' back
    put = await pat.room_put_state(room.room_id, "m.room.history_visibility",
                                   {"history_visibility": "shared"})
    if isinstance(put, nio.RoomPutStateResponse):
        async def restored() -> bool:
            ev = await door.corp_state(room.room_id, "m.room.history_visibility")
            return ev is not None and ev["content"]["history_visibility"] == "joined"

        await wait_until(restored, within=30, what="history visibility put back",
                         describe=door.enclave.describe)


async def test_profiles_do_not_cross_the_boundary(door: Trio) -> None:
    eve = door.other("eve")
    bob_id = door.uid("bob")
    with pytest.raises(RuntimeError) as e:
        await door.request(eve, "GET", f"/_matrix/client/v3/profile/{q(bob_id)}")
    assert any(code in str(e.value) for code in ("403", "404")), e.value
    # unauthenticated look-ups on the corporate server are refused too
    with pytest.raises(RuntimeError) as e:
        await asyncio.to_thread(door.pair.corp.request, "GET",
                                f"/_matrix/client/v3/profile/{q(bob_id)}", None, None)
    assert "401" in str(e.value) or "M_MISSING_TOKEN" in str(e.value), e.value
    # a colleague who shares no room with bob: refused; one who does: answered
    carol = await door.staff("carol")
    with pytest.raises(RuntimeError):
        await door.request(carol, "GET", f"/_matrix/client/v3/profile/{q(bob_id)}")


async def test_class_in_initial_state_is_replaced_by_the_gate(door: Trio) -> None:
    bob = await door.staff("bob")
    room = await bob.room_create(name="Claims to be external", initial_state=[
        {"type": "org.enclave.room_class", "state_key": "", "content": {"class": "external"}}])
    assert isinstance(room, nio.RoomCreateResponse), room
    ev = await door.corp_state(room.room_id, "org.enclave.room_class")
    assert ev is not None and ev["content"]["class"] == "internal"
    assert await class_line(door, room.room_id) == "internal"
    inv = await bob.room_invite(room.room_id, door.other("pat").user_id)
    assert isinstance(inv, nio.RoomInviteError) and "class.internal" in inv.message, inv


async def test_dm_with_the_gate_is_recognised_and_the_bot_stays_out(door: Trio) -> None:
    await dm_is_recognised_and_the_bot_stays_out(door)


async def test_staff_room_brings_enclaves_bot_in_and_the_bot_kicks(door: Trio) -> None:
    """The gate's creation edits invite Enclave's bot with power into a staff member's
    group room; an outsider wrongly present (a remote join, which Synapse never asks the
    gate about) is kicked BY THE BOT, not by the room's creator."""
    bob = await door.staff("bob")
    alias = f"ext-kick-{os.urandom(3).hex()}"
    room = await bob.room_create(alias=alias, visibility=nio.RoomVisibility.public,
                                 preset=nio.RoomPreset.public_chat)
    assert isinstance(room, nio.RoomCreateResponse), room
    bot = door.uid(BOT_LOCALPART)

    async def bot_joined() -> bool:
        return await door.corp_membership(room.room_id, bot) == "join"

    await wait_until(bot_joined, within=30, what="Enclave's bot joined",
                     describe=door.enclave.describe)
    pl = await door.corp_state(room.room_id, "m.room.power_levels")
    assert pl is not None and pl["content"]["users"].get(bot) == 100, pl
    eve = door.other("eve")
    corp = door.corp_name
    answer = await join_via(door, eve, f"#{alias}:{corp}", corp)
    assert answer.get("room_id") == room.room_id, answer

    async def kicked() -> bool:
        ev = await door.member_event(room.room_id, eve.user_id)
        return ev is not None and ev["content"]["membership"] == "leave"

    await wait_until(kicked, within=30, what="the outsider removed",
                     describe=door.enclave.describe)
    ev = await door.member_event(room.room_id, eve.user_id)
    assert ev is not None and ev["sender"] == bot, ev  # not bob, the all-powerful creator


# -- without the gate module -------------------------------------------------------------------
async def test_gate_off_class_claimed_by_the_creator_is_reverted(door: Trio) -> None:
    await door.enclave.stop()
    door.pair.corp.extra_config.pop("modules", None)
    await asyncio.to_thread(door.pair.corp.restart)
    await door.enclave.start()
    bob = await door.staff("bob")
    pat = door.other("pat")
    await pat.sync(timeout=0)
    room = await bob.room_create(name="Claims to be external", initial_state=[
        {"type": "org.enclave.room_class", "state_key": "", "content": {"class": "external"}}])
    assert isinstance(room, nio.RoomCreateResponse), room
    inv = await bob.room_invite(room.room_id, pat.user_id)
    assert isinstance(inv, nio.RoomInviteResponse), inv  # no gate: the invite happens
    bot = door.uid(BOT_LOCALPART)

    # Enclave is not in bob's room (no gate: no creation edits): it cannot put its class
    # back nor withdraw the invitation, and does neither as bob (who could). It records
    # what it did not do, with the fix.
    async def reported() -> bool:
        return any(r["outcome"] == "not_done" and r["room_id"] == room.room_id
                   for r in await door.audit("builtin.enclave_power"))

    await wait_until(reported, within=30, what="the not_done audit record",
                     describe=door.enclave.describe)
    [nd] = [r for r in await door.audit("builtin.enclave_power")
            if r["room_id"] == room.room_id]
    assert f"invite {bot} and give it power" in nd["reason"], nd
    assert any(r["outcome"] == "not_done" and r["room_id"] == room.room_id
               for r in await door.audit("builtin.class_record"))
    cls = await door.corp_state(room.room_id, "org.enclave.room_class")
    assert cls is not None and cls["sender"] == bob.user_id  # nothing sent as bob
    assert cls["content"]["class"] == "external"
    assert await door.corp_membership(room.room_id, pat.user_id) == "invite"
    assert await class_line(door, room.room_id) == "internal"  # Enclave's record decides
    plan = await door.enclave.cli("separation", "--plan", "--room", room.room_id)
    assert "builtin.enclave_power" in plan.stdout and bot in plan.stdout, plan.stdout

    # the fix: the room's admin brings Enclave's bot in with power; it joins and acts
    pl = await door.corp_state(room.room_id, "m.room.power_levels")
    assert pl is not None
    users = {**pl["content"].get("users", {}), bot: 100}
    put = await bob.room_put_state(room.room_id, "m.room.power_levels",
                                   {**pl["content"], "users": users})
    assert isinstance(put, nio.RoomPutStateResponse), put
    assert isinstance(await bob.room_invite(room.room_id, bot), nio.RoomInviteResponse)

    async def reverted() -> bool:
        ev = await door.corp_state(room.room_id, "org.enclave.room_class")
        return ev is not None and ev["content"].get("class") == "internal"

    await wait_until(reverted, within=30, what="Enclave's class put back by its bot",
                     describe=door.enclave.describe)
    cls = await door.corp_state(room.room_id, "org.enclave.room_class")
    assert cls is not None and cls["sender"] == bot, cls
    applied = await door.enclave.cli("separation", "--apply", "--room", room.room_id)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    ev = await door.member_event(room.room_id, pat.user_id)
    assert ev is not None and ev["content"]["membership"] == "leave", ev
    assert ev["sender"] == bot, ev  # the invitation withdrawn by Enclave's bot
    plan = await door.enclave.cli("separation", "--plan", "--room", room.room_id)
    assert plan.returncode == 0 and "0 actions" in plan.stdout, plan.stdout + plan.stderr


async def test_gate_off_history_is_kept_from_people_never_admitted(door: Trio) -> None:
    bob = await door.staff("bob")
    pat, eve = door.other("pat"), door.other("eve")
    await pat.sync(timeout=0)
    bot = door.uid(BOT_LOCALPART)
    # without the gate a room is Enclave's to guard only where its bot is in with power
    # (docs/operators/separation.md, "Without the gate"): bob brings it in
    room = await bob.room_create(alias=f"ext-{os.urandom(3).hex()}",
                                 invite=[pat.user_id, bot], preset=nio.RoomPreset.public_chat,
                                 power_level_override={"invite": 0, "users": {bot: 100}})
    assert isinstance(room, nio.RoomCreateResponse), room

    async def joined_only() -> bool:  # no gate: Enclave sets it as the room is made
        ev = await door.corp_state(room.room_id, "m.room.history_visibility")
        return ev is not None and ev["content"]["history_visibility"] == "joined"

    await wait_until(joined_only, within=30, what="history visibility 'joined'",
                     describe=door.enclave.describe)
    hv = await door.corp_state(room.room_id, "m.room.history_visibility")
    assert hv is not None and hv["sender"] == bot, hv
    await invite_arrives(pat, room.room_id)
    assert isinstance(await pat.join(room.room_id), nio.JoinResponse)
    sent = await bob.room_send(room.room_id, "m.room.message",
                               {"msgtype": "m.text", "body": SECRET})
    assert isinstance(sent, nio.RoomSendResponse), sent
    await outsider_brought_in_reads_nothing(door, pat, eve, room.room_id)
    # a change by the staff member is put back too
    put = await bob.room_put_state(room.room_id, "m.room.history_visibility",
                                   {"history_visibility": "world_readable"})
    assert isinstance(put, nio.RoomPutStateResponse), put
    await wait_until(joined_only, within=30, what="history visibility put back",
                     describe=door.enclave.describe)


async def test_gate_off_notice_says_staff_left_when_the_invite_stands(door: Trio) -> None:
    # a trusted_private_chat makes the invitee a room v12 creator: nobody can withdraw the
    # invitation, so Enclave takes the staff member out, and says so
    bob = await door.staff("bob")
    await bob.sync(timeout=0)
    eve = door.other("eve")
    dm = await bob.room_create(is_direct=True, invite=[eve.user_id],
                               preset=nio.RoomPreset.trusted_private_chat)
    assert isinstance(dm, nio.RoomCreateResponse), dm
    await wait_left(bob, dm.room_id, within=30, describe=door.enclave.describe)
    body = await read_notice(bob, door.uid(BOT_LOCALPART), eve.user_id)
    assert "could not withdraw" in body and "took you out of the room" in body, body
    assert "withdrew your invitation" not in body


async def test_gate_off_remote_join_is_undone_reactively(door: Trio) -> None:
    # without the gate nothing can refuse the join before it exists
    # (docs/operators/separation.md, "Not built"):
    # the reactive layer takes the staff member out and tells them
    eve = door.other("eve")
    alias = f"party-{os.urandom(3).hex()}"
    room = await eve.room_create(alias=alias, visibility=nio.RoomVisibility.public,
                                 preset=nio.RoomPreset.public_chat)
    assert isinstance(room, nio.RoomCreateResponse), room
    dave = await door.staff("dave")
    await dave.sync(timeout=0)
    answer = await join_via(door, dave, f"#{alias}:{door.pair.personal.server_name}",
                            door.pair.personal.server_name)
    assert answer.get("room_id") == room.room_id, answer
    await wait_left(dave, room.room_id, within=30, describe=door.enclave.describe)
    body = await read_notice(dave, door.uid(BOT_LOCALPART), "took you out of a room")
    assert "class.internal" in body, body
    # the one thing Enclave does as the user (their own membership), and the record says so
    leave = [r for r in await door.audit("--room", room.room_id) if r["kind"] == "leave"]
    assert leave and leave[0]["actor"] == dave.user_id, leave
    assert f"done for {dave.user_id} by Enclave (their own membership)" in leave[0]["reason"]


async def test_gate_off_dm_is_recognised_and_the_bot_stays_out(door: Trio) -> None:
    await dm_is_recognised_and_the_bot_stays_out(door)


async def test_gate_off_generated_whitelist_refuses_joins_of_outsiders_rooms(
        door: Trio) -> None:
    """Without the gate, Synapse's federation_domain_whitelist (written from the policy by
    ``enclave registration --homeserver-snippet``) refuses a staff join of a room on a
    personal server before it happens; the partner's server still federates. Last: it
    leaves the corporate server restricted."""
    out = door.config.parent
    r = await door.enclave.cli("registration", "-o", str(out / "registration-check.yaml"),
                               "--homeserver-snippet", str(out / "homeserver-snippet.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    snippet = yaml.safe_load((out / "homeserver-snippet.yaml").read_text())
    assert door.pair.partner is not None
    allowed = [door.corp_name, door.pair.partner.server_name]
    assert snippet["federation_domain_whitelist"] == allowed
    eve, pat = door.other("eve"), door.other("pat")
    alias = f"party-{os.urandom(3).hex()}"
    party = await eve.room_create(alias=alias, visibility=nio.RoomVisibility.public,
                                  preset=nio.RoomPreset.public_chat)
    assert isinstance(party, nio.RoomCreateResponse), party
    await door.enclave.stop()
    door.pair.corp.extra_config["federation_domain_whitelist"] = (
        snippet["federation_domain_whitelist"])
    await asyncio.to_thread(door.pair.corp.restart)
    await door.enclave.start()
    dave = await door.staff("dave")
    personal = door.pair.personal.server_name
    answer = await join_via(door, dave, f"#{alias}:{personal}", personal)
    assert "room_id" not in answer, answer  # refused by Synapse, nothing to undo
    answer = await join_via(door, dave, party.room_id, personal)
    assert "room_id" not in answer, answer
    assert await door.corp_membership(party.room_id, dave.user_id) is None
    # the partner still federates: invited into an external room, they join and read
    bob = await door.staff("bob")
    await pat.sync(timeout=0)
    room = await bob.room_create(alias=f"ext-{os.urandom(3).hex()}", invite=[pat.user_id])
    assert isinstance(room, nio.RoomCreateResponse), room
    await invite_arrives(pat, room.room_id)
    assert isinstance(await pat.join(room.room_id), nio.JoinResponse)
    sent = await bob.room_send(room.room_id, "m.room.message",
                               {"msgtype": "m.text", "body": "hello partner"})
    assert isinstance(sent, nio.RoomSendResponse), sent

    async def partner_reads() -> bool:
        return "hello partner" in await texts(door, pat, room.room_id)

    await wait_until(partner_reads, within=30, what="the partner reading the message")


async def dm_is_recognised_and_the_bot_stays_out(door: Trio) -> None:
    """An encrypted DM between staff: recorded as a direct chat; reconciliation and a
    retention run leave the bot out of it and send nothing in clear."""
    alice, bob = await door.staff("alice"), await door.staff("bob")
    await bob.sync(timeout=0)
    dm = await alice.room_create(is_direct=True, invite=[bob.user_id],
                                 preset=nio.RoomPreset.trusted_private_chat,
                                 initial_state=[{"type": "m.room.encryption", "state_key": "",
                                                 "content": {"algorithm":
                                                             "m.megolm.v1.aes-sha2"}}])
    assert isinstance(dm, nio.RoomCreateResponse), dm
    await invite_arrives(bob, dm.room_id)
    assert isinstance(await bob.join(dm.room_id), nio.JoinResponse)

    async def recorded_dm() -> bool:
        return await class_line(door, dm.room_id) == "dm"

    await wait_until(recorded_dm, within=30, what="the DM recorded as a direct chat",
                     describe=door.enclave.describe)
    for cmd in (("separation", "--apply"), ("retention", "--apply")):
        r = await door.enclave.cli(*cmd, "--room", dm.room_id)
        assert r.returncode == 0, r.stdout + r.stderr
    await asyncio.sleep(2)
    bot = door.uid(BOT_LOCALPART)
    assert await door.corp_membership(dm.room_id, bot) is None
    # nothing was sent in clear into the encrypted DM
    state = await door.corp("GET", f"/_synapse/admin/v1/rooms/{q(dm.room_id)}/messages"
                            "?dir=b&limit=100")
    clear = [e for e in state["chunk"] if e["type"] == "m.room.message"]
    assert clear == [], clear


async def class_line(t: Trio, room_id: str) -> str:
    """The class ``enclave explain room`` gives (its record, else how it classifies)."""
    r = await t.enclave.cli("explain", "room", room_id)
    line = next((ln for ln in r.stdout.splitlines() if ln.strip().startswith("class:")), "")
    return line.split(":", 1)[1].split()[0] if line else r.stdout + r.stderr
