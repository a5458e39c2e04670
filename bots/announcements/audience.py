"""Who an announcement reaches: selection from the directory view as a pure function.

Semantics (config ``audience:`` and ``!announce``): within one criterion any value matches
(``department: [Sales, Ops]``); every criterion given must match (``groups`` AND
``department`` …); ``all_staff`` alone is everyone active. Explicit ``users`` are added
(unless the directory knows them as leavers) and explicit ``rooms`` get the message as
they are. Leavers (inactive records) are never selected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bridge.config.bots import AudienceConfig
from bridge.model.people import StaffRecord

from ..commands import CommandError

CRITERIA = ("groups", "department", "location", "title")


@dataclass(frozen=True)
class Audience:
    all_staff: bool = False
    groups: tuple[str, ...] = ()
    department: tuple[str, ...] = ()
    location: tuple[str, ...] = ()
    title: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    rooms: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: AudienceConfig) -> Audience:
        return cls(all_staff=cfg.all_staff, groups=tuple(cfg.groups),
                   department=tuple(cfg.department), location=tuple(cfg.location),
                   title=tuple(cfg.title), users=tuple(cfg.users), rooms=tuple(cfg.rooms))

    def to_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Audience:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v)  # type: ignore[arg-type]
                      for k, v in d.items()})

    @property
    def has_criteria(self) -> bool:
        return any(getattr(self, c) for c in CRITERIA)

    def key(self) -> str:
        """A short stable key: same audience, same key (one announcement room each)."""
        canon = repr(sorted((k, tuple(sorted(v)) if isinstance(v, tuple) else v)
                            for k, v in self.__dict__.items()))
        return hashlib.sha256(canon.encode()).hexdigest()[:12]

    def describe(self) -> str:
        """'department Sales or Ops, and group it-admins; plus @x:y' for people."""
        parts: list[str] = []
        if self.all_staff and not self.has_criteria:
            parts.append("all staff")
        names = {"groups": "group", "department": "department", "location": "location",
                 "title": "title"}
        crit = [f"{names[c]} {' or '.join(getattr(self, c))}" for c in CRITERIA
                if getattr(self, c)]
        if crit:
            parts.append(", and ".join(crit))
        if self.users:
            parts.append(("plus " if parts else "") + ", ".join(self.users))
        if self.rooms:
            parts.append(("plus rooms " if parts else "rooms ") + ", ".join(self.rooms))
        return "; ".join(parts) or "nobody"


@dataclass(frozen=True)
class Selection:
    users: tuple[str, ...]  # people, sorted
    rooms: tuple[str, ...]  # explicit rooms, as given
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (user, why)

    @property
    def targets(self) -> tuple[str, ...]:
        return (*self.users, *self.rooms)


def _matches(a: Audience, s: StaffRecord) -> bool:
    if a.groups and not (set(a.groups) & s.groups):
        return False
    for attr in ("department", "location", "title"):
        wanted: tuple[str, ...] = getattr(a, attr)
        if wanted and s.attribute(attr) not in wanted:
            return False
    return True


def select_audience(audience: Audience, staff: Iterable[StaffRecord]) -> Selection:
    """The people (and rooms) ``audience`` reaches in the directory view ``staff``."""
    by_id = {s.user_id: s for s in staff}
    chosen: set[str] = set()
    if audience.all_staff or audience.has_criteria:
        chosen = {uid for uid, s in by_id.items() if s.active and _matches(audience, s)}
    skipped: list[tuple[str, str]] = []
    for u in audience.users:
        rec = by_id.get(u)
        if rec is not None and not rec.active:
            skipped.append((u, "a leaver (inactive in the directory)"))
        else:
            chosen.add(u)
    return Selection(users=tuple(sorted(chosen)), rooms=tuple(dict.fromkeys(audience.rooms)),
                     skipped=tuple(skipped))


_SELECTOR_KEYS = {"group": "groups", "groups": "groups", "department": "department",
                  "dept": "department", "location": "location", "title": "title",
                  "user": "users", "room": "rooms"}


def parse_audience(spec: str) -> Audience:
    """``!announce``'s audience word: comma-separated selectors.

    ``all`` · ``group:NAME`` · ``department:NAME`` · ``location:NAME`` · ``title:NAME`` ·
    ``@user:server`` · ``!room`` / ``#alias:server``; quote the whole word when a name has
    spaces (``"department:Research & Development"``)."""
    values: dict[str, list[str]] = {k: [] for k in ("groups", "department", "location",
                                                    "title", "users", "rooms")}
    all_staff = False
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise CommandError("no audience given")
    for p in parts:
        if p.lower() in ("all", "everyone", "all_staff"):
            all_staff = True
        elif p.startswith("@"):
            if ":" not in p:
                raise CommandError(f"{p!r} is not a user id (@name:server)")
            values["users"].append(p)
        elif p.startswith(("!", "#")):
            values["rooms"].append(p)
        elif ":" in p:
            key, _, val = p.partition(":")
            field_name = _SELECTOR_KEYS.get(key.strip().lower())
            if field_name is None or not val.strip():
                raise CommandError(
                    f"unknown audience selector {p!r}; use all, group:NAME, department:NAME, "
                    "location:NAME, title:NAME, @user:server or a room")
            values[field_name].append(val.strip())
        else:
            raise CommandError(
                f"unknown audience selector {p!r}; use all, group:NAME, department:NAME, "
                "location:NAME, title:NAME, @user:server or a room")
    return Audience(all_staff=all_staff, **{k: tuple(v) for k, v in values.items()})


def count_by(selection: Selection, staff: Sequence[StaffRecord],
             attribute: str = "department") -> dict[str, int]:
    """Recipients per attribute value (for a preview)."""
    by_id = {s.user_id: s for s in staff}
    out: dict[str, int] = {}
    for u in selection.users:
        rec = by_id.get(u)
        val = (rec.attribute(attribute) if rec else None) or "(not in directory)"
        out[val] = out.get(val, 0) + 1
    return dict(sorted(out.items()))
