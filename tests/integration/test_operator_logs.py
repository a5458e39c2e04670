"""Logs an operator can read, and metrics the alerts can rely on, from a real ``enclave run``.

Enclave runs idle with a scheduled directory sync every 3 s and the onboarding bot's timer
every 0.5 s (both on the root's one APScheduler): no APScheduler line, nothing logged while
nothing happens, a line per job run only when it changed something; in JSON every line is
one JSON object, and with ``logging.libraries: INFO`` APScheduler's own lines show, naming
one scheduler started. The scrape names every metric deploy/monitoring's alerts and
dashboard read from Enclave.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from devstack.monitoring import used_names

from .bots_helpers import person, write_bots_config
from .harness import EnclaveProcess, Stack, metric, parse_metrics, wait_until

pytestmark = pytest.mark.integration

JOB_MINUTES = 0.05  # a directory sync every 3 s


def enclave_config(stack: Stack, base: Path, **logging_cfg: Any) -> Path:
    # someone new on this homeserver: the start-up run provisions them (a line to log)
    people = [person("1", "ann-" + uuid.uuid4().hex[:6], "Sales")]
    path = write_bots_config(stack, base, people, bots={"onboarding": {
        "poll_seconds": 0.5, "message": "Welcome, {first_name}!"}})
    cfg = yaml.safe_load(path.read_text())
    cfg["directory"]["interval_minutes"] = JOB_MINUTES
    cfg["directory"]["sync_on_start"] = True
    cfg["logging"] = {"level": "INFO", **logging_cfg}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def log_lines(proc: EnclaveProcess, since: int = 0) -> list[str]:
    """The process's log from byte ``since``, without the harness's start markers."""
    with proc.log_path.open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode("utf-8", errors="replace")
    return [x for x in text.splitlines() if x.strip() and not x.startswith("===== start")]


def job_metric(samples: dict, series: str, **labels: str) -> float:
    """``metric`` of the directory-sync job (its label ``name`` is metric()'s argument)."""
    want = {("name", "directory-sync"), *labels.items()}
    return sum(v for (n, lab), v in samples.items() if n == series and want <= set(lab))


async def job_runs(proc: EnclaveProcess, outcome: str = "ok") -> float:
    return job_metric(await proc.metrics(), "enclave_job_runs_total", outcome=outcome)


async def wait_runs(proc: EnclaveProcess, n: float) -> None:
    async def enough() -> bool:
        return await job_runs(proc) >= n

    await wait_until(enough, within=60, what=f"{n} clean directory-sync runs",
                     describe=proc.describe)


async def test_an_idle_enclave_is_quiet_and_its_metrics_cover_the_alerts(
        shared_stack: Stack, tmp_path: Path) -> None:
    proc = EnclaveProcess(enclave_config(shared_stack, tmp_path / "text"),
                          shared_stack.as_port)
    try:
        await proc.start()
        # start-up is over with the completeness check's first report (after its grace)
        async def first_check() -> bool:
            return any("completeness check:" in x for x in log_lines(proc))

        await wait_until(first_check, within=60, what="the first completeness check",
                         describe=proc.describe)
        await wait_runs(proc, 2)
        mark = proc.log_path.stat().st_size
        before = await job_runs(proc)
        await wait_runs(proc, before + 4)  # >= 12 s idle: 24 timer runs of the bot
        idle = log_lines(proc, mark)
        samples_text = await _metrics_text(proc)
        everything = log_lines(proc)
    finally:
        if proc.running:
            assert await proc.stop() == 0, proc.describe()

    assert not [x for x in everything if "apscheduler" in x.lower()
                or "Running job" in x or "executed successfully" in x], proc.describe()
    # nothing happened, nothing logged (quiet job runs are DEBUG)
    assert idle == [], "\n".join(idle)
    # start-up: a handful of lines, each an event (listening, leader, ping, bot, jobs...)
    assert len(everything) <= 20, "\n".join(everything)
    assert any("enclave listening on" in x for x in everything)
    assert any("job directory-sync (start-up): ok" in x for x in everything), everything

    # the job metrics the EnclaveJobFailing alert reads
    samples = parse_metrics(samples_text)
    assert job_metric(samples, "enclave_job_runs_total", outcome="ok") >= before + 4
    assert job_metric(samples, "enclave_job_runs_total", outcome="failed") == 0
    assert job_metric(samples, "enclave_job_last_success_timestamp_seconds") > 0
    assert job_metric(samples, "enclave_job_last_failure_timestamp_seconds") == 0
    assert metric(samples, "enclave_directory_sync_runs_total", outcome="refused") == 0
    # every Enclave metric the alerts and the dashboard use is in a real scrape
    families = set(re.findall(r"^# TYPE (\S+) \S+$", samples_text, re.M))
    exposed = families | {f + "_total" for f in families} | {
        f + s for f in families for s in ("_bucket", "_count", "_sum")}
    missing = {n: sorted(w) for n, w in used_names().items()
               if not n.startswith("enclave_gate_module_") and n not in exposed}
    assert not missing, missing


async def test_json_logs_are_one_object_per_line_and_one_scheduler_starts(
        shared_stack: Stack, tmp_path: Path) -> None:
    # libraries at INFO: APScheduler's own lines show, and so does each scheduler's start
    proc = EnclaveProcess(enclave_config(shared_stack, tmp_path / "json", format="json",
                                         libraries="INFO"), shared_stack.as_port)
    try:
        await proc.start()
        await wait_runs(proc, 2)
    finally:
        if proc.running:
            assert await proc.stop() == 0, proc.describe()
    lines = log_lines(proc)
    objects = []
    for line in lines:
        try:
            objects.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{proc.describe()}")
    for o in objects:
        assert {"ts", "level", "logger", "message"} <= set(o), o
        assert o["ts"].endswith("Z")
    started = [o for o in objects if o["logger"].startswith("apscheduler")
               and o["message"] == "Scheduler started"]
    assert len(started) == 1, [o["message"] for o in objects
                               if o["logger"].startswith("apscheduler")][:20]
    # APScheduler runs the bot's timer and the job on that one scheduler
    assert any("Waker._timer" in o["message"] for o in objects)
    runs = [o for o in objects if o.get("job") == "directory-sync"]
    assert runs and runs[0]["outcome"] == "ok" and runs[0]["reason"] == "start-up", runs
    assert isinstance(runs[0]["seconds"], float)
    # tokens never reach the log
    text = proc.log_path.read_text(encoding="utf-8")
    assert shared_stack.as_token not in text and shared_stack.hs_token not in text


async def _metrics_text(proc: EnclaveProcess) -> str:
    async with aiohttp.ClientSession() as s, s.get(proc.base_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()
