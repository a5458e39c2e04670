"""The console's guards over HTTP, on a real store (SQLite and PostgreSQL) and the real
aiohttp application: security headers and cookie flags, the single sign-on start needing
the sign-in form's token, the SSO nonce answering one callback, bad search input answered
with a clear 400 (never a 500), legal holds' details kept to the legal role in the audit
search and CSV, and a hand-made requeue form. Sessions are made in the session store as a
sign-in makes them (the sign-in itself, through a real Synapse, is in
tests/integration/test_console.py)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.config.console import ConsoleConfig
from bridge.console.auth import ConsoleAuth, hash_session_id
from bridge.console.web import COOKIE, LOGIN_COOKIE, SSO_COOKIE, ConsoleWeb
from bridge.model.people import StaffRecord
from bridge.store import AuditRecord, Stores
from bridge.store.base import AuditSearch, ConsoleSession

from .conftest import MakeStore

GROUPS = {"helpdesk": "viewer", "it-ops": "operator", "legal-team": "legal"}
VIEWER, OPERATOR, LEGAL = "@vic:corp.test", "@otto:corp.test", "@lena:corp.test"
# nothing listens here: the homeserver is away (login flows fall back to the password)
NO_HOMESERVER = "http://127.0.0.1:9"


class Console:
    def __init__(self, stores: Stores, client: TestClient):
        self.stores, self.client = stores, client

    async def session(self, user_id: str) -> tuple[str, str]:
        """A session as a sign-in makes it: (the cookie's id, its CSRF token)."""
        raw, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = int(time.time() * 1000)
        await self.stores.console_sessions.session_create(ConsoleSession(
            hash_session_id(raw), user_id, (), csrf, now, now))
        return raw, csrf

    def get(self, path: str, raw: str | None = None, **kw: Any) -> Any:
        return self.client.get(path, allow_redirects=False,
                               headers={"Cookie": f"{COOKIE}={raw}"} if raw else {}, **kw)

    def post(self, path: str, data: Any, cookies: str = "", **kw: Any) -> Any:
        return self.client.post(path, data=data, allow_redirects=False,
                                headers={"Cookie": cookies} if cookies else {}, **kw)


MakeConsole = Callable[..., Awaitable[Console]]


@pytest.fixture
async def make_console(make_store: MakeStore) -> AsyncIterator[MakeConsole]:
    opened: list[tuple[TestClient, aiohttp.ClientSession]] = []

    async def make(public_url: str = "http://127.0.0.1:1", separation: Any = None,
                   **config: Any) -> Console:
        stores = await make_store()
        await stores.directory.replace_directory_view([
            StaffRecord(user_id=uid, person_id=str(i), active=True, username=uid[1:4],
                        display_name=uid, groups=frozenset({group}))
            for i, (uid, group) in enumerate([(VIEWER, "helpdesk"), (OPERATOR, "it-ops"),
                                              (LEGAL, "legal-team")])])
        cfg = ConsoleConfig(enabled=True, groups=GROUPS, **config)  # type: ignore[arg-type]
        http = aiohttp.ClientSession()

        def clock() -> int:
            return int(time.time() * 1000)

        auth = ConsoleAuth(cfg, sessions=stores.console_sessions, directory=stores.directory,
                           audit=stores.audit, http=lambda: http,
                           homeserver_url=NO_HOMESERVER, clock_ms=clock)
        console = ConsoleWeb(
            cfg, auth, server_name="corp.test", public_url=public_url,
            homeserver_url=NO_HOMESERVER, audit=stores.audit, holds=stores.holds,
            inbox=stores.inbox, kv=stores.kv, retention_rooms=stores.retention_rooms,
            separation=separation, directory=None, retention=None, line_of=lambda _: None,
            config_path="config.yaml", job_ids=lambda: [], extension_pages=lambda: [],
            clock_ms=clock)
        app = web.Application()

        async def ready() -> dict[str, Any]:
            return {}

        console.add_routes(app, ready)
        # no cookie jar: each request carries exactly the cookies the test names
        client = TestClient(TestServer(app, host="127.0.0.1"),
                            cookie_jar=aiohttp.DummyCookieJar())
        await client.start_server()
        opened.append((client, http))
        return Console(stores, client)

    yield make
    for client, http in opened:
        await client.close()
        await http.close()


def _set_cookie(resp: Any, name: str) -> str:
    return next((h for h in resp.headers.getall("Set-Cookie", [])
                 if h.startswith(name + "=")), "")


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:1", "https://console.corp.test"])
async def test_security_headers_and_cookie_flags(make_console: MakeConsole,
                                                 public_url: str) -> None:
    c = await make_console(public_url)
    raw, _ = await c.session(VIEWER)
    for path, who in [("/console/login", None), ("/console/audit", raw)]:
        async with c.get(path, who) as resp:
            assert resp.status == 200, path
            h = resp.headers
            csp = h["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
            assert "default-src 'none'" in csp and "script-src" not in csp
            assert h["X-Frame-Options"] == "DENY"
            assert h["X-Content-Type-Options"] == "nosniff"
            assert h["Referrer-Policy"] == "same-origin"
            assert h["Cache-Control"] == "no-store"
    async with c.get("/console/login") as resp:
        cookie = _set_cookie(resp, LOGIN_COOKIE).lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert ("secure" in cookie.split("; ")) == public_url.startswith("https://")


async def test_single_sign_on_starts_only_from_the_sign_in_form(
        make_console: MakeConsole) -> None:
    c = await make_console()
    # no GET that sets anything: another site's link or <img> cannot start a sign-in
    async with c.get("/console/sso") as resp:
        assert resp.status == 405
    async with c.post("/console/sso", {}) as resp:
        assert resp.status == 403 and not _set_cookie(resp, SSO_COOKIE)
    async with c.get("/console/login") as resp:
        html = await resp.text()
        login = resp.cookies[LOGIN_COOKIE].value
    token = html.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    assert token == login
    async with c.post("/console/sso", {"login_csrf": "guess"},
                      cookies=f"{LOGIN_COOKIE}={login}") as resp:
        assert resp.status == 403 and not _set_cookie(resp, SSO_COOKIE)
    async with c.post("/console/sso", {"login_csrf": token},
                      cookies=f"{LOGIN_COOKIE}={login}") as resp:
        assert resp.status == 303
        assert resp.headers["Location"].startswith(
            NO_HOMESERVER + "/_matrix/client/v3/login/sso/redirect?redirectUrl=")
        sso = _set_cookie(resp, SSO_COOKIE)
        nonce = resp.cookies[SSO_COOKIE].value
    assert "samesite=lax" in sso.lower() and "httponly" in sso.lower()
    # the nonce answers one callback, whatever came of it (here: the homeserver is away)
    async with c.client.get(f"/console/sso/callback?state={nonce}&loginToken=t",
                            headers={"Cookie": f"{SSO_COOKIE}={nonce}"},
                            allow_redirects=False) as resp:
        assert resp.status == 403
        gone = _set_cookie(resp, SSO_COOKIE)
    assert gone and ("max-age=0" in gone.lower() or "expires=thu, 01 jan 1970" in gone.lower())


async def test_bad_search_input_is_a_clear_error_never_a_crash(
        make_console: MakeConsole) -> None:
    c = await make_console()
    raw, _ = await c.session(VIEWER)
    for query, says in [("user=%00", "user: control characters are not allowed"),
                        ("room=a%01b", "room: control characters are not allowed"),
                        ("since=99999999999999999d", "neither a relative time"),
                        ("until=2026-13-45", "neither a relative time")]:
        for path in ("/console/audit", "/console/audit.csv"):
            async with c.get(f"{path}?{query}", raw) as resp:
                assert resp.status == 400, (path, query)
                assert says in await resp.text(), (path, query)
    # a keyset the store cannot hold, or digits that are not ASCII: ignored, not a 500
    for before in ("99999999999999999999.1", "1.99999999999999999999", "%C2%B2.1"):
        async with c.get(f"/console/audit?before={before}", raw) as resp:
            assert resp.status == 200, before


async def test_hold_details_only_for_the_legal_role(make_console: MakeConsole) -> None:
    c = await make_console()
    await c.stores.audit.add_audit(AuditRecord(
        ts=int(time.time() * 1000), source="cli", kind="hold_add", outcome="applied",
        actor=LEGAL, rule_id="builtin.legal_hold", reason="SECRET-REASON",
        detail="hold h1 case SECRET-CASE: users=['@target:corp.test']"))
    viewer, _ = await c.session(VIEWER)
    operator, _ = await c.session(OPERATOR)
    legal, _ = await c.session(LEGAL)
    for who in (viewer, operator):
        for path in ("/console/audit", "/console/audit.csv"):
            async with c.get(path, who) as resp:
                text = await resp.text()
            assert resp.status == 200
            assert "hold_add" in text and "(legal role only)" in text, path
            assert "SECRET" not in text and "@target" not in text, path
    for path in ("/console/audit", "/console/audit.csv"):
        async with c.get(path, legal) as resp:
            text = await resp.text()
        assert "SECRET-CASE" in text and "SECRET-REASON" in text, path


async def test_requeue_refuses_a_hand_made_form(make_console: MakeConsole) -> None:
    c = await make_console()
    raw, csrf = await c.session(OPERATOR)
    cookie = f"{COOKIE}={raw}"
    for seq in ("99999999999999999999", "\u00b2", "-1"):
        async with c.post("/console/inbox/requeue", {"csrf": csrf, "seq": seq},
                          cookies=cookie) as resp:
            assert resp.status == 200, seq
            assert "choose events to requeue" in await resp.text()
    many = [("csrf", csrf)] + [("seq", str(i)) for i in range(201)]
    async with c.post("/console/inbox/requeue", many, cookies=cookie) as resp:
        assert "at most 200" in await resp.text()
    # NUL in a form field: refused before the store is asked
    async with c.post("/console/inbox/requeue", {"csrf": csrf, "seq": "1\x00"},
                      cookies=cookie) as resp:
        assert resp.status == 400


class SlowScan:
    """Stands in for the separation service: a plan that takes as long as the test says
    (a real one reads every room through the homeserver's admin API)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.runs = 0

    async def reconcile(self, *, apply: bool) -> Any:
        assert not apply
        self.runs += 1
        self.started.set()
        await self.finish.wait()
        raise RuntimeError("scan stopped by the test")


async def test_a_plan_that_reads_every_room_runs_one_at_a_time(
        make_console: MakeConsole) -> None:
    scan = SlowScan()
    c = await make_console(separation=scan)
    raw, _ = await c.session(VIEWER)

    async def plan() -> tuple[int, str]:
        async with c.get("/console/separation?plan=1", raw) as resp:
            return resp.status, await resp.text()

    first = asyncio.create_task(plan())
    await asyncio.wait_for(scan.started.wait(), 30)
    # reloads (or a script) while it runs: answered at once, no second scan
    for _ in range(3):
        # bounded: without the guard this request would wait for the first scan to end
        status, html = await asyncio.wait_for(plan(), 30)
        assert status == 429 and "already running" in html
    assert scan.runs == 1
    scan.finish.set()
    status, html = await first
    assert status == 200 and "scan stopped by the test" in html
    status, _ = await asyncio.wait_for(plan(), 30)  # the next one runs
    assert scan.runs == 2


async def test_sign_in_throttle_counts_the_client_behind_the_proxy(
        make_console: MakeConsole) -> None:
    """Behind a reverse proxy every request comes from the proxy: with trusted_proxies
    the throttle counts each client, so a few failures of one do not refuse everyone."""
    c = await make_console(max_failed_logins=2, trusted_proxies=["127.0.0.1"])

    async def attempt(user: str, client: str) -> str:
        async with c.get("/console/login") as resp:
            login = resp.cookies[LOGIN_COOKIE].value
        async with c.client.post("/console/login", allow_redirects=False, data={
                "username": user, "password": "x", "login_csrf": login}, headers={
                "Cookie": f"{LOGIN_COOKIE}={login}",
                "X-Forwarded-For": f"{client}, 127.0.0.1"}) as resp:
            assert resp.status == 403
            return await resp.text()

    # the homeserver is away: each attempt fails (and counts)
    for user in ("a1", "a2"):
        assert "homeserver did not answer" in await attempt(user, "198.51.100.1")
    assert "too many failed sign-ins" in await attempt("a3", "198.51.100.1")
    assert "homeserver did not answer" in await attempt("b1", "198.51.100.2")
    refused = [r for r in await c.stores.audit.audit_page(AuditSearch(limit=50))
               if r["rule_id"] == "console.throttled"]
    # the throttled attempt names the client behind the proxy (and the typed name, which
    # is only a claim: the record has no actor)
    assert len(refused) == 1 and refused[0]["actor"] is None
    assert refused[0]["detail"].endswith("from 198.51.100.1"), refused[0]["detail"]


async def test_sign_in_with_a_control_character_is_a_clear_error(
        make_console: MakeConsole) -> None:
    c = await make_console()
    async with c.get("/console/login") as resp:
        login = resp.cookies[LOGIN_COOKIE].value
    async with c.post("/console/login", {"username": "lena\x00", "password": "x",
                                         "login_csrf": login},
                      cookies=f"{LOGIN_COOKIE}={login}") as resp:
        assert resp.status == 400
        assert "username: control characters are not allowed" in await resp.text()
