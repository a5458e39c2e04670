"""The ``bots:`` section: Enclave's bots (announcements, onboarding) and what they send.

Durations are seconds or a number with a unit (``90s``, ``30m``, ``4h``, ``2d``, ``1w``).
Message texts are Markdown; ``{name}``-style variables are filled per recipient (see
:data:`PERSON_VARIABLES`), webhook templates also take ``{{json.path}}`` from the request.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import BeforeValidator, Field, field_validator, model_validator

from ..kernel.durations import parse_duration_seconds
from .base import SecretRef, StrictModel

# Variables an announcement body may use. Per-person ones need one message per person
# (delivery: dm); {date} and {title} are the same for everyone.
PERSON_VARIABLES = frozenset({"name", "first_name", "department", "location", "job_title"})
SHARED_VARIABLES = frozenset({"date", "title"})
VARIABLE_RE = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
SLUG = r"^[a-z0-9][a-z0-9_\-]*$"


Seconds = Annotated[int, BeforeValidator(parse_duration_seconds)]


def _iso_text(value: Any) -> Any:
    # an unquoted YAML timestamp arrives as a datetime; keep the model's type a string
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def template_variables(text: str) -> set[str]:
    """The ``{name}`` variables a Markdown text uses (``{{...}}`` are webhook fields)."""
    return set(VARIABLE_RE.findall(text))


def _check_variables(text: str, allowed: frozenset[str]) -> str:
    unknown = template_variables(text) - allowed
    if unknown:
        raise ValueError(f"unknown variable(s) {sorted(unknown)}; use any of "
                         f"{sorted(allowed)} (write {{{{ and }}}} for literal braces)")
    return text


class BotIdentityConfig(StrictModel):
    """A bot's own Matrix user, inside Enclave's exclusive namespace."""

    # after appservice.namespace_prefix: 'announce' -> @enclave_announce:server
    localpart: str = Field(pattern=r"^[a-z0-9._=\-/+]+$")
    displayname: str = Field(min_length=1)
    # an mxc:// URI uploaded beforehand; None leaves the avatar alone
    avatar_url: str | None = Field(None, pattern=r"^mxc://[^/\s]+/[^/\s]+$")


class DmConfig(StrictModel):
    """The bot's direct-message rooms (one per person, reused)."""

    # 'auto': the person is joined to the DM (it shows up at once, nothing to accept);
    # 'invite': the person gets an invite and sees the message once they accept
    join: Literal["auto", "invite"] = "auto"
    # room name (None: the bot's display name)
    room_name: str | None = None
    # create new DMs with encryption on; needs the bot's E2EE sender, else sends fail
    # (reported, never skipped)
    encrypted: bool = False


class ScheduleConfig(StrictModel):
    """When an announcement goes out: a cron expression in a time zone, or one date-time."""

    cron: str | None = None
    # ISO date-time; without an offset it is read in `timezone`
    at: Annotated[str | None, BeforeValidator(_iso_text)] = None
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as "
                             "'Europe/Berlin' or 'UTC')") from None
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            CronTrigger.from_crontab(v, timezone="UTC")
        except ValueError as e:
            raise ValueError(f"not a cron expression (minute hour day month weekday): {e}"
                             ) from None
        return v

    @field_validator("at")
    @classmethod
    def _at(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            dt.datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an ISO date-time such as 2026-12-01T09:00"
                             ) from None
        return v

    @model_validator(mode="after")
    def _one(self) -> ScheduleConfig:
        if (self.cron is None) == (self.at is None):
            raise ValueError("give exactly one of cron or at")
        return self


class AudienceConfig(StrictModel):
    """Who receives it. Within one criterion any value matches; all criteria given must
    match (groups AND department ...). ``users`` and ``rooms`` are added as they are."""

    all_staff: bool = False
    groups: list[str] = Field(default_factory=list)
    department: list[str] = Field(default_factory=list)
    location: list[str] = Field(default_factory=list)
    title: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    rooms: list[str] = Field(default_factory=list)

    @field_validator("users")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        for u in v:
            if not re.match(r"^@[^:\s]+:\S+$", u):
                raise ValueError(f"{u!r} is not a Matrix user id (@name:server)")
        return v

    @field_validator("rooms")
    @classmethod
    def _rooms(cls, v: list[str]) -> list[str]:
        for r in v:
            if not re.match(r"^[!#][^\s]+$", r):
                raise ValueError(f"{r!r} is not a room id (!…) or alias (#…:server)")
        return v

    @model_validator(mode="after")
    def _something(self) -> AudienceConfig:
        if not (self.all_staff or self.groups or self.department or self.location
                or self.title or self.users or self.rooms):
            raise ValueError("an audience needs all_staff, a criterion, users or rooms")
        return self


