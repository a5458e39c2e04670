"""Wire Enclave's services once and serve them (aiohttp ``cleanup_ctx`` for lifetimes)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .cluster import Leadership, replica_name
from .config import LoadedConfig, Secret
from .directory.build import Debouncer, build_directory_sync
from .directory.sync import DirectorySync, SyncRefused
from .matrix.appservice import AppserviceAPI, json_errors
from .matrix.client import HomeserverUnavailable, MatrixClient, MatrixRequestError
from .matrix.completeness import CompletenessCheck
from .matrix.executor import Executor
from .matrix.inbox import EventHandler, FunctionHandler, InboxProcessor
from .metrics import Metrics
from .retention.build import build_retention, classifier_of
from .retention.service import RetentionService
from .separation.build import build_separation
from .separation.service import SeparationService
from .store import Store, open_store
from .store.single import SingleProcessLock

log = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class IdentityState:
    """What start-up learned about the homeserver and Enclave's own users."""

    homeserver_reachable: bool = False
    homeserver_checked_at: float = 0.0
    homeserver_error: str | None = None
    bot_ready: bool = False
    admin_ready: bool = False
    admin_problem: str | None = None
    pinged: bool = False


@dataclass
class Services:
    """Everything a running Enclave holds; handlers and the CLI receive this."""

    loaded: LoadedConfig
    secrets: dict[str, Secret]
    store: Store
    metrics: Metrics
    session: aiohttp.ClientSession
    client: MatrixClient
    executor: Executor
    inbox: InboxProcessor
    clock_ms: Callable[[], int]
    leadership: Leadership
    identity: IdentityState = field(default_factory=IdentityState)
    directory: DirectorySync | None = None
    # the last directory sync run: {"at": ms, "outcome": ok|partial|refused|error, ...}
    directory_status: dict[str, Any] = field(default_factory=dict)
    # set once start-up has made Enclave's bot and admin identity ready
    bootstrapped: asyncio.Event = field(default_factory=asyncio.Event)
    separation: SeparationService | None = None
    # the last separation reconciliation: {"at": ms, "outcome": ..., ...}
    separation_status: dict[str, Any] = field(default_factory=dict)
    retention: RetentionService | None = None
    # the last scheduled retention run: {"at": ms, "outcome": ..., ...}
    retention_status: dict[str, Any] = field(default_factory=dict)
    completeness: CompletenessCheck | None = None

    @property
    def config(self) -> Any:
        return self.loaded.config


def load_handler_factories(refs: Sequence[str]) -> list[Callable[[Services], EventHandler]]:
    """Import 'module:callable' handler factories named in ``inbox.handlers``."""
    out = []
    for ref in refs:
        mod_name, _, attr = ref.partition(":")
        try:
            mod = importlib.import_module(mod_name)
            out.append(getattr(mod, attr))
        except (ImportError, AttributeError) as e:
            raise RuntimeError(f"inbox.handlers: cannot load {ref!r}: {e}") from e
    return out


def build_store(loaded: LoadedConfig, secrets: dict[str, Secret]) -> Store:
    db = loaded.config.database
    pw = secrets.get("database.password")
    return open_store(
        db.url, base_dir=loaded.base_dir, password=pw.get() if pw else None,
        sqlite_synchronous=db.sqlite_synchronous, pool_size=db.pool_size,
    )


class Bootstrap:
    """Makes sure the homeserver answers, Enclave's users exist, and pings it (backlog)."""

    def __init__(self, svc: Services):
        self.svc = svc

    async def run_forever(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.run_once()
                self.svc.bootstrapped.set()
                return
            except (HomeserverUnavailable, MatrixRequestError, aiohttp.ClientError) as e:
                log.warning("start-up against the homeserver incomplete (%s); retry in %.0fs",
                            e, delay)
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)

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


async def _allow_without_policy(req: Any) -> Any:
    from .gate.protocol import GateAnswer

    return GateAnswer(allow=True, rule_id="policy.absent", reason="no policy: section")


def reload_policy(svc: Services) -> tuple[bool, str]:
    """Re-read the config file and use its ``policy:`` and ``retention:`` sections; a file
    that fails validation is refused and the running policy stays."""
    from .config import ConfigError, load_config

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


