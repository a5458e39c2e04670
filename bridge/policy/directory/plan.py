"""The plan directory sync makes: actions in application order, findings, the records to
remember; what concerns one user; and whether a plan may run at all (:func:`check_safety`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..actions import Action, Invite, Join, Kick, SetState
from .actions import (
    CreateAccount,
    CreateManagedRoom,
    DeactivateAccount,
    EraseAccount,
    HandOverRoom,
    JoinThroughParent,
    ReactivateAccount,
    UpdateAccount,
)
from .view import PersonRecord

if TYPE_CHECKING:  # importing bridge.config at run time would pull in its YAML loader
    from ...config.directory import DirectoryConfig
    from ...model.people import DirectorySnapshot

# -- the plan ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Finding:
    """Something sync noticed and only reports (drift in report mode, refusals)."""

    rule_id: str
    subject: str
    message: str


@dataclass(frozen=True)
class SyncPlan:
    actions: tuple[Action, ...]
    findings: tuple[Finding, ...]
    # records to save once every account action of that person has been applied
    records: Mapping[str, PersonRecord]
    active_people: int = 0

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.actions:
            out[a.kind] = out.get(a.kind, 0) + 1
        return out

    @property
    def deactivations(self) -> int:
        return sum(1 for a in self.actions if isinstance(a, DeactivateAccount))


# application order: accounts exist before rooms use them; rooms before memberships; the
# hand-over happens before the leaver is deactivated
PHASES: dict[str, int] = {
    CreateAccount.kind: 0, ReactivateAccount.kind: 0, UpdateAccount.kind: 0,
    CreateManagedRoom.kind: 1, HandOverRoom.kind: 2,
    Invite.kind: 3, Join.kind: 3, Kick.kind: 3, JoinThroughParent.kind: 4, SetState.kind: 5,
    DeactivateAccount.kind: 6, EraseAccount.kind: 7,
}


def in_phase_order(actions: list[Action]) -> list[Action]:
    """``actions`` in :data:`PHASES` order."""
    return sorted(actions, key=lambda a: PHASES.get(a.kind, 9))  # stable within a phase


def touching(plan: SyncPlan, user_id: str) -> tuple[list[Action], list[Finding]]:
    """The planned actions and findings that concern one user (``enclave sync --plan
    --user``): actions on them, by them, or that hand their rooms over."""
    acts = [a for a in plan.actions
            if user_id in (getattr(a, "user", None), a.actor, getattr(a, "successor", None))]
    return acts, [f for f in plan.findings if f.subject == user_id]


def check_safety(plan: SyncPlan, snapshot: DirectorySnapshot, config: DirectoryConfig, *,
                 force: bool = False) -> list[str]:
    """Why this plan must not run ([] = it may). ``force`` lifts the deactivation limits
    and the minimum size, never the refusal of an empty answer."""
    problems: list[str] = []
    n = len(snapshot.people)
    if n == 0:
        return ["the directory answered with no people at all; refusing to treat everyone "
                "as a leaver (check the source, its base DN and filter)"]
    s = config.safety
    if force:
        return []
    if n < s.min_people:
        problems.append(f"the directory answered with {n} people, fewer than "
                        f"safety.min_people ({s.min_people})")
    deact = plan.deactivations
    if deact > s.max_deactivations:
        problems.append(f"{deact} accounts would be deactivated, more than "
                        f"safety.max_deactivations ({s.max_deactivations})")
    base = max(plan.active_people, 1)
    if plan.active_people and deact * 100.0 / base > s.max_deactivation_percent:
        problems.append(f"{deact} of {plan.active_people} active accounts "
                        f"({deact * 100.0 / base:.1f}%) would be deactivated, more than "
                        f"safety.max_deactivation_percent ({s.max_deactivation_percent}%)")
    return problems
