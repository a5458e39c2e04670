"""Separation end to end: two real homeservers, the gate module, Enclave, nio clients.

The corporate server runs the gate module and Enclave (directory file source, policy);
the personal server holds the outsiders: an external contact, a partner and a guest.
The tests run in file order on one module-scoped setup; the last ones switch the gate to
``allow`` and then off, to show the reactive layer on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.federation import FederatedPair

from ..directory_helpers import ADMIN_LOCALPART, ensure_enclave_admin
from ..harness import BOT_LOCALPART, EnclaveProcess, Stack, nio, wait_until
from .conftest import CorpStaff, separation_config, started_and_synced

pytestmark = pytest.mark.integration

GUEST_SECONDS = 40
PEOPLE = {
    # username: (id, groups, department)
    "alice": ("2001", ["sales"], "Sales"),
    "bob": ("2002", ["engineering"], "Engineering"),
    "carol": ("2003", ["research"], "Research"),
    "dave": ("2004", ["trading"], "Trading"),
}


def q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


@dataclass
class Setup(CorpStaff):
    pair: FederatedPair
    stack: Stack
    enclave: EnclaveProcess
    config: Path
    gate_secret: Path
    outsiders: dict[str, tuple[str, str]]  # name -> (user id, token) on the personal server
    guest_expires: float
    clients: list[nio.AsyncClient] = field(default_factory=list)

    def outsider(self, name: str) -> nio.AsyncClient:
        user_id, token = self.outsiders[name]
        c = nio.AsyncClient(self.pair.personal.base_url, user_id)
        c.access_token, c.user_id = token, user_id
        self.clients.append(c)
        return c

    async def corp(self, method: str, path: str, body: Any = None, *,
                   token: str | None = None) -> Any:
        return await asyncio.to_thread(self.pair.corp.request, method, path, body,
                                       token or self.stack.admin_token)

    def gate_module(self, **extra: Any) -> list[dict[str, Any]]:
        return [{"module": "bridge.gate.module.EnclaveGate", "config": {
            "url": f"http://127.0.0.1:{self.stack.as_port}",
            "secret_path": str(self.gate_secret),
            "enclave_users": [self.uid(BOT_LOCALPART), self.uid(ADMIN_LOCALPART)],
            "timeout_ms": 2000, **extra}}]

    async def restart_corp(self, modules: list[dict[str, Any]] | None) -> None:
        if modules is None:
            self.pair.corp.extra_config.pop("modules", None)
        else:
            self.pair.corp.extra_config["modules"] = modules
        await asyncio.to_thread(self.pair.corp.restart)


def write_directory(path: Path) -> None:
    people = [{"id": pid, "username": name, "display_name": name.title(),
               "department": dept, "groups": groups, "initial_password": f"pw-{name}"}
              for name, (pid, groups, dept) in PEOPLE.items()]
    path.write_text(yaml.safe_dump({"people": people}, sort_keys=False))


def policy(s: Setup | None, partner: str, guest: str, guest_expires: datetime,
           sponsor: str) -> dict[str, Any]:
    return {
        "default_class": "internal",
        "room_classes": [
            {"id": "internal", "federate": False},
            {"id": "external", "federate": True,
             "allow": {"partners": True, "guests": True}},
        ],
        "classify": [{"id": "cls-ext-alias", "room_class": "external", "alias": "^#ext-"}],
        "partners": [{"id": "partner-pat", "users": [partner], "room_classes": ["external"]}],
        "guests": [{"id": "guest-gina", "user": guest, "sponsor": sponsor,
                    "expires": guest_expires, "room_classes": ["external"]}],
        "dms": {"exceptions": [{"id": "dm-sales-external", "who": {"groups": ["sales"]},
                                "allow": ["external"]}]},
        "barriers": [{"id": "barrier-research-trading",
                      "between": [{"groups": ["research"]}, {"groups": ["trading"]}]}],
        "notify": {"contact": "#it-help"},
        "reconcile": {"interval_minutes": 0},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("separation")
    pair = FederatedPair.create(base / "pair")
    enclave: EnclaveProcess | None = None
    try:
        stack = Stack.prepare(base / "enclave", synapse=pair.corp)
        gate_secret = base / "gate_secret"
        gate_secret.write_text("gate-" + os.urandom(12).hex() + "\n")
        s = Setup(pair=pair, stack=stack, enclave=None,  # type: ignore[arg-type]
                  config=base / "enclave" / "config.yaml", gate_secret=gate_secret,
                  outsiders={}, guest_expires=0)
        pair.corp.extra_config["modules"] = s.gate_module()
        pair.start()
        stack.bootstrap()
        ensure_enclave_admin(stack)
        for name in ("eve", "pat", "gina"):
            s.outsiders[name] = pair.personal.register_user(f"{name}-{os.urandom(3).hex()}",
                                                            f"pw-{name}")
        directory = base / "directory.yaml"
        write_directory(directory)
        stack.write_enclave_config(s.config)
        s.guest_expires = time.time() + GUEST_SECONDS
        separation_config(s.config, directory=directory, gate_secret=gate_secret,
                          policy=policy(None, s.outsiders["pat"][0], s.outsiders["gina"][0],
                                        datetime.fromtimestamp(s.guest_expires, UTC),
                                        s.uid("alice")))
        enclave = EnclaveProcess(s.config, stack.as_port)
        s.enclave = enclave
        yield s
    finally:
        if enclave is not None:
            enclave.cleanup()
        pair.stop()


@pytest.fixture
async def sep(setup: Setup) -> AsyncIterator[Setup]:
    await started_and_synced(setup.enclave)
    yield setup
    for c in setup.clients:
        with contextlib.suppress(Exception):
            await c.close()
    setup.clients.clear()


async def no_invite(client: nio.AsyncClient, room_id: str, seconds: float = 3.0) -> bool:
    """True if ``room_id``'s invite never shows in the client's sync within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        resp = await client.sync(timeout=500)
        if isinstance(resp, nio.SyncResponse) and room_id in resp.rooms.invite:
            return False
    return True


