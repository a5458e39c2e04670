"""Retention, legal holds and archive pruning: every decision, as pure functions.

The purge job, ``enclave retention --plan``, the reactive handler that guards
``m.room.retention`` and the archive's own pruning all call :class:`RetentionPolicy`, so they
cannot disagree. No I/O and no clock reads: the caller passes ``now`` and the timestamps it
read from the archive index.

Vocabulary: a *period* is how long a room's history stays on the homeserver (``None``:
forever) and names the rule (id and YAML path) it comes from; a *hold* keeps matching events
from being purged or pruned, whatever their period; a *purge plan* says up to which
timestamp a room's history may go, in bounded steps.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..kernel.durations import (  # noqa: F401  (re-exported: the constants policy callers use)
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    SECOND_MS,
    WEEK_MS,
    YEAR_MS,
    format_duration_ms,
)
from ..kernel.timestamps import iso_utc


class RetentionSettings(Protocol):
    """What the policy reads of the ``retention:`` section
    (``bridge.config.retention.RetentionConfig``). Not imported, not even for type checks:
    the config imports this module (durations, rule ids), and policy stays below config."""

    enabled: bool
    classes: Sequence[Any]
    dms: Any
    default: Any
    adjust_power: int
    visibility: Any
    media: Any
    archive: Any

DM_CLASS = "dm"  # mirrors bridge.config.policy.DM_CLASS (not imported: keeps this pure)
RETENTION_STATE_TYPE = "m.room.retention"
DEFAULT_RULE = "retention.default"
STATE_RULE = "builtin.retention_state"
HOLD_RULE = "builtin.legal_hold"
# A moderator's "keep forever" adjustment, as stored in ``override_ms`` (None there means
# "no adjustment", so forever needs a value of its own).
OVERRIDE_FOREVER = -1

# durations live in the kernel (one parser per unit); re-exported for policy callers
def _longer(a: int | None, b: int | None) -> bool:
    """Whether period ``a`` is strictly longer than ``b`` (None is forever)."""
    if a is None:
        return b is not None
    return b is not None and a > b


def _outside(keep: int | None, lo: int | None, hi: int | None) -> bool:
    """Whether ``keep`` is outside the bounds (None bounds are open; None keep is forever)."""
    return (lo is not None and _longer(lo, keep)) or _longer(keep, hi)


def _ts(ms: int | None) -> str:
    return iso_utc(ms, "-")


# -- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Period:
    """How long a room's history is kept (None: forever) and the rule that says so."""

    keep_ms: int | None
    rule_id: str
    path: str
    source: str  # "class" | "dm" | "default" | "room" (a moderator's adjustment)

    def describe(self) -> str:
        return f"{format_duration_ms(self.keep_ms)} by {self.rule_id} ({self.path}, {self.source})"


@dataclass(frozen=True)
class Hold:
    """A legal hold: matching events are neither purged nor pruned from the archive.

    ``users`` empty means any sender, ``rooms`` empty any room (not both: see
    :func:`validate_hold`); ``since_ms``/``until_ms`` are inclusive bounds on the event's
    ``origin_server_ts``. A released hold matches nothing.
    """

    id: str
    case_id: str
    reason: str
    placed_by: str
    users: frozenset[str]
    rooms: frozenset[str]
    since_ms: int | None
    until_ms: int | None
    created_at: int
    released_at: int | None = None
    released_by: str | None = None

    def active(self) -> bool:
        """Not released."""
        return self.released_at is None

    def matches(self, room_id: str, sender: str | None, ts: int) -> bool:
        """Whether this hold keeps the event sent by ``sender`` in ``room_id`` at ``ts``."""
        if not self.active():
            return False
        if self.users and sender not in self.users:
            return False
        if self.rooms and room_id not in self.rooms:
            return False
        if self.since_ms is not None and ts < self.since_ms:
            return False
        return self.until_ms is None or ts <= self.until_ms


_HOLD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_USER_RE = re.compile(r"^@[^:\s]+:\S+$")
# room version 12 ids have no server part ("!opaque"), older ones do ("!opaque:server")
_ROOM_RE = re.compile(r"^![^\s:]+(:\S+)?$")


