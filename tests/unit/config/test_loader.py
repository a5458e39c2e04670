"""Config validation: every problem names the key path and the YAML line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import (
    ConfigError,
    LoadedConfig,
    Secret,
    check_secrets,
    load_config,
    parse_config,
)
from bridge.config.models import SecretRef

# Line numbers in the tables below refer to this layout; keep it in step.
GOOD = """\
homeserver:
  url: http://127.0.0.1:8008
  server_name: corp.example.com
appservice:
  public_url: http://127.0.0.1:29330
  as_token:
    file: secrets/as_token
  hs_token:
    env: ENCLAVE_HS_TOKEN
"""


def with_lines(*extra: str, base: str = GOOD) -> str:
    return base + "".join(extra)


def replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="test.yaml")
    assert ei.value.source == "in test.yaml"
    return ei.value.problems


# -- good configs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "check"),
    [
        pytest.param(GOOD, lambda c: c.appservice.port == 29330, id="minimal-defaults"),
        pytest.param(
            with_lines("database:\n  url: postgresql://enclave@127.0.0.1:5432/enclave\n"
                       "  password:\n    env: PGPASS\n"),
            lambda c: c.database.password == SecretRef(env="PGPASS"), id="postgres-with-env-pw",
        ),
        pytest.param(
            with_lines("database:\n  url: postgres://db.internal/enclave?sslmode=require\n"),
            lambda c: c.database.url.endswith("sslmode=require"), id="postgres-query-no-pw",
        ),
        pytest.param(
            replace("http://127.0.0.1:8008", "https://matrix.corp.example.com/"),
            lambda c: c.homeserver.url == "https://matrix.corp.example.com",
            id="url-trailing-slash",
        ),
        pytest.param(
            replace("corp.example.com", "corp.example.com:8448"),
            lambda c: c.bot_user_id == "@enclave:corp.example.com:8448", id="server-name-port",
        ),
        pytest.param(
            with_lines("inbox:\n  handlers: [pkg.mod:factory]\n  backoff_initial_seconds: 2\n"),
            lambda c: c.inbox.handlers == ["pkg.mod:factory"]
            and c.inbox.backoff_initial_seconds == 2.0,
            id="handlers-and-int-for-float",
        ),
        pytest.param(
            with_lines("# trailing comment\n"),
            lambda c: c.logging.level == "INFO", id="comment-only-tail",
        ),
        pytest.param(
            with_lines("logging:\n  level: DEBUG\n  format: json\n"),
            lambda c: (c.logging.level, c.logging.format) == ("DEBUG", "json"), id="logging",
        ),
        pytest.param(
            replace("  hs_token:\n", "  admin_localpart: ops-admin\n  hs_token:\n"),
            lambda c: c.admin_user_id == "@ops-admin:corp.example.com", id="admin-outside-ns",
        ),
    ],
)
def test_good_configs(text: str, check) -> None:
    cfg = parse_config(text)
    assert check(cfg)


# -- bad configs: (yaml, the one expected problem's location, message fragment) ---------------
BAD = [
    pytest.param(
        with_lines("  port: 70000\n"),
        "at appservice.port (line 10)", "less than or equal to 65535", id="port-range",
    ),
    pytest.param(
        with_lines("  port: eighty\n"),
        "at appservice.port (line 10)", "valid integer", id="port-string",
    ),
    pytest.param(
        with_lines("  port: yes\n"),  # YAML 1.1 boolean; must not become port 1
        "at appservice.port (line 10)", "valid integer", id="port-bool",
    ),
    pytest.param(
        with_lines("  port: 80.5\n"),
        "at appservice.port (line 10)", "valid integer", id="port-float",
    ),
    pytest.param(
        with_lines("homeservr:\n  url: x\n"),
        "at homeservr (line 10)", "unknown key (not a setting Enclave knows; check the spelling)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        with_lines("  prot: 8080\n"),
        "at appservice.prot (line 10)", "unknown key", id="unknown-nested-key",
    ),
    pytest.param(
        replace("    env: ENCLAVE_HS_TOKEN\n", "    env: ENCLAVE_HS_TOKEN\n    vault: x\n"),
        "at appservice.hs_token.vault (line 10)", "unknown key", id="unknown-secret-key",
    ),
    pytest.param(
        replace("  as_token:\n    file: secrets/as_token\n", "  as_token: {}\n"),
        "at appservice.as_token (line 6)", "give exactly one of 'file' or 'env'",
        id="secret-neither",
    ),
    pytest.param(
        replace("    env: ENCLAVE_HS_TOKEN\n", "    env: ENCLAVE_HS_TOKEN\n    file: hs\n"),
        "at appservice.hs_token (line 8)", "give exactly one of 'file' or 'env'",
        id="secret-both",
    ),
    pytest.param(
        replace("  as_token:\n    file: secrets/as_token\n", "  as_token: s3cr3t-inline\n"),
        "at appservice.as_token (line 6)", "a secret is never written inline",
        id="secret-inline",
    ),
    pytest.param(
        with_lines("database:\n  url: postgresql://enclave:hunter2@db:5432/enclave\n"),
        "at database.url (line 11)", "must not contain a password", id="pg-url-password",
    ),
    pytest.param(
        with_lines("database:\n  url: postgresql://enclave@db/enclave?password=hunter2\n"),
        "at database.url (line 11)", "must not contain a password", id="pg-url-query-password",
    ),
    pytest.param(
        with_lines("database:\n  url: mysql://db/enclave\n"),
        "at database.url (line 11)", "must start with sqlite:// or postgresql://",
        id="db-scheme",
    ),
    pytest.param(
        replace("  hs_token:\n", "  admin_localpart: enclave_admin\n  hs_token:\n"),
        "at appservice.admin_localpart (line 8)",
        "must not start with namespace_prefix 'enclave_'", id="admin-in-exclusive-namespace",
    ),
    pytest.param(
        replace("  hs_token:\n", "  namespace_prefix: ops\n  admin_localpart: ops-admin\n"
                "  hs_token:\n"),
        "at appservice.admin_localpart (line 9)", "must not start with namespace_prefix 'ops'",
        id="admin-in-custom-namespace",
    ),
    pytest.param(
        replace("  hs_token:\n", "  namespace_prefix: enclave\n  hs_token:\n"),
        "at appservice.admin_localpart (line 4)",  # the default admin is now inside it
        "'enclave-admin' must not start with namespace_prefix 'enclave'",
        id="default-admin-in-namespace",
    ),
    pytest.param(
        replace("  hs_token:\n", "  bot_localpart: Enclave\n  hs_token:\n"),
        "at appservice.bot_localpart (line 8)", "may contain only a-z, 0-9",
        id="localpart-uppercase",
    ),
    pytest.param(
        replace("http://127.0.0.1:8008", "ftp://127.0.0.1"),
        "at homeserver.url (line 2)", "must be an http:// or https:// URL", id="hs-url-scheme",
    ),
    pytest.param(
        replace("http://127.0.0.1:29330", "127.0.0.1:29330"),
        "at appservice.public_url (line 5)", "must be an http:// or https:// URL",
        id="public-url-scheme",
    ),
    pytest.param(
        replace("corp.example.com", "corp example"),
        "at homeserver.server_name (line 3)", "must be a Matrix server name", id="server-name",
    ),
    pytest.param(
        replace("  server_name: corp.example.com\n", ""),
        "at homeserver.server_name (line 1)", "Field required", id="missing-required",
    ),
    pytest.param(
        replace("appservice:\n  public_url: http://127.0.0.1:29330\n",
                "appservice:\n  public_url: [http://a]\n"),
        "at appservice.public_url (line 5)", "valid string", id="list-for-string",
    ),
    pytest.param(
        with_lines("inbox: 5\n"),
        "at inbox (line 10)", "valid dictionary", id="section-not-mapping",
    ),
    pytest.param(
        with_lines("inbox:\n  handlers:\n    - pkg.mod:factory\n    - 5\n"),
        "at inbox.handlers[1] (line 13)", "valid string", id="list-item-type",
    ),
    pytest.param(
        with_lines("inbox:\n  handlers: [nocolon]\n"),
        "at inbox.handlers (line 11)", "is not of the form 'package.module:callable'",
        id="handler-ref",
    ),
    pytest.param(
        with_lines("inbox:\n  max_attempts: 0\n"),
        "at inbox.max_attempts (line 11)", "greater than or equal to 1", id="max-attempts",
    ),
    pytest.param(
        replace("  server_name: corp.example.com\n",
                "  server_name: corp.example.com\n  timeout_seconds: 0\n"),
        "at homeserver.timeout_seconds (line 4)", "greater than 0", id="timeout-zero",
    ),
    pytest.param(
        with_lines("logging:\n  level: TRACE\n"),
        "at logging.level (line 11)", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'", id="literal",
    ),
    pytest.param(
        with_lines("database:\n  sqlite_synchronous: off\n"),  # YAML 1.1: off is False
        "at database.sqlite_synchronous (line 11)", "'full' or 'normal'", id="yaml-off-bool",
    ),
    pytest.param(
        with_lines("appservice:\n  port: 1\n"),
        "at appservice (line 10)", "duplicate key (first given at line 4)",
        id="duplicate-section",
    ),
    pytest.param(
        replace("  server_name: corp.example.com\n",
                "  server_name: corp.example.com\n  server_name: other.example.com\n"),
        "at homeserver.server_name (line 4)", "duplicate key (first given at line 3)",
        id="duplicate-key",
    ),
]


@pytest.mark.parametrize(("text", "where", "fragment"), BAD)
def test_bad_configs(text: str, where: str, fragment: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(where + ": "), problems
    assert fragment in problems[0], problems


def test_every_problem_is_reported_at_once() -> None:
    text = with_lines("  port: 0\n", "logging:\n  level: LOUD\n  colour: red\n")
    problems = problems_of(text)
    assert [p.split(":")[0] for p in problems] == [
        "at appservice.port (line 10)",
        "at logging.level (line 12)",
        "at logging.colour (line 13)",
    ]


def test_error_message_is_the_full_report() -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(with_lines("  port: 0\n"), source="/etc/enclave/config.yaml")
    assert str(ei.value).startswith("Error in configuration in /etc/enclave/config.yaml:\n  - ")
    assert "at appservice.port (line 10)" in str(ei.value)


def test_inline_secret_value_is_not_echoed() -> None:
    text = replace("  as_token:\n    file: secrets/as_token\n", "  as_token: hunter2-value\n")
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    assert "hunter2-value" not in str(ei.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("homeserver:\n  url: [1,\n  b: c\n",
                     "invalid YAML (line 4, column 1): expected ',' or ']'", id="unclosed-flow"),
        pytest.param("homeserver:\n\turl: x\n",
                     "invalid YAML (line 2, column 1): found character '\\t'", id="tab"),
        pytest.param("a: b\n  c: d\n",
                     "invalid YAML (line 2, column 4): mapping values are not allowed here",
                     id="bad-indent"),
        pytest.param("", "the file is empty", id="empty"),
        pytest.param("# only a comment\n\n", "the file is empty", id="comments-only"),
        pytest.param("- homeserver\n- appservice\n",
                     "the top level must be a mapping of sections", id="top-level-list"),
        pytest.param("just text\n", "the top level must be a mapping of sections",
                     id="top-level-scalar"),
    ],
)
def test_unusable_documents(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1
    assert problems[0].startswith(expected), problems


# -- load_config --------------------------------------------------------------------------
def test_load_config_resolves_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "enclave.yaml").write_text(GOOD)
    loaded = load_config(sub / "enclave.yaml")
    assert loaded.base_dir == sub.resolve()
    assert loaded.resolve("secrets/as_token") == sub.resolve() / "secrets/as_token"
    assert loaded.resolve("/abs/x") == Path("/abs/x")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(None, "cannot read the file: No such file or directory", id="missing"),
        pytest.param(b"homeserver: \xff\xfe\n", "the file is not UTF-8 text", id="not-utf8"),
    ],
)
def test_load_config_unreadable(tmp_path: Path, content: bytes | None, expected: str) -> None:
    p = tmp_path / "config.yaml"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.problems == [expected]
    assert str(p) in ei.value.source


# -- secrets ------------------------------------------------------------------------------
def loaded_in(tmp_path: Path, text: str = GOOD) -> LoadedConfig:
    (tmp_path / "config.yaml").write_text(text)
    return load_config(tmp_path / "config.yaml")


@pytest.mark.parametrize(
    "value",
    ["CHANGE_ME", "changeme", "change-me", "Change_Me", "<your token>", "<hs_token>",
     "REPLACE_ME", "CHANGE_ME_PLEASE", "secret", "xxx", "", "   \n", "  changeme  \n"],
)
@pytest.mark.parametrize("via", ["file", "env"])
def test_placeholder_secrets_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     value: str, via: str) -> None:
    loaded = loaded_in(tmp_path)
    if via == "file":
        ref, where = SecretRef(file=Path("tok")), f"file {tmp_path / 'tok'}"
        (tmp_path / "tok").write_text(value)
    else:
        ref, where = SecretRef(env="ENCLAVE_T"), "environment variable ENCLAVE_T"
        monkeypatch.setenv("ENCLAVE_T", value)
    with pytest.raises(ConfigError) as ei:
        loaded.secret(ref, "appservice.as_token")
    assert ei.value.problems == [
        f"{where} holds a placeholder, not a real secret: set a real value"
    ]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("Qm9vdHN0cmFwLXRva2VuLTEyMzQ1Njc4OTA", "Qm9vdHN0cmFwLXRva2VuLTEyMzQ1Njc4OTA"),
        ("a-real-token\n", "a-real-token"),  # the trailing newline of `echo x > file`
        ("  spaced-token  ", "spaced-token"),
        ("my-secret-2024", "my-secret-2024"),  # contains 'secret' but is not the placeholder
    ],
)
def test_real_secrets_accepted(tmp_path: Path, stored: str, expected: str) -> None:
    loaded = loaded_in(tmp_path)
    (tmp_path / "tok").write_text(stored)
    s = loaded.secret(SecretRef(file=Path("tok")), "k")
    assert isinstance(s, Secret)
    assert s.get() == expected


def test_secret_env_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCLAVE_NOPE", raising=False)
    with pytest.raises(ConfigError) as ei:
        loaded_in(tmp_path).secret(SecretRef(env="ENCLAVE_NOPE"), "appservice.hs_token")
    assert ei.value.problems == [
        "environment variable ENCLAVE_NOPE is not set (needed for appservice.hs_token)"
    ]


def test_secret_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        loaded_in(tmp_path).secret(SecretRef(file=Path("nope/tok")), "appservice.as_token")
    assert ei.value.problems == [
        f"cannot read file {tmp_path / 'nope/tok'}: No such file or directory"
    ]


@pytest.mark.parametrize("method", [repr, str, lambda s: f"{s}", lambda s: f"{s!r}"])
def test_secret_never_shows_its_value(method) -> None:
    s = Secret("tok-9f8e7d6c")
    assert "tok-9f8e7d6c" not in method(s)
    assert "*" in method(s)
    assert s.get() == "tok-9f8e7d6c"


def test_check_secrets_reports_every_problem(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCLAVE_HS_TOKEN", raising=False)
    loaded = loaded_in(tmp_path)
    with pytest.raises(ConfigError) as ei:
        check_secrets(loaded)
    assert ei.value.problems == [
        f"at appservice.as_token: cannot read file {tmp_path / 'secrets/as_token'}: "
        "No such file or directory",
        "at appservice.hs_token: environment variable ENCLAVE_HS_TOKEN is not set "
        "(needed for appservice.hs_token)",
    ]


def test_check_secrets_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_HS_TOKEN", "hs-real-value-1")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets/as_token").write_text("as-real-value-1\n")
    out = check_secrets(loaded_in(tmp_path))
    assert {k: v.get() for k, v in out.items()} == {
        "appservice.as_token": "as-real-value-1",
        "appservice.hs_token": "hs-real-value-1",
    }


def test_check_secrets_reads_the_s3_archive_key(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_HS_TOKEN", "hs-real-value-1")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets/as_token").write_text("as-real-value-1\n")
    (tmp_path / "secrets/s3").write_text("CHANGE_ME\n")
    text = GOOD + ("retention:\n  archive:\n    s3:\n      bucket: enclave-archive\n"
                   "      access_key_id: AKIAEXAMPLE\n"
                   "      secret_access_key: {file: secrets/s3}\n")
    with pytest.raises(ConfigError) as ei:
        check_secrets(loaded_in(tmp_path, text))
    assert ei.value.problems == [
        f"at retention.archive.s3.secret_access_key: file {tmp_path / 'secrets/s3'} holds a "
        "placeholder, not a real secret: set a real value"]
    (tmp_path / "secrets/s3").write_text("wJalrXUtnFEMI-real\n")
    out = check_secrets(loaded_in(tmp_path, text))
    assert out["retention.archive.s3.secret_access_key"].get() == "wJalrXUtnFEMI-real"
