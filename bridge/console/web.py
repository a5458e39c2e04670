"""The operators' console at ``/console``: server-rendered pages (aiohttp + Jinja2, no
script) over the same service functions the CLI calls.

Every page needs a live session (``ConsoleAuth.resolve``, re-decided against the directory
on each request); every POST needs a role and the session's CSRF token, and is audited
under the signed-in person's Matrix id with source ``console``. Pages an extension adds
(``Plugin.console_pages``, e.g. the bots' announcements) get the same checks.
"""

from __future__ import annotations

import csv
import io
import logging
import secrets as pysecrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from ..config.console import ConsoleConfig
from ..directory.sync import DirectorySync, SyncRefused
from ..extension import ConsolePage, ConsoleRequest
from ..kernel.durations import format_duration_ms
from ..kernel.spreadsheet import csv_cell
from ..kernel.timestamps import parse_when_ms, readable_utc
from ..policy.console import csrf_ok, decide_client_address
from ..policy.retention import HOLD_RULE
from ..retention.holds import HoldCheckFailed, UnknownHoldSubjects
from ..retention.service import RetentionService
from ..separation.explain import explain_invite, explain_join, explain_room
from ..separation.service import SeparationService
from ..store.base import AuditSearch, HoldRecord
from ..store.domains import AuditStore, HoldStore, InboxStore, KVStore, RetentionRoomStore
from .auth import ConsoleAuth, Signed

log = logging.getLogger(__name__)

COOKIE = "enclave_console"
SSO_COOKIE = "enclave_console_sso"
LOGIN_COOKIE = "enclave_console_login"
TEMPLATES = Path(__file__).parent / "templates"
AUDIT_COLUMNS = ("id", "ts", "source", "kind", "outcome", "actor", "user_id", "room_id",
                 "rule_id", "reason", "detail")
INT64_MAX = 2**63 - 1
# audit records of legal holds: their reason and detail (case, people, rooms) are legal data
HOLD_KINDS = ("hold_add", "hold_release")
LEGAL_ONLY = "(legal role only)"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


@dataclass(frozen=True)
class NavItem:
    path: str
    title: str
    role: str


T = TypeVar("T")
Handler = Callable[[web.Request, Signed], Awaitable[web.StreamResponse]]


