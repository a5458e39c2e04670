"""Enclave gate: a Synapse module that asks Enclave before people meet.

Runs INSIDE Synapse. It imports only the standard library, ``synapse.*``, ``twisted.*`` and
``prometheus_client`` (a dependency of Synapse), so this one file can be copied into
Synapse's environment without Enclave installed::

    cp bridge/gate/module.py /usr/lib/python3/dist-packages/enclave_gate.py  # any sys.path dir

    # homeserver.yaml
    modules:
      - module: enclave_gate.EnclaveGate      # or bridge.gate.module.EnclaveGate
        config:
          url: http://127.0.0.1:29330         # Enclave's appservice listener
          secret_path: /etc/matrix-synapse/enclave_gate_secret   # or secret: "..."
          enclave_users: ["@enclave:corp.example.com", "@enclave-admin:corp.example.com"]
          timeout_ms: 500
          on_unreachable: deny                # or allow
          protected_state_types: [org.enclave.room_class, m.room.retention]
          user_search_cache_seconds: 30

For each invite, join, room creation, state event and user-directory result it POSTs a
check to ``{url}/_enclave/gate/v1/check`` (``Authorization: Bearer <secret>``; the protocol
is in ``bridge/gate/protocol.py``) and does what Enclave answers. Users in
``enclave_users`` (Enclave's bot and admin identity) always pass without a question, so
Enclave acting on the homeserver never waits for itself.

When Enclave cannot answer (connection refused, ``timeout_ms`` passed, a non-200 answer
such as 401 for a wrong secret, or an answer that is not the protocol's) the check follows
``on_unreachable``: ``deny`` (default) refuses with "Enclave policy service unreachable; try
again later or contact IT", ``allow`` lets it through, except that only ``enclave_users``
may then set ``protected_state_types`` (also inside a createRoom ``initial_state``). A
warning is logged each time, without the secret.

How a refusal reaches the person (Synapse 1.163, read in its source and checked against a
real Synapse by tests/integration/test_gate_module.py):

* ``user_may_invite``, ``user_may_join_room``, ``federated_user_may_invite``: a returned
  ``(Codes.FORBIDDEN, fields)`` becomes ``SynapseError(403, <Synapse's fixed text>,
  errcode, additional_fields=fields)``; ``cs_error`` writes the additional fields after
  ``error``, so ``fields["error"]`` replaces the fixed text ("Invites have been disabled on
  this server", "Not allowed to join this room"). The client sees ``M_FORBIDDEN``, our
  message (which names the rule) and ``org.enclave.rule_id``/``org.enclave.reason``.
* ``user_may_send_state_event`` accepts only a bare ``Codes`` (a tuple is logged as invalid
  and refused with "You are not permitted to send the state event"), so the module raises
  ``SynapseError(403, message)`` itself; Synapse passes the exception to the client as is.
* ``on_create_room`` (third-party rules): raising ``SynapseError`` is the documented way;
  any other exception would become "Room creation forbidden with these parameters". An
  allowed answer may carry ``edits`` that are merged into the request before the room is
  made (``creation_content`` keys, ``initial_state`` events replacing same type/state_key,
  ``invite`` users added, ``power_users`` levels added to the room's first power levels).
* ``check_username_for_spam``: ``True`` hides the candidate from the requester's user
  directory search; there is no message. Answers are cached per (requester, candidate) for
  ``user_search_cache_seconds`` (unreachable outcomes are not cached).

A local user's join of a room this server has no state for (a remote room) reaches
``user_may_join_room`` with no state at all: the module sends what Synapse says about an
invitation (``invited``) and Enclave decides from what it remembers (the remote invitations
it approved), not from the empty room.

What Synapse does not ask modules about: server admins bypass the invite, join and
state-event checks; the creator's own join at room creation is not a join check; the
``initial_state`` of createRoom is not a state-event check (the create_room check sees it).
``user_may_invite`` gets no invite content, so ``is_direct`` is unknown for local invites,
except the invites of a createRoom with ``is_direct: true`` (remembered from the create_room
check for a few seconds). A remote inviter's invite is asked once, as ``federated``, with the
room facts the invite event carries (``unsigned.invite_room_state``): these are the remote
server's claims, not yet checked by Synapse at that point, so policy should trust only what
a lie could not abuse (a remote server can always omit or fake the class). A refused
federated invite fails the remote inviter's request with our message (seen on 1.163: the
remote client gets ``M_FORBIDDEN`` and the text).

Metrics (on Synapse's ``/_synapse/metrics``, with ``enable_metrics: true`` and a listener
with the ``metrics`` resource): ``enclave_gate_module_checks_total{check,outcome}``,
``enclave_gate_module_unreachable_total{reason}``, ``enclave_gate_module_request_seconds``
(see :class:`GateMetrics`); ``docs/operators/monitoring.md`` alerts on them.

Cost: each check reads the room's state (members included) from Synapse's caches and makes
one keep-alive HTTP request; bench/gate_latency.py measures it. Synapse's HTTP client logs
every request at INFO ("Received response to POST .../_enclave/gate/v1/check: 200"); set
the ``synapse.http.client`` logger to WARNING to quieten it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from synapse.module_api import (
    NOT_SPAM,
    EventBase,
    ModuleApi,
    UserProfile,
    make_deferred_yieldable,
    run_in_background,
)
from synapse.module_api.errors import Codes, ConfigError, SynapseError
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers

logger = logging.getLogger(__name__)

CHECK_PATH = "/_enclave/gate/v1/check"
UNREACHABLE_MESSAGE = ("Enclave policy service unreachable; try again later or contact IT")
UNREACHABLE_RULE = "gate.unreachable"
PROTECTED_RULE = "gate.protected_state"
CLASS_STATE_TYPE = "org.enclave.room_class"
DEFAULT_PROTECTED = (CLASS_STATE_TYPE, "m.room.retention")
MEMBERSHIPS = frozenset({"join", "invite", "knock"})
# What of a createRoom body Enclave needs to decide (the protocol's "create" object).
CREATE_KEYS = ("preset", "is_direct", "invite", "room_alias_name", "name", "topic",
               "creation_content", "initial_state", "visibility", "room_version")
# State read for a room's facts (members: every m.room.member, filtered afterwards).
ROOM_STATE_TYPES: tuple[tuple[str, str | None], ...] = (
    ("m.room.create", ""), ("m.room.member", None), (CLASS_STATE_TYPE, ""),
    ("m.room.canonical_alias", ""), ("m.room.name", ""), ("m.room.join_rules", ""),
    ("m.room.encryption", ""), ("m.room.power_levels", ""), ("m.room.history_visibility", ""),
)
# How long a createRoom's is_direct is remembered for the invites Synapse sends right after.
DM_HINT_SECONDS = 30.0
# Room versions whose creators outrank everyone: a mirror of
# bridge.kernel.power.creators_have_unlimited_power (this file imports nothing of Enclave);
# tests/unit/gate/test_module.py keeps the two equal.
PRIVILEGED_CREATOR_VERSIONS = frozenset({"org.matrix.hydra.11"})


def creators_have_unlimited_power(version: str | None) -> bool:
    """True in room versions 12 and later (and the v12 pre-release ``org.matrix.hydra.11``)."""
    v = "1" if version is None else str(version)
    return v in PRIVILEGED_CREATOR_VERSIONS or (v.isdigit() and int(v) >= 12)
_CONFIG_KEYS = frozenset({"url", "secret", "secret_path", "timeout_ms", "on_unreachable",
                          "protected_state_types", "enclave_users",
                          "user_search_cache_seconds"})
_CACHE_PRUNE_AT = 10000


# -- config -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateModuleConfig:
    """The module's parsed config (see the module docstring for the YAML)."""

    url: str
    secret: str
    timeout_ms: int = 500
    on_unreachable: str = "deny"
    protected_state_types: frozenset[str] = frozenset(DEFAULT_PROTECTED)
    enclave_users: frozenset[str] = frozenset()
    user_search_cache_seconds: float = 30.0

    def __repr__(self) -> str:  # never show the secret, even in a debug log
        return (f"GateModuleConfig(url={self.url!r}, timeout_ms={self.timeout_ms}, "
                f"on_unreachable={self.on_unreachable!r}, "
                f"enclave_users={sorted(self.enclave_users)})")


