"""Directory sync as a pure diff: the directory's wish vs what the homeserver has.

:func:`diff_directory` takes the mapped directory (people → Matrix users), what Enclave
remembers having provisioned, and a view of the homeserver (accounts, managed rooms, the
rooms of people about to leave) and returns a :class:`SyncPlan`: the actions that make the
homeserver match, findings that are only reported, and the records to remember. It compares
before it writes, so an unchanged person costs nothing. :func:`check_safety` decides whether a
plan may run at all. ``enclave sync --plan``, ``--apply`` and the scheduled run all call these.

The package: :mod:`.actions` (sync's action kinds), :mod:`.view` (what the homeserver has),
:mod:`.plan` (the plan, its order, the safety check), :mod:`.rooms` (managed rooms) and
:mod:`.diff` (:func:`diff_directory`).
"""

from .actions import (
    MANAGED_REF,
    CreateAccount,
    CreateManagedRoom,
    DeactivateAccount,
    EraseAccount,
    HandOverRoom,
    JoinThroughParent,
    ReactivateAccount,
    UpdateAccount,
)
from .diff import ADMIN_LEVEL, diff_directory
from .plan import PHASES, Finding, SyncPlan, check_safety, in_phase_order, touching
from .rooms import DesiredRoom, desired_rooms, same_membership_rule, slug
from .view import AccountState, HomeserverView, PersonRecord, RoomView

__all__ = [
    "ADMIN_LEVEL", "MANAGED_REF", "PHASES", "AccountState", "CreateAccount",
    "CreateManagedRoom", "DeactivateAccount", "DesiredRoom", "EraseAccount", "Finding",
    "HandOverRoom", "HomeserverView", "JoinThroughParent", "PersonRecord", "ReactivateAccount",
    "RoomView", "SyncPlan", "UpdateAccount", "check_safety", "desired_rooms", "diff_directory",
    "in_phase_order", "same_membership_rule", "slug", "touching",
]
