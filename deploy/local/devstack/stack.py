"""The local stack: a throwaway Synapse on SQLite, Enclave on SQLite, a sample directory.

Runs in the foreground and prints how to log in with Element; Ctrl-C stops every process it
started. State lives in ``--state-dir`` (default ``var/local-stack``) so accounts survive a
restart; ``--fresh`` wipes it first. Enclave's directory sync provisions the people of the
sample directory file (accounts, department spaces and rooms) and re-reads the file every
minute. For evaluation only: demo passwords come from that file.

    python -m devstack.stack [--fresh] [--synapse-port 8008] [--enclave-port 29330]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from .synapse import SynapseServer

# deploy/local/devstack/stack.py: the checkout, whose Enclave (``python -m bridge``) it runs
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DIRECTORY = REPO_ROOT / "deploy" / "local" / "directory.yaml"
SERVER_NAME = "corp.test"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _secret_file(path: Path) -> str:
    """Read a secret from ``path``, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


# What the local stack demonstrates of directory sync: a space per department with a
# general room in it (managers at power 50), and a room for everyone.
LOCAL_MANAGED_ROOMS: list[dict[str, Any]] = [
    {"id": "department", "kind": "space", "for_each": "department", "name": "{value}",
     "alias": "dept-{slug}", "topic": "The {value} department (managed by Enclave)"},
    {"id": "department-general", "kind": "room", "for_each": "department",
     "parent": "department", "name": "{value} general", "alias": "{slug}-general",
     "power": [{"managers": True, "level": 50}]},
    {"id": "all-staff", "kind": "room", "members": "all", "name": "All staff",
     "alias": "all-staff", "power": [{"group": "it-admins", "level": 100}]},
]


# What the local stack demonstrates of separation: internal rooms that never federate,
# a Finance-only class, and an information barrier between Sales and Finance (carol and
# dave in the sample directory cannot DM, share a room or find each other in search).
LOCAL_POLICY: dict[str, Any] = {
    "default_class": "internal",
    "room_classes": [
        {"id": "internal", "description": "Company-only rooms", "federate": False},
        {"id": "finance", "description": "Finance staff only", "federate": False,
         "allow": {"staff_only": {"attributes": {"department": ["Finance"]}}}},
        {"id": "company", "description": "Company-wide rooms: barriers do not apply",
         "federate": False, "barriers": False},
    ],
    "classify": [{"id": "cls-finance-alias", "room_class": "finance", "alias": "^#fin-"},
                 {"id": "cls-company", "room_class": "company", "alias": "^#all-staff:"}],
    "barriers": [{"id": "barrier-sales-finance",
                  "description": "Sales may not talk to Finance (demo)",
                  "between": [{"attributes": {"department": ["Sales"]}},
                              {"attributes": {"department": ["Finance"]}}]}],
    "notify": {"contact": "the IT team (#it-help)"},
    "reconcile": {"interval_minutes": 10},
}


# What the local stack demonstrates of retention: internal rooms keep 30 days, but a
# moderator may shorten a room's period down to 2 minutes with `!retention 2m`; the purge
# job runs every minute, archives first, and everything stays in the archive (state/archive)
# for `enclave export`. The period shows as m.room.retention and a notice from Enclave.
LOCAL_RETENTION: dict[str, Any] = {
    "enabled": True,
    "default": {"keep": "365d"},
    "classes": [
        {"id": "retention-internal", "room_class": "internal", "keep": "30d",
         "adjustable_by": "moderators", "min": "2m", "max": "365d"},
        {"id": "retention-finance", "room_class": "finance", "keep": "3650d",
         "adjustable_by": "nobody"},
        {"id": "retention-company", "room_class": "company", "keep": "365d",
         "adjustable_by": "nobody"},
    ],
    "dms": {"id": "retention-dms", "keep": "365d"},
    "archive": {"path": "archive", "keep": "forever"},
    "purge": {"interval_minutes": 1, "window_events": 1000, "pause_seconds": 0.2},
    "visibility": {"set_state": True, "notice": "message",
                   "text": "Messages here are kept for {period}."},
}


