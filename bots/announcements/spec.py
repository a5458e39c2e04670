"""An announcement as data: what one occurrence sends, and its text per recipient.

An occurrence stores its :class:`AnnouncementSpec` as JSON when it is made, so a config
edit never changes a fan-out in progress, and ad-hoc and webhook announcements (which
have no config entry) are delivered, reminded and reported the same way. Pure.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from bridge.config.bots import (
    PERSON_VARIABLES,
    VARIABLE_RE,
    AnnouncementConfig,
    WebhookConfig,
    _MessageSpec,
)
from bridge.kernel.ids import localpart_of
from bridge.model.people import StaffRecord

from .audience import Audience

# content key every announcement message carries (clients and tests can find it)
MARKER = "io.enclave.announcement"


@dataclass(frozen=True)
class AnnouncementSpec:
    title: str
    body: str  # Markdown with {variables}
    audience: Audience
    mode: str = "dm"  # "dm" | "room"
    room_key: str | None = None
    room_name: str | None = None
    room_topic: str | None = None
    require_ack: bool = False
    reminder_after_ms: int | None = None
    reminder_count: int = 0
    escalate: bool = False
    expires_after_ms: int | None = None
    timezone: str = "UTC"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: AnnouncementConfig | WebhookConfig | _MessageSpec, *,
                    title: str, body: str, timezone: str = "UTC") -> AnnouncementSpec:
        r = cfg.reminders
        return cls(
            title=title, body=body, audience=Audience.from_config(cfg.audience),
            mode=cfg.delivery.mode, room_key=cfg.delivery.room,
            room_name=cfg.delivery.room_name, room_topic=cfg.delivery.room_topic,
            require_ack=cfg.require_ack,
            reminder_after_ms=r.after * 1000 if r else None,
            reminder_count=r.count if r else 0,
            escalate=bool(r and r.escalate_to_manager),
            expires_after_ms=cfg.expires_after * 1000 if cfg.expires_after else None,
            timezone=timezone,
        )

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items()}
        d["audience"] = self.audience.to_dict()
        return json.dumps(d, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> AnnouncementSpec:
        d = json.loads(text)
        d["audience"] = Audience.from_dict(d["audience"])
        return cls(**d)

    @property
    def personal(self) -> bool:
        """Whether the body differs per person (then it goes out one message each)."""
        return bool(set(VARIABLE_RE.findall(self.body)) & PERSON_VARIABLES)

    @property
    def room_identity(self) -> str:
        """The key of the announcement room (room mode): configured, or per audience."""
        return self.room_key or f"audience-{self.audience.key()}"

    @property
    def follows_up(self) -> bool:
        return self.require_ack and (self.reminder_count > 0 or self.escalate)


def person_variables(staff: StaffRecord | None, user_id: str) -> dict[str, str]:
    """{name} {first_name} {department} {location} {job_title} of one recipient."""
    if staff is None:
        local = localpart_of(user_id)
        return {"name": local, "first_name": local, "department": "", "location": "",
                "job_title": ""}
    name = staff.display_name or staff.username
    return {"name": name, "first_name": name.split(" ")[0], "department":
            staff.department or "", "location": staff.location or "",
            "job_title": staff.title or ""}


def fill(text: str, values: dict[str, str]) -> str:
    """Replace known ``{variables}``; ``{{`` and ``}}`` become literal braces."""
    out = VARIABLE_RE.sub(lambda m: values.get(m.group(1), m.group(0)), text)
    return out.replace("{{", "{").replace("}}", "}")


def compose(spec: AnnouncementSpec, *, date: str, staff: StaffRecord | None = None,
            user_id: str | None = None) -> str:
    """The Markdown one recipient (or a room) gets: title, body, how to acknowledge."""
    values = {"date": date, "title": spec.title}
    if user_id is not None:
        values.update(person_variables(staff, user_id))
    parts = [f"### 📣 {fill(spec.title, values)}", fill(spec.body, values).strip()]
    if spec.require_ack:
        parts.append("_Please acknowledge: react with ✅ or reply `!ack`._")
    return "\n\n".join(parts)


_FIELD_RE = re.compile(r"\{\{\s*([A-Za-z0-9_\-.]+)\s*\}\}")


def lookup(data: Any, path: str) -> Any:
    """``a.b.0.c`` in decoded JSON; None when any step is missing."""
    cur = data
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
        if cur is None:
            return None
    return cur


def fill_webhook(template: str, payload: Any) -> str:
    """Fill ``{{field.path}}`` from a webhook's JSON; missing fields become ''.

    Values are inserted as text: Markdown they contain is escaped, so a payload cannot
    add links or formatting the template did not have."""

    def value(m: re.Match[str]) -> str:
        v = lookup(payload, m.group(1))
        if v is None:
            return ""
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        return escape_markdown(text)

    return _FIELD_RE.sub(value, template)


def escape_markdown(text: str) -> str:
    """Backslash-escape Markdown punctuation (and braces: no variables from payloads)."""
    return re.sub(r"([\\`*_\[\]{}()<>#+\-!|~>])", r"\\\1", text)
