"""Rules that exist once (issue #18): no module keeps its own copy of a kernel rule.

Each check looks for the shape the old copies had; a new copy written the same way fails
here and should call the shared helper instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.store.lease import new_lease_owner

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for top in ("bridge", "bots") for p in (ROOT / top).rglob("*.py"))

# (what, pattern, the only files allowed to have it)
COPIES = [
    ("lease owner recipe", r'gethostname\(\)\}:\{os\.getpid\(\)\}:',
     {"bridge/store/lease.py"}),
    ("backoff doubling", r'delay \* 2\b|delay \*= 2|\* 2 \*\* \(?attempt|\* \(2 \*\* \(attempt',
     {"bridge/kernel/retry.py"}),
    ("retry_after_ms reading", r'\.get\("retry_after_ms"\)', {"bridge/kernel/retry.py"}),
    ("reply fallback stripping", r'def _?strip_reply_fallback', {"bridge/kernel/relations.py"}),
    ("duration parser without its unit", r'def parse_duration\(', set()),
    ("timestamp conversion", r'fromtimestamp\(\s*\w+ / 1000', {"bridge/kernel/timestamps.py"}),
    ("manual HTML escaping (the transcript template autoescapes)", r'html\.escape\(', set()),
    # the gate module runs inside Synapse and imports nothing of Enclave: it reads the room
    # for the decision, which then uses the kernel's rule
    ("creators of a room", r'\.get\("additional_creators"\)',
     {"bridge/kernel/power.py", "bridge/gate/module.py"}),
    ("m.in_reply_to reading", r'\.get\("m\.in_reply_to"\)', {"bridge/kernel/relations.py"}),
    ("m.in_reply_to writing", r'\{"m\.in_reply_to":', {"bridge/kernel/relations.py"}),
    # a user's level read straight from the users map (no users_default, no v12 creators):
    # kernel.power.user_level / user_level_in_state
    ("power level of a user", r'users\.get\([^)]*,\s*0\)', set()),
    ("duration units", r'\[smhdwy?\]|"w": 604800|\b604800\b', {"bridge/kernel/durations.py"}),
    # legal holds are placed and released by RetentionService.add_hold / release_hold
    # (bridge/retention/holds.py, the audit record with them), never straight on the store
    # by the CLI or anyone else
    # the localpart / server part of a Matrix id: kernel.ids (the first ":" splits them)
    ("parts of a Matrix id", r'\[1:\]\.(partition|split)\(":"|\.split\(":", 1\)\[[01]\]',
     {"bridge/kernel/ids.py"}),
    # who is one of Enclave's own users (bot, admin, namespace): policy.power.is_enclave_user
    ("Enclave's own users",
     r'startswith\(self\.service_prefix\)|startswith\(f"@\{[\w.]*namespace_prefix', set()),
    # which edits count (m.replace by the original sender, same type, ...): the transcript
    # and the export's lineage both call kernel.relations.replacement_problem
    ("validity of an edit", r'def _?replacement_problem|original\.get\("sender"\) ==',
     {"bridge/kernel/relations.py"}),
    # a CSV cell a spreadsheet will not run: kernel.spreadsheet.csv_cell (export, console,
    # announcement reports)
    ("CSV formula guard", r'\("=", "\+", "-", "@"', {"bridge/kernel/spreadsheet.py"}),
    ("placing or releasing a hold", r'\.hold_add\(|\.hold_release\(|validate_hold\(',
     {"bridge/retention/holds.py", "bridge/policy/retention.py"}),
]


def test_bots_call_client_methods_not_raw_requests() -> None:
    """What the bots ask of the homeserver (reads, sends, keys, logins) goes through
    MatrixClient methods: no ``.request(`` call in bots, whatever the HTTP method."""
    raw = re.compile(r'\.request\(')
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "bots").rglob("*.py")
             if raw.search(p.read_text())]
    assert found == []


def test_every_csv_writer_guards_its_cells() -> None:
    """A module that writes CSV passes its cells through kernel.spreadsheet.csv_cell (the
    bots' console page once wrote the announcement report's rows unguarded beside the
    report's own guarded writer)."""
    writer = re.compile(r'csv\.(writer|DictWriter)\(')
    found = [str(p.relative_to(ROOT)) for p in SOURCES
             if writer.search(text := p.read_text()) and "csv_cell(" not in text]
    assert found == []


@pytest.mark.parametrize(("what", "pattern", "allowed"), COPIES, ids=[c[0] for c in COPIES])
def test_rule_written_once(what: str, pattern: str, allowed: set[str]) -> None:
    rx = re.compile(pattern)
    found = {str(p.relative_to(ROOT)) for p in SOURCES if rx.search(p.read_text())}
    assert found <= allowed, f"{what} copied in {sorted(found - allowed)}"


def test_lease_owner_names_host_process_and_holder() -> None:
    a, b = new_lease_owner(), new_lease_owner()
    assert a != b  # two holders in one process never share a lease
    host, pid, token = a.rsplit(":", 2)
    assert host and pid.isdigit() and re.fullmatch(r"[0-9a-f]{8}", token)
