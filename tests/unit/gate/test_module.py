"""The Synapse module's pure parts: config, room facts, answers, edits, and that it stays
a single file Synapse can load without Enclave installed. Its Synapse-facing behaviour is
tested against a real Synapse in tests/integration/test_gate_module.py."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("synapse")

from synapse.module_api.errors import ConfigError

from bridge.gate import module as gate_module
from bridge.gate.module import (
    BadAnswer,
    apply_create_edits,
    parse_module_config,
    protected_in,
    read_answer,
    refusal_fields,
    refusal_message,
    room_facts,
    room_from_invite,
)
from bridge.gate.protocol import gate_request_from_obj

MODULE_FILE = Path(gate_module.__file__)


def test_module_imports_only_stdlib_synapse_twisted_and_prometheus_client() -> None:
    tree = ast.parse(MODULE_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import ties the file to Enclave's package"
            roots.add((node.module or "").split(".")[0])
    # prometheus_client: a requirement of Synapse itself (its metrics)
    allowed = set(sys.stdlib_module_names) | {"synapse", "twisted", "__future__",
                                              "prometheus_client"}
    assert roots - allowed == set()
    assert "synapse" in roots and "twisted" in roots  # the walk saw the imports


# -- config --------------------------------------------------------------------------------------
def test_config_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    cfg = parse_module_config({"url": "http://127.0.0.1:29330/", "secret_path": str(secret)})
    assert cfg.url == "http://127.0.0.1:29330" and cfg.secret == "s3cret"
    assert cfg.timeout_ms == 500 and cfg.on_unreachable == "deny"
    assert cfg.protected_state_types == {"org.enclave.room_class", "m.room.retention"}
    assert cfg.enclave_users == frozenset() and cfg.user_search_cache_seconds == 30
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(("config", "says"), [
    ({"secret": "x"}, "'url'"),
    ({"url": "ftp://x", "secret": "x"}, "'url'"),
    ({"url": "http://x"}, "exactly one of 'secret' or 'secret_path'"),
    ({"url": "http://x", "secret": "x", "secret_path": "/p"}, "exactly one"),
    ({"url": "http://x", "secret": "  "}, "secret is empty"),
    ({"url": "http://x", "secret_path": "/nonexistent/secret"}, "cannot read secret_path"),
    ({"url": "http://x", "secret": "x", "timeout_ms": 0}, "'timeout_ms'"),
    ({"url": "http://x", "secret": "x", "timeout_ms": True}, "'timeout_ms'"),
    ({"url": "http://x", "secret": "x", "on_unreachable": "maybe"}, "'on_unreachable'"),
    ({"url": "http://x", "secret": "x", "protected_state_types": "m.room.x"},
     "'protected_state_types'"),
    ({"url": "http://x", "secret": "x", "enclave_users": ["enclave"]}, "'enclave_users'"),
    ({"url": "http://x", "secret": "x", "user_search_cache_seconds": -1},
     "'user_search_cache_seconds'"),
    ({"url": "http://x", "secret": "x", "timeout": 5}, "unknown Enclave gate setting"),
])
def test_bad_config_names_the_key(config: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_module_config(config)
    assert says in str(err.value)


# -- room facts ------------------------------------------------------------------------------------
def ev(sender: str, **content: Any) -> dict[str, Any]:
    return {"sender": sender, "content": content}


STATE = {
    ("m.room.create", ""): ev("@c:s", room_version="12", additional_creators=["@d:s"],
                              **{"m.federate": False}),
    ("m.room.member", "@c:s"): ev("@c:s", membership="join"),
    ("m.room.member", "@d:s"): ev("@c:s", membership="invite"),
    ("m.room.member", "@k:s"): ev("@k:s", membership="knock"),
    ("m.room.member", "@gone:s"): ev("@gone:s", membership="leave"),
    ("m.room.member", "@ban:s"): ev("@c:s", membership="ban"),
    ("org.enclave.room_class", ""): ev("@enclave:s", **{"class": "internal"}),
    ("m.room.canonical_alias", ""): ev("@c:s", alias="#a:s", alt_aliases=["#b:s", "#a:s"]),
    ("m.room.name", ""): ev("@c:s", name="Plans"),
    ("m.room.join_rules", ""): ev("@c:s", join_rule="knock"),
    ("m.room.encryption", ""): ev("@c:s", algorithm="m.megolm.v1.aes-sha2"),
    ("m.room.power_levels", ""): ev("@c:s", users={"@c:s": 100}, kick=50),
}


def test_room_facts_from_state_is_a_valid_protocol_room() -> None:
    facts = room_facts("!r", STATE, is_direct=None)

    assert facts == {
        "room_id": "!r", "room_version": "12", "creator": "@c:s", "creators": ["@c:s", "@d:s"],
        "is_direct": None, "class": "internal", "class_grant": None, "history": None,
        "aliases": ["#a:s", "#b:s"], "name": "Plans",
        "federate": False, "join_rule": "knock", "encrypted": True,
        "members": {"@c:s": "join", "@d:s": "invite", "@k:s": "knock"},
        "power": {"users": {"@c:s": 100}, "kick": 50},
    }
    # what the module sends, Enclave's parser accepts
    req = gate_request_from_obj({"check": "join", "user": "@x:s", "room": facts})
    assert req.room is not None and req.room.room_class == "internal"


def test_room_facts_of_an_old_or_unknown_room() -> None:
    old = room_facts("!o", {("m.room.create", ""): ev("@c:s", creator="@c:s")})
    assert old["room_version"] == "1" and old["creator"] == "@c:s"
    assert old["federate"] is True and old["join_rule"] == "invite"
    assert old["encrypted"] is False and old["class"] is None and old["power"] == {}
    unknown = room_facts("!u", {})
    assert unknown["room_version"] is None and unknown["creator"] is None
    assert unknown["join_rule"] is None and unknown["members"] == {}


def test_room_facts_ignore_malformed_content() -> None:
    facts = room_facts("!r", {
        ("m.room.create", ""): ev("@c:s", room_version=12, additional_creators="@x:s"),
        ("org.enclave.room_class", ""): ev("@c:s", **{"class": ["internal"]}),
        ("m.room.canonical_alias", ""): ev("@c:s", alias=5, alt_aliases=[None, "#z:s"]),
        ("m.room.name", ""): {"sender": "@c:s", "content": None},
    })
    assert facts["room_version"] == "1" and facts["creators"] == ["@c:s"]
    assert facts["class"] is None and facts["aliases"] == ["#z:s"] and facts["name"] is None


def test_room_from_a_federated_invite() -> None:
    invite = {
        "room_id": "!dm", "sender": "@pat:ext.test", "state_key": "@carol:corp.test",
        "content": {"membership": "invite", "is_direct": True},
        "unsigned": {"invite_room_state": [
            {"type": "m.room.create", "state_key": "", "sender": "@pat:ext.test",
             "content": {"room_version": "12"}},
            {"type": "org.enclave.room_class", "state_key": "", "sender": "@pat:ext.test",
             "content": {"class": "internal"}},
            {"type": "m.room.member", "state_key": "@pat:ext.test", "sender": "@pat:ext.test",
             "content": {"membership": "join"}},
            "garbage",
        ]},
    }
    facts = room_from_invite(invite)
    assert facts["room_id"] == "!dm" and facts["is_direct"] is True
    assert facts["creator"] == "@pat:ext.test" and facts["room_version"] == "12"
    assert facts["class"] == "internal" and facts["federate"] is True
    assert facts["members"] == {"@pat:ext.test": "join", "@carol:corp.test": "invite"}


def test_room_from_a_bare_federated_invite() -> None:
    facts = room_from_invite({"room_id": "!x", "sender": "@p:e", "state_key": "@c:s",
                              "content": {"membership": "invite"}})
    assert facts["is_direct"] is None and facts["creator"] is None
    assert facts["members"] == {"@p:e": "join", "@c:s": "invite"}


# -- answers ---------------------------------------------------------------------------------------
def test_read_answer_accepts_the_protocol() -> None:
    ans = read_answer(b'{"allow": false, "rule_id": "r", "reason": "x", "message": "m", '
                      b'"edits": null}')
    assert ans["allow"] is False and ans["rule_id"] == "r"
    assert read_answer(b'{"allow": true}')["message"] == ""


@pytest.mark.parametrize("raw", [
    b"<html>", b"[]", b'{"allow": 1}', b'{"allow": true, "rule_id": 3}',
    b'{"allow": true, "edits": {"power": {}}}',
    b'{"allow": true, "edits": {"creation_content": []}}',
    b'{"allow": true, "edits": {"initial_state": [{"type": "t", "content": []}]}}',
])
def test_read_answer_refuses_what_is_not_the_protocol(raw: bytes) -> None:
    with pytest.raises(BadAnswer):
        read_answer(raw)


def test_refusal_always_names_the_rule() -> None:
    named = {"rule_id": "policy.dms", "message": "Enclave policy (policy.dms): no."}
    assert refusal_message(named) == "Enclave policy (policy.dms): no."
    assert refusal_message({"rule_id": "policy.dms", "message": "No."}) == (
        "No. [Enclave rule policy.dms]")
    assert "policy.dms" in refusal_message({"rule_id": "policy.dms"})
    assert refusal_fields({"rule_id": "r", "reason": "why", "message": "r: no"}) == {
        "error": "r: no", "org.enclave.rule_id": "r", "org.enclave.reason": "why"}


# -- createRoom edits ------------------------------------------------------------------------------
def test_edits_merge_creation_content_and_replace_initial_state() -> None:
    config: dict[str, Any] = {
        "name": "x",
        "creation_content": {"m.federate": True, "type": "m.space"},
        "initial_state": [
            {"type": "org.enclave.room_class", "state_key": "", "content": {"class": "mine"}},
            {"type": "m.room.topic", "content": {"topic": "t"}},
        ],
    }
    apply_create_edits(config, {
        "creation_content": {"m.federate": False},
        "initial_state": [{"type": "org.enclave.room_class",
                           "content": {"class": "internal"}}]})
    assert config["creation_content"] == {"m.federate": False, "type": "m.space"}
    assert config["initial_state"] == [
        {"type": "m.room.topic", "content": {"topic": "t"}},
        {"type": "org.enclave.room_class", "state_key": "", "content": {"class": "internal"}},
    ]


def test_edits_on_a_bare_request() -> None:
    config: dict[str, Any] = {}
    apply_create_edits(config, {"creation_content": {"m.federate": False}})
    assert config == {"creation_content": {"m.federate": False}}
    apply_create_edits(config, {})
    assert config == {"creation_content": {"m.federate": False}}


BOT = "@enclave:corp.test"


@pytest.mark.parametrize(("config", "creator_power", "users"), [
    # before v12 Synapse needs the creator in an override's users (it replaces them whole)
    pytest.param({}, False, {"@bob:corp.test": 100, BOT: 100}, id="v10"),
    # v12: creators must not be listed
    pytest.param({}, True, {BOT: 100}, id="v12"),
    pytest.param({"preset": "trusted_private_chat", "invite": ["@al:corp.test"]}, False,
                 {"@bob:corp.test": 100, "@al:corp.test": 100, BOT: 100},
                 id="v10-trusted-invitees-keep-ops"),
    pytest.param({"power_level_content_override": {"users": {"@bob:corp.test": 50},
                                                   "kick": 0}}, False,
                 {"@bob:corp.test": 50, BOT: 100}, id="own-override-kept"),
])
def test_power_users_edit(config: dict[str, Any], creator_power: bool,
                          users: dict[str, int]) -> None:
    apply_create_edits(config, {"invite": [BOT], "power_users": {BOT: 100}},
                       creator="@bob:corp.test", creator_power=creator_power)
    assert config["power_level_content_override"]["users"] == users
    assert config["invite"][-1] == BOT and config["invite"].count(BOT) == 1


def test_power_users_edit_goes_into_an_initial_power_levels_event() -> None:
    pl = {"type": "m.room.power_levels", "state_key": "",
          "content": {"users": {"@bob:corp.test": 100, BOT: 0}, "kick": 50}}
    config: dict[str, Any] = {"initial_state": [pl], "invite": [BOT]}
    apply_create_edits(config, {"invite": [BOT], "power_users": {BOT: 100}},
                       creator="@bob:corp.test")
    assert config["initial_state"][0]["content"] == {
        "users": {"@bob:corp.test": 100, BOT: 100}, "kick": 50}
    assert "power_level_content_override" not in config and config["invite"] == [BOT]


def test_protected_types_in_initial_state() -> None:
    protected = {"org.enclave.room_class", "m.room.retention"}
    assert protected_in([{"type": "m.room.retention", "content": {}},
                         {"type": "m.room.topic"}, "junk"], protected) == ["m.room.retention"]
    assert protected_in(None, protected) == []


def test_the_documented_homeserver_snippet_is_a_valid_config(tmp_path: Path) -> None:
    import yaml

    snippet = MODULE_FILE.parents[2] / "deploy" / "synapse" / "homeserver-snippet.yaml"
    modules = yaml.safe_load(snippet.read_text())["modules"]
    (entry,) = [m for m in modules if m["module"].endswith(".EnclaveGate")]
    secret = tmp_path / "secret"
    secret.write_text("from-the-snippet")
    cfg = parse_module_config({**entry["config"], "secret_path": str(secret)})
    assert cfg.enclave_users and cfg.on_unreachable == "deny"


@pytest.mark.parametrize("version", [None, "1", "9", "10", "11", "12", "13", "27", "99",
                                     "org.matrix.hydra.11", "org.example.v12", "", "12.1"])
def test_gate_mirrors_the_kernels_creator_rule(version: str | None) -> None:
    """The gate (one file inside Synapse, importing nothing of Enclave) keeps its own copy of
    the creator rule; it must answer as bridge.kernel.power does, or a v13 room's creators
    would be put into the users map by the gate and outranked by Enclave's policy."""
    from bridge.kernel.power import creators_have_unlimited_power

    assert gate_module.creators_have_unlimited_power(version) is \
        creators_have_unlimited_power(version)


