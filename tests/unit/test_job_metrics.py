"""Scheduled jobs are counted by outcome and logged in one line only when they changed
something or did not end ok (bridge.app.interval_job, bridge.metrics, bridge.root._report)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bridge.app import interval_job
from bridge.extension import JobReport, ScheduledJob
from bridge.metrics import JOB_OUTCOMES, Metrics
from bridge.root import _report


def value(m: Metrics, series: str, /, **labels: str) -> float | None:
    return m.registry.get_sample_value(series, labels)


def test_record_job_sets_the_last_success_or_failure() -> None:
    m = Metrics()
    m.job_known("sync")
    for outcome in JOB_OUTCOMES:  # exported at 0 before the first run
        assert value(m, "enclave_job_runs_total", name="sync", outcome=outcome) == 0
    assert value(m, "enclave_job_last_success_timestamp_seconds", name="sync") == 0
    m.record_job("sync", "ok", 100.0, 0.5)
    m.record_job("sync", "partial", 200.0, 0.5)
    m.record_job("sync", "refused", 300.0, 0.1)
    m.record_job("sync", "skipped", 400.0, 0.0)
    assert value(m, "enclave_job_last_success_timestamp_seconds", name="sync") == 100
    # partial is a failure; refused and skipped are neither
    assert value(m, "enclave_job_last_failure_timestamp_seconds", name="sync") == 200
    m.record_job("sync", "failed", 500.0, 0.5)
    assert value(m, "enclave_job_last_failure_timestamp_seconds", name="sync") == 500
    assert value(m, "enclave_job_runs_total", name="sync", outcome="refused") == 1
    assert value(m, "enclave_job_seconds_count", name="sync") == 5


@pytest.mark.parametrize(("status", "summary", "expected"), [
    ({"outcome": "ok", "failed": 0}, "", JobReport("ok", "")),
    ({"outcome": "ok", "failed": 0}, "create_account 2", JobReport("ok", "create_account 2")),
    ({"outcome": "partial", "failed": 3}, "update 1", JobReport("partial", "update 1, 3 failed")),
    ({"outcome": "error", "error": "RuntimeError: boom"}, "", JobReport("failed",
                                                                      "RuntimeError: boom")),
    ({"outcome": "refused", "problems": ["shrank by 60%", "x"]}, "",
     JobReport("refused", "shrank by 60%; x")),
])
def test_a_job_status_becomes_its_report(status: dict[str, Any], summary: str,
                                          expected: JobReport) -> None:
    assert _report(status, summary) == expected


class KV:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get_kv(self, key: str) -> str | None:
        return self.data.get(key)

    async def set_kv(self, key: str, value: str) -> None:
        self.data[key] = value


def services(metrics: Metrics) -> Any:
    """What interval_job reads of the root, with this replica leading."""
    bootstrapped = asyncio.Event()
    bootstrapped.set()
    leadership = SimpleNamespace(is_leader=True, name="r1", elections=1, on_elected=[])
    return SimpleNamespace(leadership=leadership, metrics=metrics, clock_ms=lambda: 1_000_000,
                           stores=SimpleNamespace(kv=KV()), bootstrapped=bootstrapped,
                           scheduler=AsyncIOScheduler())


@pytest.mark.parametrize(("result", "outcome", "level", "line"), [
    (None, "ok", None, None),  # nothing done: no line
    (JobReport("ok", "create_account 1"), "ok", logging.INFO,
     "job sync (start-up): ok in"),
    (JobReport("partial", "1 failed"), "partial", logging.WARNING,
     "job sync (start-up): partial in"),
    (RuntimeError("boom"), "failed", logging.WARNING, "job sync (start-up): failed in"),
])
async def test_a_run_is_counted_and_logged_once_when_it_matters(
        result: Any, outcome: str, level: int | None, line: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    svc = services(metrics)

    async def run(reason: str) -> JobReport | None:
        if isinstance(result, Exception):
            raise result
        return result

    ctx = interval_job(svc, ScheduledJob("sync", 0, run, at_start=True))
    caplog.set_level(logging.DEBUG, logger="bridge.app")
    gen = ctx(web.Application())
    await gen.__anext__()
    for _ in range(100):  # the start-up run happens in a task
        if value(metrics, "enclave_job_runs_total", name="sync", outcome=outcome):
            break
        await asyncio.sleep(0.01)
    with pytest.raises(StopAsyncIteration):
        await gen.__anext__()
    assert value(metrics, "enclave_job_runs_total", name="sync", outcome=outcome) == 1
    assert svc.stores.kv.data["job-last:sync"] == "1000000"
    results = [r for r in caplog.records if r.name == "bridge.app"
               and r.levelno >= logging.INFO and "job sync (start-up)" in r.getMessage()]
    if line is None:
        assert results == []
    else:
        assert len(results) == 1 and results[0].levelno == level
        assert results[0].getMessage().startswith(line)
        assert results[0].__dict__["outcome"] == outcome  # a JSON field
        # a run that raised: its traceback on the same line
        assert (results[0].exc_info is not None) == isinstance(result, Exception)
