"""The composition root: every Enclave service built once, from the typed config.

Like Synapse's ``HomeServer``: one object with a cached ``get_*`` builder per service; a
builder asks the root for what it needs and passes it through constructors, so no service
is wired by setting attributes after it was made. ``enclave run`` (``bridge/app.py`` maps
the root onto aiohttp routes and lifetimes), every CLI command and the benches build their
services from a :class:`Root`; nothing else constructs a store, client or executor. The
root builds the database and each domain store once (:class:`~bridge.store.Stores`) and
hands each service only the stores it uses.

The root is also the object handlers and extensions receive (``Services``): its plain
attributes (``identity``, ``*_status``, ``bootstrapped``) are the running state ``/ready``
shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .auditstream.service import AuditStreamer
from .cluster import Leadership, replica_name
from .config import ConfigError, LoadedConfig, Secret
from .console.auth import ConsoleAuth
from .console.web import ConsoleWeb
from .directory.debounce import Debouncer
from .directory.file_source import FileSource
from .directory.ldap_source import LdapSource
from .directory.source import DirectorySource
from .directory.sync import DirectorySync, SyncRefused
from .extension import (
    ENTRY_POINT_GROUP,
    Extension,
    JobReport,
    Plugin,
    ScheduledJob,
    discover_extensions,
)
from .gate.protocol import GateAnswer
from .gate.service import GateService
from .matrix.client import MatrixClient
from .matrix.completeness import CompletenessCheck
from .matrix.executor import Executor
from .matrix.inbox import EventHandler, FunctionHandler, InboxProcessor
from .metrics import Metrics
from .policy.retention import Hold
from .retention.archive import ArchiveWriter, LocalArchive
from .retention.archive.s3 import S3Archive
from .retention.holds import hold_from_record
from .retention.service import RetentionService
from .separation.service import SeparationService
from .store import SharedDatabase, Stores, open_stores

if TYPE_CHECKING:
    # imported where used: scim2-server costs ~0.3 s at import, paid only by a SCIM source
    from .directory.scim import ScimService

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


def load_handler_factories(refs: Sequence[str]) -> list[Callable[[Root], EventHandler]]:
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


class Root:
    """Builds each service once (``get_*`` / the properties of the same name).

    ``extensions``: the extensions to load (default: those installed, see
    :func:`bridge.extension.discover_extensions`). ``extra_handlers``: handler factories a
    caller adds after those of ``inbox.handlers`` (tests). ``lease_ttl_ms``: the lease ttl
    of the scheduled runs (default: the cluster's; the CLI's own runs renew theirs too).
    """

    def __init__(self, loaded: LoadedConfig, secrets: dict[str, Secret], *,
                 clock_ms: Callable[[], int] = wall_clock_ms,
                 extensions: Sequence[Extension] | None = None,
                 extra_handlers: Sequence[Callable[[Root], EventHandler]] = ()):
        self.loaded = loaded
        self.secrets = secrets
        self.clock_ms = clock_ms
        self.extensions: list[Extension] = list(
            discover_extensions() if extensions is None else extensions)
        self.extra_handlers = tuple(extra_handlers)
        self.lease_ttl_ms = loaded.config.cluster.lease_ttl_seconds * 1000
        # running state (``/ready``); the jobs below and start-up fill it in
        self.identity = IdentityState()
        self.bootstrapped = asyncio.Event()
        self.directory_status: dict[str, Any] = {}
        self.separation_status: dict[str, Any] = {}
        self.retention_status: dict[str, Any] = {}
        self._installation_id = ""
        self._check_extension_sections()

    @property
    def config(self) -> Any:
        return self.loaded.config

    def _check_extension_sections(self) -> None:
        # a config section only an extension reads must not be silently ignored
        claimed = {s for ext in self.extensions for s in ext.config_sections}
        for section in ("bots",):
            if getattr(self.config, section, None) is not None and section not in claimed:
                raise ConfigError(str(self.loaded.path or "(in memory)"), [
                    f"{section}: no installed extension handles this section (entry point "
                    f"group {ENTRY_POINT_GROUP}; after a checkout: pip install -e .)"])

    # -- the store, the homeserver, the executor ------------------------------------------
    @cached_property
    def metrics(self) -> Metrics:
        return Metrics()

    @cached_property
    def scheduler(self) -> AsyncIOScheduler:
        """The one APScheduler of ``enclave run``: the scheduled jobs' intervals
        (``bridge.app.interval_job``) and the bots' wake-up timers; ``bridge.app`` starts
        and stops it."""
        return AsyncIOScheduler()

    @cached_property
    def stores(self) -> Stores:
        """The shared database and one store per domain on it (built, not opened)."""
        db = self.config.database
        pw = self.secrets.get("database.password")
        return open_stores(
            db.url, base_dir=self.loaded.base_dir, password=pw.get() if pw else None,
            sqlite_synchronous=db.sqlite_synchronous, pool_size=db.pool_size,
            extra_migrations=[m for ext in self.extensions
                              if (m := ext.migrations()) is not None],
        )

    @property
    def database(self) -> SharedDatabase:
        return self.stores.database

    @cached_property
    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(json_serialize=None)

    @cached_property
    def client(self) -> MatrixClient:
        hs = self.config.homeserver
        return MatrixClient(
            self.session, hs.url, self.secrets["appservice.as_token"].get(),
            max_retries=hs.max_retries, timeout=hs.timeout_seconds,
            on_rate_limited=self.metrics.rate_limited.inc,
            on_unreachable=self._homeserver_unreachable)

    def _homeserver_unreachable(self) -> None:
        # the completeness check dates homeserver outages; only a running Enclave has one
        # (a CLI command's failing request must not build the inbox to tell it)
        check = self.__dict__.get("completeness")
        if check is not None:
            check.homeserver_unreachable()

    @cached_property
    def completeness(self) -> CompletenessCheck | None:
        """The inbox's completeness check, or None when ``inbox.completeness`` is off."""
        cfg = self.config
        if not cfg.inbox.completeness.enabled:
            return None
        return CompletenessCheck(
            self.stores.inbox, self.stores.kv, self.client, self.metrics,
            admin_user_id=cfg.admin_user_id,
            bound_seconds=cfg.inbox.completeness.bound_seconds, clock_ms=self.clock_ms,
            on_recovered=lambda: self.inbox.notify(),
            admin_ready=lambda: self.identity.admin_ready)

    def installation_id(self) -> str:
        """This database's id (read when the store opened; "" before)."""
        return self._installation_id

    @cached_property
    def executor(self) -> Executor:
        return Executor(self.client, self.stores.outbox, self.stores.audit,
                        bot_user_id=self.config.bot_user_id,
                        clock_ms=self.clock_ms, metrics=self.metrics,
                        admin_user_id=self.config.admin_user_id,
                        installation_id=self.installation_id)

    @cached_property
    def leadership(self) -> Leadership:
        cfg, metrics = self.config, self.metrics
        return Leadership(self.stores.leases, self.stores.kv,
                          replica_name(cfg.cluster.replica_name), self.clock_ms,
                          self.lease_ttl_ms,
                          on_change=lambda leader: metrics.leader.set(int(leader)),
                          # SQLite: the store's lock already makes this the only process
                          exclusive=self.database.dialect == "sqlite")

    async def open_store(self, *, migrate: bool, create_installation_id: bool) -> None:
        """Open the store, migrate it (``migrate``), check its schema, read the installation
        id (and make one for a new database when ``create_installation_id``)."""
        database, kv = self.database, self.stores.kv
        await database.open()
        try:
            if migrate:
                applied = await database.migrate()
                if applied:
                    log.info("database migrated to version %d", applied[-1])
            await database.check_schema()
            iid = await kv.get_kv("installation_id")
            if iid is None and create_installation_id:
                iid = pysecrets.token_hex(8)
                await kv.set_kv("installation_id", iid)
            self._installation_id = iid or ""
        except BaseException:
            await database.close()
            raise

    async def close_client(self, wait_seconds: float) -> None:
        """Log the admin's own session out (bounded: the homeserver may be gone), then
        close the HTTP session."""
        if "session" not in self.__dict__:
            return
        try:
            await asyncio.wait_for(self.client.close_sessions(), timeout=wait_seconds)
        except Exception as e:
            log.warning("the admin session was not logged out: %s", e)
        await self.session.close()

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Root]:
        """The root of a CLI command (no running service): the store open and current,
        the homeserver client closed on the way out."""
        await self.open_store(migrate=False, create_installation_id=False)
        try:
            yield self
        finally:
            # the admin's own session (user list) dies with the run: no token left over
            await self.close_client(wait_seconds=10)
            await self.close_archive()
            await self.database.close()

    async def close_archive(self) -> None:
        """Close the archive's connections (an S3 client) if it was built."""
        archive = self.__dict__.get("archive")  # a cached_property: only if built
        if archive is not None:
            await archive.aclose()

    # -- the domain services ---------------------------------------------------------------
    @cached_property
    def directory_source(self) -> DirectorySource | None:
        """The configured source (ldap3 itself is imported by the LDAP session, when used)."""
        dcfg = self.config.directory
        if dcfg is None:
            return None
        src, base_dir = dcfg.source, self.loaded.base_dir
        if src.type == "file":
            path = src.path if src.path.is_absolute() else base_dir / src.path
            return FileSource(path, format=src.format,
                              allow_initial_passwords=src.allow_initial_passwords)
        if src.type == "ldap":
            pw = self.secrets.get("directory.source.bind_password")
            return LdapSource(src, bind_password=pw.get() if pw else None, store=self.stores.kv,
                              base_dir=base_dir)
        from .directory.scim import ScimSource  # heavy import (see TYPE_CHECKING above)

        return ScimSource(self.stores.scim)

    @cached_property
    def directory(self) -> DirectorySync | None:
        """The directory sync, or None when the config has no ``directory:`` section."""
        cfg, dcfg = self.config, self.config.directory
        if dcfg is None:
            return None
        assert self.directory_source is not None
        sep = self.separation
        return DirectorySync(
            dcfg, self.directory_source, client=self.client, executor=self.executor,
            directory_store=self.stores.directory, leases=self.stores.leases,
            metrics=self.metrics, clock_ms=self.clock_ms,
            server_name=cfg.homeserver.server_name,
            bot_user_id=cfg.bot_user_id, admin_user_id=cfg.admin_user_id,
            namespace_prefix=cfg.appservice.namespace_prefix,
            admin_localpart=cfg.appservice.admin_localpart,
            bot_localpart=cfg.appservice.bot_localpart,
            allow_initial_passwords=getattr(dcfg.source, "allow_initial_passwords", False),
            # separation rebuilds its policy when the directory view changed, and adds its
            # class state to the managed rooms the sync creates
            on_view_change=sep.invalidate if sep is not None else None,
            room_edits=sep.managed_room_edits if sep is not None else None,
            lease_ttl_ms=self.lease_ttl_ms,
        )

    @cached_property
    def separation(self) -> SeparationService | None:
        """The separation service, or None when the config has no ``policy:`` section."""
        cfg = self.config
        if cfg.policy is None:
            return None
        ret = self.retention
        return SeparationService(
            cfg.policy, audit=self.stores.audit, kv=self.stores.kv,
            directory_store=self.stores.directory, leases=self.stores.leases,
            client=self.client, executor=self.executor,
            metrics=self.metrics, clock_ms=self.clock_ms,
            server_name=cfg.homeserver.server_name, bot_user_id=cfg.bot_user_id,
            admin_user_id=cfg.admin_user_id, service_prefix=cfg.appservice.namespace_prefix,
            creation_state=ret.creation_state if ret is not None else None,
            lease_ttl_ms=self.lease_ttl_ms)

    @cached_property
    def archive(self) -> ArchiveWriter | None:
        """The archive: a local directory, or an S3 bucket with Object Lock
        (``retention.archive.s3``)."""
        rcfg = self.config.retention
        if rcfg is None:
            return None
        s3 = rcfg.archive.s3
        if s3 is None:
            return LocalArchive(self.loaded.resolve(rcfg.archive.path), self.stores.archive,
                                segment_max_bytes=rcfg.archive.segment_max_bytes,
                                clock_ms=self.clock_ms)
        secret = self.secrets.get("retention.archive.s3.secret_access_key")

        def client() -> Any:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
            return get_session().create_client(
                "s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                aws_access_key_id=s3.access_key_id,
                aws_secret_access_key=secret.get() if secret is not None else None,
                config=AioConfig(max_pool_connections=max(10, s3.concurrency),
                                 retries={"max_attempts": 3, "mode": "standard"}))

        async def keep_ms(room_id: str) -> int | None:
            # the room's class decides its archive period; built after the archive
            ret = self.retention
            assert ret is not None
            return ret.policy.archive_keep_ms(await ret.room_class(room_id))

        async def holds() -> list[Hold]:
            return [hold_from_record(r) for r in await self.stores.holds.holds()]

        return S3Archive(client, s3.bucket, self.stores.archive, prefix=s3.prefix,
                         lock_mode=s3.lock_mode, keep_ms=keep_ms, holds=holds,
                         segment_max_bytes=rcfg.archive.segment_max_bytes,
                         concurrency=s3.concurrency, seal_seconds=s3.seal_seconds,
                         clock_ms=self.clock_ms)

    async def _classify(self, room_id: str) -> str | None:
        # built after retention (separation asks retention for its creation state): the
        # classifier reaches separation when it is called, not when retention is made
        sep = self.separation
        if sep is None:
            return None
        facts = await sep.room_facts(room_id)
        policy = await sep.policy()
        return str(policy.classify_room(facts).id)

    @cached_property
    def retention(self) -> RetentionService | None:
        """The retention service, or None when the config has no ``retention:`` section."""
        cfg = self.config
        if cfg.retention is None:
            return None
        assert self.archive is not None
        return RetentionService(
            cfg.retention, audit=self.stores.audit, index=self.stores.archive,
            holds=self.stores.holds, retention_rooms=self.stores.retention_rooms,
            kv=self.stores.kv, directory_store=self.stores.directory,
            leases=self.stores.leases, client=self.client, executor=self.executor,
            archive=self.archive, metrics=self.metrics, clock_ms=self.clock_ms,
            server_name=cfg.homeserver.server_name, bot_user_id=cfg.bot_user_id,
            admin_user_id=cfg.admin_user_id, service_prefix=cfg.appservice.namespace_prefix,
            classify=self._classify if cfg.policy is not None else None,
            lease_ttl_ms=self.lease_ttl_ms)

    @cached_property
    def gate(self) -> GateService | None:
        """The gate module's HTTP service, or None without a ``gate:`` section."""
        if self.config.gate is None:
            return None
        async def allow_without_policy(req: Any) -> Any:
            return GateAnswer(allow=True, rule_id="policy.absent", reason="no policy: section")

        sep = self.separation
        return GateService(secret=self.secrets["gate.secret"].get(),
                           decide=sep.decide_gate if sep is not None else allow_without_policy,
                           metrics=self.metrics)

    @cached_property
    def scim_debounce(self) -> Debouncer | None:
        dcfg = self.config.directory
        if dcfg is None or dcfg.source.type != "scim":
            return None
        return Debouncer(dcfg.source.debounce_seconds, self._scim_sync)

    async def _scim_sync(self) -> None:
        # not a scheduled job: its one log line is written here
        report = await self.directory_run("SCIM change")
        if report.outcome != "ok" or report.summary:
            log.log(logging.INFO if report.outcome in ("ok", "skipped") else logging.WARNING,
                    "directory sync (SCIM change): %s%s", report.outcome,
                    f": {report.summary}" if report.summary else "")

    @cached_property
    def scim(self) -> ScimService | None:
        """The SCIM endpoint identity providers push to (a ``scim`` directory source)."""
        dcfg = self.config.directory
        if dcfg is None or dcfg.source.type != "scim":
            return None
        from .directory.scim import ScimService  # heavy import (see TYPE_CHECKING above)

        assert self.scim_debounce is not None
        return ScimService(self.stores.scim, token=self.secrets["directory.source.token"].get(),
                           path_prefix=dcfg.source.path_prefix, clock_ms=self.clock_ms,
                           on_change=self.scim_debounce.trigger)

    # -- the operators' console -------------------------------------------------------------
    @cached_property
    def console(self) -> ConsoleWeb | None:
        """The web console at ``/console`` (``console.enabled``), over the same services
        the CLI uses; None when it is off."""
        cfg = self.config
        ccfg = cfg.console
        if not ccfg.enabled:
            return None
        stores = self.stores
        auth = ConsoleAuth(ccfg, sessions=stores.console_sessions,
                           directory=stores.directory, audit=stores.audit,
                           http=lambda: self.session, homeserver_url=cfg.homeserver.url,
                           clock_ms=self.clock_ms)
        return ConsoleWeb(
            ccfg, auth, server_name=cfg.homeserver.server_name,
            public_url=ccfg.public_url or cfg.appservice.public_url,
            homeserver_url=cfg.homeserver.url, audit=stores.audit, holds=stores.holds,
            inbox=stores.inbox, kv=stores.kv, retention_rooms=stores.retention_rooms,
            separation=self.separation, directory=self.directory, retention=self.retention,
            line_of=self.loaded.line_of, config_path=str(self.loaded.path or "(in memory)"),
            job_ids=lambda: [j.id for j in self.jobs],
            extension_pages=lambda: [p for plugin in self.plugins
                                     for p in plugin.console_pages],
            clock_ms=self.clock_ms)

    @cached_property
    def audit_stream(self) -> AuditStreamer | None:
        """The audit stream (syslog, JSON lines), or None when ``audit.stream`` is empty."""
        acfg = self.config.audit
        if not acfg.stream:
            return None
        return AuditStreamer(acfg, self.stores.audit_feed, self.stores.kv, self.metrics,
                             self.clock_ms, self.loaded.base_dir)

    # -- extensions, handlers, jobs ---------------------------------------------------------
    @cached_property
    def plugins(self) -> list[Plugin]:
        """What each extension set up on this root (those it configures nothing for left
        out), in extension order."""
        out = []
        for ext in self.extensions:
            plugin = ext.setup(self)
            if plugin is not None:
                out.append(plugin)
        return out

    @cached_property
    def handlers(self) -> list[EventHandler]:
        """The inbox's handlers, in the order every event goes through them."""
        out: list[EventHandler] = []
        # 1. retention: archive first, so what the others do never keeps an event from it
        if self.retention is not None:
            out.append(FunctionHandler("retention", self.retention.handle_event))
        # 2. the handlers named in inbox.handlers, then those the caller added
        for factory in [*load_handler_factories(self.config.inbox.handlers),
                        *self.extra_handlers]:
            out.append(factory(self))
        # 3. separation
        if self.separation is not None:
            out.append(FunctionHandler("separation", self.separation.handle_event))
        # 4. the extensions' (bots), in extension order
        for plugin in self.plugins:
            out.extend(plugin.handlers)
        return out

    @cached_property
    def inbox(self) -> InboxProcessor:
        stores = self.stores
        return InboxProcessor(stores.journal, stores.inbox, stores.outbox, self.executor,
                              self.handlers, self.config.inbox, self.metrics, self.clock_ms)

    @cached_property
    def jobs(self) -> list[ScheduledJob]:
        """Every scheduled job (leader only; see ``bridge.app.interval_job``)."""
        cfg = self.config
        dcfg = cfg.directory
        jobs = []
        if self.directory is not None and dcfg is not None:
            jobs.append(ScheduledJob("directory-sync", dcfg.interval_minutes,
                                     self.directory_run, at_start=dcfg.sync_on_start))
        if self.separation is not None:
            minutes = self.separation.config.reconcile.interval_minutes
            jobs.append(ScheduledJob("separation-reconcile", minutes, self.separation_run,
                                     at_start=minutes > 0))
        ret = self.retention
        if ret is not None:
            # not at start-up: a purge is never urgent, and reading every room back would
            # slow the start (and the bots starting beside it)
            jobs.append(ScheduledJob(
                "retention-purge", ret.config.purge.interval_minutes if ret.config.enabled
                else 0, self.retention_run, at_start=False))
        for plugin in self.plugins:
            jobs.extend(plugin.jobs)
        return jobs

    async def _job_status(self, what: str, reason: str,
                          work: Callable[[], Awaitable[dict[str, Any]]],
                          ) -> dict[str, Any] | None:
        """Run a scheduled job that needs Enclave's admin identity and return the status
        ``/ready`` shows ({"reason", "outcome", ..., "at"}); None when it was skipped."""
        if not self.identity.admin_ready:
            log.warning("%s (%s) skipped: %s", what, reason,
                        self.identity.admin_problem or "admin identity not ready yet")
            return None
        status: dict[str, Any] = {"reason": reason}
        try:
            status.update(await work())
        except SyncRefused as e:
            # counted by the sync itself, logged by the job (its report); nothing changed
            status.update(outcome="refused", problems=e.problems)
        except Exception as e:
            status.update(outcome="error", error=f"{type(e).__name__}: {e}")
            log.exception("%s (%s) failed", what, reason)
        status["at"] = self.clock_ms()
        return status

    async def directory_run(self, reason: str) -> JobReport:
        directory = self.directory
        assert directory is not None

        async def sync() -> dict[str, Any]:
            result = await directory.run()
            if result.ok:
                self.metrics.directory_last_success.set(self.clock_ms() / 1000)
            return dict(outcome="ok" if result.ok else "partial", applied=result.applied,
                        failed=len(result.failed), findings=len(result.plan.findings))

        status = await self._job_status("directory sync", reason, sync)
        if status is None:
            return JobReport("skipped")
        self.directory_status = status
        if self.separation is not None:
            self.separation.invalidate()  # staff, groups and leavers may have changed
        applied = status.get("applied") or {}
        return _report(status, ", ".join(f"{k} {v}" for k, v in sorted(applied.items()) if v))

    async def separation_run(self, reason: str) -> JobReport:
        sep = self.separation
        assert sep is not None

        async def reconcile() -> dict[str, Any]:
            result = await sep.reconcile(apply=True)
            return dict(outcome="ok" if not result.failed else "partial",
                        rooms=result.plan.rooms, applied=result.applied,
                        failed=len(result.failed), findings=len(result.plan.findings))

        status = await self._job_status("separation reconciliation", reason, reconcile)
        if status is None:
            return JobReport("skipped")
        self.separation_status = status
        return _report(status, f"{status['applied']} action(s) applied in "
                               f"{status['rooms']} rooms" if status.get("applied") else "")

    async def retention_run(self, reason: str) -> JobReport:
        ret = self.retention
        assert ret is not None

        async def purge() -> dict[str, Any]:
            run = await ret.run(apply=True)
            return dict(outcome="ok" if not run.failed else "partial",
                        rooms=len(run.rooms), failed=len(run.failed),
                        purged=sum(r.purged for r in run.rooms),
                        archived=sum(r.archived for r in run.rooms),
                        media_deleted=sum(r.media_deleted for r in run.rooms))

        status = await self._job_status("retention run", reason, purge)
        if status is None:
            return JobReport("skipped")
        self.retention_status = status
        done = ", ".join(f"{k} {status[k]}" for k in ("archived", "purged", "media_deleted")
                         if status.get(k))
        return _report(status, f"{done} in {status['rooms']} rooms" if done else "")


def _report(status: dict[str, Any], summary: str) -> JobReport:
    """A job's report from the status ``/ready`` shows (``error`` becomes ``failed``)."""
    outcome = status.get("outcome", "ok")
    if outcome == "error":
        return JobReport("failed", str(status.get("error", "")))
    if outcome == "refused":
        return JobReport("refused", "; ".join(map(str, status.get("problems") or [])))
    if status.get("failed"):
        summary = ", ".join(filter(None, [summary, f"{status['failed']} failed"]))
    return JobReport(outcome, summary)


# what handlers, extensions and the app receive: the root itself
Services = Root
