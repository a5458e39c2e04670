"""The lineage of each archived message (pure): the original, each edit (``m.replace``) in
archive order, edits clients ignore (recorded as rejected, with why), and the redaction
(who, when, why).

Whether an edit counts is the kernel's rule (:func:`bridge.kernel.relations.
replacement_problem`: the original sender, same type, ...). The archive keeps what was
said: the original's content is the archived copy even after the homeserver redacted it;
``archived_redacted`` says when the archive itself only ever got the redacted copy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..kernel.relations import (
    content_of,
    edit_target,
    is_redacted,
    redaction_target,
    replacement_problem,
)


@dataclass(frozen=True)
class Redaction:
    """An ``m.room.redaction`` of an event: who sent it, when, the reason they gave."""

    event_id: str
    by: str | None
    ts: int | None
    reason: str | None


@dataclass(frozen=True)
class Version:
    """One version of a message: the original or an edit. ``content`` is what the version
    says (an edit's ``m.new_content``, or its whole content if encrypted or invalid)."""

    event_id: str
    sender: str | None
    ts: int | None
    content: Mapping[str, Any] = field(compare=False)
    redaction: Redaction | None = None  # an edit that was itself redacted
    rejected: str | None = None  # why clients ignore this edit (None: it counts)


@dataclass(frozen=True)
class Lineage:
    """A message's history as the archive holds it."""

    event_id: str
    original: Version
    edits: tuple[Version, ...]  # valid edits in archive order
    rejected_edits: tuple[Version, ...]  # m.replace events clients ignore
    redaction: Redaction | None
    archived_redacted: bool  # the archive only has the redacted copy of the original

    @property
    def current(self) -> Version:
        """The version clients show (latest valid edit that is not redacted)."""
        live = [e for e in self.edits if e.redaction is None]
        return live[-1] if live else self.original


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _redaction(ev: Mapping[str, Any]) -> Redaction:
    return Redaction(event_id=_str(ev.get("event_id")) or "", by=_str(ev.get("sender")),
                     ts=_int(ev.get("origin_server_ts")),
                     reason=_str(content_of(ev).get("reason")))


def _version(ev: Mapping[str, Any], content: Mapping[str, Any],
             redactions: Mapping[str, Redaction], rejected: str | None = None) -> Version:
    eid = _str(ev.get("event_id")) or ""
    return Version(event_id=eid, sender=_str(ev.get("sender")),
                   ts=_int(ev.get("origin_server_ts")), content=content,
                   redaction=redactions.get(eid), rejected=rejected)


def message_lineage(events: Sequence[Mapping[str, Any]], *,
                    stands_for: Callable[[Mapping[str, Any]], str | None] | None = None,
                    ) -> dict[str, Lineage]:
    """Event id -> :class:`Lineage` for every non-state event of one room that is not itself
    an edit or a redaction, ``events`` given in archive order. Edits and redactions of events
    the archive does not hold are left out (there is no original to attach them to).

    ``stands_for(event)``: the id of the event a record stands for (the archive's plaintext
    of an encrypted message): the redaction of that event is the record's too (deleting
    the message deleted what it said, whichever copy of it is read).

    Every redaction in the archive counts: the homeserver refuses a client's redaction of
    another user's event without the power, and never hands on (to the appservice or the
    admin API) a federated one it did not apply (Synapse's ``recheck_redaction``: another
    server's redaction of an event it did not send)."""
    by_id: dict[str, Mapping[str, Any]] = {}
    redactions: dict[str, Redaction] = {}
    for ev in events:
        eid = _str(ev.get("event_id"))
        if eid is not None:
            by_id.setdefault(eid, ev)
        target = redaction_target(ev)
        if target is not None and target not in redactions:  # the first one removed it
            redactions[target] = _redaction(ev)
    edits: dict[str, list[Version]] = {}
    rejected: dict[str, list[Version]] = {}
    for ev in events:
        target = edit_target(ev)
        original = by_id.get(target) if target is not None else None
        if target is None or original is None or "state_key" in ev:
            continue
        problem = replacement_problem(original, ev)
        new = content_of(ev).get("m.new_content")
        content = new if problem is None and isinstance(new, Mapping) else content_of(ev)
        version = _version(ev, content, redactions, problem)
        (edits if problem is None else rejected).setdefault(target, []).append(version)
    out: dict[str, Lineage] = {}
    for eid, ev in by_id.items():
        if ("state_key" in ev or edit_target(ev) is not None
                or redaction_target(ev) is not None):
            continue
        out[eid] = Lineage(
            event_id=eid, original=_version(ev, content_of(ev), {}),
            edits=tuple(edits.get(eid, ())), rejected_edits=tuple(rejected.get(eid, ())),
            redaction=redactions.get(eid) or _stood_for(ev, redactions, stands_for),
            archived_redacted=is_redacted(ev))
    return out


def _stood_for(ev: Mapping[str, Any], redactions: Mapping[str, Redaction],
               stands_for: Callable[[Mapping[str, Any]], str | None] | None,
               ) -> Redaction | None:
    original = stands_for(ev) if stands_for is not None else None
    return redactions.get(original) if original is not None else None
