"""deploy/systemd for real, short of systemd itself: install-venv.sh builds a fresh venv
from this checkout (pip, not editable) into a temporary prefix and renders the unit; the
unit's ExecStartPre and ExecStart lines then run as systemd would start them (its
WorkingDirectory and Environment, nothing of this checkout on the path) against a real
Synapse, until /ready answers 200; SIGTERM (the unit's KillSignal) must end it cleanly.

The sandbox directives (ProtectSystem=, SystemCallFilter=, ...) are not applied here: no
systemd manages the process. tests/unit/deploy/test_systemd.py checks them statically and
with `systemd-analyze security`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import REPO_ROOT, Stack, tail

pytestmark = pytest.mark.integration

INSTALL = REPO_ROOT / "deploy" / "systemd" / "install-venv.sh"


def parse_unit(text: str) -> dict[str, list[str]]:
    """[Service] keys of a unit file: {key: [values in order]}."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unit_env(unit: dict[str, list[str]]) -> dict[str, str]:
    """What systemd gives the service: a bare environment plus Environment= lines."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for assignment in unit.get("Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        return 0, f"{type(e).__name__}: {e}"


def base_python() -> str:
    """The interpreter this test's venv was made from (a fresh venv needs a real one)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def test_install_venv_then_run_the_unit_against_synapse(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    had_build_dir = (REPO_ROOT / "build").exists()
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(INSTALL), "--prefix", str(prefix), "--source", str(REPO_ROOT),
         "--python", base_python(), "--no-user"],
        capture_output=True, text=True, timeout=900, check=False)
    install_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"install-venv.sh took {install_seconds:.0f}s")

    venv = prefix / "venv"
    unit_path = prefix / "lib" / "systemd" / "system" / "enclave.service"
    unit = parse_unit(unit_path.read_text())
    (pre,), (start,) = unit["ExecStartPre"], unit["ExecStart"]
    pre_argv, start_argv = shlex.split(pre), shlex.split(start)
    assert pre_argv[0] == start_argv[0] == str(venv / "bin" / "enclave")
    (workdir,) = unit["WorkingDirectory"]
    (writable,) = unit["ReadWritePaths"]
    assert workdir == writable == str(prefix / "var" / "lib" / "enclave")
    env = unit_env(unit)
    assert "PYTHONPATH" not in env

    # the venv holds a copy of the package, not a link to this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import bridge, bots; print(bridge.__file__); print(bots.__file__)"],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
                           check=False)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(venv), f"{line} is not inside the venv"
    # built from a copy: the checkout gets no build/ (another test may run from it)
    assert had_build_dir or not (REPO_ROOT / "build").exists()

    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit_path)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert verify.returncode == 0, verify.stderr

    stack = Stack.create(tmp_path / "stack")
    proc: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "enclave.log"
    try:
        # The config install-venv.sh wrote, pointed at this Synapse: its server, the
        # registration's port and tokens (Synapse knows them already).
        config = Path(pre_argv[pre_argv.index("--config") + 1])
        assert config == prefix / "etc" / "enclave" / "config.yaml"
        cfg = yaml.safe_load(config.read_text())
        secrets_dir = config.parent / "secrets"
        for name in ("as_token", "hs_token", "registration_shared_secret"):
            shutil.copy(stack.secrets_dir / name, secrets_dir / name)
        cfg["homeserver"].update(url=stack.synapse.base_url, server_name=stack.server_name,
                                 registration_shared_secret={
                                     "file": "secrets/registration_shared_secret"})
        cfg["appservice"].update(port=stack.as_port,
                                 public_url=f"http://127.0.0.1:{stack.as_port}")
        assert cfg["appservice"]["as_token"] == {"file": "secrets/as_token"}
        cfg["inbox"] = {"recovery_sweeps_seconds": []}
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))

        validate = subprocess.run([str(venv / "bin" / "enclave"), "validate", "-c", str(config)],
                                  cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=60, check=False)
        assert validate.returncode == 0, validate.stderr

        migrate = subprocess.run(pre_argv, cwd=workdir, env=env, capture_output=True,
                                 text=True, timeout=120, check=False)
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        assert "migrated" in migrate.stdout, migrate.stdout
        # the database lives in the only writable folder
        db = cfg["database"]["url"].removeprefix("sqlite:///")
        assert Path(db).is_file() and Path(db).is_relative_to(writable), db

        ready_url = f"http://127.0.0.1:{stack.as_port}/ready"
        run_started = time.monotonic()
        with log_path.open("wb") as log:
            proc = subprocess.Popen(start_argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        status, body = 0, None
        while time.monotonic() - run_started < 90:
            assert proc.poll() is None, (
                f"enclave run exited with {proc.returncode}\n{tail(log_path)}")
            status, body = get(ready_url)
            if status == 200 and isinstance(body, dict) and body.get("bot"):
                break
            time.sleep(0.2)
        assert status == 200, f"/ready: {status} {body}\n{tail(log_path)}"
        assert body["ready"] is True and body["store"]["engine"] == "sqlite", body
        assert body["homeserver"]["ok"] is True and body["admin"]["ok"] is True, body
        assert get(f"http://127.0.0.1:{stack.as_port}/health") == (200, {"status": "ok"})
        print(f"enclave run: /ready after {time.monotonic() - run_started:.1f}s")

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"enclave run did not stop within 30s of SIGTERM\n{tail(log_path)}")
        assert code == 0, f"exit code {code}\n{tail(log_path)}"
        assert get(ready_url)[0] == 0, "still answering after it exited"
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        stack.stop()
