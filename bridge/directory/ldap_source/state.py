"""The incremental state kept in the store's key/value table between reads, pure: what a
read found (:class:`ReadResult`), the stored state (:class:`IncrementalState`), its JSON
form and the fingerprint of the configuration it was written for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ...config.directory import LdapSourceConfig
from ...model.people import DirectorySnapshot
from .dialect import AttrNames, PersonRecord

STATE_VERSION = 1


@dataclass
class IncrementalState:
    token: str
    fingerprint: str
    mode: str
    mark: str | None
    runs_since_full: int
    runs: int
    people: dict[str, PersonRecord]
    skipped: set[str] = field(default_factory=set)


@dataclass
class ReadResult:
    snapshot: DirectorySnapshot
    records: dict[str, PersonRecord]
    skipped: set[str]
    mark: str | None
    full: bool
    warnings: list[str]
    changed: int | None = None


def state_fingerprint(config: LdapSourceConfig, names: AttrNames, mode: str) -> str:
    """What the stored state depends on: a different fingerprint means a full read."""
    data = {"url": config.url, "dialect": config.dialect, "users": config.users.model_dump(),
            "names": names.__dict__, "mode": mode, "v": STATE_VERSION}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def decode_state(mark_raw: str, people_raw: str) -> IncrementalState | None:
    """The stored state from its two JSON values; None when they were not written together
    (tokens differ) or by another version. Raises ValueError, KeyError or TypeError when
    unreadable."""
    m = json.loads(mark_raw)
    p = json.loads(people_raw)
    if m.get("token") != p.get("token") or m.get("version") != STATE_VERSION:
        return None
    recs = {d["id"]: PersonRecord.from_json(d) for d in p["people"]}
    return IncrementalState(token=m["token"], fingerprint=m["fingerprint"], mode=m["mode"],
                            mark=m.get("mark"), runs_since_full=int(m["runs_since_full"]),
                            runs=int(m.get("runs", 0)), people=recs,
                            skipped=set(p.get("skipped", [])))


def encode_state(old: IncrementalState | None, result: ReadResult, *, token: str,
                 fingerprint: str, mode: str) -> tuple[str, str]:
    """The (people, mark) JSON values that store ``result`` after ``old``; both carry
    ``token``, so a crash between their two writes is seen as inconsistent."""
    runs = (old.runs if old else 0) + 1
    people = {"token": token,
              "people": [r.to_json() for _, r in sorted(result.records.items())],
              "skipped": sorted(result.skipped)}
    mark = {"version": STATE_VERSION, "token": token, "fingerprint": fingerprint,
            "mode": mode, "mark": result.mark, "runs": runs,
            "runs_since_full": 0 if result.full else (old.runs_since_full + 1 if old else 0)}
    return json.dumps(people, separators=(",", ":")), json.dumps(mark)
