"""RedactingFilter: secrets never reach a log line, whatever prints them."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from bridge.logs import REDACTED, JSONFormatter, RedactingFilter, setup_logging

AS = "as-token-XYZ123abc"
HS = "hs_token_456DEF"


@pytest.fixture(autouse=True)
def _no_captured_warnings() -> Iterator[None]:
    yield
    logging.captureWarnings(False)  # setup_logging routes warnings into logging


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter([AS, HS, "short"]))
    logger = logging.getLogger("test.redaction")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.handlers[:] = []


@pytest.mark.parametrize(
    ("msg", "args", "must_not_contain", "must_contain"),
    [
        pytest.param("token is %s", (AS,), [AS], [f"token is {REDACTED}"], id="known-as"),
        pytest.param("tokens %s and %s", (HS, AS), [AS, HS], [], id="two-known"),
        pytest.param("embedded" + AS + "tail", (), [AS], ["embedded", "tail"], id="embedded"),
        pytest.param("GET /x?access_token=abc.def-ghi&user_id=@a:x", (), ["abc.def-ghi"],
                     [f"access_token={REDACTED}&user_id=@a:x"], id="query-param"),
        pytest.param("GET /console/sso/callback?state=s1&loginToken=syl_abc_def", (),
                     ["syl_abc_def"], [f"state=s1&loginToken={REDACTED}"],
                     id="console-sso-login-token"),
        pytest.param("url %s", ("http://hs/?ACCESS_TOKEN=Zz9",), ["Zz9"], [], id="query-case"),
        pytest.param("Authorization: Bearer syt_abc_DEF-123/+=", (), ["syt_abc_DEF-123"],
                     [f"Bearer {REDACTED}"], id="bearer"),
        pytest.param("headers: %r", ({"Authorization": "bearer qwerty.uiop"},), ["qwerty"],
                     [], id="bearer-in-dict"),
        pytest.param("reg %s", ("as_token: something-secret",), ["something-secret"],
                     [f"as_token: {REDACTED}"], id="yaml-as-token"),
        pytest.param('json {"hs_token": "abcdef"}', (), ["abcdef"], [], id="json-hs-token"),
        pytest.param("nothing secret here", (), [], ["nothing secret here"], id="untouched"),
        pytest.param("too short to be a secret: short", (), [],
                     ["too short to be a secret: short"], id="short-secrets-ignored"),
    ],
)
def test_messages_are_redacted(capture, msg: str, args: tuple, must_not_contain: list[str],
                               must_contain: list[str]) -> None:
    logger, stream = capture
    logger.info(msg, *args)
    out = stream.getvalue()
    for s in must_not_contain:
        assert s not in out
    for s in must_contain:
        assert s in out


def test_exception_text_is_redacted(capture) -> None:
    logger, stream = capture
    try:
        raise RuntimeError(f"request to /sync?access_token=leak123 failed with {AS}")
    except RuntimeError:
        logger.exception("failed with Bearer %s", HS)
    out = stream.getvalue()
    assert "Traceback" in out and "RuntimeError" in out
    for s in (AS, HS, "leak123"):
        assert s not in out
    assert out.count(REDACTED) >= 3


def test_redact_is_idempotent_and_longest_first() -> None:
    f = RedactingFilter(["abcdef", "abcdefgh"])
    assert f.redact("x abcdefgh y") == f"x {REDACTED} y"
    assert f.redact(f.redact("abcdef")) == REDACTED


def test_setup_logging_json_redacts(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        redactor = setup_logging("INFO", "json", [AS])
        logging.getLogger("enclave.test").info("sending with %s", AS)
        logging.getLogger("enclave.test").debug("not at INFO")
        redactor.secrets.append("late-secret-99")
        logging.getLogger("enclave.test").warning("now late-secret-99")
        lines = [orjson.loads(x) for x in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    assert [(x["level"], x["message"]) for x in lines] == [
        ("INFO", f"sending with {REDACTED}"), ("WARNING", f"now {REDACTED}")]
    assert lines[0]["logger"] == "enclave.test"
    assert lines[0]["ts"].endswith("Z")


def test_json_formatter_includes_redacted_exception() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom %s", (AS,), None)
    try:
        raise ValueError(AS)
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter([AS]).filter(record)
    out = orjson.loads(JSONFormatter().format(record))
    assert AS not in orjson.dumps(out).decode()
    assert "ValueError" in out["exc"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    names = ["apscheduler", "apscheduler.executors.default", "aiohttp.access", "nio",
             "bridge.app", "enclave.test"]
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names}
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for n, lvl in saved[2].items():
        logging.getLogger(n).setLevel(lvl)


def test_libraries_stay_at_warning_unless_asked(
        capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    setup_logging("INFO", "text")
    # what APScheduler prints for every timer run
    logging.getLogger("apscheduler.executors.default").info(
        'Running job "Waker._timer (trigger: interval[0:00:05])"')
    logging.getLogger("aiohttp.access").info("GET /metrics 200")
    logging.getLogger("nio").warning("nio warns")
    logging.getLogger("enclave.test").info("ours")
    err = capsys.readouterr().err
    assert "Running job" not in err and "GET /metrics" not in err
    assert "nio warns" in err and "ours" in err

    setup_logging("INFO", "text", libraries="INFO", loggers={"bridge.app": "DEBUG"})
    logging.getLogger("apscheduler.executors.default").info("Running job x")
    logging.getLogger("aiohttp.access").info("GET /metrics 200")
    logging.getLogger("bridge.app").debug("job starts")
    logging.getLogger("enclave.test").debug("not ours at DEBUG")
    err = capsys.readouterr().err
    assert "Running job x" in err and "job starts" in err
    # the access log needs its own name in logging.loggers
    assert "GET /metrics" not in err and "not ours at DEBUG" not in err


def test_json_lines_carry_structured_fields_redacted(
        capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    setup_logging("INFO", "json", [AS])
    logging.getLogger("enclave.test").warning(
        "job %s: %s", "directory-sync", "failed",
        extra={"job": "directory-sync", "seconds": 1.5, "detail": f"token {AS}"})
    line = orjson.loads(capsys.readouterr().err.strip())
    assert line["message"] == "job directory-sync: failed"
    assert line["job"] == "directory-sync" and line["seconds"] == 1.5
    assert line["detail"] == f"token {REDACTED}"
    assert set(line) == {"ts", "level", "logger", "message", "job", "seconds", "detail"}
