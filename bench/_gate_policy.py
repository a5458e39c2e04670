"""The real separation policy as the gate bench's decider (``--decider
bench._gate_policy:decider()``): 10,000 staff in 20 departments and 40 groups, partners,
guests, exceptions and barriers, answering through the same function the running Enclave
uses (``bridge.separation.service.decide_gate``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bridge.config.policy import PolicyConfig
from bridge.gate.protocol import GateAnswer, GateRequest
from bridge.model.people import StaffRecord
from bridge.policy.separation import SeparationPolicy
from bridge.separation.service import decide_gate

SERVER = "corp.test"
STAFF = 10_000

POLICY = {
    "default_class": "internal",
    # the bench's end-to-end part registers users the view does not list: trust them
    "unlisted_local_users": "staff",
    "room_classes": [
        {"id": "internal"},
        {"id": "hr", "allow": {"staff_only": {"groups": ["g-hr"]}}},
        {"id": "external", "federate": True, "allow": {"partners": True, "guests": True}},
    ],
    "classify": [{"id": "cls-ext", "room_class": "external", "alias": "^#ext-"},
                 {"id": "cls-hr", "room_class": "hr", "creator_group": "g-hr"}],
    "partners": [{"id": f"partner-{i}", "servers": [f"partner{i}.example"],
                  "room_classes": ["external"]} for i in range(20)],
    "guests": [{"id": f"guest-{i}", "user": f"@guest{i}:gmail.example",
                "sponsor": f"@staff{i:05d}:{SERVER}", "expires": "2030-01-01",
                "room_classes": ["external"]} for i in range(50)],
    "dms": {"exceptions": [{"id": "dm-sales", "who": {"groups": ["g-sales"]},
                            "allow": ["external"]}]},
    "barriers": [{"id": f"barrier-{i}", "between": [{"groups": [f"g{i}"]},
                                                    {"groups": [f"g{i + 20}"]}]}
                 for i in range(10)],
}


def staff() -> list[StaffRecord]:
    return [StaffRecord(
        user_id=f"@staff{i:05d}:{SERVER}", person_id=str(i), active=True,
        username=f"staff{i:05d}", display_name=f"Staff {i}", department=f"Dept {i % 20}",
        groups=frozenset({f"g{i % 40}"} | ({"g-sales"} if i % 20 == 3 else set())))
        for i in range(STAFF)]


def decider() -> Callable[[GateRequest], Awaitable[GateAnswer]]:
    """An async decider over a policy built once (as the service caches it)."""
    import datetime as dt
    import time

    cfg = dict(POLICY)
    cfg["guests"] = [{**g, "expires": dt.date(2030, 1, 1)} for g in POLICY["guests"]]
    policy = SeparationPolicy(PolicyConfig.model_validate(cfg), staff(), server_name=SERVER,
                              service_users=[f"@enclave:{SERVER}"], service_prefix="enclave_",
                              now_ms=int(time.time() * 1000))

    async def decide(req: GateRequest) -> GateAnswer:
        return decide_gate(policy, req)

    return decide