def validate_hold(hold: Hold) -> None:
    """Raise ValueError naming every problem of a hold about to be placed."""
    problems = []
    if not _HOLD_ID_RE.match(hold.id):
        problems.append(f"hold id {hold.id!r} must be letters, digits, '.', '_' or '-'")
    if not hold.case_id.strip():
        problems.append("give a case id")
    if not hold.placed_by.strip():
        problems.append("say who places the hold")
    if not hold.users and not hold.rooms:
        # a hold on everything would silently stop all retention: say so explicitly
        problems.append("give users and/or rooms (a hold on everything is not allowed)")
    problems += [f"{u!r} is not a Matrix user id" for u in sorted(hold.users)
                 if not _USER_RE.match(u)]
    problems += [f"{r!r} is not a Matrix room id" for r in sorted(hold.rooms)
                 if not _ROOM_RE.match(r)]
    if hold.since_ms is not None and hold.until_ms is not None and hold.since_ms > hold.until_ms:
        problems.append(f"since ({_ts(hold.since_ms)}) is after until ({_ts(hold.until_ms)})")
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RetentionDecision:
    """Allow or deny, the rule that decided, why, and a message for the person refused."""

    allow: bool
    rule_id: str
    reason: str
    message: str = ""


@dataclass(frozen=True)
class PurgePlan:
    """How far one room's history may be purged now, and in which steps.

    ``windows`` are ascending ``purge_up_to_ts`` values (each purges events with an earlier
    ts), the last one is ``cutoff_ms``; empty when nothing may be purged.
    """

    room_id: str
    period: Period
    due_before_ms: int | None  # events older than this are due (None: nothing is)
    cutoff_ms: int | None  # purge up to here, after holds (None: nothing to purge)
    held_from_ms: int | None  # ts of the first held event that is due
    hold_ids: tuple[str, ...]
    windows: tuple[int, ...]
    due_events: int
    held_events: int  # due, but matched by a hold
    deferred_events: int  # due and not held, but after the first held event
    reason: str
    rule_id: str

    @property
    def purge_events(self) -> int:
        """Events the windows purge."""
        return self.due_events - self.held_events - self.deferred_events


