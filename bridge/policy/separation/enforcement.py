"""Separation's enforcement: what Enclave does about what policy refuses.

:class:`SeparationPolicy` adds to the decisions the actions that follow them: who removes
whom (under Enclave's own name, never as a member), the state Enclave keeps (class record,
history visibility), notices, the reactive answer to one event (:meth:`decide_event`) and
reconciliation of a room (:meth:`diff_room`, :func:`diff_separation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ...kernel.ids import server_of
from ..actions import Action, Join, Kick, Leave, SetState
from ..power import ENCLAVE_POWER, enclave_actor
from .decisions import SeparationDecisions
from .facts import RoomFacts
from .outcomes import Finding, NotDone, NotifyUser, SeparationPlan
from .rules import (
    CLASS_RECORD_RULE,
    CLASS_STATE_TYPE,
    DM_CLASS,
    ENCLAVE_POWER_RULE,
    HISTORY_RULE,
    HISTORY_STATE_TYPE,
    Decision,
    Principal,
    RoomClass,
    class_content,
    history_within,
)


class SeparationPolicy(SeparationDecisions):
    """Separation's policy: the decisions (:class:`SeparationDecisions`) and what follows
    from them. Built from the policy config plus the directory view and ``now``.

    Build one per policy load / directory change and reuse it; it is immutable.
    """

    def diff_protected_state(self, room: RoomFacts, rc: RoomClass | None = None,
                             ) -> tuple[list[Action], list[Finding]]:
        """State Enclave keeps: its class record as the class state (a claim that differs
        is put back) and the class's history visibility. Set by Enclave's own user with the
        power (bot, else admin); a finding when neither can (never set as a member)."""
        if not self.config.enabled or not room.known:
            return [], []
        rc = rc or self.classify_room(room)
        wanted: list[tuple[str, dict[str, Any], str, str]] = []
        if room.class_state is not None and room.claimed_class != room.class_state:
            wanted.append((CLASS_STATE_TYPE, class_content(room.class_state, rc.rule_id),
                           CLASS_RECORD_RULE,
                           f"class state says {room.claimed_class!r}; Enclave's record "
                           f"says {room.class_state!r}"))
        required = self.required_history(rc)
        if required is not None and not history_within(room.history_visibility, required):
            wanted.append((HISTORY_STATE_TYPE, {"history_visibility": required},
                           HISTORY_RULE,
                           f"history visibility {room.history_visibility or 'shared'!r} in "
                           f"a {rc.id} room (at most {required!r})"))
        actions: list[Action] = []
        findings: list[Finding] = []
        pw = room.power_view
        for etype, content, rule, why in wanted:
            needed = pw.needed_state(etype)
            actor = enclave_actor(room.members, pw, self.acting_users(room), needed)
            if actor is None:
                findings.append(Finding(rule, room.room_id, etype,
                                        f"{why}; Enclave has no power to set it here, not "
                                        f"done as a member. Fix: {self.power_fix(needed)}"))
                continue
            actions.append(SetState(rule_id=rule, reason=why, actor=actor,
                                    room=room.room_id, event_type=etype, content=content))
        return actions, findings


    # -- enforcement -----------------------------------------------------------------------
    def choose_remover(self, room: RoomFacts, target: str) -> str | None:
        """Enclave's own user (bot, else admin) that can kick ``target``, or None.

        Never a member of the room (:func:`bridge.policy.power.enclave_actor`). Room
        version 12 creators have unlimited power and cannot be kicked at all.
        """
        pw = room.power_view
        return enclave_actor(room.members, pw, self.acting_users(room), pw.needed("kick"),
                             target=target)

    def acting_users(self, room: RoomFacts) -> tuple[str, ...]:
        """Who may act for Enclave in ``room``, in order: its bot, its admin, then its other
        service users (its bots) that are members (e.g. a room one of them made)."""
        others = sorted(u for u in room.members if u not in self.service_users
                        and server_of(u) == self.server_name
                        and self.principal(u).kind == "service")
        return self.enclave_users + tuple(others)

    def power_fix(self, needed: int) -> str:
        """How an operator gives Enclave what it lacks in a room."""
        bot = self.enclave_users[0] if self.enclave_users else "Enclave's bot"
        return f"invite {bot} and give it power {max(needed, 1)} (e.g. {ENCLAVE_POWER})"

    def remove(self, room: RoomFacts, user: str, decision: Decision,
               ) -> tuple[list[Action], Finding | None]:
        """Actions that take ``user`` out of ``room``; a finding where Enclave cannot.

        A local user's own membership (rejecting the invitation, leaving) is the one thing
        Enclave does AS that user, through the appservice: Synapse has no other way, and the
        reason says it was done for them by Enclave under the rule. Anyone else is kicked by
        Enclave's own user with the power; where it has none, nothing is done as a member
        of the room: a finding says why and how to fix it (a :class:`NotDone` in the
        reactive layer). A room v12 creator cannot be kicked by anyone, and Enclave's bot is
        not in direct chats, so there the local staff leave instead (their own membership).
        """
        reason = f"{decision.reason}: {decision.describe()}"
        if server_of(user) == self.server_name:
            return [Leave(rule_id=decision.rule_id, actor=user, room=room.room_id,
                          reason=f"done for {user} by Enclave (their own membership) under "
                                 f"{decision.rule_id}: {reason}")], None
        remover = self.choose_remover(room, user)
        if remover is not None:
            return [Kick(rule_id=decision.rule_id, reason=reason, actor=remover,
                         room=room.room_id, user=user)], None
        bot = self.enclave_users[0] if self.enclave_users else None
        if bot is not None and room.members.get(bot) == "invite":
            # invited (by the gate's creation edits) and not joined yet: it accepts first
            joined = room.with_member(bot, "join")
            join = self.enclave_invited(joined, bot)
            if join and self.choose_remover(joined, user) == bot:
                return [*join, Kick(rule_id=decision.rule_id, reason=reason, actor=bot,
                                    room=room.room_id, user=user)], None
        pw = room.power_view
        if pw.removable(user) and self.classify_room(room).id != DM_CLASS:
            needed = max(pw.needed("kick"), pw.of(user) + 1)
            return [], Finding(ENCLAVE_POWER_RULE, room.room_id, user,
                               f"{user} must go ({decision.rule_id}) but Enclave has no "
                               f"power to kick in this room; not done as a member. Fix: "
                               f"{self.power_fix(needed)}")
        # nobody can remove them (a v12 creator), or a direct chat (Enclave's bot stays out
        # of those): the local staff leave instead, so work and the outsider no longer
        # share the room
        actions: list[Action] = [
            Leave(rule_id=decision.rule_id, actor=u, room=room.room_id,
                  reason=f"done for {u} by Enclave (their own membership) under "
                         f"{decision.rule_id}: {reason} (cannot remove {user})")
            for u in room.current() if server_of(u) == self.server_name
            and self.principal(u).kind != "service"
        ]
        return actions, Finding(decision.rule_id, room.room_id, user,
                                f"cannot remove {user} (a room creator, or a direct chat "
                                f"Enclave is not in); {len(actions)} local member(s) leave "
                                "instead")

    def not_done(self, findings: Sequence[Finding]) -> list[Action]:
        """The reactive layer's record of findings: one :class:`NotDone` each."""
        return [NotDone(rule_id=f.rule_id, reason=f.message, room=f.room_id,
                        user=f.subject if f.subject.startswith("@") else None,
                        message=f.message) for f in findings]

    def notice(self, user: str, decision: Decision, once_key: str, what: str) -> list[Action]:
        """A once-only DM to ``user`` (a local staff member) about a refusal, if enabled."""
        p = self.principal(user)
        if not self.config.notify.enabled or p.kind != "staff":
            return []
        return [NotifyUser(rule_id=decision.rule_id, reason=decision.reason, user=user,
                           once_key=once_key,
                           body=f"{what}\n\n{decision.message}\n\nRule: {decision.rule_id} "
                                f"({decision.path})")]

    def decide_event(self, event: Mapping[str, Any], room: RoomFacts) -> list[Action]:
        """Reactive enforcement for one timeline event: reject, kick and tell, or nothing.

        ``room`` is the room as it was read after the event (the event's own membership
        included or not; it is set from the event here).
        """
        if not self.config.enabled or not self.config.reactive:
            return []
        if event.get("type") in (CLASS_STATE_TYPE, HISTORY_STATE_TYPE) \
                and event.get("state_key") == "" \
                and self.principal(str(event.get("sender", ""))).kind != "service":
            # someone else's class or history state: put Enclave's back
            actions, findings = self.diff_protected_state(room)
            return actions + self.not_done(findings)
        if event.get("type") != "m.room.member" or not isinstance(event.get("state_key"), str):
            return []
        content = event.get("content") or {}
        membership = content.get("membership")
        target, sender = event["state_key"], event.get("sender", "")
        room_id = room.room_id
        event_id = event.get("event_id", "")
        if membership == "invite" and self.principal(target).kind == "service":
            if content.get("is_direct") and room.is_direct is None:
                room = replace(room, is_direct=True)
            join = self.enclave_invited(room, target)
            if not join:
                return []
            # once in, it puts back what it could not before (state set at creation)
            return join + self.diff_protected_state(room.with_member(target, "join"))[0]
        if membership == "invite":
            if content.get("is_direct") and room.is_direct is None:
                room = replace(room, is_direct=True)
            d = self.decide_invite(sender, target, room)
            if d.allow:
                return []
            facts = room.with_member(sender, "join").with_member(target, "invite")
            actions, cannot = self.remove(facts, target, d)
            if server_of(target) == self.server_name:
                actions += self.notice(target, d, f"invite:{room_id}:{target}",
                                       f"Enclave declined an invitation from {sender} for "
                                       "you.")
            elif cannot is None:
                actions += self.notice(sender, d, f"invite:{room_id}:{target}",
                                       f"Enclave withdrew your invitation of {target}.")
            elif cannot.rule_id == ENCLAVE_POWER_RULE:
                actions += self.not_done([cannot])
                actions += self.notice(sender, d, f"invite:{room_id}:{target}",
                                       f"Enclave could not withdraw your invitation of "
                                       f"{target}: it has no power in this room. Your IT "
                                       "administrators have been told; please withdraw "
                                       "the invitation yourself.")
            else:
                # e.g. the invitee is a room v12 creator: the invitation stands, so the
                # staff leave the room instead, and the notice says exactly that
                actions += self.notice(sender, d, f"invite:{room_id}:{target}",
                                       f"Enclave could not withdraw your invitation of "
                                       f"{target} (nobody here can remove them from the "
                                       "room), so it took you out of the room instead.")
            return actions
        if membership == "join":
            facts = room.with_member(target, None)
            d = self.decide_membership(target, facts)
            if d.allow:
                return []
            actions, cannot = self.remove(room.with_member(target, "join"), target, d)
            if cannot is not None and cannot.rule_id == ENCLAVE_POWER_RULE:
                actions += self.not_done([cannot])
            if server_of(target) == self.server_name:
                actions += self.notice(target, d, f"join:{room_id}:{target}:{event_id}",
                                       "Enclave took you out of a room you joined.")
            return actions
        return []

    def enclave_invited(self, room: RoomFacts, user: str) -> list[Action]:
        """Enclave's bot invited into a room (by the gate's creation edits, or by someone):
        it joins a group room of this server, so it can act there under its own name; never
        a direct chat (it would make it a group) nor a room hosted elsewhere."""
        if (not self.enclave_users or user != self.enclave_users[0] or not room.known
                or self.classify_room(room).id == DM_CLASS):
            return []
        return [Join(rule_id=ENCLAVE_POWER_RULE, actor=user, room=room.room_id,
                     reason="invited into a group room: Enclave acts there as itself")]

    def diff_enclave_power(self, room: RoomFacts, rc: RoomClass) -> list[Finding]:
        """A group room where Enclave's own users cannot kick and put its state back (made
        without the gate, or before Enclave): reported with the fix."""
        if rc.id == DM_CLASS or not room.known or not self.enclave_users:
            return []
        pw = room.power_view
        needed = max(pw.needed("kick"), pw.needed_state(HISTORY_STATE_TYPE),
                     pw.needed_state(CLASS_STATE_TYPE))
        if enclave_actor(room.members, pw, self.acting_users(room), needed) is not None:
            return []
        return [Finding(ENCLAVE_POWER_RULE, room.room_id, self.enclave_users[0],
                        f"Enclave has no power in this {rc.id} room: it cannot remove "
                        f"anyone or put its state back here. Fix: {self.power_fix(needed)}")]

    def with_class(self, room: RoomFacts) -> RoomFacts:
        """``room`` as reconciliation judges it: a room without Enclave's record gets the
        class the policy gives it now (recorded when reconciliation applies)."""
        if room.class_state is not None:
            return room
        return replace(room, class_state=self.classify_room(room).id)

    def diff_room(self, room: RoomFacts) -> tuple[list[Action], list[Finding]]:
        """Reconciliation of one room: who must go, and what to report."""
        if not self.config.enabled:
            return [], []
        rc = self.classify_room(room)
        members = [self.principal(u) for u in room.current()]
        members = [m for m in members if m.kind != "service"]
        gone: set[str] = set()

        def take_out(p: Principal, d: Decision) -> None:
            acts, finding = self.remove(room, p.user_id, d)
            actions.extend(acts)
            gone.add(p.user_id)
            if finding is not None:
                findings.append(finding)

        actions, findings = self.diff_protected_state(room, rc)
        bot = self.enclave_users[0] if self.enclave_users else None
        if bot is not None and room.members.get(bot) == "invite":
            actions.extend(self.enclave_invited(room, bot))
        if rc.id != DM_CLASS:
            _, cls = self._class(rc.id)
            if not cls.federate and room.federate and room.class_state is None:
                findings.append(Finding(f"class.{cls.id}.federate", room.room_id, rc.id,
                                        f"{cls.id} room federates (created before Enclave's "
                                        "gate); remote users are removed, the flag cannot "
                                        "change"))
        staff = [m for m in members if m.kind == "staff"]
        for p in members:
            if rc.id == DM_CLASS:
                if p.kind == "staff":
                    d = self._expired(p)
                else:
                    d = self._expired(p) or next(
                        (x for s in staff if not (x := self.decide_dm_pair(s, p)).allow), None)
            else:
                a = self.decide_admission(p, rc)
                d = None if a.allow else a
            if d is not None:
                take_out(p, d)
                if p.expired and p.guest is not None:
                    # the sponsor hears once per room that their guest's access ended
                    actions.extend(self.notice(
                        p.guest.sponsor, d, f"guest-expired:{p.user_id}:{room.room_id}",
                        f"Guest access for {p.user_id} ({p.guest.id}) has expired; Enclave "
                        f"removed them from {room.name or room.room_id}."))
        # barriers among the staff who stay (unless the class is exempt)
        exempt = rc.id != DM_CLASS and not self._class(rc.id)[1].barriers
        for bi, bar in enumerate([] if exempt else self.config.barriers):
            sides: list[list[Principal]] = [[], []]
            for p in staff:
                if p.user_id in gone:
                    continue
                for s in self._barrier_side(p, bar, bi):
                    sides[s].append(p)
            if not sides[0] or not sides[1]:
                continue
            d = self._deny(bar.id, f"policy.barriers[{bi}]", "barrier",
                           "this room mixes both sides of an information barrier.")
            if bar.existing == "remove":
                for p in sides[1]:
                    if p.user_id not in gone:
                        take_out(p, d)
            else:
                findings.append(Finding(bar.id, room.room_id, "barrier",
                                        f"room mixes both sides of barrier {bar.id} "
                                        f"({len(sides[0])} and {len(sides[1])} members); "
                                        "reported, not changed (existing: report)"))
        if not any(f.rule_id == ENCLAVE_POWER_RULE for f in findings) and not any(
                isinstance(a, Join) for a in actions):
            findings.extend(self.diff_enclave_power(room, rc))
        return actions, findings


def diff_separation(policy: SeparationPolicy, rooms: Iterable[RoomFacts]) -> SeparationPlan:
    """Reconciliation: the actions and findings for every room scanned."""
    actions: list[Action] = []
    findings: list[Finding] = []
    n = 0
    for room in rooms:
        n += 1
        a, f = policy.diff_room(room)
        actions.extend(a)
        findings.extend(f)
    return SeparationPlan(actions, findings, n)
