"""Element's crypto as a staff client: ``tests/e2ee_client/client.mjs`` (matrix-js-sdk with
its Rust crypto, device isolation "only devices signed by their owner", as Element since
April 2026) run by Node and driven over JSON lines.

``deploy/install.sh`` installs its npm packages (pinned by ``package-lock.json``) into
``tests/e2ee_client/node_modules``; :func:`element_client_available` says why not when
Node or the packages are missing, so the tests skip with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

CLIENT_DIR = Path(__file__).resolve().parents[1] / "e2ee_client"
SCRIPT = CLIENT_DIR / "client.mjs"


def element_client_available() -> str | None:
    """None when the Node client can run, else why not."""
    if shutil.which("node") is None:
        return "node is not installed (deploy/install.sh installs it)"
    if not (CLIENT_DIR / "node_modules" / "matrix-js-sdk").is_dir():
        return f"npm packages missing: run deploy/install.sh (npm ci in {CLIENT_DIR})"
    return None


class ElementClient:
    """One Node process holding signed-in staff devices with Element's crypto: one by
    default; :meth:`device` gives further ones (named) in the same process."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path,
                 name: str = "default", parent: ElementClient | None = None):
        self._proc = proc
        self._ids = itertools.count(1) if parent is None else parent._ids
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = (
            {} if parent is None else parent._pending)
        self._reader: asyncio.Task[None] | None = None if parent is None else parent._reader
        self._parent = parent
        self.name = name
        self.stderr_path = stderr_path
        self.user_id = ""
        self.device_id = ""

    def device(self, name: str) -> ElementClient:
        """Another device (log it in with :meth:`login`) in the same Node process."""
        self._ensure_reader()
        return ElementClient(self._proc, self.stderr_path, name, parent=self)

    def _ensure_reader(self) -> None:
        root = self._parent or self
        if root._reader is None:
            root._reader = asyncio.create_task(root._read())
        self._reader = root._reader

    async def _read(self) -> None:
        assert self._proc.stdout is not None
        while True:
            line = await self._proc.stdout.readline()
            if not line:
                break
            answer = json.loads(line)
            fut = self._pending.pop(answer.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(answer)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"element client exited: {self.log_tail()}"))
        self._pending.clear()

    @classmethod
    async def start(cls, log_dir: Path, name: str = "element") -> ElementClient:
        def open_log() -> tuple[Path, Any]:
            log_dir.mkdir(parents=True, exist_ok=True)
            path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
            return path, path.open("wb")

        stderr_path, err = await asyncio.to_thread(open_log)
        proc = await asyncio.create_subprocess_exec(
            "node", str(SCRIPT), cwd=str(CLIENT_DIR), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=err, limit=64 * 1024 * 1024)
        err.close()
        return cls(proc, stderr_path)

    async def call(self, cmd: str, within: float = 60.0, **args: Any) -> dict[str, Any]:
        """Send one command; its answer (raises with the client's error and log tail)."""
        assert self._proc.stdin is not None
        self._ensure_reader()
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._proc.stdin.write(json.dumps({"id": rid, "cmd": cmd, "client": self.name,
                                           **args}).encode() + b"\n")
        await self._proc.stdin.drain()
        try:
            answer = await asyncio.wait_for(fut, within)
        finally:
            self._pending.pop(rid, None)
        if not answer.get("ok"):
            raise RuntimeError(f"element client {cmd}: {answer.get('error')}")
        return answer

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def login(self, base_url: str, user_id: str, password: str | None = None,
                    device_name: str = "Element (test)", *, device_id: str | None = None,
                    access_token: str | None = None) -> str:
        """Sign in with a password, or take over a session made elsewhere (device id and
        access token); either way set up cross-signing and start syncing."""
        r = await self.call("login", within=300, base_url=base_url, user_id=user_id,
                            password=password, device_name=device_name, device_id=device_id,
                            access_token=access_token)
        self.user_id, self.device_id = r["user_id"], r["device_id"]
        return self.device_id

    async def events(self, room_id: str | None = None) -> list[dict[str, Any]]:
        return (await self.call("events", room_id=room_id))["events"]

    async def rooms(self) -> dict[str, list[str]]:
        return await self.call("rooms")

    async def create_room(self, invite: list[str], name: str = "room") -> str:
        """A private room with encryption on (as Element creates them)."""
        return (await self.call("create_room", invite=invite, name=name))["room_id"]

    async def members(self, room_id: str) -> dict[str, str]:
        return (await self.call("members", room_id=room_id))["members"]

    async def send(self, room_id: str, body: str) -> str:
        return (await self.call("send", room_id=room_id, body=body))["event_id"]

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        return (await self.call("react", room_id=room_id, event_id=event_id,
                                key=key))["event_id"]

    async def trust(self, user_id: str, device_id: str | None = None) -> dict[str, Any]:
        return await self.call("trust", user_id=user_id, device_id=device_id)

    async def close(self) -> None:
        """Stop the Node process (every device in it)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call("stop"), 5)
        root = self._parent or self
        if root._reader is not None:
            root._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await root._reader
        with contextlib.suppress(ProcessLookupError):
            if self._proc.returncode is None:
                self._proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._proc.wait(), 5)