async def _job_status(svc: Services, what: str, reason: str,
                      work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any] | None:
    """Run a scheduled job that needs Enclave's admin identity and return the status
    ``/ready`` shows ({"reason", "outcome", ..., "at"}); None when it was skipped."""
    if not svc.identity.admin_ready:
        log.warning("%s (%s) skipped: %s", what, reason,
                    svc.identity.admin_problem or "admin identity not ready yet")
        return None
    status: dict[str, Any] = {"reason": reason}
    try:
        status.update(await work())
    except Exception as e:
        status.update(outcome="error", error=f"{type(e).__name__}: {e}")
        log.exception("%s (%s) failed", what, reason)
    status["at"] = svc.clock_ms()
    return status


def _interval_job(svc: Services, job_id: str, minutes: float,
                  run: Callable[[str], Awaitable[None]], *,
                  at_start: bool = True) -> Callable[..., Any]:
    """A ``cleanup_ctx`` for a scheduled job that runs on the leading replica only.

    Every ``minutes`` (APScheduler; one run at a time, missed runs merged; 0: never) the
    leader runs ``run("scheduled")``; the others skip. When this process becomes leader
    (once Enclave is bootstrapped) it runs ``run("start-up")`` the first time if
    ``at_start``, and ``run("takeover")`` whenever the last run by any replica (store
    key ``job-last:<id>``) is older than the interval: a dead leader's jobs are not left
    waiting for the next tick.
    """
    leadership = svc.leadership
    last_key = f"job-last:{job_id}"

    async def run_recorded(reason: str) -> None:
        if not leadership.is_leader:
            log.debug("%s (%s) skipped: another replica leads", job_id, reason)
            return
        # the start and end lines let an operator (and the replica tests) see which
        # replica ran which job when
        log.info("job %s (%s) starts on %s", job_id, reason, leadership.name)
        try:
            await run(reason)
        finally:
            log.info("job %s (%s) ends on %s", job_id, reason, leadership.name)
        await svc.store.set_kv(last_key, str(svc.clock_ms()))

    async def on_elected(first: bool) -> None:
        await svc.bootstrapped.wait()
        if first and at_start:
            await run_recorded("start-up")
            return
        if minutes <= 0:
            return
        raw = await svc.store.get_kv(last_key)
        if raw is None:
            # never ran anywhere: the interval starts now (an at_start job ran above)
            await svc.store.set_kv(last_key, str(svc.clock_ms()))
        elif svc.clock_ms() - int(raw) >= minutes * 60_000:
            await run_recorded("takeover")

    async def ctx(_: web.Application) -> AsyncIterator[None]:
        if minutes <= 0 and not at_start:
            yield
            return
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler()
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
                              id=job_id, max_instances=1, coalesce=True,
                              misfire_grace_time=int(minutes * 60))
            scheduler.start()
        yield
        leadership.on_elected.remove(start_on_election)
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if scheduler.running:
            scheduler.shutdown(wait=False)

    return ctx