class DeliveryConfig(StrictModel):
    """How it reaches people: a DM each, or one read-only room per audience."""

    mode: Literal["dm", "room"] = "dm"
    # room mode: the room's key (rooms are reused by key; default: one per audience)
    room: str | None = Field(None, pattern=SLUG)
    room_name: str | None = None
    room_topic: str | None = None


class RemindersConfig(StrictModel):
    """Reminders to those who have not acknowledged, then optionally their manager."""

    # first reminder this long after delivery, each next one this long after the last
    after: Seconds = Field(gt=0)
    count: int = Field(1, ge=0, le=20)
    # after the last reminder (one more `after`), tell the person's manager
    escalate_to_manager: bool = False


class _MessageSpec(StrictModel):
    """What every kind of announcement shares."""

    audience: AudienceConfig
    delivery: DeliveryConfig = DeliveryConfig()
    require_ack: bool = False
    reminders: RemindersConfig | None = None
    # reminders and escalations stop this long after delivery (None: never)
    expires_after: Seconds | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _acks(self) -> _MessageSpec:
        if self.reminders is not None and not self.require_ack:
            raise ValueError("reminders need require_ack: true")
        return self

    def _check_body(self, body: str) -> None:
        allowed = SHARED_VARIABLES | (PERSON_VARIABLES if self.delivery.mode == "dm"
                                      else frozenset())
        try:
            _check_variables(body, allowed)
        except ValueError as e:
            personal = template_variables(body) & PERSON_VARIABLES
            if personal and self.delivery.mode == "room":
                raise ValueError(f"variables {sorted(personal)} differ per person: they "
                                 "need delivery mode 'dm'") from None
            raise e


class AnnouncementConfig(_MessageSpec):
    """An announcement defined in config: sent on its schedule, or by hand."""

    id: str = Field(pattern=SLUG)
    title: str = Field(min_length=1)
    # Markdown; variables {name} {first_name} {department} {location} {job_title} (dm
    # delivery) and {date} {title}
    body: str = Field(min_length=1)
    # None: manual only (`enclave announcements send ID`)
    schedule: ScheduleConfig | None = None

    @model_validator(mode="after")
    def _body(self) -> AnnouncementConfig:
        self._check_body(self.body)
        return self


class WebhookTokenAuth(StrictModel):
    type: Literal["token"]
    # sent as 'Authorization: Bearer TOKEN'
    token: SecretRef


class WebhookHmacAuth(StrictModel):
    type: Literal["hmac"]
    # HMAC-SHA256 of the raw request body, hex, in `header` as 'sha256=HEX' (or just HEX)
    secret: SecretRef
    header: str = "X-Enclave-Signature"


WebhookAuth = Annotated[WebhookTokenAuth | WebhookHmacAuth, Field(discriminator="type")]


class RateLimitConfig(StrictModel):
    per_minute: float = Field(10.0, gt=0)
    burst: int = Field(5, ge=1)


class WebhookConfig(_MessageSpec):
    """``POST /hooks/{id}``: another system (HR, monitoring) makes an announcement."""

    id: str = Field(pattern=SLUG)
    auth: WebhookAuth
    # templates: {{field.path}} from the JSON body (list items by index: {{alerts.0.name}}),
    # plus the body's {name}-style variables
    title: str = Field(min_length=1)
    body: str = Field(min_length=1)
    rate_limit: RateLimitConfig = RateLimitConfig()
    max_body_bytes: int = Field(65536, ge=256, le=10 * 1024 * 1024)

    @model_validator(mode="after")
    def _body(self) -> WebhookConfig:
        self._check_body(self.body)
        return self


class ControlRoomConfig(StrictModel):
    """The room where permitted staff make ad-hoc announcements with ``!announce``."""

    # room id (!…) or alias (#…:server); invite the bot to it
    room: str = Field(pattern=r"^[!#][^\s]+$")
    # directory groups whose members may use !announce ...
    announce_groups: list[str] = Field(default_factory=list)
    # ... or anyone with at least this power level in the control room (None: groups only)
    announce_min_power: int | None = Field(None, ge=0, le=100)
    # a preview not confirmed within this long is dropped
    confirm_within: Seconds = Field(600, gt=0)
    # delivery of ad-hoc announcements unless the command says --room / --dm
    default_delivery: Literal["dm", "room"] = "dm"
    # post a summary (recipients, delivered, failed, acknowledged) when a fan-out ends
    post_summaries: bool = True

    @model_validator(mode="after")
    def _who(self) -> ControlRoomConfig:
        if not self.announce_groups and self.announce_min_power is None:
            raise ValueError("give announce_groups and/or announce_min_power: otherwise "
                             "nobody may announce")
        return self