# -- metrics ---------------------------------------------------------------------------------------
def test_gate_metrics_count_answers_and_unreachable_by_reason() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    m = gate_module.GateMetrics(registry)
    # every reason is exported at 0 before the first failure (increase() sees the first)
    for reason in gate_module.UNREACHABLE_REASONS:
        assert registry.get_sample_value("enclave_gate_module_unreachable_total",
                                         {"reason": reason}) == 0
    m.answered("invite", True, 0.002)
    m.answered("invite", False, 0.003)
    m.unanswered("join", "timeout", 0.5)
    value = registry.get_sample_value
    assert value("enclave_gate_module_checks_total", {"check": "invite", "outcome": "allow"}) == 1
    assert value("enclave_gate_module_checks_total", {"check": "invite", "outcome": "deny"}) == 1
    assert value("enclave_gate_module_checks_total",
                 {"check": "join", "outcome": "unreachable"}) == 1
    assert value("enclave_gate_module_unreachable_total", {"reason": "timeout"}) == 1
    assert value("enclave_gate_module_request_seconds_count", {}) == 3
    assert b"enclave_gate_module_request_seconds_bucket" in generate_latest(registry)


def test_process_metrics_are_made_once() -> None:
    # Synapse's registry refuses a second metric of a name: one set per process
    assert gate_module.process_metrics() is gate_module.process_metrics()
