"""Wire Enclave's services once and serve them (aiohttp ``cleanup_ctx`` for lifetimes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from apscheduler.jobstores.base import JobLookupError

from .config import ConfigError, LoadedConfig, Secret, load_config
from .extension import Extension, JobReport, ScheduledJob
from .kernel.retry import RECONNECT
from .matrix.appservice import AppserviceAPI, json_errors
from .matrix.client import HomeserverUnavailable, MatrixRequestError
from .matrix.inbox import EventHandler
from .root import IdentityState, Root, Services, load_handler_factories, wall_clock_ms
from .store.single import SingleProcessLock

__all__ = ["SERVICES", "IdentityState", "Root", "Services", "build_app",
           "load_handler_factories", "wall_clock_ms"]

log = logging.getLogger(__name__)


class Bootstrap:
    """Makes sure the homeserver answers, Enclave's users exist, and pings it (backlog)."""

    def __init__(self, svc: Services):
        self.svc = svc

    async def run_forever(self) -> None:
        attempt = 0
        while True:
            try:
                await self.run_once()
                self.svc.bootstrapped.set()
                return
            except (HomeserverUnavailable, MatrixRequestError, aiohttp.ClientError) as e:
                attempt += 1
                delay = RECONNECT.delay(attempt)
                log.warning("start-up against the homeserver incomplete (%s); retry in %.0fs",
                            e, delay)
                await asyncio.sleep(delay)

    async def run_once(self) -> None:
        svc, cfg = self.svc, self.svc.config
        ident = svc.identity
        await svc.client.versions()
        ident.homeserver_reachable = True
        ident.homeserver_checked_at = time.monotonic()
        await self.ensure_bot()
        await self.ensure_admin()
        txn = "enclave-startup-" + pysecrets.token_hex(8)
        try:
            await svc.client.ping_appservice(cfg.appservice.id, txn)
            ident.pinged = True
            log.info("homeserver pinged us: backlog, if any, is being retried")
        except MatrixRequestError as e:
            log.warning("appservice ping failed (%s); the homeserver may not reach %s",
                        e, cfg.appservice.public_url)

    async def ensure_bot(self) -> None:
        svc, cfg = self.svc, self.svc.config
        created = await svc.client.register_appservice_user(cfg.appservice.bot_localpart)
        if created:
            log.info("registered Enclave's bot %s", cfg.bot_user_id)
        name = cfg.appservice.bot_displayname
        if await svc.client.get_displayname(cfg.bot_user_id) != name:
            await svc.client.set_displayname(cfg.bot_user_id, name)
        svc.identity.bot_ready = True

    async def ensure_admin(self) -> None:
        svc, cfg = self.svc, self.svc.config
        admin = cfg.admin_user_id
        ident = svc.identity
        exists = True
        try:
            await svc.client.whoami(admin)
        except MatrixRequestError as e:
            if e.status not in (401, 403):
                raise
            exists = False
        if not exists:
            secret = svc.secrets.get("homeserver.registration_shared_secret")
            if secret is not None:
                # The password is random and thrown away: Enclave acts as this user through
                # the appservice token, nobody logs in with it.
                await svc.client.shared_secret_register(
                    cfg.appservice.admin_localpart, pysecrets.token_urlsafe(32), secret.get(),
                    admin=True,
                )
                log.info("created Enclave's admin identity %s (shared-secret registration)",
                         admin)
            else:
                await svc.client.register_appservice_user(cfg.appservice.admin_localpart)
        try:
            await svc.client.admin_get_user(admin, admin=admin)
            ident.admin_ready, ident.admin_problem = True, None
        except MatrixRequestError as e:
            ident.admin_ready = False
            ident.admin_problem = (
                f"{admin} is not a homeserver admin ({e.errcode}); make it one, e.g. "
                f"PUT /_synapse/admin/v2/users/{admin} {{\"admin\": true}} as an admin, or set "
                "homeserver.registration_shared_secret before its first start"
            )
            log.warning("%s", ident.admin_problem)


SERVICES = web.AppKey("services", Services)


def reload_policy(svc: Services) -> tuple[bool, str]:
    """Re-read the config file and use its ``policy:`` and ``retention:`` sections; a file
    that fails validation is refused and the running policy stays."""
    if svc.loaded.path is None:
        return False, "the running configuration did not come from a file"
    try:
        new = load_config(svc.loaded.path)
    except ConfigError as e:
        log.error("policy reload refused, the running policy stays: %s", e)
        return False, str(e)
    if svc.separation is None:
        return False, "separation is not running (no policy: section at start-up)"
    if new.config.policy is None:
        msg = "the new file has no policy: section; the running policy stays"
        log.error("policy reload refused: %s", msg)
        return False, msg
    svc.separation.replace_config(new.config.policy)
    if svc.retention is not None and new.config.retention is not None:
        svc.retention.replace_config(new.config.retention)
    log.info("policy reloaded from %s", svc.loaded.path)
    return True, "policy reloaded"