class AnnouncementsConfig(StrictModel):
    bot: BotIdentityConfig = BotIdentityConfig(localpart="announce",
                                               displayname="Announcements")
    control: ControlRoomConfig | None = None
    announcements: list[AnnouncementConfig] = Field(default_factory=list)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    dm: DmConfig = DmConfig()
    # reactions that acknowledge (besides a '!ack' message)
    ack_reactions: list[str] = Field(default_factory=lambda: ["✅", "✔️", "☑️", "👍"],
                                     min_length=1)
    # sends (and room joins) in flight at once during a fan-out
    max_concurrency: int = Field(8, ge=1, le=64)
    # a scheduled time missed (Enclave was down) is still sent if at most this late;
    # older ones are reported (audit, log), not sent
    misfire_grace_seconds: Seconds = Field(3600, ge=0)
    # how often the store is checked for work made elsewhere ('enclave announcements send')
    poll_seconds: float = Field(5.0, gt=0, le=3600)
    # time zone of {date} and of times in messages (a schedule's own zone wins)
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return ScheduleConfig._tz(v)

    @model_validator(mode="after")
    def _ids(self) -> AnnouncementsConfig:
        ids = [a.id for a in self.announcements] + [w.id for w in self.webhooks]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"announcement and webhook ids must be unique: {dup}")
        return self


class OnboardingLinkConfig(StrictModel):
    title: str = Field(min_length=1)
    url: str = Field(pattern=r"^(https?|mailto|matrix):\S+$")


DEFAULT_WELCOME = (
    "Welcome, {name}! This is your company chat. Everything here stays in-house.\n\n"
    "Ask your colleagues anything; your department's rooms are listed below."
)


class OnboardingConfig(StrictModel):
    """Greets each newly provisioned staff member by DM."""

    bot: BotIdentityConfig = BotIdentityConfig(localpart="welcome", displayname="Welcome")
    # Markdown; variables {name} {first_name} {department} {location} {job_title} {date}
    message: str = Field(DEFAULT_WELCOME, min_length=1)
    links: list[OnboardingLinkConfig] = Field(default_factory=list)
    # list the managed spaces and rooms of the person's department (directory.managed_rooms
    # entries with for_each: department)
    department_rooms: bool = True
    # also greet people already provisioned when onboarding is first switched on
    greet_existing: bool = False
    # how often the directory view is checked for new people
    poll_seconds: float = Field(60.0, gt=0, le=86400)
    dm: DmConfig = DmConfig()

    @field_validator("message")
    @classmethod
    def _message(cls, v: str) -> str:
        return _check_variables(v, PERSON_VARIABLES | frozenset({"date"}))


class BotsEncryptionConfig(StrictModel):
    """End-to-end encryption for the bots (Element encrypts DMs and private rooms)."""

    enabled: bool = True
    # each bot's device keys (and its device's access token, mode 0600) live here, one
    # folder per bot; keep it across restarts and back it up with the database
    store_dir: Path = Field(Path("crypto"), strict=False)
    # Element's rule (MSC4153): a person counts as reached only through a device signed by
    # their own cross-signing key; off: any device of theirs will do (legacy clients)
    require_signed_devices: bool = True


class ArchiveCaptureConfig(StrictModel):
    """The archive device: a member of every room whose class says ``capture: required``,
    with an E2EE device of its own, archiving the plaintext of encrypted messages."""

    bot: BotIdentityConfig = BotIdentityConfig(localpart="archive",
                                               displayname="Enclave archive")
    # how long to wait for a message's room key (it may come by to-device message after
    # the event) before recording a capture gap and asking for the key
    key_wait_seconds: float = Field(10.0, ge=0, le=300)
    # open gaps are tried again (and their keys requested again) this often, besides
    # whenever a room key arrives; rooms of capture classes are checked as well
    sweep_minutes: float = Field(5.0, ge=0.1)
    # the room topic line / the notice that tells staff the room is archived
    topic_line: str = Field("This room is archived by Enclave (encrypted messages included).",
                            min_length=1)
    notice: str = Field("This room is archived by Enclave: encrypted messages are captured "
                        "by the archive device.", min_length=1)


class BotsConfig(StrictModel):
    announcements: AnnouncementsConfig | None = None
    onboarding: OnboardingConfig | None = None
    # the archive device (room classes with `capture: required`)
    archive: ArchiveCaptureConfig | None = None
    encryption: BotsEncryptionConfig = BotsEncryptionConfig()

    @model_validator(mode="after")
    def _distinct(self) -> BotsConfig:
        names = [(what, s.bot.localpart) for what, s in (
            ("announcement", self.announcements), ("onboarding", self.onboarding),
            ("archive", self.archive)) if s is not None]
        seen: dict[str, str] = {}
        for what, localpart in names:
            if localpart in seen:
                raise ValueError(f"the {seen[localpart]} and {what} bots need different "
                                 "localparts")
            seen[localpart] = what
        if self.archive is not None and not self.encryption.enabled:
            raise ValueError("bots.archive needs bots.encryption.enabled: the archive device "
                             "decrypts with an E2EE device of its own")
        return self
