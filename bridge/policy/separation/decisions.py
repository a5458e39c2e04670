"""Separation's decisions: direct chats, admission to a class, joins, invitations, user
search, state events and room creation (with the gate's edits to the request).

Each ``decide_*`` answers allow or deny with the rule that decided; none of them acts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...kernel.ids import server_of
from ..power import ENCLAVE_POWER
from .facts import RoomFacts
from .rules import (
    APPROVED_INVITE_RULE,
    CLASS_RECORD_RULE,
    CLASS_STATE_TYPE,
    DM_CLASS,
    ENCRYPTION_CONTENT,
    HISTORY_RULE,
    HISTORY_STATE_TYPE,
    PROTECTED_STATE_TYPES,
    TRUST,
    UNKNOWN_ROOM_RULE,
    CreateDecision,
    Decision,
    Principal,
    RoomClass,
    history_within,
    matches,
)
from .view import PolicyView

if TYPE_CHECKING:
    from ...config.policy import AdmissionConfig


class SeparationDecisions(PolicyView):
    """Allow or deny, for every door a person or a room can pass (see the module doc)."""

    # -- direct chats ----------------------------------------------------------------------
    def decide_dm_pair(self, a: Principal, b: Principal) -> Decision:
        """May ``a`` and ``b`` hold a direct chat (or see each other in user search)?"""
        if not self.config.enabled:
            return Decision(True, "policy.enabled", "policy.enabled", "policy disabled")
        if a.kind == "service" or b.kind == "service":
            return Decision(True, "builtin.enclave", "(built in)", "Enclave's own user")
        for p in (a, b):
            if (d := self._expired(p)) is not None:
                return d
        if (d := self.barrier_between(a, b)) is not None:
            return d
        dms = self.config.dms
        staff, other = (a, b) if TRUST[a.kind] >= TRUST[b.kind] else (b, a)
        if staff.kind != "staff":
            return self._verdict(dms.non_staff, "dms.non_staff", "policy.dms.non_staff",
                                 "neither side is staff",
                                 "direct chats between people outside the company are not "
                                 "hosted here.")
        if other.kind == "staff":
            return self._verdict(dms.staff_staff, "dms.staff_staff", "policy.dms.staff_staff",
                                 "staff and staff", "direct chats between staff are off.")
        if other.kind == "partner":
            assert other.partner is not None
            if not other.partner.dm:
                return self._deny(other.partner.id,
                                  f"policy.partners[{other.partner_index}].dm",
                                  "partner without direct chats",
                                  f"{other.user_id} is a partner without direct chats.")
            verdict, rule = dms.staff_partner, "staff_partner"
        elif other.kind == "guest":
            assert other.guest is not None
            if not other.guest.dm:
                return self._deny(other.guest.id, f"policy.guests[{other.guest_index}].dm",
                                  "guest without direct chats",
                                  f"{other.user_id} is a guest without direct chats.")
            verdict, rule = dms.staff_guest, "staff_guest"
        else:
            verdict, rule = dms.staff_external, "staff_external"
        if verdict == "deny":
            for i, exc in enumerate(dms.exceptions):
                if other.kind in exc.allow and matches(exc.who, staff.staff):
                    return Decision(True, exc.id, f"policy.dms.exceptions[{i}]",
                                    f"exception for {other.kind} contacts")
        who = ("people outside the company" if other.kind == "external"
               else f"{other.kind}s")
        return self._verdict(verdict, f"dms.{rule}", f"policy.dms.{rule}",
                             f"staff and {other.kind}",
                             f"work accounts cannot hold direct chats with {who} "
                             f"({other.user_id}).")

    def _verdict(self, verdict: str, rule_id: str, path: str, reason: str,
                 human: str) -> Decision:
        if verdict == "allow":
            return Decision(True, rule_id, path, reason)
        return self._deny(rule_id, path, reason, human)

    # -- room membership -------------------------------------------------------------------
    def decide_admission(self, p: Principal, room_class: RoomClass) -> Decision:
        """May ``p`` be a member of a (non-DM) room of this class, on their own account?"""
        if p.kind == "service":
            return Decision(True, "builtin.enclave", "(built in)", "Enclave's own user")
        if (d := self._expired(p)) is not None:
            return d
        i, cls = self._class(room_class.id)
        if not cls.federate and not p.local:
            return self._deny(f"class.{cls.id}.federate", f"policy.room_classes[{i}].federate",
                              "remote user in a non-federating class",
                              f"{cls.id} rooms are for this server's users only "
                              f"({p.user_id} is not).")
        allow: AdmissionConfig = cls.allow
        path = f"policy.room_classes[{i}].allow"
        rule = f"class.{cls.id}"
        if p.kind == "staff":
            if not allow.staff:
                return self._deny(rule, path + ".staff", "staff not admitted",
                                  f"{cls.id} rooms do not admit staff.")
            if allow.staff_only is not None and not matches(allow.staff_only, p.staff):
                return self._deny(rule, path + ".staff_only", "staff outside the selector",
                                  f"{cls.id} rooms admit only some staff, and "
                                  f"{p.user_id} is not among them.")
            return Decision(True, rule, path + ".staff", "staff admitted")
        if p.kind == "partner":
            assert p.partner is not None
            if allow.partners and cls.id in p.partner.room_classes:
                return Decision(True, p.partner.id, f"policy.partners[{p.partner_index}]",
                                f"partner admitted to {cls.id}")
            return self._deny(rule, path + ".partners", "partner not admitted",
                              f"partner {p.user_id} may not be in {cls.id} rooms.")
        if p.kind == "guest":
            assert p.guest is not None
            if allow.guests and cls.id in p.guest.room_classes:
                return Decision(True, p.guest.id, f"policy.guests[{p.guest_index}]",
                                f"guest admitted to {cls.id}")
            return self._deny(rule, path + ".guests", "guest not admitted",
                              f"guest {p.user_id} may not be in {cls.id} rooms.")
        if allow.external:
            return Decision(True, rule, path + ".external", "external admitted")
        return self._deny(rule, path + ".external", "external not admitted",
                          f"{cls.id} rooms are for staff, and {p.user_id} is not a member "
                          "of staff, a partner or a guest.")

    def decide_membership(self, user: str, room: RoomFacts, *,
                          room_class: RoomClass | None = None) -> Decision:
        """May ``user`` become (or stay) a member of ``room`` with the others in it?

        Checks, in order: the user's own standing (guest expiry), barriers against every
        other member, then the class (direct-chat pair rules against every other member, or
        the class's admission), and finally that the room holds nobody the class would not
        admit: staff do not join rooms mixed with people who should not be there.
        """
        if not self.config.enabled:
            return Decision(True, "policy.enabled", "policy.enabled", "policy disabled")
        p = self.principal(user)
        if p.kind == "service":
            return Decision(True, "builtin.enclave", "(built in)", "Enclave's own user")
        if (d := self._expired(p)) is not None:
            return d
        others = [self.principal(u) for u in room.current() if u != user]
        others = [o for o in others if o.kind != "service"]
        rc = room_class or self.classify_room(room)
        if rc.id == DM_CLASS or self._class(rc.id)[1].barriers:
            for o in others:
                if (d := self.barrier_between(p, o)) is not None:
                    return d
        if rc.id == DM_CLASS:
            last = Decision(True, "builtin.enclave", "(built in)",
                            "direct chat with Enclave's own user only")
            for o in others:
                last = self.decide_dm_pair(p, o)
                if not last.allow:
                    return last
            return last
        own = self.decide_admission(p, rc)
        if not own.allow:
            return own
        for o in others:
            d = self.decide_admission(o, rc)
            if not d.allow:
                return self._deny(d.rule_id, d.path, "room holds someone the class refuses",
                                  f"this {rc.id} room holds {o.user_id}, who may not be "
                                  "in it.")
        return own

    def decide_join(self, user: str, room: RoomFacts, *,
                    invite_approved: bool = False) -> Decision:
        """May ``user`` join ``room`` now (the gate's join check)?

        A room this server has no state for is hosted elsewhere and shows nothing policy
        could judge (no members, no class): a local user joins it only through an
        invitation Enclave approved, or when it is a partner's server's room (a room id
        naming the server) of a class the user may be in. Anything else is refused: an
        empty room would otherwise look like the default class.
        """
        if not self.config.enabled:
            return Decision(True, "policy.enabled", "policy.enabled", "policy disabled")
        p = self.principal(user)
        if room.known or p.kind == "service" or not p.local:
            return self.decide_membership(user, room.with_member(user, None))
        if invite_approved:
            return Decision(True, APPROVED_INVITE_RULE, "(built in)",
                            "joins a remote room Enclave approved the invitation to")
        host = server_of(room.room_id)
        pi = self._partner_servers.get(host)
        if pi is not None:
            pc = self._partner_room_class([f"@partner:{host}"])
            if pc is not None:
                d = self.decide_admission(p, pc)
                if d.allow:
                    return Decision(True, pc.rule_id, pc.path,
                                    f"partner's room of class {pc.id}")
                return d
        return self._deny(UNKNOWN_ROOM_RULE, "(built in)", "unknown remote room",
                          f"{room.room_id} is hosted on another server and nothing shows it "
                          "is allowed for work accounts (no invitation Enclave approved, "
                          "not a partner's room).")

    def decide_invite(self, inviter: str, invitee: str, room: RoomFacts) -> Decision:
        """May ``inviter`` invite ``invitee`` into ``room``? (The inviter counts as a member.)"""
        facts = room.with_member(inviter, "join").with_member(invitee, None)
        return self.decide_membership(invitee, facts)

    def decide_user_visible(self, searcher: str, candidate: str) -> Decision:
        """May ``searcher`` find ``candidate`` in user search: only people they may DM."""
        return self.decide_dm_pair(self.principal(searcher), self.principal(candidate))

    def decide_state_event(self, sender: str, event_type: str, state_key: str,
                           content: Mapping[str, Any] | None = None,
                           room: RoomFacts | None = None) -> Decision:
        """Protected state (room class, retention) is Enclave's alone to change; in rooms
        where remote people can be present, history may not be made more visible than the
        class allows."""
        service = self.principal(sender).kind == "service"
        if (event_type == CLASS_STATE_TYPE and room is not None and room.class_state
                and (content or {}).get("class") == room.class_state):
            # putting Enclave's record back (by anyone, e.g. a room admin fixing a finding):
            # nothing changes what policy reads
            return Decision(True, CLASS_RECORD_RULE, "(built in)",
                            "class state set to Enclave's record")
        if event_type in PROTECTED_STATE_TYPES and not service:
            return self._deny("builtin.protected_state", "(built in)",
                              f"{event_type} is managed by Enclave",
                              f"{event_type} is managed by Enclave and cannot be changed "
                              "by hand.")
        if event_type == HISTORY_STATE_TYPE and state_key == "" and room is not None \
                and not service:
            required = self.required_history(self.classify_room(room))
            value = (content or {}).get("history_visibility")
            if required is not None and not history_within(value, required):
                return self._deny(HISTORY_RULE, "(built in)",
                                  f"history visibility {value!r} is more than {required!r}",
                                  f"in this room history is visible to members only from "
                                  f"when they were {required} (remote people can be "
                                  "members).")
        return Decision(True, "builtin.state", "(built in)", "unprotected state")

    def decide_create_room(self, creator: str, request: Mapping[str, Any]) -> CreateDecision:
        """May ``creator`` create this room, and what must the gate add to the request?

        Edits: Enclave's class state, ``m.federate: false`` for non-federating classes and
        an ``m.room.encryption`` event where the class requires encryption; in a group room
        (not a DM) made by anyone but Enclave, ``invite`` and ``power_users`` that bring
        Enclave's bot in with power :data:`~bridge.policy.power.ENCLAVE_POWER`.
        """
        is_direct = bool(request.get("is_direct"))
        alias_name = request.get("room_alias_name")
        facts = RoomFacts(
            room_id="(new room)", creators=frozenset({creator}), is_direct=is_direct,
            aliases=(f"#{alias_name}:{self.server_name}",) if alias_name else (),
            name=request.get("name") if isinstance(request.get("name"), str) else None,
            members={creator: "join"},
        )
        rc = self.classify_room(facts, creator=creator)
        p = self.principal(creator)
        if p.kind == "service":
            # Enclave's own rooms (managed rooms, notices) are classified like any other
            return CreateDecision(Decision(True, "builtin.enclave", "(built in)",
                                           "Enclave's own user"), rc,
                                  self.creation_edits(rc, request))
        invites = [u for u in request.get("invite") or [] if isinstance(u, str)]
        if rc.id != DM_CLASS:
            own = self.decide_admission(p, rc)
            if not own.allow:
                return CreateDecision(own, rc)
        for invitee in invites:
            d = self.decide_membership(invitee, facts, room_class=rc)
            if not d.allow:
                return CreateDecision(d, rc)
            facts = facts.with_member(invitee, "invite")
        edits = self.creation_edits(rc, request)
        if rc.id != DM_CLASS and self.enclave_users:
            # Enclave's bot is invited with power into every group room made through the
            # gate, so what policy later requires there is done under Enclave's own name
            bot = self.enclave_users[0]
            edits["invite"] = [bot]
            edits["power_users"] = {bot: ENCLAVE_POWER}
        return CreateDecision(Decision(True, rc.rule_id, rc.path, f"class {rc.id}"), rc,
                              edits)

    def creation_edits(self, rc: RoomClass, request: Mapping[str, Any]) -> dict[str, Any]:
        """What a createRoom request of class ``rc`` gets added: the class state,
        ``m.federate: false`` and encryption as the class says."""
        initial = [{"type": CLASS_STATE_TYPE, "state_key": "",
                    "content": {"class": rc.id, "rule_id": rc.rule_id, "set_by": "gate"}}]
        required = self.required_history(rc)
        if required is not None:
            initial.append({"type": HISTORY_STATE_TYPE, "state_key": "",
                            "content": {"history_visibility": required}})
        creation: dict[str, Any] = {}
        if rc.id != DM_CLASS:
            _, cls = self._class(rc.id)
            if not cls.federate:
                creation["m.federate"] = False
            has_enc = any(isinstance(e, Mapping) and e.get("type") == "m.room.encryption"
                          for e in request.get("initial_state") or [])
            if cls.encryption == "required" and not has_enc:
                initial.append({"type": "m.room.encryption", "state_key": "",
                                "content": dict(ENCRYPTION_CONTENT)})
        edits: dict[str, Any] = {"initial_state": initial}
        if creation:
            edits["creation_content"] = creation
        return edits


def apply_edits(request: Mapping[str, Any], edits: Mapping[str, Any] | None) -> dict[str, Any]:
    """A createRoom body with gate edits merged (as the gate module merges them):
    ``creation_content`` keys set, ``initial_state`` events replacing same type/state_key,
    ``invite`` added, ``power_users`` into ``power_level_content_override`` (room version 12,
    Synapse's default, where creators are not listed; the module handles older versions)."""
    body = dict(request)
    if edits and edits.get("invite"):
        current = list(body.get("invite") or [])
        body["invite"] = current + [u for u in edits["invite"] if u not in current]
    if edits and edits.get("power_users"):
        override = dict(body.get("power_level_content_override") or {})
        override["users"] = {**(override.get("users") or {}), **edits["power_users"]}
        body["power_level_content_override"] = override
    if not edits:
        return body
    if edits.get("creation_content"):
        body["creation_content"] = {**(body.get("creation_content") or {}),
                                    **edits["creation_content"]}
    if edits.get("initial_state"):
        new = list(edits["initial_state"])
        keys = {(e["type"], e.get("state_key", "")) for e in new}
        body["initial_state"] = [
            e for e in body.get("initial_state") or []
            if (e.get("type"), e.get("state_key", "")) not in keys] + new
    return body