def _reload_route(svc: Services, token: str) -> Callable[[web.Request], Any]:
    async def reload(request: web.Request) -> web.Response:
        got = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not pysecrets.compare_digest(got.encode(), token.encode()):
            return web.json_response({"errcode": "M_UNKNOWN_TOKEN", "error": "bad token"},
                                     status=401)
        ok, message = reload_policy(svc)
        return web.json_response({"reloaded": ok, "message": message},
                                 status=200 if ok else 422)

    return reload


async def _homeserver_ok(svc: Services) -> bool:
    ident = svc.identity
    if time.monotonic() - ident.homeserver_checked_at < 5:
        return ident.homeserver_reachable
    error: str | None = None
    try:
        async with svc.session.get(
            svc.client.base_url + "/_matrix/client/versions",
            timeout=aiohttp.ClientTimeout(total=2),
        ) as resp:
            ok = resp.status == 200
            if not ok:
                error = f"GET /_matrix/client/versions answered {resp.status}"
    except TimeoutError:
        ok, error = False, "no answer within 2 s"
    except (aiohttp.ClientError, OSError) as e:
        ok, error = False, f"{type(e).__name__}: {e}"
    ident.homeserver_reachable, ident.homeserver_checked_at = ok, time.monotonic()
    ident.homeserver_error = error
    if not ok and svc.completeness is not None:
        svc.completeness.homeserver_unreachable()
    return ok


def interval_job(svc: Services, job: ScheduledJob) -> Callable[..., Any]:
    """A ``cleanup_ctx`` for a scheduled job that runs on the leading replica only.

    Every ``minutes`` (the root's APScheduler; one run at a time, missed runs merged; 0:
    never) the leader runs ``run("scheduled")``; the others skip. When this process
    becomes leader (once Enclave is bootstrapped) it runs ``run("start-up")`` the first
    time if ``at_start``, and ``run("takeover")`` whenever the last run by any replica
    (store key ``job-last:<id>``) is older than the interval: a dead leader's jobs are not
    left waiting for the next tick.

    Each run is counted by outcome (``enclave_job_runs_total{name,outcome}``, the last
    success and failure times) and logged in one line when it changed something or did
    not end ``ok``; its start and end are DEBUG lines (``logging.loggers: {bridge.app:
    DEBUG}`` shows which replica ran which job when).
    """
    job_id, minutes, run, at_start = job.id, job.minutes, job.run, job.at_start
    leadership, metrics = svc.leadership, svc.metrics
    last_key = f"job-last:{job_id}"

    async def run_recorded(reason: str) -> None:
        if not leadership.is_leader:
            log.debug("%s (%s) skipped: another replica leads", job_id, reason)
            return
        log.debug("job %s (%s) starts on %s", job_id, reason, leadership.name)
        started = time.monotonic()
        error: Exception | None = None
        try:
            got = await run(reason)
            report = got if isinstance(got, JobReport) else JobReport()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error, report = e, JobReport("failed", f"{type(e).__name__}: {e}")
        finally:
            log.debug("job %s (%s) ends on %s", job_id, reason, leadership.name)
        seconds = time.monotonic() - started
        metrics.record_job(job_id, report.outcome, svc.clock_ms() / 1000, seconds)
        if report.outcome == "ok":
            level = logging.INFO if report.summary else logging.DEBUG
        else:
            level = logging.DEBUG if report.outcome == "skipped" else logging.WARNING
        log.log(level, "job %s (%s): %s in %.1fs%s", job_id, reason, report.outcome, seconds,
                f": {report.summary}" if report.summary else "",
                exc_info=error,  # the traceback of a run that raised, on the same line
                extra={"job": job_id, "reason": reason, "outcome": report.outcome,
                       "seconds": round(seconds, 3), "replica": leadership.name})
        await svc.stores.kv.set_kv(last_key, str(svc.clock_ms()))

    async def on_elected(first: bool) -> None:
        await svc.bootstrapped.wait()
        if first and at_start:
            await run_recorded("start-up")
            return
        if minutes <= 0:
            return
        raw = await svc.stores.kv.get_kv(last_key)
        if raw is None:
            # never ran anywhere: the interval starts now (an at_start job ran above)
            await svc.stores.kv.set_kv(last_key, str(svc.clock_ms()))
        elif svc.clock_ms() - int(raw) >= minutes * 60_000:
            await run_recorded("takeover")

    async def ctx(_: web.Application) -> AsyncIterator[None]:
        if minutes <= 0 and not at_start:
            yield
            return
        metrics.job_known(job_id)
        scheduler = svc.scheduler
        tasks: set[asyncio.Task[None]] = set()

        async def start_on_election() -> None:
            task = asyncio.create_task(on_elected(leadership.elections == 1),
                                       name=f"{job_id}-elected")
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        leadership.on_elected.append(start_on_election)
        if leadership.is_leader:
            await start_on_election()  # elected before this context was entered
        if minutes > 0:
            scheduler.add_job(run_recorded, "interval", args=["scheduled"], minutes=minutes,
                              id=f"job:{job_id}", max_instances=1, coalesce=True,
                              misfire_grace_time=max(1, int(minutes * 60)),
                              replace_existing=True)
        yield
        leadership.on_elected.remove(start_on_election)
        if minutes > 0:
            with contextlib.suppress(JobLookupError):
                scheduler.remove_job(f"job:{job_id}")
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return ctx