# What the local stack demonstrates of the bots: an announcement bot with a control room
# (dave, it-admins, may `!announce`), a manual announcement that asks for acknowledgement
# with a quick reminder and escalation, a weekday one to Engineering's read-only room, a
# signed webhook; and an onboarding bot that welcomes everyone. DMs are invitations here
# (accept them in Element), so nobody's room list changes behind their back.
CONTROL_ROOM_ALIAS = "announcements-control"
LOCAL_BOTS: dict[str, Any] = {
    "announcements": {
        "timezone": "Europe/Berlin",
        "control": {"room": f"#{CONTROL_ROOM_ALIAS}:{SERVER_NAME}",
                    "announce_groups": ["it-admins"], "confirm_within": "10m"},
        "announcements": [
            {"id": "welcome-to-enclave", "title": "Welcome to in-house chat",
             "body": "Hello {first_name}! From today our chat runs on Enclave, on our own "
                     "servers. Please read the [chat guidelines](https://example.com/chat) "
                     "and acknowledge.",
             "audience": {"all_staff": True}, "require_ack": True,
             "reminders": {"after": "2m", "count": 1, "escalate_to_manager": True},
             "expires_after": "1d"},
            {"id": "engineering-standup", "title": "Stand-up in 15 minutes",
             "body": "Daily stand-up at 09:45 in *Engineering general*.",
             "schedule": {"cron": "30 9 * * mon-fri", "timezone": "Europe/Berlin"},
             "audience": {"department": ["Engineering"]},
             "delivery": {"mode": "room", "room": "engineering",
                          "room_name": "Engineering announcements"}},
        ],
        "webhooks": [
            {"id": "monitoring", "auth": {"type": "hmac",
                                          "secret": {"file": "secrets/hook_monitoring"}},
             "title": "Incident: {{alert.name}}", "body": "{{alert.summary}}",
             "audience": {"groups": ["it-admins"]}, "require_ack": True,
             "rate_limit": {"per_minute": 10, "burst": 5}},
        ],
        "dm": {"join": "invite"},
    },
    "onboarding": {
        "message": "Welcome, {first_name}! This is your company chat; it stays in-house. "
                   "Your department ({department}) has its own space:",
        "links": [{"title": "Chat guidelines", "url": "https://example.com/chat"}],
        "greet_existing": True, "poll_seconds": 10,
        "dm": {"join": "invite"},
    },
}


def ensure_control_room(hs: SynapseServer, as_token: str, owner: str) -> str:
    """The announcements control room (created once, by ``owner``, with the bot invited)."""
    alias = quote(f"#{CONTROL_ROOM_ALIAS}:{SERVER_NAME}")
    try:
        return hs.request("GET", f"/_matrix/client/v3/directory/room/{alias}",
                          access_token=as_token)["room_id"]
    except RuntimeError as e:
        if "404" not in str(e):
            raise
    room = hs.request(
        "POST", f"/_matrix/client/v3/createRoom?user_id={quote(owner)}",
        {"name": "Announcements control", "room_alias_name": CONTROL_ROOM_ALIAS,
         "topic": "!announce AUDIENCE TEXT, then !confirm (it-admins only). !help",
         "preset": "private_chat", "invite": [f"@enclave_announce:{SERVER_NAME}"]},
        access_token=as_token)
    return room["room_id"]


def gate_module_config(enclave_port: int, secret_path: Path) -> list[dict[str, Any]]:
    """The homeserver.yaml ``modules:`` entry that loads Enclave's gate."""
    return [{"module": "bridge.gate.module.EnclaveGate", "config": {
        "url": f"http://127.0.0.1:{enclave_port}", "secret_path": str(secret_path.resolve()),
        "enclave_users": [f"@enclave:{SERVER_NAME}", f"@enclave-admin:{SERVER_NAME}"],
        "on_unreachable": "deny"}}]


