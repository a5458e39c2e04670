"""The gate end to end: Enclave's Synapse module inside a real Synapse asks a real
:class:`~bridge.gate.service.GateService` over loopback, and matrix-nio clients see the result.

The corporate server of a :class:`~devstack.federation.FederatedPair` loads
``bridge.gate.module.EnclaveGate`` (Synapse runs with this venv's python, where ``bridge`` is
installed in editable mode); the personal server supplies federated invites. The decider
behind the service is a table-driven test double (``RULES``) that proves the module and the
service; the real separation policy behind the same service gets its own tests. One pair
per module; Synapse is restarted only for the
``on_unreachable: allow`` test and restored after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bridge.gate.module import UNREACHABLE_MESSAGE
from bridge.gate.protocol import CLASS_STATE_TYPE, GateAnswer, GateRequest, GateRoom
from bridge.gate.service import GateService
from devstack.federation import FederatedPair

from .harness import appservice_port, nio, wait_until

pytestmark = pytest.mark.integration

SECRET = "gate-secret-" + uuid.uuid4().hex
CLASS_CONTENT = {"class": "internal", "rule_id": "test.create.internal", "set_by": "gate"}


# -- the test double behind the gate ---------------------------------------------------------
def _localpart(user_id: str | None) -> str:
    return (user_id or "@:")[1:].split(":", 1)[0]


# (check, which user id, localpart prefix, rule id): the first matching row refuses.
RULES: tuple[tuple[str, str, str, str], ...] = (
    ("invite", "target", "ext-", "test.invite.external"),
    ("invite", "user", "stranger-", "test.invite.stranger"),
    ("join", "user", "blocked-", "test.join.blocked"),
    ("user_search", "target", "hidden-", "test.search.hidden"),
)


@dataclass
class Recorder:
    """What the gate was asked, in order (appended from the gate's thread)."""

    requests: list[GateRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, req: GateRequest) -> None:
        with self.lock:
            self.requests.append(req)

    def about(self, check: str, **match: Any) -> list[GateRequest]:
        with self.lock:
            return [r for r in self.requests if r.check == check
                    and all(getattr(r, k) == v for k, v in match.items())]


def make_decider(recorder: Recorder):
    async def decide(req: GateRequest) -> GateAnswer:
        recorder.add(req)
        if req.check == "invite" and _localpart(req.target).startswith("slow-"):
            await asyncio.sleep(3)  # longer than the module's timeout
        for check, who, prefix, rule in RULES:
            if req.check == check and _localpart(getattr(req, who)).startswith(prefix):
                return GateAnswer.denied(rule, f"{who} is {prefix}*",
                                         f"Enclave policy ({rule}): not with {prefix}* users.")
        if req.check == "state_event" and req.event and req.event["type"] == CLASS_STATE_TYPE:
            return GateAnswer.denied("test.state.protected", "protected state",
                                     f"Enclave policy (test.state.protected): "
                                     f"{CLASS_STATE_TYPE} is managed by Enclave.")
        if req.check == "create_room":
            assert req.create is not None
            if "forbidden" in str(req.create.get("name", "")):
                return GateAnswer.denied("test.create.forbidden", "name",
                                         "Enclave policy (test.create.forbidden): no.")
            return GateAnswer.allowed("test.create.internal", "internal room", edits={
                "creation_content": {"m.federate": False},
                "initial_state": [{"type": CLASS_STATE_TYPE, "state_key": "",
                                   "content": CLASS_CONTENT}]})
        return GateAnswer.allowed("test.default", "no rule refused")
    return decide


class GateThread:
    """A real aiohttp app running GateService, in its own thread and event loop, on a fixed
    port (the module's url), so it can be stopped and started under a running Synapse."""

    def __init__(self, port: int, secret: str, recorder: Recorder):
        self.port = port
        self.secret = secret
        self.recorder = recorder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gate", daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        app = web.Application()
        GateService(secret=self.secret, decide=make_decider(self.recorder)).add_routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def start(self, secret: str | None = None) -> None:
        if secret is not None:
            self.secret = secret
        self._run(self._start())

    def stop(self) -> None:
        self._run(self._stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """Enclave's endpoint gone for the duration (connection refused)."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    @contextlib.contextmanager
    def with_secret(self, secret: str) -> Iterator[None]:
        """Enclave expecting another secret than the module sends."""
        old = self.secret
        self.stop()
        self.start(secret)
        try:
            yield
        finally:
            self.stop()
            self.start(old)


# -- fixtures --------------------------------------------------------------------------------
@dataclass
class GateEnv:
    pair: FederatedPair
    gate: GateThread
    recorder: Recorder
    secret_file: Path
    bot_id: str

    @property
    def corp(self) -> Any:
        return self.pair.corp

    def module_config(self, **overrides: Any) -> dict[str, Any]:
        cfg = {"url": f"http://127.0.0.1:{self.gate.port}",
               "secret_path": str(self.secret_file),
               "enclave_users": [self.bot_id], "timeout_ms": 500,
               "user_search_cache_seconds": 30, **overrides}
        return {"modules": [{"module": "bridge.gate.module.EnclaveGate", "config": cfg}],
                "user_directory": {"enabled": True, "search_all_users": True}}

    async def user(self, name: str, *, personal: bool = False) -> nio.AsyncClient:
        server = self.pair.personal if personal else self.corp
        localpart = f"{name}-{uuid.uuid4().hex[:6]}"
        user_id, token = await asyncio.to_thread(server.register_user, localpart,
                                                 f"pw-{localpart}")
        client = nio.AsyncClient(server.base_url, user_id)
        client.access_token, client.user_id = token, user_id
        return client

    async def module_metrics(self) -> dict[tuple[str, str], float]:
        """The gate module's samples on Synapse's /_synapse/metrics: {(name, label value):
        value}, the label being the outcome (checks) or the reason (unreachable)."""
        async with aiohttp.ClientSession() as s, s.get(
                self.corp.base_url + "/_synapse/metrics") as resp:
            assert resp.status == 200, await resp.text()
            text = await resp.text()
        out: dict[tuple[str, str], float] = {}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == "enclave_gate_module_checks_total":
                    key = (sample.name, sample.labels["outcome"])
                elif sample.name == "enclave_gate_module_unreachable_total":
                    key = (sample.name, sample.labels["reason"])
                else:
                    continue
                out[key] = out.get(key, 0.0) + sample.value
        return out

    def log_size(self) -> int:
        return self.corp.log_path.stat().st_size

    def log(self, since: int = 0) -> str:
        """Synapse's log from byte offset ``since`` (a :meth:`log_size` taken earlier)."""
        with self.corp.log_path.open("rb") as fh:
            fh.seek(since)
            return fh.read().decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GateEnv]:
    base = tmp_path_factory.mktemp("gate")
    secret_file = base / "gate_secret"
    secret_file.write_text(SECRET + "\n")
    recorder = Recorder()
    gate = GateThread(appservice_port(), SECRET, recorder)
    gate.start()
    pair = FederatedPair.create(base / "pair")
    env = GateEnv(pair=pair, gate=gate, recorder=recorder, secret_file=secret_file,
                  bot_id=f"@enclave-bot:{pair.corp.server_name}")
    pair.corp.extra_config.update(env.module_config())
    pair.corp.metrics = True  # the module's metrics, on Synapse's /_synapse/metrics
    try:
        pair.start()
        pair.corp.register_user("enclave-bot", "pw-enclave-bot")
        yield env
    finally:
        pair.stop()
        gate.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[nio.AsyncClient]]:
    made: list[nio.AsyncClient] = []
    yield made
    for c in made:
        with contextlib.suppress(Exception):
            await c.close()