# -- the policy ------------------------------------------------------------------------------
class RetentionPolicy:
    """The ``retention:`` config: periods, adjustments, purge plans. Immutable; reuse it."""

    def __init__(self, config: RetentionSettings):
        self.config = config
        self._classes = {c.room_class: (i, c) for i, c in enumerate(config.classes)}

    # -- periods ---------------------------------------------------------------------------
    def _configured(self, room_class: str | None) -> tuple[Period, int | None, int | None, str]:
        """The configured period of a room class, with its bounds and who may adjust it."""
        if room_class == DM_CLASS:
            d = self.config.dms
            return (Period(d.keep_ms, d.id, "retention.dms", "dm"), d.min_ms, d.max_ms,
                    d.adjustable_by)
        hit = self._classes.get(room_class) if room_class is not None else None
        if hit is not None:
            i, c = hit
            return (Period(c.keep_ms, c.id, f"retention.classes[{i}]", "class"), c.min_ms,
                    c.max_ms, c.adjustable_by)
        return (Period(self.config.default.keep_ms, DEFAULT_RULE, "retention.default",
                       "default"), None, None, "nobody")

    def period_for(self, room_class: str | None, *, override_ms: int | None = None) -> Period:
        """The period of a room: its class's (``"dm"``: ``dms``), else the default.

        ``override_ms`` (a moderator's adjustment; :data:`OVERRIDE_FOREVER` for forever)
        wins with source ``"room"``, unless the config no longer allows it (the class was
        made non-adjustable or its bounds moved): then the configured period applies.
        """
        period, lo, hi, adjustable_by = self._configured(room_class)
        if override_ms is None or adjustable_by == "nobody":
            return period
        keep = None if override_ms == OVERRIDE_FOREVER else override_ms
        if keep is not None and keep <= 0:
            return period
        if _outside(keep, lo, hi):
            return period
        return Period(keep, period.rule_id, period.path, "room")

    def bounds_for(self, room_class: str | None) -> tuple[int | None, int | None, str]:
        """(min_ms, max_ms, adjustable_by) of a room class; None bounds are open."""
        _, lo, hi, adjustable_by = self._configured(room_class)
        return lo, hi, adjustable_by

    def decide_adjustment(self, room_class: str | None, requester_power: int,
                          requested_ms: int | None) -> RetentionDecision:
        """May someone with ``requester_power`` set the room's period to ``requested_ms``
        (None: forever)? Checks who may adjust, the power needed and the class bounds."""
        if not self.config.enabled:
            return RetentionDecision(False, "retention.enabled", "retention disabled",
                                     "Retention is not managed in this deployment.")
        period, lo, hi, adjustable_by = self._configured(room_class)
        rule = f"{period.rule_id} ({period.path})"
        if adjustable_by == "nobody":
            return RetentionDecision(
                False, period.rule_id, "not adjustable",
                f"Enclave policy ({period.rule_id}): the retention period of this room is "
                f"fixed at {format_duration_ms(period.keep_ms)}.")
        if requester_power < self.config.adjust_power:
            return RetentionDecision(
                False, "retention.adjust_power",
                f"power {requester_power} < {self.config.adjust_power}",
                f"Enclave policy (retention.adjust_power): changing the retention period "
                f"needs power level {self.config.adjust_power}.")
        if requested_ms is not None and requested_ms <= 0:
            return RetentionDecision(
                False, period.rule_id, "not a period",
                f"Enclave policy ({period.rule_id}): a retention period must be longer than "
                "zero.")
        bounds = f"between {format_duration_ms(lo) if lo is not None else 'any'} and " \
                 f"{format_duration_ms(hi)}"
        if lo is not None and _longer(lo, requested_ms):
            return RetentionDecision(
                False, period.rule_id, f"below min of {rule}",
                f"Enclave policy ({period.rule_id}): {format_duration_ms(requested_ms)} is "
                f"shorter than allowed; choose {bounds}.")
        if _longer(requested_ms, hi):
            return RetentionDecision(
                False, period.rule_id, f"above max of {rule}",
                f"Enclave policy ({period.rule_id}): {format_duration_ms(requested_ms)} is "
                f"longer than allowed; choose {bounds}.")
        return RetentionDecision(True, period.rule_id, f"within bounds of {rule}")

    # -- visibility ------------------------------------------------------------------------
    def retention_state(self, period: Period) -> dict[str, Any]:
        """Content of ``m.room.retention`` for a period: ``{}`` when kept forever."""
        return {} if period.keep_ms is None else {"max_lifetime": period.keep_ms}

    def notice_text(self, period: Period) -> str:
        """The notice or topic line telling members how long messages are kept."""
        return self.config.visibility.text.format(period=format_duration_ms(period.keep_ms))

    def decide_retention_event(self, *, sender_is_service: bool, content: Mapping[str, Any],
                               expected: Mapping[str, Any]) -> RetentionDecision:
        """An ``m.room.retention`` event: Enclave's own, or one equal to what Enclave would
        set, stands; anything else is refused by the gate or reverted."""
        if sender_is_service:
            return RetentionDecision(True, STATE_RULE, "sent by Enclave")
        if dict(content) == dict(expected):
            return RetentionDecision(True, STATE_RULE, "equal to the configured state")
        return RetentionDecision(
            False, STATE_RULE, "only Enclave sets m.room.retention",
            "Enclave policy (builtin.retention_state): the retention period is set by "
            "Enclave; ask a moderator to use !retention if the room's class allows changes.")

    # -- purge -----------------------------------------------------------------------------
    def plan_purge(self, room_id: str, period: Period, now_ms: int, timestamps: Sequence[int],
                   held_timestamps: Sequence[int], hold_ids: Sequence[str],
                   window_events: int) -> PurgePlan:
        """Up to which ts a room's history may be purged, in steps of at most
        ``window_events`` events.

        ``timestamps``: origin_server_ts of the room's archived, not yet purged events;
        ``held_timestamps``: those of them a hold matches. An event is due when
        ``ts < now - keep``. The homeserver purges everything before a timestamp and cannot
        skip events, so the cutoff stops at the first held due event; due events from there
        on are deferred. A step boundary never falls between two events with the same ts
        (a step then holds more than ``window_events`` events rather than none).
        """
        if window_events < 1:
            raise ValueError("window_events must be at least 1")
        ts = sorted(timestamps)
        holds = tuple(sorted(set(hold_ids)))

        def plan(due_before: int | None, cutoff: int | None, held_from: int | None,
                 windows: tuple[int, ...], due: int, held: int, deferred: int, reason: str,
                 rule_id: str) -> PurgePlan:
            return PurgePlan(room_id, period, due_before, cutoff, held_from, holds, windows,
                             due, held, deferred, reason, rule_id)

        if not self.config.enabled:
            return plan(None, None, None, (), 0, 0, 0, "retention disabled",
                        "retention.enabled")
        if period.keep_ms is None:
            return plan(None, None, None, (), 0, 0, 0, "kept forever", period.rule_id)
        due_before = now_ms - period.keep_ms
        due = bisect_left(ts, due_before)
        held_due = sorted(t for t in held_timestamps if t < due_before)
        held_from = held_due[0] if held_due else None
        cutoff = due_before if held_from is None else held_from
        purge = bisect_left(ts, cutoff)  # events with ts < cutoff: due and none held
        deferred = due - purge - len(held_due)
        rule_id = period.rule_id if held_from is None else HOLD_RULE
        if due == 0:
            return plan(due_before, None, None, (), 0, 0, 0,
                        f"nothing older than {_ts(due_before)}", rule_id)
        windows = _windows(ts[:purge], cutoff, window_events)
        reason = (f"{due} events older than {_ts(due_before)} "
                  f"({format_duration_ms(period.keep_ms)} by {period.rule_id}); "
                  f"{purge} purged in {len(windows)} step{'' if len(windows) == 1 else 's'}")
        if held_from is not None:
            reason += (f"; {len(held_due)} held by {', '.join(holds) or 'a hold'} from "
                       f"{_ts(held_from)}, {deferred} after it deferred")
        return plan(due_before, cutoff if windows else None, held_from, windows, due,
                    len(held_due), deferred, reason, rule_id)

    # -- media and the archive -------------------------------------------------------------
    def media_due(self, period: Period, media_ts: int, now_ms: int) -> bool:
        """Whether media uploaded at ``media_ts`` is due: by ``media.keep`` when set, else by
        the period of the event that references it. The caller skips held media."""
        keep = self.config.media.keep_ms if self.config.media.keep is not None \
            else period.keep_ms
        return self.config.enabled and keep is not None and media_ts < now_ms - keep

    def archive_keep_ms(self, room_class: str | None) -> int | None:
        """How long the archive keeps a room class's events (None: forever)."""
        hit = self._classes.get(room_class) if room_class is not None else None
        if hit is not None and hit[1].archive_keep is not None:
            return hit[1].archive_keep_ms
        return self.config.archive.keep_ms

    def decide_archive_prune(self, *, newest_ts: int, room_class: str | None, held: bool,
                             now_ms: int) -> bool:
        """Whether an archive segment whose newest event is at ``newest_ts`` may be pruned.

        Never when a hold matches any of its events, and never while its events may still be
        on the homeserver (the longest period the room could have, adjustments included):
        the archive must hold everything that is later purged.
        """
        if held:
            return False
        keep = self.archive_keep_ms(room_class)
        period, _, hi, adjustable_by = self._configured(room_class)
        live = hi if adjustable_by != "nobody" else period.keep_ms
        for other in (period.keep_ms, live):
            if _longer(other, keep):
                keep = other
        return keep is not None and newest_ts < now_ms - keep


def _windows(ts: Sequence[int], cutoff: int, window_events: int) -> tuple[int, ...]:
    """Ascending purge_up_to_ts values purging ``ts`` (sorted, all < cutoff) in steps."""
    out: list[int] = []
    i, n = 0, len(ts)
    while i < n:
        j = min(i + window_events, n)
        if j < n and ts[j] == ts[j - 1]:
            # purge_up_to_ts = ts[j] would leave the equal events of this step for the next
            # one; end the step before the run of equal ts instead ...
            j = bisect_left(ts, ts[j], i, j)
            if j == i:  # ... unless the run fills the whole step: take all of it
                j = bisect_right(ts, ts[i], i, n)
        out.append(ts[j] if j < n else cutoff)
        i = j
    return tuple(out)