def parse_module_config(config: Mapping[str, Any]) -> GateModuleConfig:
    """Validate the ``config:`` mapping from homeserver.yaml; raise ConfigError naming the key."""
    if not isinstance(config, Mapping):
        raise ConfigError("the Enclave gate config must be a mapping")
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise ConfigError(f"unknown Enclave gate setting(s) {sorted(unknown)}; "
                          f"known: {sorted(_CONFIG_KEYS)}")
    url = config.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError("'url' must be Enclave's http:// or https:// base URL",
                          ("url",))
    if ("secret" in config) == ("secret_path" in config):
        raise ConfigError("give exactly one of 'secret' or 'secret_path'")
    if "secret_path" in config:
        path = config["secret_path"]
        if not isinstance(path, str):
            raise ConfigError("'secret_path' must be a file path", ("secret_path",))
        try:
            with open(path, encoding="utf-8") as fh:
                secret = fh.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read secret_path {path}: {e.strerror}",
                              ("secret_path",)) from None
    else:
        secret = config["secret"]
        if not isinstance(secret, str):
            raise ConfigError("'secret' must be a string", ("secret",))
        secret = secret.strip()
    if not secret:
        raise ConfigError("the Enclave gate secret is empty")
    timeout_ms = config.get("timeout_ms", 500)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
        raise ConfigError("'timeout_ms' must be a positive whole number", ("timeout_ms",))
    on_unreachable = config.get("on_unreachable", "deny")
    if on_unreachable not in ("deny", "allow"):
        raise ConfigError("'on_unreachable' must be 'deny' or 'allow'", ("on_unreachable",))
    protected = config.get("protected_state_types", list(DEFAULT_PROTECTED))
    if not isinstance(protected, list) or not all(isinstance(t, str) for t in protected):
        raise ConfigError("'protected_state_types' must be a list of event types",
                          ("protected_state_types",))
    users = config.get("enclave_users", [])
    if not isinstance(users, list) or not all(
            isinstance(u, str) and u.startswith("@") and ":" in u for u in users):
        raise ConfigError("'enclave_users' must be a list of user ids (@name:server)",
                          ("enclave_users",))
    cache = config.get("user_search_cache_seconds", 30)
    if isinstance(cache, bool) or not isinstance(cache, int | float) or cache < 0:
        raise ConfigError("'user_search_cache_seconds' must be a number >= 0",
                          ("user_search_cache_seconds",))
    return GateModuleConfig(
        url=url.rstrip("/"), secret=secret, timeout_ms=timeout_ms,
        on_unreachable=on_unreachable, protected_state_types=frozenset(protected),
        enclave_users=frozenset(users), user_search_cache_seconds=float(cache),
    )