async def wait_invite(client: nio.AsyncClient, room_id: str | None = None,
                      within: float = 30) -> str:
    async def probe() -> str | None:
        resp = await client.sync(timeout=500)
        if isinstance(resp, nio.SyncResponse):
            for rid in resp.rooms.invite:
                if room_id is None or rid == room_id:
                    return rid
        return None

    return await wait_until(probe, within=within, interval=0, what="an invite")


async def membership(s: Setup, room_id: str, user: str) -> str | None:
    try:
        state = await s.corp("GET", f"/_synapse/admin/v1/rooms/{q(room_id)}/state")
    except RuntimeError:
        return None
    for e in state["state"]:
        if e["type"] == "m.room.member" and e["state_key"] == user:
            return e["content"].get("membership")
    return None


# -- the gate ----------------------------------------------------------------------------------
async def test_internal_rooms_are_created_without_federation(sep: Setup) -> None:
    bob = await sep.staff("bob")
    resp = await bob.room_create(name="Roadmap")
    assert isinstance(resp, nio.RoomCreateResponse), resp
    create = await bob.room_get_state_event(resp.room_id, "m.room.create")
    assert create.content.get("m.federate") is False
    cls = await bob.room_get_state_event(resp.room_id, "org.enclave.room_class")
    assert cls.content["class"] == "internal"
    # the class is Enclave's to change, not the creator's
    put = await bob.room_put_state(resp.room_id, "org.enclave.room_class",
                                   {"class": "external"})
    assert isinstance(put, nio.RoomPutStateError)
    assert "org.enclave.room_class is managed by Enclave" in put.message