def scheduler_ctx(svc: Services) -> Callable[..., Any]:
    """A ``cleanup_ctx`` that starts the root's one APScheduler and shuts it down last."""

    async def ctx(_: web.Application) -> AsyncIterator[None]:
        scheduler = svc.scheduler
        scheduler.start()
        yield
        if scheduler.running:
            scheduler.shutdown(wait=False)

    return ctx


async def build_app(
    loaded: LoadedConfig,
    secrets: dict[str, Secret],
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
    extra_handlers: Sequence[Callable[[Services], EventHandler]] = (),
    extensions: Sequence[Extension] | None = None,
    migrate: bool = True,
) -> web.Application:
    """Map the composition root onto an aiohttp application: its routes, and lifetimes
    (``cleanup_ctx``) for the store, the homeserver session, leadership, start-up, SCIM,
    the scheduled jobs and the extensions."""
    svc = Root(loaded, secrets, clock_ms=clock_ms, extensions=extensions,
               extra_handlers=extra_handlers)
    return mount_root(svc, migrate=migrate)


def mount_root(svc: Root, *, migrate: bool = True) -> web.Application:
    """The aiohttp application of a root (see :func:`build_app`)."""
    cfg, secrets = svc.config, svc.secrets
    stores, client, inbox, leadership = svc.stores, svc.client, svc.inbox, svc.leadership
    database = stores.database
    jobs, plugins = svc.jobs, svc.plugins
    _ = svc.completeness  # built now: the client tells it of outages from the first request

    async def ready() -> dict[str, Any]:
        store_ok, store_err = True, None
        try:
            await database.ping()
        except Exception as e:
            store_ok, store_err = False, str(e)
        hs_ok = await _homeserver_ok(svc)
        return {
            "ready": store_ok and hs_ok,
            "store": {"ok": store_ok, "error": store_err, "engine": database.dialect},
            "homeserver": {"ok": hs_ok, "url": cfg.homeserver.url,
                           "error": None if hs_ok else svc.identity.homeserver_error},
            "bot": svc.identity.bot_ready,
            "admin": {"ok": svc.identity.admin_ready, "problem": svc.identity.admin_problem},
            "directory": svc.directory_status if svc.directory is not None else None,
            "separation": svc.separation_status if svc.separation is not None else None,
            "retention": svc.retention_status if svc.retention is not None else None,
            "cluster": leadership.status(),
            "completeness": (svc.completeness.status() if svc.completeness is not None
                             else None),
            "audit_stream": (svc.audit_stream.status() if svc.audit_stream is not None
                             else None),
        }

    async def user_exists(user_id: str) -> bool:
        return svc.identity.bot_ready and user_id in (cfg.bot_user_id, cfg.admin_user_id)

    api = AppserviceAPI(
        stores.journal, stores.inbox, svc.metrics, hs_token=secrets["appservice.hs_token"].get(),
        on_new_events=inbox.notify, user_exists=user_exists, ready=ready,
        clock_ms=svc.clock_ms, on_request=inbox.note_ingest,
        on_refused=lambda: _spawn(ping_soon()),
    )
    app = web.Application(middlewares=[json_errors], client_max_size=cfg.appservice.max_body_bytes)
    app[SERVICES] = svc
    app.add_routes(api.routes())
    if svc.gate is not None:
        svc.gate.add_routes(app)
    app.router.add_post("/_enclave/admin/v1/reload",
                        _reload_route(svc, secrets["appservice.as_token"].get()))
    if svc.scim is not None:
        svc.scim.add_routes(app)
    if svc.console is not None:
        svc.console.add_routes(app, ready)

    background: set[asyncio.Task[Any]] = set()

    def _spawn(coro: Any) -> None:
        task = asyncio.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    async def ping_soon() -> None:
        # after our 503 reached the homeserver: the ping makes its recoverer run at once
        await asyncio.sleep(0.5)
        try:
            await client.ping_appservice(cfg.appservice.id, "enclave-sweep-" +
                                         pysecrets.token_hex(6))
        except (MatrixRequestError, HomeserverUnavailable) as e:
            log.warning("recovery sweep ping failed (%s); the homeserver retries on its own", e)

    async def recovery_sweeps() -> None:
        # Synapse can strand a transaction created while it catches up after our downtime
        # (docs/operators/known-issues.md); a later recovery delivers it. Start-up is such a time.
        waited = 0.0
        for delay in cfg.inbox.recovery_sweeps_seconds:
            await asyncio.sleep(delay - waited)
            waited = delay
            api.request_recovery_sweep()

    async def store_ctx(_: web.Application) -> AsyncIterator[None]:
        # a SQLite store has one writer process: a second `enclave run` is refused here
        single = SingleProcessLock.for_database(database)
        if single is not None:
            single.acquire()
        try:
            await svc.open_store(migrate=migrate, create_installation_id=True)
            if svc.config.retention is not None and svc.archive is not None:
                # an S3 bucket without versioning and Object Lock refuses the start
                await svc.archive.check()
        except BaseException:
            if single is not None:
                single.release()
            raise
        yield
        await svc.close_archive()
        await database.close()
        if single is not None:
            single.release()

    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        # shutting down: the homeserver may be gone, do not wait long for it
        await svc.close_client(wait_seconds=5)

    async def leadership_ctx(_: web.Application) -> AsyncIterator[None]:
        # the leader processes the inbox; every replica journals the homeserver's
        # transactions, and the leader hears of those others took (PostgreSQL NOTIFY)
        leadership.on_elected.append(inbox.start)

        async def stop_inbox() -> None:
            # done before the lease can expire (the leader steps down at 3/4 of the ttl),
            # so a successor never works beside a room worker finishing its event
            await inbox.stop(grace_seconds=min(10.0, leadership.ttl_ms / 5000))

        leadership.on_deposed.append(stop_inbox)
        stop_watch = await stores.journal.watch_journal(inbox.notify)
        await leadership.start()
        checking: asyncio.Task[None] | None = None
        if svc.completeness is not None:
            check = svc.completeness

            async def check_while_leading() -> None:
                await check.run_forever(svc.bootstrapped.wait)

            checking = asyncio.create_task(leadership.while_leader(check_while_leading),
                                           name="completeness-check")
        streaming: asyncio.Task[None] | None = None
        if svc.audit_stream is not None:
            # the leader only: one reader per sink keeps every sink's order
            streaming = asyncio.create_task(leadership.while_leader(svc.audit_stream.run),
                                            name="audit-stream")
        yield
        for task in (checking, streaming):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await leadership.stop()
        await stop_watch()

    async def bootstrap_ctx(_: web.Application) -> AsyncIterator[None]:
        # after start-up, so the homeserver's ping reaches a listening socket
        task = asyncio.create_task(Bootstrap(svc).run_forever(), name="bootstrap")
        sweeps = asyncio.create_task(recovery_sweeps(), name="recovery-sweeps")
        yield
        for t in (task, sweeps, *background):
            t.cancel()
        await asyncio.gather(task, sweeps, *background, return_exceptions=True)

    async def scim_ctx(_: web.Application) -> AsyncIterator[None]:
        if svc.scim is not None:
            await svc.scim.load()  # what identity providers provisioned before, from the store
        yield
        if svc.scim_debounce is not None:
            await svc.scim_debounce.close()

    # the scheduler first: every job and bot timer is removed before it shuts down
    app.cleanup_ctx.extend([scheduler_ctx(svc), session_ctx, store_ctx, leadership_ctx,
                            bootstrap_ctx, scim_ctx])
    app.cleanup_ctx.extend(interval_job(svc, job) for job in jobs)
    # extensions (bots): registered last, so they stop before the store
    for plugin in plugins:
        if plugin.mount is not None:
            plugin.mount(app)
        if plugin.lifetime is not None:
            app.cleanup_ctx.append(plugin.lifetime)
    return app
