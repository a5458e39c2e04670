"""The ``enclave`` command line, called in-process through ``bridge.cli.main``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import stat
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml

from bridge.cli import EXIT_CONFIG, EXIT_DATABASE, EXIT_OK, main, parse_time
from bridge.store import AuditRecord, NewEvent, open_stores
from bridge.store.shared import load_migrations

MakeConfig = Callable[..., Path]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- validate -----------------------------------------------------------------------------
def test_validate_ok(config_dir: MakeConfig, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_dir()
    assert main(["validate", str(cfg)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.startswith(f"{cfg}: valid.")
    assert "2 secret(s) readable" in out
    assert "as-token-real-value" not in out + err
    assert err == ""


@pytest.mark.parametrize(
    ("extra", "tokens", "expected"),
    [
        pytest.param("  sqlite_synchronous: maybe\n", True,
                     "at database.sqlite_synchronous (line 12)", id="bad-value"),
        pytest.param("logging:\n  levl: INFO\n", True,
                     "at logging.levl (line 13): unknown key", id="unknown-key"),
        pytest.param("", False,
                     "at appservice.as_token: cannot read file", id="secret-file-missing"),
    ],
)
def test_validate_invalid_exits_3(config_dir: MakeConfig, capsys: pytest.CaptureFixture[str],
                                  extra: str, tokens: bool, expected: str) -> None:
    cfg = config_dir(extra=extra, tokens=tokens)
    assert main(["validate", "-c", str(cfg)]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert f"Error in configuration in {cfg}" in err
    assert expected in err


def test_validate_placeholder_token_exits_3(config_dir: MakeConfig,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_dir()
    (cfg.parent / "secrets/hs_token").write_text("CHANGE_ME\n")
    assert main(["validate", str(cfg)]) == EXIT_CONFIG
    assert "at appservice.hs_token: file" in capsys.readouterr().err


def test_validate_missing_file_exits_3(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == EXIT_CONFIG
    assert "cannot read the file: No such file or directory" in capsys.readouterr().err


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2


# -- registration -------------------------------------------------------------------------
def run_registration(cfg: Path, *extra: str) -> dict:
    out = cfg.parent / "registration.yaml"
    assert main(["registration", "-c", str(cfg), "-o", str(out), *extra]) == EXIT_OK
    return yaml.safe_load(out.read_text())


def test_registration_content(config_dir: MakeConfig) -> None:
    cfg = config_dir(tokens=False)
    reg = run_registration(cfg)
    assert reg["id"] == "enclave"
    assert reg["url"] == "http://127.0.0.1:29330"
    assert reg["sender_localpart"] == "enclave"
    assert reg["rate_limited"] is False
    assert reg["receive_ephemeral"] is True
    assert reg["namespaces"] == {
        "users": [
            {"exclusive": True, "regex": r"@enclave_.*:corp\.example\.com$"},
            {"exclusive": False, "regex": r"@.*:corp\.example\.com$"},
        ],
        "aliases": [{"exclusive": False, "regex": "#.*:corp\\.example\\.com$"}],
        "rooms": [{"exclusive": False, "regex": "!.*"}],
    }
    secrets_dir = cfg.parent / "secrets"
    assert reg["as_token"] == (secrets_dir / "as_token").read_text().strip()
    assert reg["hs_token"] == (secrets_dir / "hs_token").read_text().strip()
    assert reg["as_token"] != reg["hs_token"]
    assert len(reg["as_token"]) >= 40


def test_registration_enables_msc4190_device_management_when_configured(
        config_dir: MakeConfig) -> None:
    cfg = config_dir(tokens=False)
    assert "io.element.msc4190" not in run_registration(cfg)
    cfg.write_text(cfg.read_text().replace("appservice:\n", "appservice:\n  msc4190: true\n", 1))
    assert run_registration(cfg)["io.element.msc4190"] is True


def test_registration_regexes_match_the_right_users(config_dir: MakeConfig) -> None:
    import re

    reg = run_registration(config_dir(tokens=False))
    exclusive, everyone = (re.compile(u["regex"]) for u in reg["namespaces"]["users"])
    assert exclusive.fullmatch("@enclave_bot1:corp.example.com")
    assert not exclusive.fullmatch("@enclave-admin:corp.example.com")  # admin stays outside
    assert not exclusive.fullmatch("@enclave_x:corpXexample.com")  # the dot is escaped
    assert everyone.fullmatch("@alice:corp.example.com")
    assert not everyone.fullmatch("@alice:corp-example.com")
    assert not everyone.fullmatch("@alice:evil.org")
    # Synapse uses re.match (anchored at the start only): the end must be anchored too
    assert not everyone.match("@alice:corp.example.com.evil.org")


def test_registration_writes_the_gate_secret_once(config_dir: MakeConfig) -> None:
    cfg = config_dir(tokens=False, extra="gate:\n  secret: {file: secrets/gate_secret}\n")
    run_registration(cfg)
    secret = (cfg.parent / "secrets/gate_secret").read_text()
    assert len(secret.strip()) > 40 and mode(cfg.parent / "secrets/gate_secret") == 0o600
    run_registration(cfg)  # kept unless --rotate
    assert (cfg.parent / "secrets/gate_secret").read_text() == secret
    assert main(["validate", str(cfg)]) == EXIT_OK


def test_registration_writes_the_homeserver_snippet_from_the_policy(
        config_dir: MakeConfig) -> None:
    policy = ("policy:\n"
              "  room_classes: [{id: internal, federate: false},\n"
              "                 {id: external, allow: {partners: true, guests: true}}]\n"
              "  partners:\n"
              "    - {id: acme, servers: [acme.example, acme-2.example],"
              " room_classes: [external]}\n"
              "    - {id: solo, users: ['@pat:pat.example'], room_classes: [external]}\n"
              "  guests:\n"
              "    - {id: gina, user: '@gina:gina.example', sponsor: '@alice:corp.example.com',"
              " expires: 2030-01-01, room_classes: [external]}\n")
    cfg = config_dir(extra=policy)
    run_registration(cfg, "--homeserver-snippet", str(cfg.parent / "snippet.yaml"))
    snippet = yaml.safe_load((cfg.parent / "snippet.yaml").read_text())
    assert snippet["federation_domain_whitelist"] == [
        "corp.example.com", "acme.example", "acme-2.example", "pat.example", "gina.example"]
    assert snippet["allow_profile_lookup_over_federation"] is False
    # without a policy there is nothing to whitelist: the profile limits only
    plain = config_dir()
    run_registration(plain, "--homeserver-snippet", str(plain.parent / "s.yaml"))
    assert "federation_domain_whitelist" not in yaml.safe_load(
        (plain.parent / "s.yaml").read_text())


def test_registration_files_are_private(config_dir: MakeConfig) -> None:
    cfg = config_dir(tokens=False)
    run_registration(cfg)
    assert mode(cfg.parent / "secrets/as_token") == 0o600
    assert mode(cfg.parent / "secrets/hs_token") == 0o600
    assert mode(cfg.parent / "registration.yaml") == 0o600


def test_registration_keeps_tokens_unless_rotated(config_dir: MakeConfig) -> None:
    cfg = config_dir(tokens=False)
    first = run_registration(cfg)
    again = run_registration(cfg)
    assert (again["as_token"], again["hs_token"]) == (first["as_token"], first["hs_token"])
    rotated = run_registration(cfg, "--rotate")
    assert rotated["as_token"] != first["as_token"]
    assert rotated["hs_token"] != first["hs_token"]
    assert (cfg.parent / "secrets/as_token").read_text().strip() == rotated["as_token"]


def test_registration_keeps_existing_real_tokens(config_dir: MakeConfig) -> None:
    cfg = config_dir()  # real values already there
    reg = run_registration(cfg)
    assert reg["as_token"] == "as-token-real-value"
    assert reg["hs_token"] == "hs-token-real-value"


def test_registration_replaces_a_placeholder_token(config_dir: MakeConfig) -> None:
    cfg = config_dir()
    (cfg.parent / "secrets/as_token").write_text("CHANGE_ME\n")
    reg = run_registration(cfg)
    assert reg["as_token"] not in ("CHANGE_ME", "")
    assert (cfg.parent / "secrets/as_token").read_text().strip() == reg["as_token"]
    assert reg["hs_token"] == "hs-token-real-value"


@pytest.mark.parametrize("rotate", [False, True])
def test_registration_makes_replaced_token_files_private(config_dir: MakeConfig,
                                                         rotate: bool) -> None:
    cfg = config_dir()
    tok = cfg.parent / "secrets/as_token"
    tok.write_text("CHANGE_ME\n")
    os.chmod(tok, 0o644)
    run_registration(cfg, *(["--rotate"] if rotate else []))
    assert mode(tok) == 0o600


def test_registration_env_tokens(config_dir: MakeConfig,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_dir(tokens=False)
    cfg.write_text(cfg.read_text().replace("file: secrets/hs_token", "env: ENCLAVE_HS"))
    monkeypatch.setenv("ENCLAVE_HS", "hs-from-environment")
    reg = run_registration(cfg)
    assert reg["hs_token"] == "hs-from-environment"
    assert not (cfg.parent / "secrets/hs_token").exists()


# -- migrate ------------------------------------------------------------------------------
def test_migrate_then_check(config_dir: MakeConfig, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_dir()
    assert main(["migrate", "-c", str(cfg), "--check"]) == EXIT_DATABASE
    assert "run 'enclave migrate'" in capsys.readouterr().err
    latest = len(load_migrations("sqlite"))
    assert main(["migrate", "-c", str(cfg)]) == EXIT_OK
    assert f"migrated from version 0 to {latest}" in capsys.readouterr().out
    assert main(["migrate", "-c", str(cfg)]) == EXIT_OK
    assert f"already at version {latest}; nothing to do" in capsys.readouterr().out
    assert main(["migrate", "-c", str(cfg), "--check"]) == EXIT_OK
    assert f"schema is current (version {latest})" in capsys.readouterr().out
    assert (cfg.parent / "var/enclave.db").exists()


def test_audit_needs_a_migrated_database(config_dir: MakeConfig,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_dir()
    assert main(["audit", "-c", str(cfg)]) == EXIT_DATABASE
    assert capsys.readouterr().err.startswith("database: ")


# -- audit --------------------------------------------------------------------------------
T0 = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1000)
HOUR = 3_600_000

RECORDS = [
    AuditRecord(ts=T0, source="inbox", kind="kick", outcome="applied", user_id="@a:x",
                room_id="!r1", rule_id="separation.dm", reason="not staff"),
    AuditRecord(ts=T0 + HOUR, source="inbox", kind="invite", outcome="failed",
                user_id="@b:x", room_id="!r1", rule_id="sync.membership", reason="dept"),
    AuditRecord(ts=T0 + 2 * HOUR, source="cli", kind="kick", outcome="applied",
                user_id="@a:x", room_id="!r2", rule_id="separation.dm", reason="not staff"),
    AuditRecord(ts=T0 + 3 * HOUR, source="sync", kind="leave", outcome="parked",
                user_id="@c:x", room_id="!r2", rule_id="sync.leaver", reason="left org"),
]


@pytest.fixture
def audited(config_dir: MakeConfig) -> Path:
    cfg = config_dir()
    assert main(["migrate", "-c", str(cfg)]) == EXIT_OK

    async def fill() -> None:
        store = open_stores("sqlite:///var/enclave.db", base_dir=cfg.parent)
        await store.database.open()
        try:
            for r in RECORDS:
                await store.audit.add_audit(r)
        finally:
            await store.database.close()

    asyncio.run(fill())
    return cfg


@pytest.mark.parametrize(
    ("args", "expected_kinds_ts"),
    [
        pytest.param([], [0, 1, 2, 3], id="all"),
        pytest.param(["--user", "@a:x"], [0, 2], id="user"),
        pytest.param(["--room", "!r2"], [2, 3], id="room"),
        pytest.param(["--rule", "separation.dm"], [0, 2], id="rule"),
        pytest.param(["--outcome", "failed"], [1], id="outcome"),
        pytest.param(["--since", "2026-11-01T01:00"], [1, 2, 3], id="since-iso"),
        pytest.param(["--until", "2026-11-01T02:00"], [0, 1], id="until-iso-exclusive"),
        pytest.param(["--since", "2026-11-01T01:00", "--until", "2026-11-01T03:00",
                      "--user", "@a:x"], [2], id="combined"),
        pytest.param(["--limit", "2"], [0, 1], id="limit"),
        pytest.param(["--user", "@nobody:x"], [], id="none"),
    ],
)
def test_audit_json_filters(audited: Path, capsys: pytest.CaptureFixture[str],
                            args: list[str], expected_kinds_ts: list[int]) -> None:
    capsys.readouterr()
    assert main(["audit", "-c", str(audited), "--format", "json", *args]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    rows = [orjson.loads(line) for line in lines]
    assert [r["ts"] for r in rows] == [RECORDS[i].ts for i in expected_kinds_ts]
    if rows:
        assert set(rows[0]) >= {"ts", "source", "kind", "outcome", "actor", "user_id",
                                "room_id", "rule_id", "reason", "detail"}


def test_audit_table_format(audited: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["audit", "-c", str(audited), "--outcome", "parked"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "audit (1 records)" in out
    assert "2026-11-01 03:00:00" in out and "sync.leaver" in out


def test_audit_bad_time_is_a_usage_error(audited: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "-c", str(audited), "--since", "yesterday"]) == 2
    assert "'yesterday' is neither a relative time" in capsys.readouterr().err


# -- inbox --------------------------------------------------------------------------------
def test_inbox_parked_and_requeue(config_dir: MakeConfig,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_dir()
    assert main(["migrate", "-c", str(cfg)]) == EXIT_OK

    async def park() -> int:
        store = open_stores("sqlite:///var/enclave.db", base_dir=cfg.parent)
        await store.database.open()
        try:
            ev = NewEvent("$e1", "!r", "pdu", "m.room.message", "@a:x", 1, "{}")
            await store.inbox.save_transaction("t1", [ev], [], 1)
            (got,) = await store.inbox.fetch_due_events(2, 10)
            await store.inbox.fail_event(got.seq, 3, 10, "boom", True)
            return got.seq
        finally:
            await store.database.close()

    seq = asyncio.run(park())
    capsys.readouterr()
    assert main(["inbox", "parked", "-c", str(cfg), "--format", "json"]) == EXIT_OK
    (row,) = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (row["seq"], row["event_id"], row["last_error"]) == (seq, "$e1", "boom")
    assert main(["inbox", "requeue", "-c", str(cfg)]) == EXIT_OK
    assert "requeued 1 parked event(s)" in capsys.readouterr().out
    assert main(["inbox", "status", "-c", str(cfg)]) == EXIT_OK
    stats = orjson.loads(capsys.readouterr().out)
    assert stats["events"] == {"pending": 1, "done": 0, "parked": 0}


# -- parse_time ---------------------------------------------------------------------------
NOW = dt.datetime(2026, 11, 10, 12, 0, tzinfo=dt.UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30s", NOW_MS - 30_000),
        ("90m", NOW_MS - 90 * 60_000),
        ("24h", NOW_MS - 24 * HOUR),
        ("7d", NOW_MS - 7 * 24 * HOUR),
        ("2w", NOW_MS - 14 * 24 * HOUR),
        ("0s", NOW_MS),
        (" 5m ", NOW_MS - 5 * 60_000),
        ("2026-11-01", T0),
        ("2026-11-01T00:00", T0),
        ("2026-11-01T02:00:00+02:00", T0),
        ("2026-11-01T00:00:00Z", T0),
    ],
)
def test_parse_time(value: str, expected: int) -> None:
    assert parse_time(value, now=NOW) == expected


@pytest.mark.parametrize("value", ["yesterday", "5", "-5m", "5y", "24H", "", "2026-13-01"])
def test_parse_time_rejects(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time(value, now=NOW)


# -- bots ---------------------------------------------------------------------------------
def test_bots_reset_identity_leaves_a_marker_for_the_next_start(
        config_dir: MakeConfig, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_dir(extra="bots:\n  announcements: {}\n")
    assert main(["bots", "reset-identity", "announce", "-c", str(cfg)]) == EXIT_OK
    marker = cfg.parent / "crypto" / "enclave_announce" / "cross_signing.reset"
    assert marker.exists() and mode(marker) == 0o600
    assert "identity changed" in capsys.readouterr().out
    # an unknown bot changes nothing and says which ones exist
    assert main(["bots", "reset-identity", "nobody", "-c", str(cfg)]) == 2  # usage
    assert "@enclave_announce:corp.example.com" in capsys.readouterr().err
