"""Prometheus metrics, one registry per running app (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.transactions = Counter(
            "enclave_transactions", "Homeserver transactions by result", ["result"], registry=r)
        self.events_received = Counter(
            "enclave_events_received", "Events accepted into the inbox", ["kind"], registry=r)
        self.events_quarantined = Counter(
            "enclave_events_quarantined", "Malformed events kept aside with their reason",
            registry=r)
        self.events_processed = Counter(
            "enclave_events_processed", "Inbox events by processing outcome", ["outcome"],
            registry=r)
        self.processing_lag = Histogram(
            "enclave_processing_lag_seconds", "From receipt to processed",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r)
        self.txn_seconds = Histogram(
            "enclave_transaction_seconds", "Time to answer a homeserver transaction",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
            registry=r)
        self.actions = Counter(
            "enclave_actions", "Actions by kind and outcome", ["kind", "outcome"], registry=r)
        self.resends_avoided = Counter(
            "enclave_resends_avoided",
            "Resends skipped: the read-back found the earlier attempt's event", registry=r)
        self.rate_limited = Counter(
            "enclave_homeserver_rate_limited", "429 answers received (and honoured)", registry=r)
        self.inbox_events = Gauge(
            "enclave_inbox_events", "Inbox events by status", ["status"], registry=r)
        self.inbox_oldest_pending = Gauge(
            "enclave_inbox_oldest_pending_age_seconds",
            "Age of the oldest pending event (processing lag now)", registry=r)
        self.quarantine_size = Gauge(
            "enclave_quarantine_size", "Events in quarantine", registry=r)
        self.actions_by_status = Gauge(
            "enclave_outbox_actions", "Outbox actions by status", ["status"], registry=r)
        self.directory_runs = Counter(
            "enclave_directory_sync_runs", "Directory sync runs by outcome (ok, partial, "
            "refused)", ["outcome"], registry=r)
        self.directory_last_success = Gauge(
            "enclave_directory_sync_last_success_timestamp_seconds",
            "When a directory sync last applied without failures", registry=r)
        self.separation_enforced = Counter(
            "enclave_separation_enforced", "Separation actions decided by layer (reactive, "
            "reconcile) and action kind", ["layer", "kind"], registry=r)
        self.archived_events = Counter(
            "enclave_archived_events", "Events written to the compliance archive by path "
            "(live, backfill, snapshot)", ["path"], registry=r)
        self.archived_media = Counter(
            "enclave_archived_media", "Media files copied to the archive by outcome",
            ["outcome"], registry=r)
        self.purged_events = Counter(
            "enclave_purged_events", "Events purged from the homeserver after archiving",
            registry=r)
        self.purge_step_seconds = Histogram(
            "enclave_purge_step_seconds", "Duration of one bounded purge step on the homeserver",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)
        self.leader = Gauge(
            "enclave_leader", "1 while this replica leads (inbox processing, scheduled jobs, "
            "bots' loops), else 0", registry=r)
        self.retention_last_success = Gauge(
            "enclave_retention_last_success_timestamp_seconds",
            "When a retention run last finished without failures", registry=r)
        self.gate_checks = Counter(
            "enclave_gate_checks", "Gate checks from the Synapse module by check and outcome "
            "(allow, deny, error, bad_request, unauthorized)", ["check", "outcome"],
            registry=r)
        self.gate_seconds = Histogram(
            "enclave_gate_decide_seconds", "Time to decide one gate check",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1),
            registry=r)
        self.events_recovered = Counter(
            "enclave_events_recovered", "Events the homeserver has but never pushed, put into "
            "the inbox by the completeness check, by cause (homeserver_restart, "
            "enclave_downtime, not_pushed)", ["cause"], registry=r)
        self.completeness_gap = Gauge(
            "enclave_completeness_oldest_gap_seconds",
            "Age of the oldest event the homeserver had and the inbox did not, at the last "
            "completeness check (0: none)", registry=r)
        self.completeness_lag = Gauge(
            "enclave_completeness_lag_seconds",
            "Seconds since the start of the last complete completeness check (events newer "
            "than that are not verified yet)", registry=r)
        self.completeness_bound = Gauge(
            "enclave_completeness_bound_seconds",
            "The configured bound (inbox.completeness.bound_seconds) the lag and the oldest "
            "gap are held to", registry=r)
        # Scheduled jobs (bridge.app.interval_job): what alerts on "a job fails" read.
        self.job_runs = Counter(
            "enclave_job_runs", "Scheduled job runs on this replica by job and outcome (ok, "
            "partial, failed, refused, skipped); the label is ``name``, not ``job``, which "
            "is Prometheus' own", ["name", "outcome"], registry=r)
        self.job_last_success = Gauge(
            "enclave_job_last_success_timestamp_seconds",
            "When a job's last run with outcome ok ended on this replica (0: not since start)",
            ["name"], registry=r)
        self.job_last_failure = Gauge(
            "enclave_job_last_failure_timestamp_seconds",
            "When a job's last run with outcome failed or partial ended on this replica "
            "(0: not since start)", ["name"], registry=r)
        self.job_seconds = Histogram(
            "enclave_job_seconds", "Duration of one scheduled job run", ["name"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600), registry=r)
        self.audit_streamed = Counter(
            "enclave_audit_streamed", "Audit records handed to a stream sink (at least once: "
            "a resend after a crash counts again)", ["sink"], registry=r)
        self.audit_stream_cursor = Gauge(
            "enclave_audit_stream_cursor", "The last audit id a stream sink has", ["sink"],
            registry=r)
        self.audit_stream_lag = Gauge(
            "enclave_audit_stream_lag_seconds", "Age of the oldest audit record a stream sink "
            "does not have yet (0: caught up)", ["sink"], registry=r)
        self.audit_stream_errors = Counter(
            "enclave_audit_stream_errors", "Failed attempts to send to a stream sink (each "
            "retried with backoff)", ["sink"], registry=r)

    def job_known(self, job: str) -> None:
        """Export a job's series at 0 before its first run, so ``increase()`` and the
        dashboards see the first failure (a series born at 1 has no increase)."""
        for outcome in JOB_OUTCOMES:
            self.job_runs.labels(name=job, outcome=outcome)
        self.job_last_success.labels(name=job)
        self.job_last_failure.labels(name=job)

    def record_job(self, job: str, outcome: str, ended_s: float, seconds: float) -> None:
        """Count one run of ``job`` (``outcome`` one of :data:`JOB_OUTCOMES`)."""
        self.job_runs.labels(name=job, outcome=outcome).inc()
        self.job_seconds.labels(name=job).observe(seconds)
        if outcome == "ok":
            self.job_last_success.labels(name=job).set(ended_s)
        elif outcome in JOB_FAILURES:
            self.job_last_failure.labels(name=job).set(ended_s)


# What a scheduled job's run can end with; ``failed`` and ``partial`` are failures.
JOB_OUTCOMES = ("ok", "partial", "failed", "refused", "skipped")
JOB_FAILURES = frozenset({"partial", "failed"})