async def build_app(
    loaded: LoadedConfig,
    secrets: dict[str, Secret],
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
    extra_handlers: Sequence[Callable[[Services], EventHandler]] = (),
    migrate: bool = True,
) -> web.Application:
    """Build the aiohttp app with every service wired through constructors."""
    cfg = loaded.config
    metrics = Metrics()
    store = build_store(loaded, secrets)
    session = aiohttp.ClientSession(json_serialize=None)
    client = MatrixClient(
        session, cfg.homeserver.url, secrets["appservice.as_token"].get(),
        max_retries=cfg.homeserver.max_retries, timeout=cfg.homeserver.timeout_seconds,
        on_rate_limited=metrics.rate_limited.inc,
    )
    executor = Executor(client, store, bot_user_id=cfg.bot_user_id, clock_ms=clock_ms,
                        metrics=metrics,
                        admin_user_id=cfg.admin_user_id)
    inbox = InboxProcessor(store, executor, [], cfg.inbox, metrics, clock_ms)
    leadership = Leadership(store, replica_name(cfg.cluster.replica_name), clock_ms,
                            cfg.cluster.lease_ttl_seconds * 1000,
                            on_change=lambda leader: metrics.leader.set(int(leader)),
                            # SQLite: the store's lock already makes this the only process
                            exclusive=store.dialect == "sqlite")
    svc = Services(loaded, secrets, store, metrics, session, client, executor, inbox, clock_ms,
                   leadership)
    for factory in [*load_handler_factories(cfg.inbox.handlers), *extra_handlers]:
        inbox.handlers.append(factory(svc))
    svc.directory = build_directory_sync(loaded, secrets, store=store, client=client,
                                         executor=executor, metrics=metrics, clock_ms=clock_ms)
    svc.separation = build_separation(loaded, store=store, client=client, executor=executor,
                                      metrics=metrics, clock_ms=clock_ms)
    if svc.separation is not None:
        inbox.handlers.append(FunctionHandler("separation", svc.separation.handle_event))
        if svc.directory is not None:
            svc.directory.on_view_change = svc.separation.invalidate
            svc.directory.room_edits = svc.separation.managed_room_edits
    svc.retention = build_retention(loaded, store=store, client=client, executor=executor,
                                    metrics=metrics, clock_ms=clock_ms,
                                    classify=classifier_of(svc.separation))
    for job in (svc.directory, svc.separation, svc.retention):
        if job is not None:
            job.lease_ttl_ms = leadership.ttl_ms
    if svc.retention is not None:
        retention = svc.retention
        # archive first: what the other handlers do must not keep an event from the archive
        inbox.handlers.insert(0, FunctionHandler("retention", retention.handle_event))
        if svc.separation is not None:
            svc.separation.creation_state = retention.creation_state

    if cfg.inbox.completeness.enabled:
        svc.completeness = check = CompletenessCheck(
            store, client, metrics, admin_user_id=cfg.admin_user_id,
            bound_seconds=cfg.inbox.completeness.bound_seconds, clock_ms=clock_ms,
            on_recovered=inbox.notify, admin_ready=lambda: svc.identity.admin_ready)
        client.on_unreachable = check.homeserver_unreachable

    async def ready() -> dict[str, Any]:
        store_ok, store_err = True, None
        try:
            await store.ping()
        except Exception as e:
            store_ok, store_err = False, str(e)
        hs_ok = await _homeserver_ok(svc)
        return {
            "ready": store_ok and hs_ok,
            "store": {"ok": store_ok, "error": store_err, "engine": store.dialect},
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
        }

    async def user_exists(user_id: str) -> bool:
        return svc.identity.bot_ready and user_id in (cfg.bot_user_id, cfg.admin_user_id)

    api = AppserviceAPI(
        store, metrics, hs_token=secrets["appservice.hs_token"].get(),
        on_new_events=inbox.notify, user_exists=user_exists, ready=ready, clock_ms=clock_ms,
        on_request=inbox.note_ingest, on_refused=lambda: _spawn(ping_soon()),
    )
    app = web.Application(middlewares=[json_errors], client_max_size=cfg.appservice.max_body_bytes)
    app[SERVICES] = svc
    app.add_routes(api.routes())
    if cfg.gate is not None:
        from .gate.service import GateService

        GateService(secret=secrets["gate.secret"].get(),
                    decide=svc.separation.decide_gate if svc.separation is not None
                    else _allow_without_policy, metrics=metrics).add_routes(app)
    app.router.add_post("/_enclave/admin/v1/reload",
                        _reload_route(svc, secrets["appservice.as_token"].get()))

    async def directory_run(reason: str) -> None:
        assert svc.directory is not None
        if not svc.identity.admin_ready:
            log.warning("directory sync (%s) skipped: %s", reason,
                        svc.identity.admin_problem or "admin identity not ready yet")
            return
        status: dict[str, Any] = {"reason": reason}
        try:
            result = await svc.directory.run()
            status.update(outcome="ok" if result.ok else "partial", applied=result.applied,
                          failed=len(result.failed), findings=len(result.plan.findings))
            if result.ok:
                metrics.directory_last_success.set(clock_ms() / 1000)
        except SyncRefused as e:
            # logged and counted by the sync itself; nothing changed
            status.update(outcome="refused", problems=e.problems)
        except Exception as e:
            status.update(outcome="error", error=f"{type(e).__name__}: {e}")
            log.exception("directory sync (%s) failed", reason)
        status["at"] = clock_ms()
        svc.directory_status = status
        if svc.separation is not None:
            svc.separation.invalidate()  # staff, groups and leavers may have changed

    scim_debounce: Debouncer | None = None
    scim: Any = None
    dcfg = cfg.directory
    if dcfg is not None and dcfg.source.type == "scim":
        from .directory.scim import ScimService

        scim_debounce = Debouncer(dcfg.source.debounce_seconds,
                                  lambda: directory_run("SCIM change"))
        scim = ScimService(store, token=secrets["directory.source.token"].get(),
                           path_prefix=dcfg.source.path_prefix, clock_ms=clock_ms,
                           on_change=scim_debounce.trigger)
        scim.add_routes(app)

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
        # (README, "Known issues"); a later recovery delivers it. Start-up is such a time.
        waited = 0.0
        for delay in cfg.inbox.recovery_sweeps_seconds:
            await asyncio.sleep(delay - waited)
            waited = delay
            api.request_recovery_sweep()

    async def store_ctx(_: web.Application) -> AsyncIterator[None]:
        # a SQLite store has one writer process: a second `enclave run` is refused here
        single = SingleProcessLock.for_store(store)
        if single is not None:
            single.acquire()
        try:
            await store.open()
        except BaseException:
            if single is not None:
                single.release()
            raise
        if migrate:
            applied = await store.migrate()
            if applied:
                log.info("database migrated to version %d", applied[-1])
        await store.check_schema()
        iid = await store.get_kv("installation_id")
        if iid is None:
            iid = pysecrets.token_hex(8)
            await store.set_kv("installation_id", iid)
        executor.installation_id = iid
        yield
        await store.close()
        if single is not None:
            single.release()

    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        try:  # shutting down: the homeserver may be gone, do not wait long for it
            await asyncio.wait_for(client.close_sessions(), timeout=5)
        except Exception as e:
            log.info("admin session not logged out at shutdown: %s", e)
        await session.close()

    async def leadership_ctx(_: web.Application) -> AsyncIterator[None]:
        # the leader processes the inbox; every replica journals the homeserver's
        # transactions, and the leader hears of those others took (PostgreSQL NOTIFY)
        leadership.on_elected.append(inbox.start)

        async def stop_inbox() -> None:
            # done before the lease can expire (the leader steps down at 3/4 of the ttl),
            # so a successor never works beside a room worker finishing its event
            await inbox.stop(grace_seconds=min(10.0, leadership.ttl_ms / 5000))

        leadership.on_deposed.append(stop_inbox)
        stop_watch = await store.watch_journal(inbox.notify)
        await leadership.start()
        checking: asyncio.Task[None] | None = None
        if svc.completeness is not None:
            check = svc.completeness

            async def check_while_leading() -> None:
                await check.run_forever(svc.bootstrapped.wait)

            checking = asyncio.create_task(leadership.while_leader(check_while_leading),
                                           name="completeness-check")
        yield
        if checking is not None:
            checking.cancel()
            await asyncio.gather(checking, return_exceptions=True)
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
        if scim is not None:
            await scim.load()  # what identity providers provisioned before, from the store
        yield
        if scim_debounce is not None:
            await scim_debounce.close()

    directory_ctx = _interval_job(
        svc, "directory-sync", dcfg.interval_minutes if svc.directory and dcfg else 0,
        directory_run, at_start=bool(svc.directory and dcfg and dcfg.sync_on_start))

    async def separation_run(reason: str) -> None:
        assert svc.separation is not None
        sep = svc.separation

        async def reconcile() -> dict[str, Any]:
            result = await sep.reconcile(apply=True)
            return dict(outcome="ok" if not result.failed else "partial",
                        rooms=result.plan.rooms, applied=result.applied,
                        failed=len(result.failed), findings=len(result.plan.findings))

        status = await _job_status(svc, "separation reconciliation", reason, reconcile)
        if status is not None:
            svc.separation_status = status

    sep_minutes = svc.separation.config.reconcile.interval_minutes if svc.separation else 0
    separation_ctx = _interval_job(svc, "separation-reconcile", sep_minutes, separation_run,
                                   at_start=sep_minutes > 0)

    async def retention_run(reason: str) -> None:
        assert svc.retention is not None
        ret = svc.retention

        async def purge() -> dict[str, Any]:
            run = await ret.run(apply=True)
            return dict(outcome="ok" if not run.failed else "partial",
                        rooms=len(run.rooms), failed=len(run.failed),
                        purged=sum(r.purged for r in run.rooms),
                        archived=sum(r.archived for r in run.rooms),
                        media_deleted=sum(r.media_deleted for r in run.rooms))

        status = await _job_status(svc, "retention run", reason, purge)
        if status is not None:
            svc.retention_status = status

    ret = svc.retention
    ret_minutes = (ret.config.purge.interval_minutes
                   if ret is not None and ret.config.enabled else 0)
    # not at start-up: a purge is never urgent, and reading every room back would slow
    # the start (and the bots starting beside it)
    retention_ctx = _interval_job(svc, "retention-purge", ret_minutes, retention_run,
                                  at_start=False)

    app.cleanup_ctx.extend([session_ctx, store_ctx, leadership_ctx, bootstrap_ctx, scim_ctx,
                            directory_ctx, separation_ctx, retention_ctx])
    # bots (announcements, onboarding): registered last, so they stop before the store
    from bots.wiring import build_bots

    build_bots(svc, app)
    return app
