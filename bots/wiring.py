"""Wire the bots into a running Enclave (through ``bots.extension.BotsExtension``).

:func:`build_bots` builds the shared bot services, registers each bot's action appliers
with the executor, and returns the extension's :class:`~bridge.extension.Plugin`: the bots
as inbox handlers, the webhook routes, and a lifetime that starts the bots (after Enclave's
own start-up) and stops them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.extension import Plugin

from .actions import BotMessage, bot_message_applier
from .announcements.bot import AnnouncementBot
from .announcements.webhooks import Webhooks
from .bot import Bot
from .capture.bot import ArchiveBot
from .capture.device import ArchiveDevice
from .capture.store import CaptureGapStore
from .console import announcements_page
from .crypto import EncryptedSender, EncryptedSenders
from .jobs import cancel_quietly
from .onboarding import OnboardingBot
from .sending import PlainSender, RoomEncryption, RoomSender, RoutingSender
from .services import BotServices, StaffDirectory
from .store import AnnouncementStore

if TYPE_CHECKING:
    from bridge.root import Services

log = logging.getLogger(__name__)


@dataclass
class BotsRuntime:
    """The running bots (``app[BOTS]``): tests drive their ``tick()`` directly."""

    services: BotServices
    announcements: AnnouncementBot | None = None
    onboarding: OnboardingBot | None = None
    archive: ArchiveBot | None = None
    webhooks: Webhooks | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def bots(self) -> list[Bot]:
        return [b for b in (self.announcements, self.onboarding, self.archive)
                if b is not None]


BOTS = web.AppKey("bots", BotsRuntime)


Decrypt = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


MemberJoined = Callable[[str, str, str], Awaitable[None]]


def build_bot_services(svc: Services, *, encrypted_sender: RoomSender | None = None,
                       decrypt: Decrypt | None = None,
                       member_joined: MemberJoined | None = None) -> BotServices:
    """The services every bot shares; sends pick the E2EE sender for encrypted rooms, and
    ``decrypt`` (bot user, room, event) lets bots read commands in encrypted rooms."""
    cfg = svc.config
    encryption = RoomEncryption(svc.client)
    sender = RoutingSender(PlainSender(svc.client), encryption, encrypted_sender,
                           read_back=svc.executor.read_back)
    return BotServices(
        audit=svc.stores.audit, kv=svc.stores.kv, leases=svc.stores.leases,
        directory_store=svc.stores.directory,
        client=svc.client, executor=svc.executor, metrics=svc.metrics,
        clock_ms=svc.clock_ms, sender=sender, encryption=encryption,
        directory=StaffDirectory(svc.stores.directory), server_name=cfg.homeserver.server_name,
        namespace_prefix=cfg.appservice.namespace_prefix,
        main_bot_user_id=cfg.bot_user_id, admin_user_id=cfg.admin_user_id,
        announcements=AnnouncementStore(svc.database.db),
        encrypted_sender=encrypted_sender, decrypt=decrypt,
        member_joined=member_joined, scheduler=svc.scheduler)


def _encryption(svc: Services, cfg: Any
                ) -> tuple[RoomSender, Decrypt, MemberJoined, dict[str, Any]]:
    """One E2EE device per bot (keys under ``bots.encryption.store_dir``), the sender that
    picks the device of the sending bot, a decrypt hook for commands in encrypted rooms, and
    a join hook that gives a new member the keys of messages sent while they were invited."""
    conf = svc.config
    root = svc.loaded.resolve(cfg.encryption.store_dir)
    devices: dict[str, EncryptedSender] = {}
    for section in (cfg.announcements, cfg.onboarding, cfg.archive):
        if section is None:
            continue
        localpart = conf.appservice.namespace_prefix + section.bot.localpart
        user_id = f"@{localpart}:{conf.homeserver.server_name}"
        kind = ArchiveDevice if section is cfg.archive else EncryptedSender
        devices[user_id] = kind(
            svc.client, homeserver_url=conf.homeserver.url, user_id=user_id,
            store_dir=root / localpart, appservice_sender=conf.bot_user_id,
            require_signed_devices=cfg.encryption.require_signed_devices)

    async def decrypt(bot_user: str, room_id: str,
                      event: dict[str, Any]) -> dict[str, Any] | None:
        device = devices.get(bot_user)
        return await device.decrypt(room_id, event) if device is not None else None

    async def member_joined(bot_user: str, room_id: str, user_id: str) -> None:
        device = devices.get(bot_user)
        if device is not None:
            device.member_joined(room_id, user_id)

    return EncryptedSenders(devices.values()), decrypt, member_joined, dict(devices)


def _archive_bot(svc: Services, bsvc: BotServices, devices: dict[str, Any]) -> ArchiveBot:
    """The archive device's bot (``bots.archive``): needs retention (it archives through
    ``RetentionService.capture_plaintext``), the policy's room classes and E2EE."""
    conf = svc.config
    cfg = conf.bots.archive
    if svc.retention is None or svc.separation is None:
        raise RuntimeError("bots.archive needs the retention: and policy: sections (it "
                           "archives the rooms whose class says capture: required)")
    user_id = (f"@{conf.appservice.namespace_prefix}{cfg.bot.localpart}:"
               f"{conf.homeserver.server_name}")
    device = devices.get(user_id)
    if not isinstance(device, ArchiveDevice):
        raise RuntimeError("bots.archive needs bots.encryption.enabled (its E2EE device)")
    retention = svc.retention
    return ArchiveBot(bsvc, cfg, device=device, gaps=CaptureGapStore(svc.database.db),
                      capture_plaintext=retention.capture_plaintext,
                      archiving=lambda: retention.config.enabled,
                      separation=svc.separation,
                      room_classes={c.id: c for c in conf.policy.room_classes},
                      list_rooms=retention.rooms)


