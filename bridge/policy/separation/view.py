"""The policy's reading of the world: who a user is and what class a room is.

:class:`PolicyView` holds the policy config, the directory view and ``now``, and answers
the questions every decision starts from: a user's :class:`~.rules.Principal` (service,
staff, partner, guest, external), a room's :class:`~.rules.RoomClass`, the information
barriers between two people and a guest's expiry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ...kernel.ids import server_of
from ...model.people import StaffRecord
from ..power import is_enclave_user
from .facts import RoomFacts, is_direct_chat
from .rules import (
    CLASS_STATE_TYPE,
    DM_CLASS,
    Decision,
    Principal,
    RoomClass,
    matches,
)

if TYPE_CHECKING:
    from ...config.policy import BarrierConfig, PolicyConfig, RoomClassConfig


class PolicyView:
    """The policy config plus the directory view and ``now``: everything decisions read.

    Build one per policy load / directory change and reuse it; it is immutable.
    """

    def __init__(self, config: PolicyConfig,
                 staff: Iterable[StaffRecord] | Mapping[str, StaffRecord | None], *,
                 server_name: str, service_users: Iterable[str] = (),
                 service_prefix: str | None = None, now_ms: int):
        self.config = config
        self.server_name = server_name
        self.now_ms = now_ms
        # a mapping by user id is used as given, not copied (``None``: not listed), so
        # policy test cases with their own facts need not copy a whole directory each
        self.staff: Mapping[str, StaffRecord | None] = (
            staff if isinstance(staff, Mapping) else {r.user_id: r for r in staff})
        # ordered: Enclave acts as the first of them (its bot, then its admin) with power
        self.enclave_users = tuple(dict.fromkeys(service_users))
        self.service_users = frozenset(self.enclave_users)
        self.service_prefix = service_prefix
        self.classes = {c.id: (i, c) for i, c in enumerate(config.room_classes)}
        self._partner_users: dict[str, int] = {}
        self._partner_servers: dict[str, int] = {}
        for i, p in enumerate(config.partners):
            for u in p.users:
                self._partner_users.setdefault(u, i)
            for s in p.servers:
                self._partner_servers.setdefault(s, i)
        self._guests = {g.user: i for i, g in reversed(list(enumerate(config.guests)))}
        # memo tables: a policy object lives for one policy + directory view + ``now``
        self._principals: dict[str, Principal] = {}
        self._sides: dict[tuple[int, str], frozenset[int]] = {}
        self._classify = [
            (i, r, re.compile(r.alias) if r.alias else None,
             re.compile(r.name) if r.name else None)
            for i, r in enumerate(config.classify)
        ]

    # -- principals ------------------------------------------------------------------------
    def principal(self, user_id: str) -> Principal:
        """What policy makes of a user id (memoised: the policy object is immutable)."""
        p = self._principals.get(user_id)
        if p is None:
            if len(self._principals) > 200_000:
                self._principals.clear()
            p = self._principals[user_id] = self._principal(user_id)
        return p

    def _principal(self, user_id: str) -> Principal:
        local = server_of(user_id) == self.server_name
        if is_enclave_user(user_id, server_name=self.server_name,
                           own_users=self.service_users,
                           namespace_prefix=self.service_prefix or ""):
            return Principal(user_id, "service", True)
        if local:
            rec = self.staff.get(user_id)
            if rec is not None and rec.active:
                return Principal(user_id, "staff", True, staff=rec)
            if rec is None and self.config.unlisted_local_users == "staff":
                return Principal(user_id, "staff", True)
            return Principal(user_id, "external", True, staff=rec)
        gi = self._guests.get(user_id)
        if gi is not None:
            g = self.config.guests[gi]
            return Principal(user_id, "guest", False, guest=g, guest_index=gi,
                             expired=self.now_ms >= g.expires_ms)
        pi = self._partner_users.get(user_id, self._partner_servers.get(server_of(user_id)))
        if pi is not None:
            return Principal(user_id, "partner", False, partner=self.config.partners[pi],
                             partner_index=pi)
        return Principal(user_id, "external", False)

    # -- rooms -----------------------------------------------------------------------------
    def classify_room(self, room: RoomFacts, *, creator: str | None = None) -> RoomClass:
        """The room's class: Enclave's class state, else DM, else the first rule, else default."""
        if room.class_state is not None:
            if room.class_state == DM_CLASS or room.class_state in self.classes:
                return RoomClass(room.class_state, "room.class_state",
                                 f"room state {CLASS_STATE_TYPE}", "state")
        if is_direct_chat(room):
            return RoomClass(DM_CLASS, "room.is_direct", "policy.dms", "dm")
        creators = [creator] if creator else sorted(room.creators)
        if pc := self._partner_room_class(creators):
            return pc
        for i, rule, alias_re, name_re in self._classify:
            if alias_re is not None and not any(alias_re.search(a) for a in room.aliases):
                continue
            if name_re is not None and not (room.name and name_re.search(room.name)):
                continue
            if rule.creator_group is not None and not any(
                    rule.creator_group in self.principal(c).groups for c in creators):
                continue
            return RoomClass(rule.room_class, rule.id, f"policy.classify[{i}]", "rule")
        return RoomClass(self.config.default_class, "default_class", "policy.default_class",
                         "default")

    def _partner_room_class(self, creators: Sequence[str]) -> RoomClass | None:
        """A room made on a partner's server by the partner: the first federating class
        the partner is admitted to (their rooms are theirs, so no local rule can name
        them). None for any other room."""
        if not creators or any(server_of(c) == self.server_name for c in creators):
            return None
        p = self.principal(creators[0])
        if p.kind != "partner" or p.partner is None:
            return None
        for c in p.partner.room_classes:
            if c in self.classes and self.classes[c][1].federate:
                return RoomClass(c, p.partner.id,
                                 f"policy.partners[{p.partner_index}].room_classes", "partner")
        return None

    def required_history(self, rc: RoomClass) -> str | None:
        """The m.room.history_visibility a room of this class must keep (or be stricter
        than), or None where no remote person can ever be a member."""
        if rc.id == DM_CLASS:
            return self.config.dms.history_visibility
        _, cls = self._class(rc.id)
        return cls.history_visibility if cls.federate else None

    def _class(self, class_id: str) -> tuple[int, RoomClassConfig]:
        return self.classes.get(class_id) or self.classes[self.config.default_class]

    # -- helpers for decisions -------------------------------------------------------------
    def _deny(self, rule_id: str, path: str, reason: str, human: str) -> Decision:
        contact = self.config.notify.contact
        return Decision(False, rule_id, path, reason,
                        f"Enclave policy ({rule_id}): {human} Ask {contact} if you need an "
                        "exception.")

    def _barrier_side(self, p: Principal, b: BarrierConfig, index: int = -1) -> frozenset[int]:
        if p.kind != "staff":
            return frozenset()
        key = (index, p.user_id)
        if index >= 0 and key in self._sides:
            return self._sides[key]
        sides = frozenset(i for i, sel in enumerate(b.between) if matches(sel, p.staff))
        if index >= 0:
            self._sides[key] = sides
        return sides

    def barrier_between(self, a: Principal, b: Principal) -> Decision | None:
        """The first barrier that keeps ``a`` and ``b`` apart, as a deny; else None."""
        if a.kind != "staff" or b.kind != "staff":
            return None  # barriers are between staff
        for i, bar in enumerate(self.config.barriers):
            sa, sb = self._barrier_side(a, bar, i), self._barrier_side(b, bar, i)
            if not sa or not sb:
                continue
            if (0 in sa and 1 in sb) or (1 in sa and 0 in sb):
                return self._deny(bar.id, f"policy.barriers[{i}]", "barrier",
                                  f"{a.user_id} and {b.user_id} are kept apart by an "
                                  "information barrier.")
        return None

    def _expired(self, p: Principal) -> Decision | None:
        if p.kind == "guest" and p.expired:
            assert p.guest is not None
            return self._deny(p.guest.id, f"policy.guests[{p.guest_index}].expires",
                              "guest expired",
                              f"guest access for {p.user_id} has expired.")
        return None