async def test_external_dm_invite_is_refused_by_the_gate(sep: Setup) -> None:
    bob = await sep.staff("bob")
    await bob.sync(timeout=0)
    eve = sep.outsider("eve")
    room = await eve.room_create(is_direct=True, preset=nio.RoomPreset.trusted_private_chat)
    assert isinstance(room, nio.RoomCreateResponse)
    inv = await eve.room_invite(room.room_id, bob.user_id)
    assert isinstance(inv, nio.RoomInviteError), inv
    assert await no_invite(bob, room.room_id)


async def test_staff_inviting_a_personal_contact_is_refused_with_a_message(sep: Setup) -> None:
    bob = await sep.staff("bob")
    eve_id = sep.outsiders["eve"][0]
    dm = await bob.room_create(is_direct=True, invite=[eve_id],
                               preset=nio.RoomPreset.trusted_private_chat)
    assert isinstance(dm, nio.RoomCreateError), dm
    assert "dms.staff_external" in dm.message and "#it-help" in dm.message
    room = await bob.room_create(name="Project")
    assert isinstance(room, nio.RoomCreateResponse)
    inv = await bob.room_invite(room.room_id, eve_id)
    assert isinstance(inv, nio.RoomInviteError)
    assert "class.internal.federate" in inv.message
    # a sales person has an exception for external contacts
    alice = await sep.staff("alice")
    ok = await alice.room_create(is_direct=True, invite=[eve_id],
                                 preset=nio.RoomPreset.trusted_private_chat)
    assert isinstance(ok, nio.RoomCreateResponse), ok


async def test_external_join_is_refused_and_partner_only_gets_into_external_rooms(
        sep: Setup) -> None:
    bob = await sep.staff("bob")
    alias = f"ext-{os.urandom(3).hex()}"
    ext = await bob.room_create(alias=alias, visibility=nio.RoomVisibility.public,
                                preset=nio.RoomPreset.public_chat)
    assert isinstance(ext, nio.RoomCreateResponse), ext
    cls = await bob.room_get_state_event(ext.room_id, "org.enclave.room_class")
    assert cls.content["class"] == "external"
    internal = await bob.room_create(preset=nio.RoomPreset.public_chat)
    assert isinstance(internal, nio.RoomCreateResponse)
    eve, pat = sep.outsider("eve"), sep.outsider("pat")
    for who in (eve, pat):
        r = await who.join(internal.room_id)
        assert isinstance(r, nio.JoinError), r  # internal rooms do not federate
    # Synapse asks modules about local joins only: a remote join of a federating room is
    # undone by the reactive layer (a kick as the room's local creator)
    r = await eve.join(f"#{alias}:{sep.corp_name}")
    if isinstance(r, nio.JoinResponse):
        async def kicked() -> bool:
            return await membership(sep, ext.room_id, eve.user_id) == "leave"

        await wait_until(kicked, within=30, what="the reactive kick",
                         describe=sep.enclave.describe)
        audit = await sep.enclave.cli("audit", "--rule", "class.external", "--format", "json")
        assert '"kick"' in audit.stdout, audit.stdout
    else:
        assert "class.external" in r.message, r
    r = await pat.join(f"#{alias}:{sep.corp_name}")
    assert isinstance(r, nio.JoinResponse), r
    inv = await bob.room_invite(internal.room_id, pat.user_id)
    assert isinstance(inv, nio.RoomInviteError) and "class.internal" in inv.message


