"""Separation of work from personal contacts: every decision, as pure functions.

The gate (Synapse module, before an event exists), the reactive handler (appservice, after),
reconciliation (scheduled scan) and ``enclave explain`` all call these functions with the
same :class:`SeparationPolicy`, so they cannot disagree. No I/O, no clock reads: the caller
passes the directory view, the room's facts and ``now``.

Vocabulary: a *principal* is what policy makes of a user id (Enclave's own service users,
staff, partner, guest, external); a room has a *class* (``dm`` for direct chats); a
*decision* allows or denies and names the rule (id and YAML path) that made it.

The package, bottom up: :mod:`.rules` (rule ids, state types, decision values),
:mod:`.facts` (a room's facts, direct-chat recognition), :mod:`.outcomes` (notices,
findings, the plan), :mod:`.view` (principals and room classes), :mod:`.decisions`
(``decide_*``) and :mod:`.enforcement` (what Enclave does about a refusal, reconciliation).
"""

from .decisions import SeparationDecisions, apply_edits
from .enforcement import SeparationPolicy, diff_separation
from .facts import (
    RoomFacts,
    is_direct_chat,
    room_facts_from_gate,
    room_facts_from_invite,
    room_facts_from_state,
)
from .outcomes import Finding, NotDone, NotifyUser, SeparationPlan
from .rules import (
    APPROVED_INVITE_RULE,
    CLASS_RECORD_RULE,
    CLASS_STATE_TYPE,
    DM_CLASS,
    ENCLAVE_POWER_RULE,
    ENCRYPTION_CONTENT,
    HISTORY_ORDER,
    HISTORY_RULE,
    HISTORY_STATE_TYPE,
    PROTECTED_STATE_TYPES,
    TRUST,
    UNKNOWN_ROOM_RULE,
    CreateDecision,
    Decision,
    Kind,
    Principal,
    RoomClass,
    class_content,
    federation_whitelist,
    history_within,
    matches,
)
from .view import PolicyView

__all__ = [
    "APPROVED_INVITE_RULE", "CLASS_RECORD_RULE", "CLASS_STATE_TYPE", "DM_CLASS",
    "ENCLAVE_POWER_RULE", "ENCRYPTION_CONTENT", "HISTORY_ORDER", "HISTORY_RULE",
    "HISTORY_STATE_TYPE", "PROTECTED_STATE_TYPES", "TRUST", "UNKNOWN_ROOM_RULE",
    "CreateDecision", "Decision", "Finding", "Kind", "NotDone", "NotifyUser", "PolicyView",
    "Principal", "RoomClass", "RoomFacts", "SeparationDecisions", "SeparationPlan",
    "SeparationPolicy", "apply_edits", "class_content", "diff_separation",
    "federation_whitelist", "history_within", "is_direct_chat", "matches",
    "room_facts_from_gate", "room_facts_from_invite", "room_facts_from_state",
]
