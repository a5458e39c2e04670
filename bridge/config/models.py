"""Typed configuration for Enclave.

Every section is a pydantic v2 model with ``extra="forbid"`` so a typo is an error, not a
silently ignored key. Secrets are never inline: each secret has a ``*_file`` and a ``*_env``
variant and exactly one of them must be set (see :class:`Secret`).
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .audit import AuditConfig
from .base import SecretRef, StrictModel
from .bots import BotsConfig
from .console import ConsoleConfig
from .directory import DirectoryConfig
from .gate import GateConfig
from .policy import PolicyConfig
from .retention import RetentionConfig, check_room_classes

LOCALPART_RE = re.compile(r"^[a-z0-9._=\-/+]+$")


class HomeserverConfig(StrictModel):
    url: str = Field(description="Client-server API base URL Enclave calls")
    server_name: str
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    max_retries: int = Field(5, ge=0, le=50)
    registration_shared_secret: SecretRef | None = Field(
        None,
        description="Only used at start-up to create Enclave's admin identity if it is missing",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+(/.*)?$", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$", v):
            raise ValueError("must be a Matrix server name such as 'corp.example.com'")
        return v


class AppserviceConfig(StrictModel):
    id: str = Field("enclave", pattern=r"^[A-Za-z0-9_.\-]+$")
    bind_host: str = "127.0.0.1"
    port: int = Field(29330, ge=1, le=65535)
    public_url: str = Field(description="URL at which the homeserver reaches Enclave")
    as_token: SecretRef
    hs_token: SecretRef
    bot_localpart: str = "enclave"
    # before admin_localpart: its validator reads it
    namespace_prefix: str = Field(
        "enclave_", description="Exclusive user namespace for Enclave's own users"
    )
    admin_localpart: str = Field("enclave-admin", validate_default=True)
    bot_displayname: str = "Enclave"
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # write `io.element.msc4190: true` (appservice device management) into the registration:
    # needed where the homeserver delegates auth (next-gen auth / MAS). The homeserver then
    # refuses appservice logins, which Enclave's admin listings still use
    # (docs/operators/bots.md, "MSC4190 in the registration")
    msc4190: bool = False

    @field_validator("bot_localpart", "admin_localpart", "namespace_prefix")
    @classmethod
    def _localpart(cls, v: str) -> str:
        if not LOCALPART_RE.match(v):
            raise ValueError("may contain only a-z, 0-9 and . _ = - / +")
        return v

    @field_validator("admin_localpart")
    @classmethod
    def _admin_outside_namespace(cls, v: str, info: ValidationInfo) -> str:
        # Synapse refuses to register a server admin inside an exclusive namespace
        # (M_EXCLUSIVE), so the admin identity must live outside it. A field validator (not
        # a model one) so the error points at appservice.admin_localpart and its line.
        prefix = info.data.get("namespace_prefix")
        if prefix is not None and v.startswith(prefix):
            raise ValueError(
                f"admin_localpart {v!r} must not start with namespace_prefix {prefix!r} "
                "(the exclusive namespace)"
            )
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+(/.*)?$", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class DatabaseConfig(StrictModel):
    url: str = Field(
        "sqlite:///var/enclave.db",
        description="sqlite:///relative/or/absolute.db or postgresql://user@host:port/db",
    )
    password: SecretRef | None = None
    sqlite_synchronous: Literal["full", "normal"] = "full"
    pool_size: int = Field(10, ge=1, le=200)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite://") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError("must start with sqlite:// or postgresql://")
        if v.startswith(("postgresql://", "postgres://")):
            parts = urlsplit(v)
            if (
                re.match(r"^postgres(ql)?://[^/@]*:[^/@]*@", v)
                or parts.password is not None
                or "password" in {k.lower() for k in parse_qs(parts.query)}
            ):
                raise ValueError(
                    "must not contain a password; use database.password.file/env"
                )
        return v


class CompletenessConfig(StrictModel):
    """The completeness check (docs/operators/completeness.md): the leader reads every
    room's new events through the homeserver's admin API and puts into the inbox what the
    appservice push never delivered."""

    enabled: bool = Field(True, description="Needs Synapse's admin API (Enclave's admin "
                                            "identity); off for other homeservers")
    bound_seconds: float = Field(
        60.0, ge=3, le=3600,
        description="Every event processed within this many seconds of its creation while "
                    "Enclave and the homeserver run: recover after a sixth, check every third")


class InboxConfig(StrictModel):
    room_concurrency: int = Field(16, ge=1, le=1000)
    batch_size: int = Field(500, ge=1, le=10000)
    max_attempts: int = Field(8, ge=1, le=100)
    backoff_initial_seconds: float = Field(1.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    handlers: list[str] = Field(
        default_factory=list,
        description="Extra handler factories as 'module:callable' (extension point)",
    )
    recovery_sweeps_seconds: list[float] = Field(
        default_factory=list,
        description="After start-up, make the homeserver re-run its recovery at these delays "
                    "(for homeservers without Synapse's admin API; the completeness check "
                    "replaces them)",
    )
    completeness: CompletenessConfig = CompletenessConfig()

    @field_validator("recovery_sweeps_seconds")
    @classmethod
    def _sweeps(cls, v: list[float]) -> list[float]:
        if any(d <= 0 for d in v) or v != sorted(v):
            raise ValueError("must be positive delays in increasing order")
        return v

    @field_validator("handlers")
    @classmethod
    def _handler_refs(cls, v: list[str]) -> list[str]:
        for ref in v:
            if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", ref):
                raise ValueError(f"{ref!r} is not of the form 'package.module:callable'")
        return v


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class LoggingConfig(StrictModel):
    """``level``: Enclave's own loggers; ``libraries``: APScheduler, aiohttp, matrix-nio,
    asyncio and the other libraries underneath (``bridge.logs.LIBRARY_LOGGERS``);
    ``loggers``: a level per logger name (e.g. ``{bridge.app: DEBUG}``)."""

    level: LogLevel = "INFO"
    format: Literal["json", "text"] = "text"
    libraries: LogLevel = "WARNING"
    loggers: dict[str, LogLevel] = Field(default_factory=dict)


class ClusterConfig(StrictModel):
    """Several replicas on one PostgreSQL database: one of them (the leader, a store lease)
    processes the inbox and runs the scheduled jobs and bots' loops; every replica accepts
    the homeserver's transactions. A dead leader is replaced within about
    ``lease_ttl_seconds * 4/3``."""

    lease_ttl_seconds: int = Field(30, ge=3, le=600)
    replica_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Shown in /ready and logs; default: hostname:pid",
    )


class EnclaveConfig(StrictModel):
    homeserver: HomeserverConfig
    appservice: AppserviceConfig
    database: DatabaseConfig = DatabaseConfig()
    inbox: InboxConfig = InboxConfig()
    logging: LoggingConfig = LoggingConfig()
    cluster: ClusterConfig = ClusterConfig()
    console: ConsoleConfig = ConsoleConfig()
    directory: DirectoryConfig | None = None
    gate: GateConfig | None = None
    bots: BotsConfig | None = None
    policy: PolicyConfig | None = None
    # after policy: its validator reads the room classes
    retention: RetentionConfig | None = None
    audit: AuditConfig = AuditConfig()

    @field_validator("retention")
    @classmethod
    def _retention_classes(cls, v: RetentionConfig | None,
                           info: ValidationInfo) -> RetentionConfig | None:
        # A field validator (not a model one) and a located ValidationError, so an unknown
        # class is reported at retention.classes[i].room_class and its line. Without a
        # policy section there are no room classes to check against; with an invalid one,
        # its own errors are reported instead.
        policy = info.data.get("policy")
        if v is not None and isinstance(policy, PolicyConfig):
            check_room_classes(v, [c.id for c in policy.room_classes])
        return v

    @model_validator(mode="after")
    def _capture(self) -> EnclaveConfig:
        capture = [c.id for c in self.policy.room_classes
                   if c.capture == "required"] if self.policy is not None else []
        if capture and self.retention is None:
            raise ValueError(f"room classes {capture} require capture (capture: required), "
                             "which archives into the retention archive: add a retention: "
                             "section")
        if capture and (self.bots is None or self.bots.archive is None):
            raise ValueError(f"room classes {capture} require capture (capture: required): "
                             "configure the archive device (bots.archive)")
        return self

    @property
    def bot_user_id(self) -> str:
        return f"@{self.appservice.bot_localpart}:{self.homeserver.server_name}"

    @property
    def admin_user_id(self) -> str:
        return f"@{self.appservice.admin_localpart}:{self.homeserver.server_name}"