async def test_barrier_groups_cannot_dm_share_a_room_or_find_each_other(sep: Setup) -> None:
    carol, dave, bob = [await sep.staff(n) for n in ("carol", "dave", "bob")]
    dm = await carol.room_create(is_direct=True, invite=[dave.user_id])
    assert isinstance(dm, nio.RoomCreateError) and "barrier-research-trading" in dm.message
    room = await carol.room_create(name="Research", invite=[bob.user_id])
    assert isinstance(room, nio.RoomCreateResponse)
    inv = await carol.room_invite(room.room_id, dave.user_id)
    assert isinstance(inv, nio.RoomInviteError) and "barrier-research-trading" in inv.message
    # a third party cannot bring them together either
    await bob.join(room.room_id)
    inv = await bob.room_invite(room.room_id, dave.user_id)
    assert isinstance(inv, nio.RoomInviteError)

    async def search(client: nio.AsyncClient, term: str) -> set[str]:
        body = await sep.corp("POST", "/_matrix/client/v3/user_directory/search",
                              {"search_term": term, "limit": 50}, token=client.access_token)
        return {r["user_id"] for r in body["results"]}

    # people in public rooms are listed in user search; the gate hides those one may not
    # contact (accounts made by the admin API are listed only once they share a room)
    for who in (carol, dave):
        pub = await who.room_create(preset=nio.RoomPreset.public_chat,
                                    visibility=nio.RoomVisibility.public)
        assert isinstance(pub, nio.RoomCreateResponse), pub

    async def listed() -> bool:
        return dave.user_id in await search(bob, "dave") and \
            carol.user_id in await search(bob, "carol")

    await wait_until(listed, within=30, what="the user directory to list carol and dave")
    assert dave.user_id not in await search(carol, "dave")
    assert carol.user_id not in await search(dave, "carol")
    assert dave.user_id in await search(bob, "dave")


async def test_expired_guest_is_removed_by_reconciliation(sep: Setup) -> None:
    alice = await sep.staff("alice")
    gina = sep.outsider("gina")
    alias = f"ext-guest-{os.urandom(3).hex()}"
    room = await alice.room_create(alias=alias, invite=[gina.user_id])
    assert isinstance(room, nio.RoomCreateResponse), room
    await wait_invite(gina, room.room_id)
    joined = await gina.join(room.room_id)
    assert isinstance(joined, nio.JoinResponse), joined
    plan = await sep.enclave.cli("separation", "--plan", "--room", room.room_id)
    assert plan.returncode == 0 and "0 actions" in plan.stdout, plan.stdout + plan.stderr
    await asyncio.sleep(max(0.0, sep.guest_expires - time.time() + 1))
    plan = await sep.enclave.cli("separation", "--plan", "--room", room.room_id)
    assert "guest-gina" in plan.stdout, plan.stdout
    applied = await sep.enclave.cli("separation", "--apply", "--room", room.room_id)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert await membership(sep, room.room_id, gina.user_id) == "leave"
    audit = await sep.enclave.cli("audit", "--rule", "guest-gina", "--format", "json")
    assert '"kick"' in audit.stdout
    # the sponsor is told
    body = await read_notice(alice, sep.uid(BOT_LOCALPART), "Guest access")
    assert gina.user_id in body and "guest-gina" in body


async def test_explain_names_the_rule_and_its_line(sep: Setup) -> None:
    r = await sep.enclave.cli("explain", "invite", sep.uid("carol"), sep.uid("dave"))
    assert r.returncode == 0, r.stderr
    assert "DENY" in r.stdout and "barrier-research-trading" in r.stdout
    assert "policy.barriers[0]" in r.stdout and "line " in r.stdout
    r = await sep.enclave.cli("explain", "invite", sep.uid("alice"), sep.outsiders["eve"][0])
    assert "ALLOW" in r.stdout and "dm-sales-external" in r.stdout


