"""The onboarding bot: greets each newly provisioned staff member by DM.

A second, small bot on the same base as the announcement bot. It watches the directory
view (written by every directory sync) and sends each active person it has not greeted a
welcome with the configured links and their department's spaces and rooms (the managed
rooms directory sync keeps, ``for_each: department``). Who was greeted is kept in its
storage; the send's transaction id is derived from the person, so a crash between send
and record does not greet twice. With ``greet_existing: false`` the people already
provisioned when onboarding first runs are remembered as a baseline and not greeted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from bridge.config.bots import OnboardingConfig
from bridge.config.directory import DirectoryConfig
from bridge.matrix.client import HomeserverUnavailable, MatrixRequestError
from bridge.matrix.executor import txn_id_for
from bridge.model.people import StaffRecord

from .announcements.delivery import date_text
from .announcements.spec import fill, person_variables
from .bot import Bot
from .jobs import Waker, run_forever
from .markdown import message_content
from .sending import SendRefused
from .services import BotServices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepartmentRoom:
    name: str
    room_id: str
    is_space: bool


def decide_greetings(view: Iterable[StaffRecord], greeted: set[str],
                     baseline: set[str] | None, provisioned: set[str]) -> list[str]:
    """Active people whose account exists (``provisioned``: directory sync applied it),
    neither greeted nor in the baseline, in user id order."""
    skip = greeted | (baseline or set())
    return sorted(r.user_id for r in view
                  if r.active and r.user_id in provisioned and r.user_id not in skip)


def department_rooms(directory: DirectoryConfig | None, managed: Mapping[str, str],
                     department: str | None) -> list[DepartmentRoom]:
    """The managed spaces and rooms (``for_each: department``) of one department."""
    if directory is None or not department:
        return []
    out = []
    for entry in directory.managed_rooms:
        if entry.for_each != "department":
            continue
        room = managed.get(f"{entry.id}/{department}")
        if room is not None:
            out.append(DepartmentRoom(entry.name.replace("{value}", department), room,
                                      entry.kind == "space"))
    return sorted(out, key=lambda r: (not r.is_space, r.name))


def welcome_markdown(cfg: OnboardingConfig, staff: StaffRecord | None, user_id: str,
                     rooms: Sequence[DepartmentRoom], date: str, server_name: str) -> str:
    """The welcome text of one person."""
    values = {**person_variables(staff, user_id), "date": date}
    parts = [fill(cfg.message, values).strip()]
    if rooms:
        dept = f" — {staff.department}" if staff and staff.department else ""
        lines = [f"**Your department{dept}:**"]
        for r in rooms:
            kind = "space" if r.is_space else "room"
            lines.append(f"- [{r.name}](https://matrix.to/#/{r.room_id}?via={server_name})"
                         f" ({kind})")
        parts.append("\n".join(lines))
    if cfg.links:
        parts.append("\n".join(["**Useful links:**",
                                *[f"- [{link.title}]({link.url})" for link in cfg.links]]))
    return "\n\n".join(parts)


class OnboardingBot(Bot):
    component: ClassVar[str] = "onboarding"

    def __init__(self, svc: BotServices, cfg: OnboardingConfig,
                 directory: DirectoryConfig | None):
        super().__init__(svc, cfg.bot, cfg.dm)
        self.cfg = cfg
        self.directory_cfg = directory
        self.waker = Waker(svc.clock_ms, cfg.poll_seconds, "onboarding", svc.scheduler)

    async def run(self) -> None:
        self.waker.start()
        await run_forever(self.name, self.tick, self.waker)

    async def close(self) -> None:
        self.waker.stop()

    async def tick(self) -> list[str]:
        """Greet whoever is new; return who was greeted in this pass."""
        await self.ready.wait()
        self.svc.directory.invalidate()
        view = await self.svc.directory.all()
        if not view:
            return []  # no directory sync has run yet
        greeted = {k.removeprefix("greeted:") for k in await self.storage.list("greeted:")}
        baseline_raw = await self.storage.get("baseline")
        if baseline_raw is None:
            baseline = set() if self.cfg.greet_existing else {r.user_id for r in view}
            await self.storage.put_new("baseline", sorted(baseline))
            baseline_raw = await self.storage.get("baseline")
        baseline = set(baseline_raw or [])
        provisioned = {p.user_id for p in await self.svc.directory_store.directory_people()
                       if p.status == "active"}
        todo = decide_greetings(view, greeted, baseline, provisioned)
        if not todo:
            return []
        managed = await self.svc.directory_store.managed_rooms()
        by_id = {r.user_id: r for r in view}
        done = []
        for user in todo:
            try:
                if await self.greet(user, by_id.get(user), managed):
                    done.append(user)
            except HomeserverUnavailable as e:
                log.warning("onboarding: homeserver unavailable (%s); later", e)
                break
        return done

    async def greet(self, user: str, staff: StaffRecord | None,
                    managed: Mapping[str, str]) -> bool:
        now = self.svc.clock_ms()
        rooms = department_rooms(self.directory_cfg, managed,
                                 staff.department if staff else None)
        md = welcome_markdown(self.cfg, staff, user, rooms, date_text(now, "UTC"),
                              self.svc.server_name)
        room: str | None = None
        try:
            room = await self.ensure_dm(user)
            # recorded as greeted only after the send: read the DM back first, a crash in
            # between followed by a homeserver restart must not greet twice
            eid = await self.svc.sender.send(
                room, message_content(md), sender=self.user_id, resend=True,
                txn_id=txn_id_for(self.svc.installation_key(f"onboarding/welcome/{user}")))
        except (MatrixRequestError, SendRefused) as e:
            detail = e.reason if isinstance(e, SendRefused) else str(e)
            await self.svc.audit.add_audit(self.audit(
                "onboarding_welcome", "failed", user_id=user, room_id=room,
                rule_id="bots.onboarding.welcome", reason="newly provisioned", detail=detail))
            log.warning("onboarding: could not greet %s: %s", user, detail)
            # remembered as handled: a permanent failure is reported once, not every pass
            await self.storage.put(f"greeted:{user}", {"at": now, "failed": detail})
            return False
        await self.storage.put(f"greeted:{user}", {"at": now, "event_id": eid, "room": room})
        await self.svc.audit.add_audit(self.audit(
            "onboarding_welcome", "applied", user_id=user, room_id=room,
            rule_id="bots.onboarding.welcome", reason="newly provisioned", detail=eid))
        log.info("onboarding: greeted %s", user)
        return True