def write_enclave_config(state: Path, synapse_port: int, enclave_port: int,
                         directory: Path = DEFAULT_DIRECTORY) -> Path:
    """The Enclave config the stack runs with (SQLite, tokens in state/secrets)."""
    cfg: dict[str, Any] = {
        "homeserver": {
            "url": f"http://127.0.0.1:{synapse_port}",
            "server_name": SERVER_NAME,
            "registration_shared_secret": {"file": "secrets/registration_shared_secret"},
        },
        "appservice": {
            "bind_host": "127.0.0.1",
            "port": enclave_port,
            "public_url": f"http://127.0.0.1:{enclave_port}",
            "as_token": {"file": "secrets/as_token"},
            "hs_token": {"file": "secrets/hs_token"},
        },
        "database": {"url": "sqlite:///enclave.db"},
        "logging": {"level": "INFO", "format": "text"},
        "directory": {
            "source": {"type": "file", "path": str(directory.resolve()),
                       "allow_initial_passwords": True},
            "interval_minutes": 1,
            # a demo directory is tiny: removing one person is already 25%
            "safety": {"max_deactivations": 5, "max_deactivation_percent": 50.0},
            "managed_rooms": LOCAL_MANAGED_ROOMS,
        },
        "gate": {"secret": {"file": "secrets/gate_secret"}},
        "policy": LOCAL_POLICY,
        "retention": LOCAL_RETENTION,
        "bots": LOCAL_BOTS,
        # the operators' console at http://127.0.0.1:<enclave_port>/console: Dave (it-admins)
        # signs in with his demo password
        "console": {"enabled": True, "groups": {"it-admins": "operator"}},
    }
    path = state / "enclave.yaml"
    path.write_text(
        "# Written by the local stack on every start; edit the launcher, not this file.\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    return path


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Enclave exited with code {proc.returncode} during start-up")
        status, _ = _get(url)
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Enclave not ready after {timeout:.0f}s ({url})")


def wait_for_people(hs: SynapseServer, directory: Path, proc: subprocess.Popen[bytes],
                    timeout: float, ready_url: str, as_token: str) -> list[dict[str, Any]]:
    """Wait until Enclave's first directory sync has provisioned the sample people (their
    profiles answer, asked as each person through the appservice token: profiles answer
    only signed-in people who share a room, or the person themselves). Not by logging in:
    that would spend the login rate limit that the people trying Element need."""
    data = yaml.safe_load(directory.read_text()) or {}
    people = [p for p in data.get("people") or [] if not p.get("disabled")]
    deadline = time.monotonic() + timeout
    while True:  # the first run has finished (its outcome is on /ready)
        if proc.poll() is not None:
            raise RuntimeError(f"Enclave exited with code {proc.returncode}")
        status, body = _get(f"{ready_url}")
        run = (json.loads(body or b"{}").get("directory") or {}) if status == 200 else {}
        if run.get("outcome"):
            if run["outcome"] != "ok":
                raise RuntimeError(f"the first directory sync did not succeed: {run}")
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no directory sync within {timeout:.0f}s; see enclave.log")
        time.sleep(0.3)
    for person in people:
        user_id = f"@{person['username']}:{hs.server_name}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Enclave exited with code {proc.returncode}")
            try:
                hs.request("GET", f"/_matrix/client/v3/profile/{quote(user_id)}"
                           f"?user_id={quote(user_id)}", access_token=as_token)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{user_id} was not provisioned by directory sync within "
                        f"{timeout:.0f}s; see enclave.log") from None
                time.sleep(0.3)
    return people


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="enclave-local-stack", description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", type=Path, default=REPO_ROOT / "var" / "local-stack")
    p.add_argument("--fresh", action="store_true", help="wipe the state dir first")
    p.add_argument("--synapse-port", type=int, default=8008)
    p.add_argument("--enclave-port", type=int, default=29330)
    p.add_argument("--directory", type=Path, default=DEFAULT_DIRECTORY)
    args = p.parse_args(argv)

    state: Path = args.state_dir.resolve()
    if args.fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    for port, what in ((args.synapse_port, "Synapse"), (args.enclave_port, "Enclave")):
        if not _port_free(port):
            print(f"error: port {port} for {what} is in use on 127.0.0.1 (another stack "
                  f"running?); pick another with --{what.lower()}-port", file=sys.stderr)
            return 1

    shared_secret = _secret_file(state / "secrets" / "registration_shared_secret")
    _secret_file(state / "secrets" / "gate_secret")
    _secret_file(state / "secrets" / "hook_monitoring")
    config = write_enclave_config(state, args.synapse_port, args.enclave_port, args.directory)
    registration = state / "enclave-registration.yaml"
    subprocess.run(
        [sys.executable, "-m", "bridge", "registration", "-c", str(config),
         "-o", str(registration)],
        check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
    )

    hs = SynapseServer(
        base_dir=state / "synapse", server_name=SERVER_NAME, port=args.synapse_port,
        app_service_config_files=[registration], registration_shared_secret=shared_secret,
        production_rate_limits=True,
        extra_config={"modules": gate_module_config(args.enclave_port,
                                                    state / "secrets" / "gate_secret")},
    )
    enclave: subprocess.Popen[bytes] | None = None
    stop_requested = False

    def request_stop(signum: int, _frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    try:
        print(f"starting Synapse on 127.0.0.1:{args.synapse_port} ...", flush=True)
        hs.start()
        print(f"starting Enclave on 127.0.0.1:{args.enclave_port} ...", flush=True)
        log = open(state / "enclave.log", "ab")  # kept open while Enclave runs
        enclave = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "-c", str(config)],
            cwd=REPO_ROOT, stdout=log, stderr=log, start_new_session=True,
        )
        wait_ready(f"http://127.0.0.1:{args.enclave_port}/ready", enclave, 60)
        as_token = (state / "secrets" / "as_token").read_text().strip()
        people = wait_for_people(hs, args.directory, enclave, 60,
                                 f"http://127.0.0.1:{args.enclave_port}/ready", as_token)
        ensure_control_room(hs, as_token, f"@dave:{SERVER_NAME}")
        print_banner(args, state, hs, enclave, people)
        while not stop_requested:
            if enclave.poll() is not None:
                print(f"Enclave exited (code {enclave.returncode}); see {state}/enclave.log",
                      file=sys.stderr)
                code = 1
                break
            if not hs.running:
                print(f"Synapse exited; see {hs.log_path}", file=sys.stderr)
                code = 1
                break
            time.sleep(0.2)
    except Exception as e:  # report and still stop whatever was started
        print(f"error: {e}", file=sys.stderr)
        code = 1
    finally:
        print("stopping ...", flush=True)
        if enclave is not None and enclave.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(enclave.pid, signal.SIGTERM)
            try:
                enclave.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(enclave.pid, signal.SIGKILL)
                enclave.wait()
        hs.stop()
        print("stopped.", flush=True)
    return code


