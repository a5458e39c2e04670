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
            "(live, backfill)", ["path"], registry=r)
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