async def login_bot(env: GateEnv, clients: list[nio.AsyncClient]) -> nio.AsyncClient:
    bot = nio.AsyncClient(env.corp.base_url, env.bot_id)
    clients.append(bot)
    resp = await bot.login("pw-enclave-bot")
    assert isinstance(resp, nio.LoginResponse), resp
    return bot


async def room_of(client: nio.AsyncClient, **kw: Any) -> str:
    resp = await client.room_create(**kw)
    assert isinstance(resp, nio.RoomCreateResponse), resp
    return resp.room_id


async def invited_rooms(client: nio.AsyncClient) -> set[str]:
    resp = await client.sync(timeout=0, full_state=True)
    assert isinstance(resp, nio.SyncResponse), resp
    return set(resp.rooms.invite)


async def state_event(client: nio.AsyncClient, room_id: str, ev_type: str,
                      state_key: str = "") -> dict[str, Any] | None:
    resp = await client.room_get_state_event(room_id, ev_type, state_key)
    if isinstance(resp, nio.RoomGetStateEventError):
        assert resp.status_code == "M_NOT_FOUND", resp
        return None
    return resp.content


# -- invites -----------------------------------------------------------------------------------
async def test_denied_invite_names_the_rule_and_never_reaches_the_invitee(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, ext = await env.user("alice"), await env.user("ext-eve")
    clients += [alice, ext]
    room = await room_of(alice, name="project")

    resp = await alice.room_invite(room, ext.user_id)

    assert isinstance(resp, nio.RoomInviteError), resp
    assert resp.status_code == "M_FORBIDDEN"
    assert "test.invite.external" in resp.message
    assert "not with ext-* users" in resp.message
    assert room not in await invited_rooms(ext)
    assert await state_event(alice, room, "m.room.member", ext.user_id) is None


async def test_allowed_invite_goes_through_with_the_room_facts(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, bob = await env.user("alice"), await env.user("bob")
    clients += [alice, bob]
    room = await room_of(alice, name="team")

    resp = await alice.room_invite(room, bob.user_id)

    assert isinstance(resp, nio.RoomInviteResponse), resp
    assert room in await invited_rooms(bob)
    asked = env.recorder.about("invite", user=alice.user_id, target=bob.user_id)
    assert len(asked) == 1
    facts = asked[0].room
    assert facts is not None and facts.room_id == room
    assert facts.creator == alice.user_id and alice.user_id in facts.creators
    assert facts.members == {alice.user_id: "join"}
    assert facts.room_version == "12" and facts.federate is False  # the create edit
    assert facts.room_class == "internal" and facts.name == "team"
    assert facts.is_direct is None  # Synapse's user_may_invite carries no invite content
    # room version 12: creators have unlimited power and are left out of the users map
    assert "users_default" in facts.power and alice.user_id not in facts.power["users"]
    assert asked[0].federated is False


async def test_invites_of_a_direct_chat_creation_are_asked_with_is_direct(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, bob = await env.user("alice"), await env.user("bob")
    clients += [alice, bob]

    room = await room_of(alice, is_direct=True, invite=[bob.user_id],
                         preset=nio.RoomPreset.trusted_private_chat)

    created = env.recorder.about("create_room", user=alice.user_id)
    assert created[-1].create is not None
    assert created[-1].create["is_direct"] is True
    assert tuple(created[-1].create["invite"]) == (bob.user_id,)
    asked = env.recorder.about("invite", user=alice.user_id, target=bob.user_id)
    assert [r.room.room_id for r in asked if r.room] == [room]
    assert asked[0].room is not None and asked[0].room.is_direct is True


async def test_enclave_users_are_never_asked(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    bot = await login_bot(env, clients)
    ext = await env.user("ext-frank")
    clients.append(ext)
    before = len(env.recorder.requests)

    room = await room_of(bot, name="managed")
    invite = await bot.room_invite(room, ext.user_id)
    put = await bot.room_put_state(room, CLASS_STATE_TYPE, {"class": "managed"})

    assert isinstance(invite, nio.RoomInviteResponse), invite
    assert isinstance(put, nio.RoomPutStateResponse), put
    assert [r for r in env.recorder.requests[before:] if r.user == env.bot_id] == []
    # no create edits either: the bot's room federates and has only the class it set
    create = await state_event(bot, room, "m.room.create")
    assert create is not None and create.get("m.federate", True) is True
    assert await state_event(bot, room, CLASS_STATE_TYPE) == {"class": "managed"}


# -- joins -------------------------------------------------------------------------------------
async def test_denied_join_is_refused_with_the_rule(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, blocked, ok = (await env.user("alice"), await env.user("blocked-bo"),
                          await env.user("carol"))
    clients += [alice, blocked, ok]
    room = await room_of(alice, name="open", preset=nio.RoomPreset.public_chat)

    refused = await blocked.join(room)
    joined = await ok.join(room)

    assert isinstance(refused, nio.JoinError), refused
    assert refused.status_code == "M_FORBIDDEN"
    assert "test.join.blocked" in refused.message
    assert isinstance(joined, nio.JoinResponse), joined
    members = await alice.joined_members(room)
    assert isinstance(members, nio.JoinedMembersResponse), members
    assert {m.user_id for m in members.members} == {alice.user_id, ok.user_id}
    asked = env.recorder.about("join", user=blocked.user_id)
    assert asked and asked[0].room is not None and asked[0].room.join_rule == "public"


# -- room creation -----------------------------------------------------------------------------
async def test_create_room_gets_the_edits_of_enclave(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice = await env.user("alice")
    clients.append(alice)
    # the user asks for a federating room with its own class: Enclave's edits win
    room = await room_of(alice, name="plans", federate=True, initial_state=[
        {"type": CLASS_STATE_TYPE, "state_key": "", "content": {"class": "mine"}}])

    create = await state_event(alice, room, "m.room.create")
    assert create is not None and create.get("m.federate") is False
    assert await state_event(alice, room, CLASS_STATE_TYPE) == CLASS_CONTENT
    asked = env.recorder.about("create_room", user=alice.user_id)
    assert asked[-1].create is not None and asked[-1].create["name"] == "plans"
    assert asked[-1].create["initial_state"][0]["content"] == {"class": "mine"}


async def test_create_room_refused_with_the_rule(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice = await env.user("alice")
    clients.append(alice)

    resp = await alice.room_create(name="forbidden plans")

    assert isinstance(resp, nio.RoomCreateError), resp
    assert resp.status_code == "M_FORBIDDEN"
    assert "test.create.forbidden" in resp.message


# -- protected state ---------------------------------------------------------------------------
async def test_only_enclave_may_change_the_room_class(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice = await env.user("alice")
    clients.append(alice)
    room = await room_of(alice, name="mine")

    refused = await alice.room_put_state(room, CLASS_STATE_TYPE, {"class": "external"})
    topic = await alice.room_put_state(room, "m.room.topic", {"topic": "fine"})

    assert isinstance(refused, nio.RoomPutStateError), refused
    assert refused.status_code == "M_FORBIDDEN"
    assert "test.state.protected" in refused.message
    assert isinstance(topic, nio.RoomPutStateResponse), topic
    assert await state_event(alice, room, CLASS_STATE_TYPE) == CLASS_CONTENT
    asked = env.recorder.about("state_event", user=alice.user_id)
    assert [r.event["type"] for r in asked if r.event] == [CLASS_STATE_TYPE, "m.room.topic"]
    assert asked[0].event is not None and asked[0].event["content"] == {"class": "external"}


# -- user directory ----------------------------------------------------------------------------
async def search(env: GateEnv, client: nio.AsyncClient, term: str) -> set[str]:
    async with aiohttp.ClientSession() as http, http.post(
            f"{env.corp.base_url}/_matrix/client/v3/user_directory/search",
            json={"search_term": term, "limit": 50},
            headers={"Authorization": f"Bearer {client.access_token}"}) as resp:
        assert resp.status == 200, await resp.text()
        return {r["user_id"] for r in (await resp.json())["results"]}


async def test_user_search_hides_a_denied_candidate(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    tag = uuid.uuid4().hex[:8]
    # the directory matches whole words of ids and names: tag is one of each localpart
    alice, seen, hidden = (await env.user(f"alice-{tag}"), await env.user(f"seen-{tag}"),
                           await env.user(f"hidden-{tag}"))
    bot = await login_bot(env, clients)
    clients += [alice, seen, hidden]

    # the directory fills in the background: wait until Enclave's bot (never filtered)
    # finds both candidates, so a missing result below can only be the gate's doing
    async def both_indexed() -> bool:
        return {seen.user_id, hidden.user_id} <= await search(env, bot, tag)

    await wait_until(both_indexed, within=30, what="the user directory to index both")

    found = await search(env, alice, tag)

    assert seen.user_id in found
    assert hidden.user_id not in found
    assert env.recorder.about("user_search", user=alice.user_id, target=hidden.user_id)


# -- Enclave unreachable -----------------------------------------------------------------------
async def test_unreachable_enclave_denies_by_default(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, bob = await env.user("alice"), await env.user("bob")
    clients += [alice, bob]
    room = await room_of(alice, name="down", preset=nio.RoomPreset.public_chat)
    mark = env.log_size()
    before = await env.module_metrics()

    with env.gate.down():
        invite = await alice.room_invite(room, bob.user_id)
        join = await bob.join(room)
        create = await alice.room_create(name="while down")
        topic = await alice.room_put_state(room, "m.room.topic", {"topic": "x"})

    for resp in (invite, join, create, topic):
        assert isinstance(resp, nio.ErrorResponse), resp
        assert resp.status_code == "M_FORBIDDEN"
        assert UNREACHABLE_MESSAGE in resp.message
    assert room not in await invited_rooms(bob)
    assert "could not ask Enclave about invite" in env.log(mark)
    # counted where an operator's alert reads it: Synapse's metrics (Enclave never heard)
    down = await env.module_metrics()
    unreachable = ("enclave_gate_module_checks_total", "unreachable")
    assert down[unreachable] - before.get(unreachable, 0) >= 4, (before, down)
    connect = ("enclave_gate_module_unreachable_total", "connect")
    assert down[connect] - before[connect] >= 4, (before, down)
    # back up: the same invite goes through
    assert isinstance(await alice.room_invite(room, bob.user_id), nio.RoomInviteResponse)
    allowed = ("enclave_gate_module_checks_total", "allow")
    assert (await env.module_metrics())[allowed] > down.get(allowed, 0)


async def test_timeout_counts_as_unreachable(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, slow = await env.user("alice"), await env.user("slow-sam")
    clients += [alice, slow]
    room = await room_of(alice, name="slow")
    mark = env.log_size()
    before = await env.module_metrics()

    resp = await alice.room_invite(room, slow.user_id)

    assert isinstance(resp, nio.RoomInviteError), resp
    assert UNREACHABLE_MESSAGE in resp.message
    assert "no answer within 500 ms" in env.log(mark)
    timeouts = ("enclave_gate_module_unreachable_total", "timeout")
    assert (await env.module_metrics())[timeouts] - before[timeouts] >= 1
    assert room not in await invited_rooms(slow)


async def test_wrong_secret_counts_as_unreachable_and_is_logged_without_it(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, bob = await env.user("alice"), await env.user("bob")
    clients += [alice, bob]
    room = await room_of(alice, name="secret")
    mark = env.log_size()
    before = await env.module_metrics()

    with env.gate.with_secret("another-secret-" + uuid.uuid4().hex):
        resp = await alice.room_invite(room, bob.user_id)

    assert isinstance(resp, nio.RoomInviteError), resp
    assert UNREACHABLE_MESSAGE in resp.message
    assert "HTTP 401 (wrong gate secret?)" in env.log(mark)
    status = ("enclave_gate_module_unreachable_total", "status")
    assert (await env.module_metrics())[status] - before[status] >= 1
    assert SECRET not in env.log()


# -- federated invites -------------------------------------------------------------------------
async def test_federated_invites_are_asked_with_the_invite_facts(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    carol = await env.user("carol")
    friend = await env.user("friend-pat", personal=True)
    stranger = await env.user("stranger-sid", personal=True)
    clients += [carol, friend, stranger]

    dm = await room_of(friend, is_direct=True, invite=[carol.user_id],
                       preset=nio.RoomPreset.trusted_private_chat)
    refused = await stranger.room_create(is_direct=True, invite=[carol.user_id],
                                         preset=nio.RoomPreset.trusted_private_chat)

    async def invited() -> bool:
        return dm in await invited_rooms(carol)

    await wait_until(invited, within=30, what="the friend's DM invite")
    asked = env.recorder.about("invite", user=friend.user_id, target=carol.user_id)
    assert len(asked) == 1 and asked[0].federated is True
    facts = asked[0].room
    assert facts is not None and facts.room_id == dm and facts.is_direct is True
    assert facts.members == {friend.user_id: "join", carol.user_id: "invite"}
    assert facts.creator == friend.user_id and facts.room_version == "12"
    # the corporate server's refusal travels back: the stranger's own server fails the
    # createRoom with our message
    assert env.recorder.about("invite", user=stranger.user_id, target=carol.user_id)
    assert isinstance(refused, nio.RoomCreateError), refused
    assert refused.status_code == "M_FORBIDDEN"
    assert "test.invite.stranger" in refused.message


async def test_joins_of_remote_rooms_are_asked_with_what_little_is_known(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    pat = await env.user("pat", personal=True)
    carol, blocked = await env.user("carol"), await env.user("blocked-bea")
    clients += [pat, carol, blocked]
    room = await room_of(pat, name="outside", preset=nio.RoomPreset.public_chat)
    via = env.pair.personal.server_name

    async def join(client: nio.AsyncClient) -> Any:
        path = (f"/_matrix/client/v3/join/{urllib.parse.quote(room, safe='')}"
                f"?server_name={urllib.parse.quote(via)}")
        try:
            return await asyncio.to_thread(env.corp.request, "POST", path, {},
                                           client.access_token)
        except RuntimeError as e:
            return str(e)

    joined, refused = await join(carol), await join(blocked)

    assert isinstance(joined, dict) and joined["room_id"] == room, joined
    assert isinstance(refused, str) and "403" in refused and "test.join.blocked" in refused
    asked = env.recorder.about("join", user=carol.user_id)
    # the corporate server is not in the room yet: no state to read
    assert asked and asked[0].room == GateRoom(room_id=room)


# -- on_unreachable: allow (restarts Synapse, so it comes last) -------------------------------
@contextlib.contextmanager
def reconfigured(env: GateEnv, **module: Any) -> Iterator[None]:
    old = dict(env.corp.extra_config)
    env.corp.extra_config.update(env.module_config(**module))
    env.corp.restart()
    try:
        yield
    finally:
        env.corp.extra_config.clear()
        env.corp.extra_config.update(old)
        env.corp.restart()


async def test_unreachable_enclave_allows_when_configured_but_guards_protected_state(
        env: GateEnv, clients: list[nio.AsyncClient]) -> None:
    alice, bob = await env.user("alice"), await env.user("bob")
    clients += [alice, bob]
    room = await room_of(alice, name="allow")

    with reconfigured(env, on_unreachable="allow"), env.gate.down():
        mark = env.log_size()
        invite = await alice.room_invite(room, bob.user_id)
        topic = await alice.room_put_state(room, "m.room.topic", {"topic": "ok"})
        klass = await alice.room_put_state(room, CLASS_STATE_TYPE, {"class": "x"})
        plain = await alice.room_create(name="plain while down")
        sneaky = await alice.room_create(name="sneaky", initial_state=[
            {"type": CLASS_STATE_TYPE, "state_key": "", "content": {"class": "x"}}])
        log = env.log(mark)

    assert isinstance(invite, nio.RoomInviteResponse), invite
    assert isinstance(topic, nio.RoomPutStateResponse), topic
    assert isinstance(plain, nio.RoomCreateResponse), plain
    for resp in (klass, sneaky):
        assert isinstance(resp, nio.ErrorResponse), resp
        assert resp.status_code == "M_FORBIDDEN"
        assert "gate.protected_state" in resp.message
    assert f"could not ask Enclave about invite by {alice.user_id}" in log
    assert "on_unreachable=allow" in log
    assert room in await invited_rooms(bob)
