"""Harness for end-to-end tests: a real Synapse, Enclave as a real subprocess, nio staff.

* :class:`Stack` — one Synapse with Enclave's registration (made by ``enclave registration``),
  its token files, a fixed appservice port and an admin user for the admin API. Synapse reads
  the registration at start only, so every Enclave config made against a stack reuses the
  stack's token files and port. ``shared_stack`` lives for the session (start ≈2.5 s);
  tests that break the homeserver build their own with ``Stack.create``.
* :class:`EnclaveProcess` — ``python -m bridge run -c CONFIG``: start (wait for /ready),
  stop (SIGTERM), kill (SIGKILL), restart on the same config and SQLite database.
* :meth:`Stack.new_staff` — a freshly registered user as a matrix-nio client.

The fixtures that use these live in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

nio = pytest.importorskip("nio")
pytest.importorskip("synapse")

from devstack.synapse import SynapseServer  # noqa: E402

from .ledger_handler import LEDGER_ROOM_ENV, SOURCE_EVENT, SOURCE_ROOM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_NAME = "corp.test"
BOT_LOCALPART = "enclave"
BOT_USER_ID = f"@{BOT_LOCALPART}:{SERVER_NAME}"
APPSERVICE_ID = "enclave"
LEDGER_HANDLER = "tests.integration.ledger_handler:factory"


# -- small utilities --------------------------------------------------------------------------
def appservice_port() -> int:
    """A free port BELOW the kernel's ephemeral range.

    Enclave's port is fixed in the registration but nobody listens on it between tests (or
    while Enclave is killed); a port from the ephemeral range could meanwhile be taken as
    the source port of some outgoing connection, and Enclave could not bind it again.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low - 1))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


async def wait_until(
    probe: Callable[[], Awaitable[Any]], *, within: float, what: str,
    interval: float = 0.2, describe: Callable[[], str] | None = None,
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            extra = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what} "
                                 f"(last probe: {last!r}){extra}")
        await asyncio.sleep(interval)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