class ConsoleWeb:
    """The console's routes, built by the composition root from the services it shows."""

    def __init__(self, config: ConsoleConfig, auth: ConsoleAuth, *, server_name: str,
                 public_url: str, homeserver_url: str, audit: AuditStore, holds: HoldStore,
                 inbox: InboxStore, kv: KVStore, retention_rooms: RetentionRoomStore,
                 separation: SeparationService | None, directory: DirectorySync | None,
                 retention: RetentionService | None, line_of: Callable[[str], int | None],
                 config_path: str, job_ids: Callable[[], Sequence[str]],
                 extension_pages: Callable[[], Sequence[ConsolePage]],
                 clock_ms: Callable[[], int]):
        self.config = config
        self.auth = auth
        self.server_name = server_name
        self.public_url = public_url.rstrip("/")
        self.secure = self.public_url.startswith("https://")
        self.homeserver_url = homeserver_url
        self.audit = audit
        self.holds = holds
        self.inbox = inbox
        self.kv = kv
        self.retention_rooms = retention_rooms
        self.separation = separation
        self.directory = directory
        self.retention = retention
        self.line_of = line_of
        self.config_path = config_path
        self.job_ids = job_ids
        self.extension_pages = extension_pages
        self.clock_ms = clock_ms
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters["when"] = lambda ms: readable_utc(ms) if ms else ""
        self.env.filters["duration"] = lambda ms: format_duration_ms(ms) if ms else ""
        self.ready: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._planning: set[str] = set()

    # -- plumbing ----------------------------------------------------------------------
    def nav(self, signed: Signed) -> list[NavItem]:
        items = [NavItem("/console/", "Status", "viewer"),
                 NavItem("/console/audit", "Audit", "viewer"),
                 NavItem("/console/explain", "Explain", "viewer"),
                 NavItem("/console/separation", "Separation", "viewer"),
                 NavItem("/console/directory", "Directory", "viewer"),
                 NavItem("/console/holds", "Legal holds", "legal"),
                 NavItem("/console/retention", "Retention", "viewer"),
                 NavItem("/console/inbox", "Inbox", "viewer")]
        items += [NavItem(f"/console/x/{p.path}", p.title, p.role)
                  for p in self.extension_pages()]
        return [i for i in items if signed.access.has(i.role)]

    def render(self, template: str, signed: Signed | None, *, status: int = 200,
               **ctx: Any) -> web.Response:
        html = self.env.get_template(template).render(
            server_name=self.server_name, signed=signed,
            nav=self.nav(signed) if signed else [],
            roles=sorted(signed.access.roles) if signed else [],
            csrf=signed.csrf if signed else "", **ctx)
        return web.Response(text=html, content_type="text/html", status=status,
                            headers=self._headers())

    @staticmethod
    def _headers() -> dict[str, str]:
        return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
                "X-Frame-Options": "DENY"}

    def _set_cookie(self, resp: web.StreamResponse, name: str, value: str, *,
                    samesite: str = "Strict", max_age: int | None = None) -> None:
        resp.set_cookie(name, value, path="/console", httponly=True, secure=self.secure,
                        samesite=samesite, max_age=max_age)

    def remote(self, request: web.Request) -> str:
        return decide_client_address(request.remote, request.headers.get("X-Forwarded-For"),
                                     self.config.trusted_proxies)

    def page(self, role: str, handler: Handler, *, post: bool = False) -> Callable[
            [web.Request], Awaitable[web.StreamResponse]]:
        """Wrap a handler: a live session, the role, and for a POST the CSRF token."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            signed = await self.auth.resolve(request.cookies.get(COOKIE))
            if signed is None:
                if request.method != "GET":
                    return self.render("refused.html", None, status=403,
                                       message="not signed in (or the session ended)")
                target = request.path_qs if request.path.startswith("/console") else "/console/"
                return _redirect("/console/login?" + urlencode({"next": target}))
            if request.method == "POST":
                form = await request.post()
                bad = _control_chars(request.query, form)
                if not csrf_ok(signed.csrf, str(form.get("csrf", "")) or None):
                    await self.auth.record(signed, "console.post", "refused",
                                           rule_id="console.csrf",
                                           reason=f"POST {request.path} without the "
                                                  "session's CSRF token")
                    return self.render("refused.html", signed, status=403,
                                       message="refused: the form's security token is "
                                               "missing or wrong (reload the page)")
            else:
                bad = _control_chars(request.query, {})
            if bad:
                # NUL and other control characters: PostgreSQL refuses NUL in text, and no
                # Matrix id, date or case id has them; a clear 400 before anything is asked
                return self.render("refused.html", signed, status=400,
                                   message=f"{bad}: control characters are not allowed")
            if not signed.access.has(role):
                if request.method == "POST":
                    await self.auth.record(signed, "console.post", "refused",
                                           rule_id="console.role",
                                           reason=f"POST {request.path} needs the {role} role")
                return self.render("refused.html", signed, status=403,
                                   message=f"this needs the {role} role")
            return await handler(request, signed)

        return wrapped

    def add_routes(self, app: web.Application,
                   ready: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.ready = ready
        r = app.router
        r.add_get("/console", self.root_redirect)
        r.add_get("/console/static/console.css", self.css)
        r.add_get("/console/login", self.login_form)
        r.add_post("/console/login", self.login_post)
        # a POST with the sign-in form's token: no other site can start a sign-in here
        r.add_post("/console/sso", self.sso_start)
        r.add_get("/console/sso/callback", self.sso_callback)
        r.add_post("/console/logout", self.page("viewer", self.logout, post=True))
        r.add_get("/console/", self.page("viewer", self.status))
        r.add_get("/console/audit", self.page("viewer", self.audit_page))
        r.add_get("/console/audit.csv", self.page("viewer", self.audit_csv))
        r.add_get("/console/explain", self.page("viewer", self.explain))
        r.add_get("/console/separation", self.page("viewer", self.separation_page))
        r.add_post("/console/separation",
                   self.page("operator", self.separation_apply, post=True))
        r.add_get("/console/directory", self.page("viewer", self.directory_page))
        r.add_post("/console/directory",
                   self.page("operator", self.directory_apply, post=True))
        r.add_get("/console/holds", self.page("legal", self.holds_page))
        r.add_post("/console/holds/place", self.page("legal", self.hold_place, post=True))
        r.add_post("/console/holds/release", self.page("legal", self.hold_release, post=True))
        r.add_get("/console/retention", self.page("viewer", self.retention_page))
        r.add_get("/console/inbox", self.page("viewer", self.inbox_page))
        r.add_post("/console/inbox/requeue", self.page("operator", self.requeue, post=True))
        for p in self.extension_pages():
            path = f"/console/x/{p.path}"
            r.add_get(path, self.page(p.role, self._extension(p)))
            if p.post_role is not None:
                r.add_post(path, self.page(p.post_role, self._extension(p), post=True))

    async def _one_at_a_time(self, kind: str,
                             run: Callable[[], Awaitable[T]]) -> tuple[T | None, bool]:
        """(result, False), or (None, True) when a plan of ``kind`` is already running in
        this process: a plan reads every room (or the whole directory), and any viewer may
        ask for one, so reloads or a script must not start them side by side."""
        if kind in self._planning:
            return None, True
        self._planning.add(kind)
        try:
            return await run(), False
        finally:
            self._planning.discard(kind)

    # -- sign-in -----------------------------------------------------------------------
    async def root_redirect(self, request: web.Request) -> web.StreamResponse:
        return _redirect("/console/")

    async def css(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=(TEMPLATES / "console.css").read_bytes(),
                            content_type="text/css",
                            headers={"Cache-Control": "max-age=3600",
                                     "X-Content-Type-Options": "nosniff"})

    @staticmethod
    def _next(value: str | None) -> str:
        # only a path of the console itself: no open redirect
        if value and value.startswith("/console/") and "//" not in value \
                and "\\" not in value and all(32 < ord(c) < 127 for c in value):
            return value
        return "/console/"

    async def login_form(self, request: web.Request, *, message: str = "",
                         status: int = 200) -> web.Response:
        flows = await self.auth.login_flows()
        # the sign-in form's own CSRF token (double submit: a cookie and the form), so no
        # other site can sign this browser in to someone else's session
        token = pysecrets.token_urlsafe(24)
        resp = self.render("login.html", None, status=status, message=message,
                           next=self._next(request.query.get("next")),
                           sso="m.login.sso" in flows,
                           password="m.login.password" in flows, login_csrf=token)
        self._set_cookie(resp, LOGIN_COOKIE, token, max_age=1800)
        return resp

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""),
                       str(form.get("login_csrf", "")) or None):
            return await self.login_form(
                request, status=403,
                message="the sign-in form expired or did not come from this console; "
                        "please sign in again")
        bad = _control_chars(form)
        if bad:  # NUL in a name would fail the audit record's write (PostgreSQL)
            return await self.login_form(
                request, status=400, message=f"{bad}: control characters are not allowed")
        got = await self.auth.sign_in_password(str(form.get("username", "")),
                                               str(form.get("password", "")),
                                               self.remote(request))
        if not got.ok or got.raw_id is None:
            return await self.login_form(request, message=got.message, status=403)
        # the session this browser had before (if any) ends: a sign-in never keeps or
        # promotes an id the browser arrived with
        await self.auth.forget(request.cookies.get(COOKIE))
        resp = _redirect(self._next(str(form.get("next", ""))))
        self._set_cookie(resp, COOKIE, got.raw_id)
        resp.del_cookie(LOGIN_COOKIE, path="/console")
        return resp

    async def sso_start(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""),
                       str(form.get("login_csrf", "")) or None):
            return await self.login_form(
                request, status=403,
                message="the sign-in form expired or did not come from this console; "
                        "please sign in again")
        # a nonce bound to this browser: a login token someone else obtained cannot sign
        # this browser in (login CSRF)
        nonce = pysecrets.token_urlsafe(24)
        callback = f"{self.public_url}/console/sso/callback?state={quote(nonce)}"
        resp = _redirect(
            f"{self.homeserver_url}/_matrix/client/v3/login/sso/redirect?"
            + urlencode({"redirectUrl": callback}))
        # Lax: the homeserver's redirect back is a cross-site navigation
        self._set_cookie(resp, SSO_COOKIE, nonce, samesite="Lax", max_age=600)
        resp.del_cookie(LOGIN_COOKIE, path="/console")
        return resp

    async def sso_callback(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state", "")
        nonce = request.cookies.get(SSO_COOKIE, "")
        if not csrf_ok(nonce, state):
            resp = await self.login_form(
                request, message="single sign-on answer not started by this browser",
                status=403)
        else:
            got = await self.auth.sign_in_token(request.query.get("loginToken", ""),
                                                self.remote(request))
            if not got.ok or got.raw_id is None:
                resp = await self.login_form(request, message=got.message, status=403)
            else:
                await self.auth.forget(request.cookies.get(COOKIE))
                resp = _redirect("/console/")
                self._set_cookie(resp, COOKIE, got.raw_id)
        # the nonce answers one callback only, whatever came of it
        resp.del_cookie(SSO_COOKIE, path="/console")
        return resp

    async def logout(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        await self.auth.sign_out(signed)
        resp = _redirect("/console/login")
        resp.del_cookie(COOKIE, path="/console")
        return resp

    # -- status ------------------------------------------------------------------------
    async def status(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        assert self.ready is not None
        ready = await self.ready()
        stats = await self.inbox.inbox_stats()
        now = self.clock_ms()
        oldest = stats.get("oldest_pending_received_at")
        jobs = []
        for job_id in self.job_ids():
            raw = await self.kv.get_kv(f"job-last:{job_id}")
            jobs.append((job_id, int(raw) if raw else None))
        return self.render("status.html", signed, ready=ready, stats=stats, jobs=jobs,
                           lag_ms=(now - oldest) if oldest else 0, now=now)

    # -- audit -------------------------------------------------------------------------
    def _search(self, q: Any, *, limit: int) -> tuple[AuditSearch, list[str]]:
        problems: list[str] = []
        now = self.clock_ms()

        def when(name: str) -> int | None:
            v = (q.get(name) or "").strip()
            if not v:
                return None
            got = parse_when_ms(v, now)
            if got is None:
                problems.append(f"{name}: {v!r} is neither a relative time like 24h nor "
                                "an ISO date")
            return got

        def text(name: str) -> str | None:
            return (q.get(name) or "").strip() or None

        # the keyset of the last row shown: "<ts>.<id>"
        before_ts = before_id = None
        ts_text, _, id_text = (q.get("before") or "").partition(".")
        if _int64(ts_text) is not None and _int64(id_text) is not None:
            before_ts, before_id = _int64(ts_text), _int64(id_text)
        return AuditSearch(since_ms=when("since"), until_ms=when("until"),
                           user_id=text("user"), room_id=text("room"), rule_id=text("rule"),
                           outcome=text("outcome"), actor=text("actor"),
                           before_ts=before_ts, before_id=before_id, limit=limit), problems

    async def audit_page(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        q = request.query
        search, problems = self._search(q, limit=100)
        rows = [] if problems else await self.audit.audit_page(search)
        rows = _for_role(rows, signed)
        keep = {k: q.get(k, "") for k in ("since", "until", "user", "room", "rule",
                                          "outcome", "actor")}
        more = None
        if len(rows) == search.limit:
            last = rows[-1]
            more = "/console/audit?" + urlencode({**keep,
                                                  "before": f"{last['ts']}.{last['id']}"})
        csv_url = "/console/audit.csv?" + urlencode(keep)
        return self.render("audit.html", signed, rows=rows, q=keep, problems=problems,
                           more=more, csv_url=csv_url, status=400 if problems else 200)

    async def audit_csv(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        search, problems = self._search({k: v for k, v in request.query.items()
                                         if k != "before"}, limit=5000)
        if problems:
            return self.render("refused.html", signed, status=400,
                               message="; ".join(problems))
        resp = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="enclave-audit-'
                                   f'{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}.csv"',
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
        await resp.prepare(request)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(AUDIT_COLUMNS)
        total = 0
        while True:
            rows = await self.audit.audit_page(search)
            for r in _for_role(rows, signed):
                writer.writerow([csv_cell(readable_utc(r["ts"]) if c == "ts" else r[c])
                                 for c in AUDIT_COLUMNS])
            total += len(rows)
            await resp.write(buf.getvalue().encode())
            buf.seek(0)
            buf.truncate()
            if len(rows) < search.limit:
                break
            search = AuditSearch(**{**search.__dict__, "before_ts": rows[-1]["ts"],
                                    "before_id": rows[-1]["id"]})
        await self.auth.record(signed, "console.audit_export", "applied",
                               reason=f"{total} audit rows downloaded as CSV",
                               detail=urlencode(dict(request.query)))
        await resp.write_eof()
        return resp

    # -- explain -----------------------------------------------------------------------
    async def explain(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        q = request.query
        what = q.get("what", "")
        a, b, room = (q.get(k, "").strip() for k in ("a", "b", "room"))
        ex, problem = None, ""
        sep = self.separation
        try:
            if what and sep is None:
                problem = "the configuration has no policy: section"
            elif sep is None or not what:
                pass
            elif what == "invite":
                if not (a and b):
                    problem = "give the inviter and the invitee"
                else:
                    ex = await explain_invite(sep, a, b, room or None, self.line_of)
            elif what == "join":
                if not (a and room):
                    problem = "give the user and the room"
                else:
                    ex = await explain_join(sep, a, room, self.line_of)
            elif what == "room":
                if not room:
                    problem = "give the room"
                else:
                    ex = await explain_room(sep, room, self.line_of)
            else:
                problem = "what: invite, join or room"
        except Exception as e:  # an unknown room, the homeserver away: say so
            log.info("console explain %s failed: %s", what, e)
            problem = f"cannot explain: {type(e).__name__}: {e}"
        return self.render("explain.html", signed, ex=ex, problem=problem,
                           q={"what": what, "a": a, "b": b, "room": room},
                           config_path=self.config_path,
                           status=400 if problem else 200)

    # -- separation --------------------------------------------------------------------
    async def separation_page(self, request: web.Request,
                              signed: Signed) -> web.StreamResponse:
        result, error, busy = None, "", False
        if self.separation is not None and request.query.get("plan"):
            separation = self.separation
            try:
                result, busy = await self._one_at_a_time(
                    "separation", lambda: separation.reconcile(apply=False))
            except RuntimeError as e:
                error = str(e)
        return self.render("separation.html", signed, result=result, error=error,
                           applied=False, enabled=self.separation is not None, busy=busy,
                           status=429 if busy else 200)

    async def separation_apply(self, request: web.Request,
                               signed: Signed) -> web.StreamResponse:
        if self.separation is None:
            await self.auth.record(signed, "console.separation_apply", "refused",
                                   reason="no policy: section")
            return self.render("refused.html", signed, status=409,
                               message="the configuration has no policy: section")
        result, error = None, ""
        try:
            result = await self.separation.reconcile(apply=True)
        except RuntimeError as e:
            error = str(e)
        await self.auth.record(
            signed, "console.separation_apply",
            "failed" if error or (result and result.failed) else "applied",
            rule_id="separation.reconcile",
            reason=error or (f"{result.applied} applied, {len(result.failed)} failed"
                             if result else ""))
        return self.render("separation.html", signed, result=result, error=error,
                           applied=True, enabled=True, busy=False)

    # -- directory ---------------------------------------------------------------------
    async def directory_page(self, request: web.Request,
                             signed: Signed) -> web.StreamResponse:
        result, refused, busy = None, None, False
        if self.directory is not None and request.query.get("plan"):
            directory = self.directory
            try:
                result, busy = await self._one_at_a_time(
                    "directory", lambda: directory.run(apply=False))
            except SyncRefused as e:
                refused = e.problems
        return self.render("directory.html", signed, result=result, refused=refused,
                           applied=False, enabled=self.directory is not None, busy=busy,
                           status=429 if busy else 200)

    async def directory_apply(self, request: web.Request,
                              signed: Signed) -> web.StreamResponse:
        if self.directory is None:
            await self.auth.record(signed, "console.directory_apply", "refused",
                                   reason="no directory: section")
            return self.render("refused.html", signed, status=409,
                               message="the configuration has no directory: section")
        result, refused = None, None
        try:
            result = await self.directory.run(apply=True)
        except SyncRefused as e:
            refused = e.problems
        if refused is not None:
            outcome, reason = "refused", "; ".join(refused)
        else:
            assert result is not None
            outcome = "applied" if result.ok else "failed"
            reason = ", ".join(f"{k} {v}" for k, v in sorted(result.applied.items())) \
                or "nothing to do"
        await self.auth.record(signed, "console.directory_apply", outcome,
                               rule_id="directory.sync", reason=reason)
        return self.render("directory.html", signed, result=result, refused=refused,
                           applied=True, enabled=True, busy=False,
                           status=409 if refused is not None else 200)

    # -- legal holds -------------------------------------------------------------------
    async def holds_page(self, request: web.Request, signed: Signed, *, message: str = "",
                         problems: Sequence[str] = (), status: int = 200,
                         form: Any = None) -> web.StreamResponse:
        holds = await self.holds.holds(include_released=bool(request.query.get("all")))
        return self.render("holds.html", signed, holds=holds, message=message,
                           problems=list(problems), enabled=self.retention is not None,
                           form=dict(form or {}), status=status,
                           show_all=bool(request.query.get("all")))

    async def hold_place(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        form = await request.post()
        if self.retention is None:
            await self.auth.record(signed, "hold_add", "refused", reason="no retention:")
            return await self.holds_page(request, signed, status=409,
                                         problems=["the configuration has no retention: "
                                                   "section"])
        def lines(name: str) -> tuple[str, ...]:
            return tuple(x for x in str(form.get(name, "")).split() if x)

        now = self.clock_ms()
        problems = []
        case, reason = str(form.get("case", "")).strip(), str(form.get("reason", "")).strip()
        if not case:
            problems.append("case: give the case or matter id")
        if not reason:
            problems.append("reason: say why the hold is placed")
        since = until = None
        for name in ("since", "until"):
            v = str(form.get(name, "")).strip()
            if v:
                got = parse_when_ms(v, now)
                if got is None:
                    problems.append(f"{name}: {v!r} is neither a relative time nor an ISO date")
                elif name == "since":
                    since = got
                else:
                    until = got
        if problems:
            await self.auth.record(signed, "hold_add", "refused", reason="; ".join(problems))
            return await self.holds_page(request, signed, problems=problems, status=400,
                                         form=form)
        rec = HoldRecord(id=str(form.get("id", "")).strip() or f"hold-{pysecrets.token_hex(4)}",
                         case_id=case, reason=reason, placed_by=signed.user_id,
                         users=lines("users"), rooms=lines("rooms"), since_ms=since,
                         until_ms=until, created_at=now)
        try:
            placed = await self.retention.add_hold(rec, source="console")
        except (HoldCheckFailed, UnknownHoldSubjects, ValueError) as e:
            probs = list(getattr(e, "problems", ())) or [str(e)]
            await self.auth.record(signed, "hold_add", "refused", reason="; ".join(probs),
                                   detail=f"hold {rec.id} case {rec.case_id}")
            return await self.holds_page(request, signed, problems=probs, status=400,
                                         form=form)
        if not placed:
            await self.auth.record(signed, "hold_add", "refused",
                                   reason=f"a hold with id {rec.id!r} exists")
            return await self.holds_page(request, signed, status=409,
                                         problems=[f"a hold with id {rec.id!r} exists"],
                                         form=form)
        return await self.holds_page(request, signed,
                                     message=f"placed hold {rec.id} (case {rec.case_id})")

    async def hold_release(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        form = await request.post()
        hold_id = str(form.get("id", "")).strip()
        reason = str(form.get("reason", "")).strip() or "released"
        if self.retention is None or not hold_id:
            await self.auth.record(signed, "hold_release", "refused",
                                   reason="no retention: section or no hold id")
            return await self.holds_page(request, signed, status=400,
                                         problems=["no hold to release"])
        if not await self.retention.release_hold(hold_id, by=signed.user_id, reason=reason,
                                                 source="console"):
            await self.auth.record(signed, "hold_release", "refused",
                                   reason=f"no active hold {hold_id!r}")
            return await self.holds_page(request, signed, status=404,
                                         problems=[f"no active hold {hold_id!r}"])
        return await self.holds_page(
            request, signed,
            message=f"released hold {hold_id}; its events follow the retention policy again")

    # -- retention ---------------------------------------------------------------------
    async def retention_page(self, request: web.Request,
                             signed: Signed) -> web.StreamResponse:
        room = request.query.get("room", "").strip()
        run, error, busy = None, "", False
        if self.retention is not None and room:
            retention = self.retention
            try:
                run, busy = await self._one_at_a_time("retention", lambda: retention.run(
                    apply=False, rooms=[room], visibility=False))
            except RuntimeError as e:
                error = str(e)
        # the page lists 500 (the store reads no more: a page load costs the same with
        # 100,000 rooms)
        known = await self.retention_rooms.retention_rooms(500) if self.retention else []
        return self.render("retention.html", signed, room=room, run=run, error=error,
                           known=known, enabled=self.retention is not None, busy=busy,
                           status=429 if busy else 200)

    # -- inbox -------------------------------------------------------------------------
    async def inbox_page(self, request: web.Request, signed: Signed, *,
                         message: str = "") -> web.StreamResponse:
        parked = await self.inbox.list_events("parked", 200)
        quarantined = await self.inbox.list_quarantine(200)
        stats = await self.inbox.inbox_stats()
        return self.render("inbox.html", signed, parked=parked, quarantined=quarantined,
                           stats=stats, message=message)

    async def requeue(self, request: web.Request, signed: Signed) -> web.StreamResponse:
        form = await request.post()
        raw = [str(v) for v in form.getall("seq", [])]
        seqs = [n for n in map(_int64, raw) if n is not None]
        if len(seqs) > 200:  # the page lists 200: a bigger form is not from it
            await self.auth.record(signed, "console.inbox_requeue", "refused",
                                   reason=f"{len(seqs)} events chosen (at most 200)")
            return await self.inbox_page(request, signed,
                                         message="choose at most 200 events at a time")
        if not seqs:
            await self.auth.record(signed, "console.inbox_requeue", "refused",
                                   reason="no event chosen")
            return await self.inbox_page(request, signed, message="choose events to requeue")
        n = await self.inbox.requeue_parked(seqs)
        await self.auth.record(signed, "console.inbox_requeue", "applied",
                               reason=f"requeued {n} parked event(s)",
                               detail="seq " + " ".join(map(str, seqs)))
        return await self.inbox_page(
            request, signed, message=f"requeued {n} parked event(s); the leader picks "
                                     "them up")

    # -- extensions' pages -------------------------------------------------------------
    def _extension(self, p: ConsolePage) -> Handler:
        async def handle(request: web.Request, signed: Signed) -> web.StreamResponse:
            form: dict[str, str] = {}
            if request.method == "POST":
                form = {k: str(v) for k, v in (await request.post()).items()}
            view = await p.handler(ConsoleRequest(
                method=request.method, actor=signed.user_id,
                roles=frozenset(signed.access.roles), query=dict(request.query), form=form,
                csrf=signed.csrf, base=f"/console/x/{p.path}"))
            if request.method == "POST":
                await self.auth.record(signed, f"console.{p.path}", view.outcome,
                                       reason=f"POST {p.title}", detail=view.detail)
            if view.csv is not None:
                name, text = view.csv
                # the file name may carry an id from the query: only plain characters
                safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_"
                               for c in name) or "download.csv"
                return web.Response(text=text, content_type="text/csv", headers={
                    "Content-Disposition": f'attachment; filename="{safe}"',
                    "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
            return self.render("extension.html", signed, title=p.title,
                               body=jinja2.utils.markupsafe.Markup(view.body_html))

        return handle


def _int64(text: str) -> int | None:
    """A whole number the store's 64-bit integer columns hold, or None: ASCII digits only
    (``"²".isdigit()`` is true, and ``int("²")`` raises)."""
    if not 0 < len(text) <= 19 or not text.isascii() or not text.isdigit():
        return None
    n = int(text)
    return n if n <= INT64_MAX else None


def _control_chars(*sources: Any) -> str | None:
    """The name of the first query or form field holding NUL or another control character
    (tab and line breaks allowed: the hold form's lists are one per line), else None."""
    for source in sources:
        for k, v in source.items():
            if isinstance(v, str) and any(
                    (ord(c) < 32 and c not in "\t\r\n") or ord(c) == 127 for c in v):
                return str(k)
    return None


def _for_role(rows: list[dict[str, Any]], signed: Signed) -> list[dict[str, Any]]:
    """Audit rows as ``signed`` may see them: the reason and detail of a legal hold's
    record (its case, people and rooms) only for the legal role, as the holds page."""
    if signed.access.has("legal"):
        return rows
    return [{**r, "reason": LEGAL_ONLY, "detail": LEGAL_ONLY}
            if r.get("kind") in HOLD_KINDS or r.get("rule_id") == HOLD_RULE else r
            for r in rows]


def _redirect(location: str) -> web.Response:
    # returned, not raised: the appservice's error middleware answers raised HTTP
    # exceptions in JSON
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