async def test_policy_reload_refuses_an_invalid_file_and_applies_a_valid_one(
        sep: Setup) -> None:
    good = sep.config.read_text()
    cfg = yaml.safe_load(good)
    try:
        cfg["policy"]["default_class"] = "nonexistent"
        sep.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        r = await sep.enclave.cli("reload")
        assert r.returncode != 0 and "default_class" in r.stderr, r.stdout + r.stderr
        bob = await sep.staff("bob")
        room = await bob.room_create(name="still internal")
        assert isinstance(room, nio.RoomCreateResponse)  # the running policy stayed
        # a valid change: DMs with outsiders allowed for everyone; applied on SIGHUP
        cfg["policy"]["default_class"] = "internal"
        cfg["policy"]["dms"]["staff_external"] = "allow"
        sep.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert sep.enclave.proc is not None
        os.kill(sep.enclave.proc.pid, signal.SIGHUP)
        eve_id = sep.outsiders["eve"][0]

        async def allowed() -> bool:
            dm = await bob.room_create(is_direct=True, invite=[eve_id])
            return isinstance(dm, nio.RoomCreateResponse)

        await wait_until(allowed, within=15, what="the reloaded policy")
    finally:
        sep.config.write_text(good)
        assert sep.enclave.proc is not None
        os.kill(sep.enclave.proc.pid, signal.SIGHUP)
        await asyncio.sleep(1)


async def test_enclave_down_gate_denies_with_a_clear_message(sep: Setup) -> None:
    bob = await sep.staff("bob")
    room = await bob.room_create(name="while down")
    await sep.enclave.stop()
    try:
        inv = await bob.room_invite(room.room_id, sep.uid("alice"))
        assert isinstance(inv, nio.RoomInviteError), inv
        assert "unreachable" in inv.message
    finally:
        await sep.enclave.start()


async def read_notice(client: nio.AsyncClient, bot: str, needle: str,
                      within: float = 30) -> str:
    """Join the bot's DM (its invite may have come in an earlier sync) and return the
    bot's notice that contains ``needle``."""
    async def probe() -> str | None:
        await client.sync(timeout=500)
        for rid, room in list(client.invited_rooms.items()):
            if room.inviter == bot or bot in room.users:
                await client.join(rid)
        for rid in list(client.rooms):
            msgs = await client.room_messages(rid, start="", limit=50)
            if not isinstance(msgs, nio.RoomMessagesResponse):
                continue
            for e in msgs.chunk:
                if isinstance(e, nio.RoomMessageNotice) and e.sender == bot and \
                        needle in e.body:
                    return e.body
        return None

    return await wait_until(probe, within=within, interval=0.5, what="the bot's notice")


async def wait_left(client: nio.AsyncClient, room_id: str, within: float = 60,
                    describe: Any = None) -> None:
    """Until the client's sync shows it out of ``room_id`` (an invite rejected for it)."""
    async def probe() -> bool:
        resp = await client.sync(timeout=500)
        return isinstance(resp, nio.SyncResponse) and room_id in resp.rooms.leave

    await wait_until(probe, within=within, interval=0, what=f"leaving {room_id}",
                     describe=describe)


async def test_gate_allow_mode_lets_through_and_reactive_catches_up(sep: Setup) -> None:
    await sep.enclave.stop()
    await sep.restart_corp(sep.gate_module(on_unreachable="allow"))
    bob = await sep.staff("bob")
    await bob.sync(timeout=0)
    eve = sep.outsider("eve")
    room = await eve.room_create(is_direct=True, invite=[bob.user_id])
    assert isinstance(room, nio.RoomCreateResponse), room
    await wait_invite(bob, room.room_id)  # Enclave is down and the gate lets it through
    await sep.enclave.start()
    await wait_left(bob, room.room_id, describe=sep.enclave.describe)
    body = await read_notice(bob, sep.uid(BOT_LOCALPART), "declined an invitation")
    assert "dms.staff_external" in body and "#it-help" in body


async def test_gate_off_reactive_layer_rejects_and_tells_the_staff_member(sep: Setup) -> None:
    await sep.restart_corp(None)
    dave = await sep.staff("dave")
    await dave.sync(timeout=0)
    eve = sep.outsider("eve")
    room = await eve.room_create(is_direct=True, invite=[dave.user_id])
    assert isinstance(room, nio.RoomCreateResponse), room
    await wait_left(dave, room.room_id, within=30, describe=sep.enclave.describe)
    body = await read_notice(dave, sep.uid(BOT_LOCALPART), "declined an invitation")
    assert "dms.staff_external" in body
