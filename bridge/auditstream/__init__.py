"""The audit stream: every audit record also to syslog (RFC 5424) and/or a JSON-lines file,
at least once and in audit id order, from a cursor per sink kept in the store
(docs/operators/audit-streaming.md)."""