# -- pure helpers (room facts, answers, edits) -------------------------------------------------
def thaw(value: Any) -> Any:
    """Synapse's frozen event content (immutabledict, tuples) as plain JSON data."""
    if isinstance(value, Mapping):
        return {str(k): thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


def room_facts(room_id: str, state: Mapping[tuple[str, str], Mapping[str, Any]],
               *, is_direct: bool | None = None) -> dict[str, Any]:
    """The protocol's ``room`` object from state events given as
    ``{(type, state_key): {"sender": ..., "content": {...}}}``."""
    def content(ev_type: str, key: str = "") -> Mapping[str, Any]:
        ev = state.get((ev_type, key)) or {}
        c = ev.get("content")
        return c if isinstance(c, Mapping) else {}

    create_ev = state.get(("m.room.create", "")) or {}
    create = content("m.room.create")
    creator = create.get("creator") if isinstance(create.get("creator"), str) else None
    if creator is None and isinstance(create_ev.get("sender"), str):
        creator = create_ev["sender"]
    creators = [creator] if creator else []
    extra = create.get("additional_creators")
    if isinstance(extra, list | tuple):
        creators += [u for u in extra if isinstance(u, str) and u not in creators]
    room_class = content(CLASS_STATE_TYPE).get("class")
    grant = content(CLASS_STATE_TYPE).get("grant")
    history = content("m.room.history_visibility").get("history_visibility")
    alias_c = content("m.room.canonical_alias")
    aliases = [alias_c["alias"]] if isinstance(alias_c.get("alias"), str) else []
    alt = alias_c.get("alt_aliases")
    if isinstance(alt, list | tuple):
        aliases += [a for a in alt if isinstance(a, str) and a not in aliases]
    name = content("m.room.name").get("name")
    join_rule = content("m.room.join_rules").get("join_rule")
    members = {}
    for (ev_type, key), ev in state.items():
        if ev_type == "m.room.member":
            c = ev.get("content")
            membership = c.get("membership") if isinstance(c, Mapping) else None
            if membership in MEMBERSHIPS:
                members[key] = membership
    version = create.get("room_version")
    if not isinstance(version, str):
        # a missing room_version means version 1 (spec); an unknown room has no create event
        version = "1" if create_ev else None
    return {
        "room_id": room_id, "room_version": version, "creator": creator,
        "creators": creators, "is_direct": is_direct,
        "class": room_class if isinstance(room_class, str) else None,
        "class_grant": grant if isinstance(grant, str) else None,
        "history": history if isinstance(history, str) else None,
        "aliases": aliases, "name": name if isinstance(name, str) else None,
        "federate": create.get("m.federate", True) is not False,
        "join_rule": join_rule if isinstance(join_rule, str) else (
            "invite" if create_ev else None),
        "encrypted": ("m.room.encryption", "") in state,
        "members": members,
        "power": thaw(content("m.room.power_levels")),
    }


def room_from_invite(event: Mapping[str, Any]) -> dict[str, Any]:
    """Room facts of a federated invite: what the invite event itself says.

    ``event`` is the invite as JSON (``room_id``, ``sender``, ``state_key``, ``content``,
    ``unsigned.invite_room_state``). Members: the inviter joined, the invitee invited.
    """
    state: dict[tuple[str, str], Mapping[str, Any]] = {}
    unsigned = event.get("unsigned")
    stripped = unsigned.get("invite_room_state") if isinstance(unsigned, Mapping) else None
    if isinstance(stripped, list | tuple):
        for ev in stripped:
            if (isinstance(ev, Mapping) and isinstance(ev.get("type"), str)
                    and isinstance(ev.get("state_key", ""), str)
                    and ev.get("type") != "m.room.member"):
                state[(ev["type"], ev.get("state_key", ""))] = ev
    content = event.get("content")
    is_direct = content.get("is_direct") if isinstance(content, Mapping) else None
    facts = room_facts(str(event.get("room_id", "")), state,
                       is_direct=is_direct if isinstance(is_direct, bool) else None)
    facts["members"] = {str(event.get("sender")): "join", str(event.get("state_key")): "invite"}
    return facts


class BadAnswer(ValueError):
    """Enclave answered something that is not the protocol's answer."""


def read_answer(body: bytes) -> dict[str, Any]:
    """Validate Enclave's answer; raise :class:`BadAnswer` saying what is wrong."""
    try:
        obj = json.loads(body)
    except ValueError:
        raise BadAnswer("not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("allow"), bool):
        raise BadAnswer("no boolean 'allow'")
    for key in ("rule_id", "reason", "message"):
        if obj.get(key) is None:
            obj[key] = ""
        elif not isinstance(obj[key], str):
            raise BadAnswer(f"'{key}' is not a string")
    edits = obj.get("edits")
    if edits is not None:
        if not isinstance(edits, dict) or set(edits) - {"creation_content", "initial_state",
                                                         "invite", "power_users"}:
            raise BadAnswer("'edits' has unknown keys")
        inv = edits.get("invite")
        if inv is not None and not (isinstance(inv, list)
                                    and all(isinstance(u, str) for u in inv)):
            raise BadAnswer("'edits.invite' is not a list of user ids")
        pu = edits.get("power_users")
        if pu is not None and not (isinstance(pu, dict) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in pu.values())):
            raise BadAnswer("'edits.power_users' is not an object of power levels")
        cc = edits.get("creation_content")
        if cc is not None and not isinstance(cc, dict):
            raise BadAnswer("'edits.creation_content' is not an object")
        init = edits.get("initial_state")
        if init is not None and not (isinstance(init, list) and all(
                isinstance(e, dict) and isinstance(e.get("type"), str)
                and isinstance(e.get("state_key", ""), str)
                and isinstance(e.get("content"), dict) for e in init)):
            raise BadAnswer("'edits.initial_state' is not a list of state events")
    return obj


def refusal_message(answer: Mapping[str, Any]) -> str:
    """The sentence the refused person reads; it always names the rule."""
    rule = answer.get("rule_id") or "unknown"
    message = answer.get("message") or f"Enclave policy ({rule}) does not allow this."
    if rule not in message:
        message = f"{message} [Enclave rule {rule}]"
    return message


def refusal_fields(answer: Mapping[str, Any]) -> dict[str, Any]:
    """Extra fields of the client's error: the message and the rule, machine-readably."""
    return {"error": refusal_message(answer),
            "org.enclave.rule_id": answer.get("rule_id") or "unknown",
            "org.enclave.reason": answer.get("reason") or ""}


def apply_create_edits(config: dict[str, Any], edits: Mapping[str, Any], *,
                       creator: str = "", creator_power: bool = False) -> None:
    """Merge Enclave's edits into a createRoom body, in place.

    ``power_users`` go into the power levels the room starts with: the ``initial_state``
    power levels event if the request has one, else ``power_level_content_override``.
    Synapse replaces the default ``users`` with an override's whole, so the levels the room
    would have had are kept: the creator's 100 (``creator_power`` False: before room
    version 12; in v12 creators must not be listed) and, for ``trusted_private_chat``, the
    invitees' 100 (in v12 they are creators).
    """
    cc = edits.get("creation_content")
    if cc:
        merged = dict(config.get("creation_content") or {})
        merged.update(cc)
        config["creation_content"] = merged
    init = edits.get("initial_state")
    if init:
        added = [{"type": e["type"], "state_key": e.get("state_key", ""),
                  "content": dict(e["content"])} for e in init]
        keys = {(e["type"], e["state_key"]) for e in added}
        kept = [e for e in config.get("initial_state") or []
                if not (isinstance(e, Mapping)
                        and (e.get("type"), e.get("state_key", "")) in keys)]
        config["initial_state"] = kept + added
    invite = [u for u in edits.get("invite") or [] if isinstance(u, str)]
    if invite:
        current = [u for u in config.get("invite") or [] if isinstance(u, str)]
        config["invite"] = current + [u for u in invite if u not in current]
    power = edits.get("power_users")
    if power:
        _add_power_users(config, dict(power), creator, creator_power)


def _add_power_users(config: dict[str, Any], power: dict[str, int], creator: str,
                     creator_power: bool) -> None:
    for e in config.get("initial_state") or []:
        if isinstance(e, dict) and e.get("type") == "m.room.power_levels" \
                and e.get("state_key", "") == "" and isinstance(e.get("content"), dict):
            users = dict(e["content"].get("users") or {})
            users.update(power)  # Enclave's own users' power is Enclave's to set
            e["content"] = {**e["content"], "users": users}
            return
    override = dict(config.get("power_level_content_override") or {})
    users = dict(override.get("users") or {})
    if "users" not in override and not creator_power:
        users[creator] = 100
        if config.get("preset") == "trusted_private_chat":
            users.update({u: 100 for u in config.get("invite") or []
                          if isinstance(u, str) and u not in power})
    users.update(power)
    override["users"] = users
    config["power_level_content_override"] = override


def protected_in(initial_state: Any, protected: Iterable[str]) -> list[str]:
    """The protected state types a createRoom ``initial_state`` tries to set."""
    types = set(protected)
    if not isinstance(initial_state, list | tuple):
        return []
    return sorted({e.get("type") for e in initial_state
                   if isinstance(e, Mapping) and e.get("type") in types})


class _Unreachable(Exception):
    """Enclave gave no usable answer; ``str()`` says why (never the secret), ``reason``
    is one of :data:`UNREACHABLE_REASONS` (the metric's label)."""

    def __init__(self, message: str, reason: str = "connect"):
        super().__init__(message)
        self.reason = reason


# -- metrics (on Synapse's own /_synapse/metrics) -------------------------------------------
# connect: no connection or the request failed; timeout: no answer within timeout_ms;
# status: a non-200 answer (401: wrong secret; 500: Enclave could not decide); bad_answer:
# a 200 that is not the protocol's
UNREACHABLE_REASONS = ("connect", "timeout", "status", "bad_answer")


class GateMetrics:
    """What the module counts, registered on ``registry`` (Synapse's global prometheus
    registry in Synapse, which serves it on a ``metrics`` listener at
    ``/_synapse/metrics`` with ``enable_metrics: true``). Only the module can see that
    Enclave did not answer: Enclave never hears of a check that did not reach it.

    ``enclave_gate_module_checks_total{check,outcome}`` (outcome ``allow``, ``deny``,
    ``unreachable``), ``enclave_gate_module_unreachable_total{reason}`` and
    ``enclave_gate_module_request_seconds`` (a check's round trip as Synapse waits for it).
    """

    def __init__(self, registry: Any):
        self.checks = Counter(
            "enclave_gate_module_checks", "Checks the Enclave gate module asked, by check and "
            "outcome (allow, deny, unreachable)", ["check", "outcome"], registry=registry)
        self.unreachable = Counter(
            "enclave_gate_module_unreachable", "Checks Enclave gave no usable answer to, by "
            "reason (connect, timeout, status, bad_answer)", ["reason"], registry=registry)
        self.seconds = Histogram(
            "enclave_gate_module_request_seconds", "Round trip of one check to Enclave, as "
            "Synapse waits for it", registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        for reason in UNREACHABLE_REASONS:  # exported at 0: increase() sees the first one
            self.unreachable.labels(reason=reason)

    def answered(self, check: str, allow: bool, seconds: float) -> None:
        self.checks.labels(check=check, outcome="allow" if allow else "deny").inc()
        self.seconds.observe(seconds)

    def unanswered(self, check: str, reason: str, seconds: float) -> None:
        self.checks.labels(check=check, outcome="unreachable").inc()
        self.unreachable.labels(reason=reason).inc()
        self.seconds.observe(seconds)


_PROCESS_METRICS: list[GateMetrics] = []


def process_metrics() -> GateMetrics:
    """The module's metrics on Synapse's global registry, made once per process (like
    Synapse's own metrics: a registry refuses a second metric of the same name)."""
    if not _PROCESS_METRICS:
        _PROCESS_METRICS.append(GateMetrics(REGISTRY))
    return _PROCESS_METRICS[0]


def _with_timeout(d: defer.Deferred, seconds: float, reactor: Any) -> defer.Deferred:
    """A Deferred that fires with ``d``'s result, or fails with _Unreachable after
    ``seconds`` (then ``d`` is cancelled). Built by hand instead of ``Deferred.addTimeout``,
    which cannot time out a Deferred whose canceller raises (Twisted #9534)."""
    out: defer.Deferred = defer.Deferred()

    def on_timeout() -> None:
        if not out.called:
            out.errback(Failure(_Unreachable(f"no answer within {seconds * 1000:.0f} ms",
                                             "timeout")))
        try:
            d.cancel()
        except Exception:  # the request is abandoned either way
            pass

    call = reactor.callLater(seconds, on_timeout)

    def done(result: Any) -> None:
        if call.active():
            call.cancel()
        if out.called:
            return None  # timed out already; swallow the cancellation failure
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(done)
    return out


# -- the module ---------------------------------------------------------------------------------
class EnclaveGate:
    """The Synapse module. Synapse calls ``parse_config`` then ``EnclaveGate(config, api)``."""

    def __init__(self, config: GateModuleConfig, api: ModuleApi):
        self._config = config
        self._api = api
        # api.http_client has no IP blocklist (unlike the federation and proxied clients), so
        # it may reach Enclave on loopback; it keeps connections alive between checks.
        self._http = api.http_client
        self._reactor = getattr(self._http, "reactor", None)
        self._url = config.url + CHECK_PATH
        self._auth = f"Bearer {config.secret}".encode()
        self._metrics: GateMetrics | None = process_metrics()
        self._search_cache: dict[tuple[str, str], tuple[float, bool]] = {}
        self._dm_hints: dict[tuple[str, str], float] = {}
        if not config.enclave_users:
            logger.warning("Enclave gate: enclave_users is empty; Enclave's own bot and admin "
                           "will be asked about like everyone else")
        api.register_spam_checker_callbacks(
            user_may_invite=self.user_may_invite,
            federated_user_may_invite=self.federated_user_may_invite,
            user_may_join_room=self.user_may_join_room,
            user_may_send_state_event=self.user_may_send_state_event,
            check_username_for_spam=self.check_username_for_spam,
        )
        api.register_third_party_rules_callbacks(on_create_room=self.on_create_room)
        logger.info("Enclave gate asks %s (timeout %d ms, on_unreachable=%s)", self._url,
                    config.timeout_ms, config.on_unreachable)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> GateModuleConfig:
        """Synapse's hook: validate the module's config at start-up."""
        return parse_module_config(config)

    # -- asking Enclave ------------------------------------------------------------------------
    async def _post(self, body: bytes) -> tuple[int, bytes]:
        headers = Headers({b"Content-Type": [b"application/json"],
                           b"Authorization": [self._auth]})
        try:
            response = await self._http.request("POST", self._url, data=body,
                                                headers=headers)
        except (ResponseNeverReceived, RequestTransmissionFailed):
            # A kept-alive connection Enclave closed (e.g. it restarted) just as we used it.
            # Twisted retries only idempotent methods; a check is a question, so ask again
            # once on a fresh connection (still within timeout_ms).
            response = await self._http.request("POST", self._url, data=body,
                                                headers=headers)
        data = await make_deferred_yieldable(readBody(response))
        return response.code, data

    async def _ask(self, question: dict[str, Any]) -> dict[str, Any]:
        """Enclave's answer, or raise _Unreachable."""
        body = json.dumps(question, ensure_ascii=False, separators=(",", ":")).encode()
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # the global one Synapse installed
        check = str(question.get("check"))
        started = time.monotonic()
        try:
            answer = await self._ask_once(body, reactor)
        except _Unreachable as e:
            if self._metrics is not None:
                self._metrics.unanswered(check, e.reason, time.monotonic() - started)
            raise
        if self._metrics is not None:
            self._metrics.answered(check, bool(answer.get("allow")),
                                   time.monotonic() - started)
        return answer

    async def _ask_once(self, body: bytes, reactor: Any) -> dict[str, Any]:
        try:
            d = run_in_background(self._post, body)
            code, data = await make_deferred_yieldable(
                _with_timeout(d, self._config.timeout_ms / 1000, reactor))
        except _Unreachable:
            raise
        except Exception as e:
            raise _Unreachable(f"{type(e).__name__}: {e}") from None
        if code != 200:
            raise _Unreachable(f"HTTP {code}" + (" (wrong gate secret?)" if code == 401 else ""),
                               "status")
        try:
            return read_answer(data)
        except BadAnswer as e:
            raise _Unreachable(f"bad answer: {e}", "bad_answer") from None

    def _unreachable(self, question: Mapping[str, Any], why: object) -> bool:
        """Log, and return whether on_unreachable lets the action through."""
        logger.warning("Enclave gate: could not ask Enclave about %s by %s (%s); "
                       "on_unreachable=%s", question.get("check"), question.get("user"),
                       why, self._config.on_unreachable)
        return self._config.on_unreachable == "allow"

    async def _decide_spam(self, question: dict[str, Any]) -> Any:
        """NOT_SPAM, or (M_FORBIDDEN, fields) with our message (see the module docstring)."""
        try:
            answer = await self._ask(question)
        except _Unreachable as e:
            if self._unreachable(question, e):
                return NOT_SPAM
            return Codes.FORBIDDEN, refusal_fields(
                {"rule_id": UNREACHABLE_RULE, "reason": "enclave unreachable",
                 "message": UNREACHABLE_MESSAGE})
        if answer["allow"]:
            return NOT_SPAM
        return Codes.FORBIDDEN, refusal_fields(answer)

    async def _room(self, room_id: str, *, is_direct: bool | None = None) -> dict[str, Any]:
        state = await self._api.get_room_state(room_id, ROOM_STATE_TYPES)
        simple = {key: {"sender": ev.sender, "content": ev.content}
                  for key, ev in state.items()}
        return room_facts(room_id, simple, is_direct=is_direct)

    def _take_dm_hint(self, inviter: str, invitee: str, room: Mapping[str, Any]) -> bool | None:
        expires = self._dm_hints.pop((inviter, invitee), None)
        if expires is None or expires < time.monotonic():
            return None
        # only for the invites of the room just created: the inviter made it and nobody
        # else has joined yet
        joined = [u for u, m in room["members"].items() if m == "join"]
        if room.get("creator") == inviter and joined == [inviter]:
            return True
        return None

    # -- spam-checker callbacks ---------------------------------------------------------------
    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> Any:
        """A local user invites someone (remote inviters: federated_user_may_invite)."""
        if inviter in self._config.enclave_users or not self._api.is_mine(inviter):
            return NOT_SPAM
        room = await self._room(room_id)
        room["is_direct"] = self._take_dm_hint(inviter, invitee, room)
        return await self._decide_spam({
            "check": "invite", "user": inviter, "target": invitee, "federated": False,
            "room": room, "create": None, "event": None})

    async def federated_user_may_invite(self, event: EventBase) -> Any:
        """A remote user invites one of ours: ask with the facts the invite carries."""
        if event.sender in self._config.enclave_users:
            return NOT_SPAM
        # Synapse 1.163's event.unsigned is a Rust object with a dict-like get(), no items()
        unsigned = event.unsigned
        stripped = unsigned.get("invite_room_state") if hasattr(unsigned, "get") else None
        invite = {"room_id": event.room_id, "sender": event.sender,
                  "state_key": event.state_key, "content": thaw(event.content),
                  "unsigned": {"invite_room_state": thaw(stripped or [])}}
        room = room_from_invite(invite)
        if room["room_version"] is None:
            version = getattr(getattr(event, "room_version", None), "identifier", None)
            room["room_version"] = version if isinstance(version, str) else None
        return await self._decide_spam({
            "check": "invite", "user": event.sender, "target": event.state_key,
            "federated": True, "room": room, "create": None, "event": None})

    async def user_may_join_room(self, user_id: str, room_id: str, is_invited: bool) -> Any:
        """A user joins a room (not the creator at creation; not server admins)."""
        if user_id in self._config.enclave_users:
            return NOT_SPAM
        room = await self._room(room_id)
        # a room this server does not know (no state) is judged by whether an invitation
        # led here: Enclave remembers the invitations it approved
        return await self._decide_spam({
            "check": "join", "user": user_id, "target": None, "federated": False,
            "room": room, "create": None, "event": None, "invited": bool(is_invited)})

    async def user_may_send_state_event(self, user_id: str, room_id: str, event_type: str,
                                        state_key: str, content: dict[str, Any]) -> Any:
        """A user sets room state through PUT /state (not server admins)."""
        if user_id in self._config.enclave_users:
            return NOT_SPAM
        room = await self._room(room_id)
        question = {"check": "state_event", "user": user_id, "target": None,
                    "federated": False, "room": room, "create": None,
                    "event": {"type": event_type, "state_key": state_key,
                              "content": thaw(content)}}
        try:
            answer = await self._ask(question)
        except _Unreachable as e:
            allow = self._unreachable(question, e)
            if event_type in self._config.protected_state_types:
                raise SynapseError(403, refusal_message(
                    {"rule_id": PROTECTED_RULE,
                     "message": f"{UNREACHABLE_MESSAGE}. Meanwhile only Enclave may change "
                                f"{event_type} ({PROTECTED_RULE})."}),
                    Codes.FORBIDDEN, {"org.enclave.rule_id": PROTECTED_RULE}) from None
            if allow:
                return NOT_SPAM
            raise SynapseError(403, UNREACHABLE_MESSAGE, Codes.FORBIDDEN,
                               {"org.enclave.rule_id": UNREACHABLE_RULE}) from None
        if answer["allow"]:
            return NOT_SPAM
        fields = refusal_fields(answer)
        raise SynapseError(403, fields.pop("error"), Codes.FORBIDDEN, fields)

    async def check_username_for_spam(self, user_profile: UserProfile,
                                      requester_id: str) -> bool:
        """True hides ``user_profile`` from ``requester_id``'s user directory search."""
        candidate = user_profile["user_id"]
        enclave = self._config.enclave_users
        if requester_id in enclave or candidate in enclave or candidate == requester_id:
            return False
        key = (requester_id, candidate)
        now = time.monotonic()
        hit = self._search_cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        question = {"check": "user_search", "user": requester_id, "target": candidate,
                    "federated": False, "room": None, "create": None, "event": None}
        try:
            answer = await self._ask(question)
        except _Unreachable as e:
            return not self._unreachable(question, e)
        hidden = not answer["allow"]
        ttl = self._config.user_search_cache_seconds
        if ttl > 0:
            if len(self._search_cache) >= _CACHE_PRUNE_AT:
                self._search_cache = {k: v for k, v in self._search_cache.items()
                                      if v[0] > now}
            self._search_cache[key] = (now + ttl, hidden)
        return hidden

    def _creator_power(self, config: Mapping[str, Any]) -> bool:
        """Whether the room being created is of a version whose creators outrank everyone
        (v12: they must not be listed in the power levels' users)."""
        version = config.get("room_version")
        if not isinstance(version, str):
            try:  # the server's default room version (not in the public module API)
                version = self._api._hs.config.server.default_room_version.identifier
            except AttributeError:
                version = "12"  # Synapse's default since 1.135
        return creators_have_unlimited_power(version)

    # -- third-party rules callback -----------------------------------------------------------
    async def on_create_room(self, requester: Any, config: dict[str, Any],
                             is_requester_admin: bool) -> None:
        """Ask before a room is created; apply Enclave's edits to the request."""
        user = requester.user.to_string()
        if user in self._config.enclave_users:
            return
        create = {k: thaw(config[k]) for k in CREATE_KEYS if k in config}
        question = {"check": "create_room", "user": user, "target": None,
                    "federated": False, "room": None, "create": create, "event": None}
        try:
            answer = await self._ask(question)
        except _Unreachable as e:
            if not self._unreachable(question, e):
                raise SynapseError(403, UNREACHABLE_MESSAGE, Codes.FORBIDDEN,
                                   {"org.enclave.rule_id": UNREACHABLE_RULE}) from None
            protected = protected_in(config.get("initial_state"),
                                     self._config.protected_state_types)
            if protected:
                raise SynapseError(403, refusal_message(
                    {"rule_id": PROTECTED_RULE,
                     "message": f"{UNREACHABLE_MESSAGE}. Meanwhile only Enclave may set "
                                f"{', '.join(protected)} ({PROTECTED_RULE})."}),
                    Codes.FORBIDDEN, {"org.enclave.rule_id": PROTECTED_RULE}) from None
            return
        if not answer["allow"]:
            fields = refusal_fields(answer)
            raise SynapseError(403, fields.pop("error"), Codes.FORBIDDEN, fields)
        if answer.get("edits"):
            apply_create_edits(config, answer["edits"], creator=user,
                               creator_power=self._creator_power(config))
        if config.get("is_direct") is True:
            expires = time.monotonic() + DM_HINT_SECONDS
            for invitee in config.get("invite") or []:
                if isinstance(invitee, str):
                    self._dm_hints[(user, invitee)] = expires
            if len(self._dm_hints) >= _CACHE_PRUNE_AT:
                now = time.monotonic()
                self._dm_hints = {k: v for k, v in self._dm_hints.items() if v > now}
