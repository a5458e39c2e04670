"""The operators' console in a real browser (headless Chromium through Playwright) against
a real Synapse and ``enclave run``: sign-in allowed and refused by directory group, every
page, a legal hold placed and released, a viewer's crafted POST and CSRF-less POSTs
refused, the directory safety refusal shown, a person moved out of a listed group losing
an open session. Screenshots are kept under var/test-artifacts/console/.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .directory_helpers import ensure_enclave_admin
from .harness import REPO_ROOT, EnclaveProcess, Stack, nio, wait_until

pytestmark = pytest.mark.integration

ARTIFACTS = REPO_ROOT / "var" / "test-artifacts" / "console"
GROUPS = {"legal-team": "legal", "it-ops": "operator", "helpdesk": "viewer"}


def person(pid: str, name: str, groups: list[str]) -> dict[str, Any]:
    return {"id": pid, "username": name, "display_name": name.title(),
            "email": f"{name}@example.com", "department": "Ops", "groups": groups,
            "initial_password": f"pw-{name}"}


PEOPLE = [person("1", "lena", ["legal-team"]), person("2", "otto", ["it-ops"]),
          person("3", "vic", ["helpdesk"]), person("4", "ned", ["sales"])]


class Env:
    def __init__(self, stack: Stack, enclave: EnclaveProcess, base: Path):
        self.stack, self.enclave, self.base = stack, enclave, base

    def uid(self, name: str) -> str:
        return f"@{name}:{self.stack.server_name}"

    @property
    def url(self) -> str:
        return self.enclave.base_url

    def write_people(self, people: list[dict[str, Any]]) -> None:
        (self.base / "directory.yaml").write_text(yaml.safe_dump({"people": people}))

    def holds(self) -> list[tuple[str, str | None, str | None]]:
        con = sqlite3.connect(f"file:{self.enclave.config.parent / 'enclave.db'}?mode=ro",
                              uri=True, timeout=10)
        try:
            return con.execute("SELECT id, placed_by, released_by FROM legal_holds"
                               " ORDER BY created_at").fetchall()
        finally:
            con.close()

    def delivery_room(self, user_id: str) -> str | None:
        con = sqlite3.connect(f"file:{self.enclave.config.parent / 'enclave.db'}?mode=ro",
                              uri=True, timeout=10)
        try:
            row = con.execute("SELECT room_id FROM announcement_deliveries WHERE target = ?"
                              " AND status = 'sent'", (user_id,)).fetchone()
        finally:
            con.close()
        return row[0] if row else None

    def audit(self, source: str = "console") -> list[tuple[Any, ...]]:
        con = sqlite3.connect(f"file:{self.enclave.config.parent / 'enclave.db'}?mode=ro",
                              uri=True, timeout=10)
        try:
            return con.execute("SELECT kind, outcome, actor, rule_id FROM audit"
                               " WHERE source = ? ORDER BY id", (source,)).fetchall()
        finally:
            con.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("console")
    stack = Stack.prepare(base / "stack")
    # login tokens for an existing session (MSC3882): what a homeserver's SSO hands the
    # console's callback, without an identity provider in the test
    stack.synapse.extra_config["login_via_existing_session"] = {
        "enabled": True, "require_ui_auth": False, "token_timeout": "5m"}
    stack.synapse.start()
    enclave: EnclaveProcess | None = None
    try:
        stack.bootstrap()
        ensure_enclave_admin(stack)
        config = base / "enclave" / "config.yaml"
        stack.write_enclave_config(config)
        cfg = yaml.safe_load(config.read_text())
        cfg["inbox"].update(handlers=["tests.integration.console_park_handler:factory"],
                            max_attempts=1)
        cfg["directory"] = {"source": {"type": "file", "path": str(base / "directory.yaml"),
                                       "allow_initial_passwords": True},
                            "interval_minutes": 0}
        cfg["policy"] = {"default_class": "internal",
                         "room_classes": [{"id": "internal", "federate": False}],
                         "reconcile": {"interval_minutes": 0}}
        cfg["retention"] = {"enabled": True, "default": {"keep": "365d"},
                            "archive": {"path": str(base / "archive")},
                            "purge": {"interval_minutes": 0}}
        cfg["bots"] = {"encryption": {"enabled": False}, "announcements": {
            "poll_seconds": 0.5, "announcements": [{
                "id": "security-notice", "title": "Security notice",
                "body": "Hello {first_name}, please read the security notice.",
                "audience": {"department": ["Ops"]}, "require_ack": True}]}}
        # every browser here is 127.0.0.1: the refused sign-ins of this test (and the
        # attempts while the people are provisioned) would reach the per-address limit
        cfg["console"] = {"enabled": True, "groups": GROUPS, "idle_timeout_minutes": 30,
                          "max_failed_logins": 100}
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        enclave = EnclaveProcess(config, stack.as_port)
        e = Env(stack, enclave, base)
        e.write_people(PEOPLE)
        yield e
    finally:
        if enclave is not None:
            enclave.cleanup()
        stack.stop()


@pytest.fixture
async def browser(env: Env) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    if not env.enclave.running:
        await env.enclave.start()

    # the directory sync at start-up provisions the people (and their groups)
    async def provisioned() -> bool:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(f"{env.url}/console/login") as resp:
                html = await resp.text()
            token = html.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
            async with s.post(f"{env.url}/console/login", allow_redirects=False, data={
                    "username": "otto", "password": "pw-otto",
                    "login_csrf": token}) as resp:
                return resp.status == 303

    await wait_until(provisioned, within=90, what="otto can sign in to the console",
                     describe=env.enclave.describe)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {ARTIFACTS}")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


async def sign_in(browser: Any, env: Env, name: str, password: str | None = None) -> Any:
    ctx = await browser.new_context(viewport={"width": 1366, "height": 800},
                                    base_url=env.url)
    ctx.set_default_timeout(60_000)
    page = await ctx.new_page()
    await page.goto("/console/")
    assert "/console/login" in page.url  # not signed in: the sign-in page
    await page.fill("#username", name)
    await page.fill("#password", password or f"pw-{name}")
    await page.click("form[action='/console/login'] button[type=submit]")
    await page.wait_for_load_state("load")
    return page


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_console_in_a_browser(env: Env, browser: Any) -> None:
    server = env.stack.server_name
    # -- refused: wrong password, a person in no listed group, someone not in the directory
    page = await sign_in(browser, env, "lena", "wrong-password")
    assert "wrong user name or password" in await page.inner_text("#login-message")
    await shot(page, "01-sign-in-wrong-password")
    page = await sign_in(browser, env, "ned")
    assert "may not use the console" in await page.inner_text("#login-message")
    await shot(page, "02-sign-in-refused-no-group")
    page = await sign_in(browser, env, env.stack.admin_user_id, "root-password")
    assert "may not use the console" in await page.inner_text("#login-message")
    assert "/console/login" in page.url
    # a sign-in posted from elsewhere (no sign-in form token of this browser): refused
    # before the homeserver is asked
    stranger = await browser.new_context(base_url=env.url)
    r = await stranger.request.post("/console/login", max_redirects=0,
                                    form={"username": "otto", "password": "pw-otto"})
    assert r.status == 403 and "enclave_console=" not in r.headers.get("set-cookie", "")
    await stranger.close()
    audit = env.audit()
    assert ("console.sign_in", "refused", env.uid("ned"), "console.no_group") in audit
    assert ("console.sign_in", "refused", env.stack.admin_user_id, "console.unknown") in audit
    assert any(a[:2] == ("console.sign_in", "refused") and a[3] == "console.homeserver"
               for a in audit)

    # -- a viewer: every read page, nothing they may not do -------------------------------
    vic = await sign_in(browser, env, "vic")
    assert await vic.inner_text("#ready") == "ready"
    assert server in await vic.inner_text("header")
    assert env.uid("vic") in await vic.inner_text("header")
    await shot(vic, "03-status-viewer")
    for path, marker, name in [
        ("/console/audit", "#audit-rows", "04-audit"),
        (f"/console/explain?what=invite&a={env.uid('vic')}&b=%40someone%3Aelsewhere.example",
         "#explanation", "05-explain-invite"),
        ("/console/separation?plan=1", "#summary", "06-separation-plan"),
        ("/console/directory?plan=1", "#summary", "07-directory-plan"),
        ("/console/retention", "h1", "08-retention"),
        ("/console/inbox", "#parked", "09-inbox"),
    ]:
        resp = await vic.goto(path)
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        assert await vic.locator(marker).count() == 1, path
        if marker == "#explanation":
            # an outsider invited by staff into a new DM: the policy's answer and its rule
            assert await vic.inner_text("#decision") in ("ALLOW", "DENY")
        await shot(vic, name)
    # a room: its explanation (class, members' standing) and its retention plan
    # (made by a staff member: separation removes anyone else from an internal room)
    room = (await env.stack.hs("POST", "/_matrix/client/v3/createRoom",
                               {"name": "console test room"},
                               as_user=env.uid("otto")))["room_id"]
    q = urllib.parse.quote(room)
    resp = await vic.goto(f"/console/explain?what=room&room={q}")
    assert resp is not None and resp.status == 200
    assert "class internal" in await vic.inner_text("#explanation")
    await shot(vic, "05b-explain-room")
    resp = await vic.goto(f"/console/retention?room={q}")
    assert resp is not None and resp.status == 200
    assert room in await vic.inner_text("#plan")
    assert "keep" in await vic.inner_text("#plan")
    await shot(vic, "08b-retention-plan")
    assert "Legal holds" not in await vic.inner_text("nav")
    resp = await vic.goto("/console/holds")
    assert resp is not None and resp.status == 403
    await shot(vic, "10-holds-refused-viewer")
    # a crafted POST with the viewer's own valid CSRF token: refused by role, nothing placed
    await vic.goto("/console/")
    token = await vic.get_attribute("header input[name=csrf]", "value")
    assert token
    r = await vic.request.post("/console/holds/place", form={
        "csrf": token, "case": "C-evil", "reason": "x", "users": env.uid("otto")})
    assert r.status == 403
    r = await vic.request.post("/console/directory", form={"csrf": token})
    assert r.status == 403
    assert env.holds() == []
    assert ("console.post", "refused", env.uid("vic"), "console.role") in env.audit()

    # -- legal: a hold placed and released -------------------------------------------------
    lena = await sign_in(browser, env, "lena")
    await lena.goto("/console/holds")
    await lena.fill("input[name=case]", "CASE-19")
    await lena.fill("#place input[name=reason]", "litigation")
    await lena.fill("input[name=id]", "hold-console")
    await lena.fill("textarea[name=users]", env.uid("otto"))
    await lena.click("#place button[type=submit]")
    await lena.wait_for_load_state("load")
    assert "placed hold hold-console" in await lena.inner_text("#message")
    assert await lena.locator("tr[data-hold=hold-console]").count() == 1
    await shot(lena, "11-hold-placed")
    assert env.holds() == [("hold-console", env.uid("lena"), None)]
    # CSRF: a POST with a wrong token, and one with none, change nothing
    r = await lena.request.post("/console/holds/release",
                                form={"csrf": "not-the-token", "id": "hold-console"})
    assert r.status == 403
    r = await lena.request.post("/console/holds/release", form={"id": "hold-console"})
    assert r.status == 403
    assert env.holds() == [("hold-console", env.uid("lena"), None)]
    assert ("console.post", "refused", env.uid("lena"), "console.csrf") in env.audit()
    # the browser's own form releases it
    await lena.click("tr[data-hold=hold-console] button[type=submit]")
    await lena.wait_for_load_state("load")
    assert "released hold hold-console" in await lena.inner_text("#message")
    await shot(lena, "12-hold-released")
    assert env.holds() == [("hold-console", env.uid("lena"), env.uid("lena"))]
    kinds = [a for a in env.audit() if a[0] in ("hold_add", "hold_release")]
    assert [(k, o, who) for k, o, who, _ in kinds] == [
        ("hold_add", "applied", env.uid("lena")), ("hold_release", "applied", env.uid("lena"))]
    # the audit page finds them by actor; the CSV has them
    await lena.goto(f"/console/audit?actor={env.uid('lena')}&since=1h")
    rows = await lena.inner_text("#audit-rows")
    assert "hold_add" in rows and "hold_release" in rows
    await shot(lena, "13-audit-by-actor")
    csv = await lena.request.get(f"/console/audit.csv?actor={env.uid('lena')}")
    assert csv.status == 200 and "hold_release" in await csv.text()
    assert "CASE-19" in await csv.text()
    # a viewer finds the records but not the case, people or reason (legal data)
    await vic.goto(f"/console/audit?actor={env.uid('lena')}&since=1h")
    rows = await vic.inner_text("#audit-rows")
    assert "hold_add" in rows and "(legal role only)" in rows
    assert "CASE-19" not in rows and "litigation" not in rows
    csv = await vic.request.get(f"/console/audit.csv?actor={env.uid('lena')}")
    assert csv.status == 200 and "CASE-19" not in await csv.text()

    # -- operator: an announcement sent from the console (an extension's page), acknowledged
    otto = await sign_in(browser, env, "otto")
    assert "Announcements" in await vic.inner_text("nav")  # a viewer sees the page...
    await vic.goto("/console/x/announcements")
    assert await vic.locator("#send").count() == 0  # ...but no send button
    r = await vic.request.post("/console/x/announcements",
                               form={"csrf": token, "id": "security-notice"})
    assert r.status == 403
    await otto.goto("/console/x/announcements")
    await otto.click("#send")
    await otto.wait_for_load_state("load")
    assert "queued security-notice" in await otto.inner_text("#message")
    assert ("console.announcements", "applied", env.uid("otto"), None) in env.audit()
    room = await wait_until(lambda: _async(env.delivery_room(env.uid("lena"))), within=60,
                            what="the notice delivered to lena")
    client = nio.AsyncClient(env.stack.synapse.base_url, env.uid("lena"))
    try:
        assert isinstance(await client.login("pw-lena"), nio.LoginResponse)
        sent = await client.room_send(room, "m.room.message",
                                      {"msgtype": "m.text", "body": "!ack"})
        assert isinstance(sent, nio.RoomSendResponse), sent
    finally:
        await client.close()

    async def acknowledged() -> bool:
        await otto.goto("/console/x/announcements?id=security-notice")
        return "1 acknowledged" in await otto.inner_text("#summary")

    await wait_until(acknowledged, within=60, what="lena's acknowledgement in the console")
    assert "1 of 4 acknowledged" in (await otto.locator("#ack-chart title").text_content() or "")
    recipients = await otto.inner_text("#recipients")
    assert env.uid("lena") in recipients and "command" in recipients
    await shot(otto, "14-announcement-report")

    # -- operator: a parked event requeued ---------------------------------------------------
    await env.stack.hs("PUT", f"/_matrix/client/v3/rooms/{q}/send/m.room.message/park-1",
                       {"msgtype": "m.text", "body": "park me"}, as_user=env.uid("otto"))

    async def parked() -> bool:
        await otto.goto("/console/inbox")
        return await otto.locator("#parked input[name=seq]").count() == 1

    await wait_until(parked, within=60, what="the failing event parked")
    assert "console test: this event always fails" in await otto.inner_text("#parked")
    await vic.goto("/console/inbox")  # a viewer sees it, without a requeue button
    assert await vic.locator("form[action='/console/inbox/requeue'] button").count() == 0
    seq = await otto.get_attribute("#parked input[name=seq]", "value")
    r = await vic.request.post("/console/inbox/requeue", form={"csrf": token, "seq": seq})
    assert r.status == 403
    await otto.check("#parked input[name=seq]")
    await shot(otto, "13b-inbox-parked")
    await otto.click("form[action='/console/inbox/requeue'] button")
    await otto.wait_for_load_state("load")
    assert "requeued 1 parked event(s)" in await otto.inner_text("#message")
    assert ("console.inbox_requeue", "applied", env.uid("otto"), None) in env.audit()

    # -- operator: separation reconciliation applied from the console ----------------------
    await otto.goto("/console/separation")
    await otto.click("#apply")
    await otto.wait_for_load_state("load")
    assert (await otto.inner_text("#summary")).startswith("Applied: scanned")
    assert ("console.separation_apply", "applied", env.uid("otto"),
            "separation.reconcile") in env.audit()

    # -- operator: the directory safety refusal, then a group change that locks vic out ----
    env.write_people([p for p in PEOPLE if p["username"] != "ned"])  # 1 of 4 leaves: > 5%
    await otto.goto("/console/directory")
    await otto.click("#apply")
    await otto.wait_for_load_state("load")
    assert "Refused by the safety checks" in await otto.inner_text("#refused")
    await shot(otto, "15-directory-refused")
    assert ("console.directory_apply", "refused", env.uid("otto"), "directory.sync") \
        in env.audit()
    moved = [dict(p) for p in PEOPLE]
    moved[2]["groups"] = ["sales"]  # vic leaves the helpdesk group
    env.write_people(moved)
    await otto.goto("/console/directory")
    await otto.click("#apply")
    await otto.wait_for_load_state("load")
    assert "Applied" in await otto.inner_text("#summary")
    await shot(otto, "16-directory-applied")
    # vic's open session stops working at the next click
    await vic.goto("/console/audit")
    assert "/console/login" in vic.url
    assert ("console.session_end", "refused", env.uid("vic"), "console.no_group") \
        in env.audit()
    # sign-out ends lena's session; the old cookie no longer opens anything
    await lena.goto("/console/")
    await lena.click("header button[type=submit]")
    await lena.wait_for_load_state("load")
    assert "/console/login" in lena.url
    await lena.goto("/console/holds")
    assert "/console/login" in lena.url


async def test_single_sign_on_callback(env: Env, browser: Any) -> None:
    """The SSO return path: a login token the homeserver issued for a person signs in the
    browser that started the sign-in, and no other."""
    client = nio.AsyncClient(env.stack.synapse.base_url, env.uid("otto"))
    try:
        assert isinstance(await client.login("pw-otto"), nio.LoginResponse)
        got = await env.stack.hs("POST", "/_matrix/client/v1/login/get_token", {},
                                 token=client.access_token)
        login_token = got["login_token"]
    finally:
        await client.close()
    # another browser, which never started a sign-in, is refused with the token
    stranger = await browser.new_context(base_url=env.url)
    page = await stranger.new_page()
    resp = await page.goto(f"/console/sso/callback?state=guess&loginToken={login_token}")
    assert resp is not None and resp.status == 403
    assert "not started by this browser" in await page.inner_text("#login-message")
    await stranger.close()
    # the browser that started it: /console/sso sets its nonce and sends it to the homeserver
    ctx = await browser.new_context(base_url=env.url)
    ctx.set_default_timeout(60_000)
    # a GET cannot start it (another site's link), nor a POST without the form's token
    assert (await ctx.request.get("/console/sso", max_redirects=0)).status == 405
    assert (await ctx.request.post("/console/sso", max_redirects=0,
                                   form={"login_csrf": "guess"})).status == 403
    start = await _sso_start(ctx)
    assert start.status == 303
    location = start.headers["location"]
    assert location.startswith(env.stack.synapse.base_url +
                               "/_matrix/client/v3/login/sso/redirect?redirectUrl=")
    callback = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["redirectUrl"][0]
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)["state"][0]
    page = await ctx.new_page()
    await page.goto(f"/console/sso/callback?state={state}&loginToken={login_token}")
    assert page.url.endswith("/console/")
    assert env.uid("otto") in await page.inner_text("header")
    await shot(page, "17-signed-in-by-sso-token")
    assert any(a[:3] == ("console.sign_in", "applied", env.uid("otto")) for a in env.audit())
    # a login token works once
    again = await browser.new_context(base_url=env.url)
    r = await _sso_start(again)
    loc = urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["location"]).query)
    state2 = urllib.parse.parse_qs(urllib.parse.urlsplit(loc["redirectUrl"][0]).query)["state"][0]
    p2 = await again.new_page()
    resp = await p2.goto(f"/console/sso/callback?state={state2}&loginToken={login_token}")
    assert resp is not None and resp.status == 403
    # signing in again in the same browser: a new session id, the old one is gone (a
    # cookie someone planted or copied before a sign-in opens nothing after it)
    old = next(c["value"] for c in await ctx.cookies() if c["name"] == "enclave_console")
    await page.goto("/console/login")
    await page.fill("#username", "otto")
    await page.fill("#password", "pw-otto")
    await page.click("form[action='/console/login'] button[type=submit]")
    await page.wait_for_load_state("load")
    assert page.url.endswith("/console/"), await page.inner_text("main")
    new = next(c["value"] for c in await ctx.cookies() if c["name"] == "enclave_console")
    assert new != old
    planted = await browser.new_context(base_url=env.url)
    await planted.add_cookies([{"name": "enclave_console", "value": old, "url": env.url}])
    p3 = await planted.new_page()
    await p3.goto("/console/")
    assert "/console/login" in p3.url
    await planted.close()
    await ctx.close()
    await again.close()


async def _sso_start(ctx: Any) -> Any:
    """Start single sign-on as the sign-in page's button does: a POST with its token."""
    html = await (await ctx.request.get("/console/login")).text()
    token = html.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    return await ctx.request.post("/console/sso", form={"login_csrf": token},
                                  max_redirects=0)


async def _async(value: Any) -> Any:
    return value