def build_bots(svc: Services, *, encrypted_sender: RoomSender | None = None,
               decrypt: Decrypt | None = None) -> Plugin | None:
    """Build the configured bots; None when ``bots:`` configures none."""
    cfg = svc.config.bots
    if cfg is None or (cfg.announcements is None and cfg.onboarding is None
                        and cfg.archive is None):
        return None
    devices: dict[str, Any] = {}
    member_joined: MemberJoined | None = None
    if encrypted_sender is None and cfg.encryption.enabled:
        encrypted_sender, decrypt, member_joined, devices = _encryption(svc, cfg)
    bsvc = build_bot_services(svc, encrypted_sender=encrypted_sender, decrypt=decrypt,
                              member_joined=member_joined)
    svc.executor.register(BotMessage, bot_message_applier(bsvc.sender))
    ann: AnnouncementBot | None = None
    webhooks: Webhooks | None = None
    if cfg.announcements is not None:
        ann = AnnouncementBot(bsvc, cfg.announcements)
        ann.register_actions()
        if cfg.announcements.webhooks:
            webhooks = Webhooks(ann, cfg.announcements.webhooks, svc.secrets)
    onboarding = (OnboardingBot(bsvc, cfg.onboarding, svc.config.directory)
                  if cfg.onboarding is not None else None)
    archive = _archive_bot(svc, bsvc, devices) if cfg.archive is not None else None
    runtime = BotsRuntime(bsvc, announcements=ann, onboarding=onboarding, archive=archive,
                          webhooks=webhooks)

    def mount(app: web.Application) -> None:
        if runtime.webhooks is not None:
            runtime.webhooks.add_routes(app)
        app[BOTS] = runtime

    async def run_bot(bot: Bot) -> None:
        await svc.bootstrapped.wait()
        await bot.start()
        device = devices.get(bot.user_id)

        async def lead() -> None:
            # Leader only: the bot's own loop (schedules, greetings) and its E2EE device,
            # whose olm sessions must live in one process (replicas share the crypto store)
            if device is not None:
                # after bot.start(): the bot's user must exist before its device logs in
                await device.start()
            await bot.run()

        async def stop() -> None:
            await bot.close()
            if device is not None:
                await device.close()

        await svc.leadership.while_leader(lead, on_stop=stop)

    async def bots_ctx(_: web.Application) -> AsyncIterator[None]:
        runtime.tasks = [asyncio.create_task(run_bot(b), name=b.name) for b in runtime.bots]
        yield
        for b in runtime.bots:
            await b.close()
        await cancel_quietly(runtime.tasks)
        for device in devices.values():
            await device.close()

    pages = []
    if cfg.announcements is not None:
        acfg = cfg.announcements
        pages.append(announcements_page(
            bsvc.announcements, svc.stores.directory,
            {a.id: a for a in acfg.announcements}, acfg.timezone, svc.clock_ms))
    return Plugin(handlers=runtime.bots, mount=mount, lifetime=bots_ctx,
                  console_pages=pages)