def print_banner(args: argparse.Namespace, state: Path, hs: SynapseServer,
                 enclave: subprocess.Popen[bytes], people: list[dict[str, Any]]) -> None:
    lines = [
        "",
        "Enclave local stack is ready.",
        f"  Homeserver URL (Element: 'Edit' homeserver): {hs.base_url}",
        f"  Server name: {SERVER_NAME}",
        f"  Enclave: http://127.0.0.1:{args.enclave_port}/ready  /metrics",
        "  Log in as (provisioned by directory sync from the sample directory file,",
        f"  {args.directory}; evaluation passwords):",
    ]
    for person in people:
        lines.append(f"    {person['username']:<8} {person['initial_password']:<24} "
                     f"{person.get('display_name', '')} ({person.get('department', '')})")
    lines += [
        "  Each has their department's space and general room, and 'All staff'.",
        "  Separation (policy in the config): rooms you create are 'internal' and never",
        "  federate; carol (Sales) and dave (Finance) are behind an information barrier:",
        "  try to DM one from the other, invite one into the other's room, or search the",
        "  user directory; each is refused with the rule's id. Explain a decision:",
        f"  enclave explain invite @carol:{SERVER_NAME} @dave:{SERVER_NAME} -c "
        f"{state}/enclave.yaml",
        "  Bots: 'Welcome' greets everyone by DM (accept its invitation). As dave, in",
        "  'Announcements control': !announce department:Sales Hello Sales!  then !confirm.",
        "  Send the sample announcement that asks for an acknowledgement (✅ or !ack;",
        "  a reminder after 2 minutes, then the manager):",
        f"  enclave announcements send welcome-to-enclave -c {state}/enclave.yaml",
        f"  enclave announcements report welcome-to-enclave -c {state}/enclave.yaml",
        "  Retention: every room shows its period (room settings, and Enclave's notice).",
        "  In a room you created type !retention 2m; after 2-3 minutes the older messages",
        "  are gone from the homeserver but kept in the archive. Export them, or hold them:",
        f"  enclave export --room '!ROOM' --out /tmp/export -c {state}/enclave.yaml",
        f"  enclave hold add --case DEMO-1 --reason demo --by you --user @carol:{SERVER_NAME}"
        f" -c {state}/enclave.yaml   (then: enclave retention --plan, archive verify)",
        "  Edit the directory file (rename, move, disable someone): within a minute",
        "  Enclave applies it; or now: enclave sync --plan / --apply -c "
        f"{state}/enclave.yaml",
        f"  State: {state}   Enclave log: {state}/enclave.log",
        f"  Audit log: {Path(sys.executable).parent / 'enclave'} audit -c {state}/enclave.yaml",
        f"  pids: synapse={hs.pid} enclave={enclave.pid}",
        "Press Ctrl-C to stop everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