# -- the homeserver side ---------------------------------------------------------------------
@dataclass
class Stack:
    """A real Synapse that knows Enclave's registration, plus what tests need to use it."""

    base: Path
    synapse: SynapseServer
    as_port: int
    registration: Path
    secrets_dir: Path
    admin_user_id: str = ""
    admin_token: str = ""

    @classmethod
    def create(cls, base: Path, *, server_name: str = SERVER_NAME,
               synapse: SynapseServer | None = None) -> Stack:
        """Write tokens + registration with ``enclave registration``, start Synapse on it.

        ``synapse``: an unstarted server of the caller's (e.g. the corporate server of a
        :class:`~devstack.federation.FederatedPair`) instead of a new one named
        ``server_name``; the stack's server name is always its server's.
        """
        stack = cls.prepare(base, server_name=server_name, synapse=synapse)
        stack.synapse.start()
        stack.bootstrap()
        return stack

    @classmethod
    def prepare(cls, base: Path, *, server_name: str = SERVER_NAME,
                synapse: SynapseServer | None = None) -> Stack:
        """:meth:`create` without starting Synapse: tokens, registration, and the server
        set to load it. Start the server yourself, then call :meth:`bootstrap`."""
        base.mkdir(parents=True, exist_ok=True)
        secrets_dir = base / "secrets"
        secrets_dir.mkdir(exist_ok=True)
        if synapse is None:
            synapse = SynapseServer(base_dir=base / "synapse", server_name=server_name)
        (secrets_dir / "registration_shared_secret").write_text(
            synapse.registration_shared_secret + "\n")
        stack = cls(base=base, synapse=synapse, as_port=appservice_port(),
                    registration=base / "enclave-registration.yaml", secrets_dir=secrets_dir)
        reg_config = stack.write_enclave_config(base / "registration-config.yaml")
        result = subprocess.run(
            [sys.executable, "-m", "bridge", "registration", "-c", str(reg_config),
             "-o", str(stack.registration)],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, f"enclave registration failed:\n{result.stderr}"
        reg = yaml.safe_load(stack.registration.read_text())
        assert reg["as_token"] == stack.as_token and reg["hs_token"] == stack.hs_token
        synapse.app_service_config_files = [
            *(p for p in synapse.app_service_config_files if p != stack.registration),
            stack.registration]
        return stack

    def bootstrap(self) -> None:
        """On the started server: the test admin, and Enclave's bot registered.

        Stops the server if that fails, so a broken start leaves nothing running."""
        synapse = self.synapse
        try:
            self.admin_user_id, self.admin_token = synapse.register_user(
                "root-" + uuid.uuid4().hex[:6], "root-password", admin=True)
            # Enclave's bot exists from the start, so a test can create its ledger room
            # before the first Enclave runs (Enclave's own start-up finds it in use).
            try:
                synapse.request("POST", "/_matrix/client/v3/register",
                                {"type": "m.login.application_service",
                                 "username": BOT_LOCALPART, "inhibit_login": True},
                                access_token=self.as_token)
            except RuntimeError as e:
                if "M_USER_IN_USE" not in str(e):
                    raise
        except BaseException:
            synapse.stop()
            raise

    @property
    def server_name(self) -> str:
        """The homeserver's name: ``corp.test``, or e.g. ``127.0.0.1:PORT`` when federating."""
        return self.synapse.server_name

    @property
    def bot_user_id(self) -> str:
        """Enclave's bot on this stack's server (``BOT_USER_ID`` for the default name)."""
        return f"@{BOT_LOCALPART}:{self.server_name}"

    @property
    def as_token(self) -> str:
        return (self.secrets_dir / "as_token").read_text().strip()

    @property
    def hs_token(self) -> str:
        return (self.secrets_dir / "hs_token").read_text().strip()

    def stop(self) -> None:
        self.synapse.stop()

    # -- Enclave configs -----------------------------------------------------------------
    def write_enclave_config(
        self, path: Path, *, handlers: list[str] | None = None,
        max_body_bytes: int | None = None, inbox: dict[str, Any] | None = None,
        database: str = "sqlite:///enclave.db",
    ) -> Path:
        """An Enclave config for this stack: same tokens and port as the registration."""
        appservice: dict[str, Any] = {
            "id": APPSERVICE_ID,
            "bind_host": "127.0.0.1",
            "port": self.as_port,
            "public_url": f"http://127.0.0.1:{self.as_port}",
            "as_token": {"file": str(self.secrets_dir / "as_token")},
            "hs_token": {"file": str(self.secrets_dir / "hs_token")},
            "bot_localpart": BOT_LOCALPART,
        }
        if max_body_bytes is not None:
            appservice["max_body_bytes"] = max_body_bytes
        cfg = {
            "homeserver": {
                "url": self.synapse.base_url if self.synapse.port else "http://127.0.0.1:1",
                "server_name": self.server_name,
                "timeout_seconds": 10,
                "max_retries": 3,
                "registration_shared_secret": {
                    "file": str(self.secrets_dir / "registration_shared_secret")},
            },
            "appservice": appservice,
            "database": {"url": database},
            # no recovery sweeps unless a test asks: a refused transaction would blur
            # the counts other tests check
            "inbox": {"handlers": list(handlers or []), "backoff_initial_seconds": 0.2,
                      "backoff_max_seconds": 2.0, "recovery_sweeps_seconds": [],
                      **(inbox or {})},
            "logging": {"level": "INFO", "format": "text"},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    # -- homeserver calls (sync urllib in a thread, so the event loop keeps running) ------
    async def hs(self, method: str, path: str, body: Any = None, *,
                 token: str | None = None, as_user: str | None = None) -> Any:
        """Call Synapse as the test admin (default), or with the AS token as ``as_user``."""
        if as_user is not None:
            sep = "&" if "?" in path else "?"
            path = f"{path}{sep}user_id={urllib.parse.quote(as_user)}"
            token = self.as_token
        return await asyncio.to_thread(self.synapse.request, method, path, body,
                                       token or self.admin_token)

    async def create_ledger_room(self) -> str:
        """A room of Enclave's bot where the ledger handler records processed events."""
        resp = await self.hs("POST", "/_matrix/client/v3/createRoom",
                             {"preset": "private_chat", "name": "ledger"},
                             as_user=self.bot_user_id)
        return resp["room_id"]

    async def room_messages(self, room_id: str) -> list[dict[str, Any]]:
        """Every m.room.message of a room, oldest first (admin API, paginated)."""
        q = urllib.parse.quote
        filt = q(json.dumps({"types": ["m.room.message"]}))
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            path = (f"/_synapse/admin/v1/rooms/{q(room_id, safe='')}/messages"
                    f"?dir=f&limit=1000&filter={filt}")
            if token:
                path += f"&from={q(token)}"
            page = await self.hs("GET", path)
            chunk = page.get("chunk", [])
            out.extend(chunk)
            token = page.get("end")
            if not chunk or not token:
                return out

    async def ledger(self, ledger_room: str) -> list[tuple[str, str]]:
        """The ledger as (source_room, source_event) in the order the bot posted it."""
        entries = []
        for ev in await self.room_messages(ledger_room):
            content = ev.get("content", {})
            if ev.get("sender") == self.bot_user_id and SOURCE_EVENT in content:
                entries.append((content[SOURCE_ROOM], content[SOURCE_EVENT]))
        return entries

    # -- Synapse's appservice sender state (read from its SQLite database) ---------------
    def _hs_db(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(f"file:{self.synapse.base_dir / 'homeserver.db'}?mode=ro",
                             uri=True, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    async def as_state(self) -> str:
        """'up' or 'down': whether Synapse considers Enclave reachable (no row: 'up')."""
        rows = await asyncio.to_thread(
            self._hs_db, "SELECT state FROM application_services_state WHERE as_id = ?",
            APPSERVICE_ID)
        return (rows[0][0] if rows and rows[0][0] else "up").lower()

    async def wait_as_up(self, within: float = 30) -> None:
        """Wait until Synapse has finished catching up with Enclave (state back to 'up').

        Events created while Synapse's recoverer finishes can be stranded (see
        :meth:`stranded`), so tests let the catch-up finish before they send more.
        """
        async def up() -> bool:
            return await self.as_state() == "up"

        await wait_until(up, within=within, what="Synapse to mark the appservice up again")

    def stranded(self) -> list[tuple[int, str, str]]:
        """(txn, event_id, sender) of events Synapse stored for Enclave but will not send.

        While the appservice is 'up' Synapse only sends new transactions; stored ones are
        sent by its recoverer alone. A transaction created while the recoverer was finishing
        (``_TransactionController.send`` saw the state 'down', the recoverer then found no
        unsent transaction and set it 'up') stays stored until the next outage.
        """
        if self._hs_db("SELECT state FROM application_services_state WHERE as_id = ?",
                       APPSERVICE_ID) != [("up",)]:
            return []  # down: the recoverer will send them
        out = []
        for txn_id, event_ids in self._hs_db(
            "SELECT txn_id, event_ids FROM application_services_txns WHERE as_id = ?",
            APPSERVICE_ID,
        ):
            for eid in json.loads(event_ids):
                sender = self._hs_db("SELECT sender FROM events WHERE event_id = ?", eid)
                out.append((txn_id, eid, sender[0][0] if sender else "?"))
        return out

    def stored_for_appservice(self) -> list[str]:
        """Event ids Synapse keeps in stored appservice transactions (to be sent by its
        recoverer; stranded if the appservice is marked up)."""
        out: list[str] = []
        for (event_ids,) in self._hs_db(
                "SELECT event_ids FROM application_services_txns WHERE as_id = ?",
                APPSERVICE_ID):
            out.extend(json.loads(event_ids))
        return out

    def set_as_state_up(self) -> None:
        """With Synapse stopped: mark Enclave up in its database, so no recoverer sends
        the stored transactions at the next start (the state Synapse's recovery race
        leaves behind: a stranded transaction)."""
        assert not self.synapse.running, "stop Synapse first"
        db = sqlite3.connect(self.synapse.base_dir / "homeserver.db", timeout=10)
        try:
            db.execute("UPDATE application_services_state SET state = 'up' WHERE as_id = ?",
                       (APPSERVICE_ID,))
            db.commit()
        finally:
            db.close()

    def stranded_report(self) -> str:
        user_events = [s for s in self.stranded() if s[2] != self.bot_user_id]
        if not user_events:
            return "Synapse holds no stranded appservice transactions with user events"
        return ("SYNAPSE STRANDED EVENTS (stored for the appservice while it was marked up, "
                f"never sent; upstream race, not Enclave): {user_events[:10]}")

    # -- staff ---------------------------------------------------------------------------
    async def new_staff(self, name: str) -> nio.AsyncClient:
        """Register a fresh user (unique per call) and return a nio client for it."""
        localpart = f"{name}-{uuid.uuid4().hex[:6]}"
        user_id, token = await asyncio.to_thread(
            self.synapse.register_user, localpart, f"pw-{localpart}")
        client = nio.AsyncClient(self.synapse.base_url, user_id)
        client.access_token = token
        client.user_id = user_id
        return client


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("ENCLAVE_CONFIG", None)
    env.update(extra or {})
    return env


# -- Enclave as a subprocess -----------------------------------------------------------------
class EnclaveProcess:
    """``python -m bridge run -c CONFIG`` with start / stop / kill / restart."""

    def __init__(self, config: Path, port: int, *, env: dict[str, str] | None = None):
        self.config = config
        self.port = port
        self.env = subprocess_env(env)
        self.log_path = config.parent / "enclave.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        return f"--- tail of {self.log_path} ---\n{tail(self.log_path)}"

    def _spawn(self) -> None:
        self.starts += 1
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(f"\n===== start #{self.starts} at {time.ctime()} =====\n")
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "-c", str(self.config)],
                cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    async def start(self, within: float = 45) -> None:
        """Spawn and wait until /ready is 200 and the bot is set up."""
        assert not self.running, "Enclave is already running"
        self._spawn()

        async def ready() -> bool:
            if not self.running:
                raise AssertionError(
                    f"Enclave exited with code {self.proc.returncode if self.proc else '?'} "
                    f"during start-up\n{self.describe()}")
            status, body = await self.get_json("/ready", within=3)
            return status == 200 and isinstance(body, dict) and bool(body.get("bot"))

        await wait_until(ready, within=within, what="Enclave /ready with its bot",
                         interval=0.1, describe=self.describe)

    async def _wait_exit(self, within: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"Enclave did not exit within {within}s\n"
                                     + self.describe())
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def stop(self, within: float = 30) -> int:
        """SIGTERM (graceful shutdown); return the exit code."""
        assert self.proc is not None and self.running, "Enclave is not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await self._wait_exit(within)
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            raise

    async def kill(self) -> int:
        """SIGKILL: a crash, no clean-up of any kind."""
        assert self.proc is not None and self.running, "Enclave is not running"
        self.proc.send_signal(signal.SIGKILL)
        return await self._wait_exit(10)

    async def restart(self) -> None:
        if self.running:
            await self.stop()
        await self.start()

    def cleanup(self) -> None:
        """Teardown: make sure the process we started is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # -- HTTP ----------------------------------------------------------------------------
    async def get_json(self, path: str, within: float = 10) -> tuple[int, Any]:
        """(status, decoded body) or (0, error text) when nothing answers."""
        try:
            async with aiohttp.ClientSession() as s, s.get(
                self.base_url + path, timeout=aiohttp.ClientTimeout(total=within)
            ) as resp:
                raw = await resp.read()
                try:
                    return resp.status, json.loads(raw)
                except ValueError:
                    return resp.status, raw.decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return 0, f"{type(e).__name__}: {e}"

    async def metrics(self) -> dict:
        async with aiohttp.ClientSession() as s, s.get(
            self.base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)
        ) as resp:
            assert resp.status == 200, await resp.text()
            return parse_metrics(await resp.text())

    # -- CLI -----------------------------------------------------------------------------
    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``enclave ARGS -c CONFIG`` (on the same database) and return the result."""
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", *args, "-c", str(self.config)],
            cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )

    async def inbox_status(self) -> dict[str, Any]:
        r = await self.cli("inbox", "status")
        assert r.returncode == 0, f"enclave inbox status failed ({r.returncode}): {r.stderr}"
        return json.loads(r.stdout)

    async def wait_idle(self, *, min_applied: int, within: float = 60,
                        also: Callable[[], str] | None = None) -> dict:
        """Wait until ``min_applied`` actions are applied and nothing is pending (metrics)."""

        async def idle() -> dict | None:
            m = await self.metrics()
            applied = metric(m, "enclave_outbox_actions", status="applied")
            pending = metric(m, "enclave_inbox_events", status="pending")
            pending_actions = metric(m, "enclave_outbox_actions", status="pending")
            if applied >= min_applied and pending == 0 and pending_actions == 0:
                return m
            return None

        def describe() -> str:
            return self.describe() + (f"\n{also()}" if also else "")

        return await wait_until(idle, within=within, interval=0.3,
                                what=f"{min_applied} applied actions and an idle inbox",
                                describe=describe)


PG_ADMIN_DSN = os.environ.get(
    "ENCLAVE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database (UTF-8, C collation: what Synapse requires, fine for
    Enclave) on the machine's server; yields its DSN and drops it afterwards. Skips when the
    server is unreachable, fails instead when ENCLAVE_REQUIRE_POSTGRES is set (CI)."""
    psycopg2 = pytest.importorskip("psycopg2")

    def admin() -> Any:
        try:
            conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
        except psycopg2.OperationalError as e:
            if os.environ.get("ENCLAVE_REQUIRE_POSTGRES"):
                pytest.fail(f"PostgreSQL required but unreachable at {PG_ADMIN_DSN}: {e}")
            pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_DSN}: {e}")
        conn.autocommit = True
        return conn

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = admin()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' LC_COLLATE='C' "
                    "LC_CTYPE='C' TEMPLATE template0")
    conn.close()
    try:
        yield f"{PG_ADMIN_DSN.rpartition('/')[0]}/{name}"
    finally:
        conn = admin()
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


async def ledger_enclave(
    stack: Stack, make: Callable[..., EnclaveProcess], **config: Any
) -> tuple[EnclaveProcess, str]:
    """A started Enclave running the ledger handler, and its (fresh) ledger room."""
    ledger_room = await stack.create_ledger_room()
    enclave = make(stack, handlers=[LEDGER_HANDLER], env={LEDGER_ROOM_ENV: ledger_room},
                   **config)
    await enclave.start()
    await stack.wait_as_up()
    return enclave, ledger_room
