"""The ``console:`` section: the operators' web console at ``/console`` (issue 19)."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictModel

ConsoleRole = Literal["viewer", "operator", "legal"]


class ConsoleConfig(StrictModel):
    """Sign-in with the person's Matrix account; access by directory group."""

    enabled: bool = Field(False, description="Serve the console at /console")
    groups: dict[str, ConsoleRole] = Field(
        default_factory=dict,
        description="Directory group -> role (viewer: read; operator: plans and applies, "
                    "requeue; legal: legal holds). Nobody else may sign in")
    idle_timeout_minutes: int = Field(30, ge=1, le=24 * 60)
    max_session_hours: int = Field(12, ge=1, le=24 * 14)
    public_url: str | None = Field(
        None,
        description="The console's base URL as browsers see it (default: appservice.public_url"
                    "); https:// makes the session cookie Secure")
    max_failed_logins: int = Field(
        5, ge=1, le=1000,
        description="Failed sign-ins per account (and per address) in 15 minutes before "
                    "further attempts are refused for the rest of that window")

    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of the reverse proxies in front of the "
                    "console: from them the client's address is read from X-Forwarded-For "
                    "(for the sign-in throttle and the audit); empty: the peer's address")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"{p!r} is not an IP address or network") from None
        return v

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+(/.*)?$", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/") if v else v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: dict[str, str]) -> dict[str, str]:
        for g in v:
            if not g.strip():
                raise ValueError("a group name must not be empty")
        return v

    @model_validator(mode="after")
    def _someone_may_sign_in(self) -> ConsoleConfig:
        if self.enabled and not self.groups:
            raise ValueError("console.enabled needs console.groups (nobody could sign in)")
        return self
