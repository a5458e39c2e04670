"""The ``directory:`` section: where people come from and what sync makes of them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from .base import SecretRef, StrictModel

_TEMPLATE_FIELDS = {
    "id", "username", "display_name", "email", "title", "department", "location",
    "email_localpart", "given_name", "surname",
}


def _check_template(v: str, allowed: set[str]) -> str:
    names = re.findall(r"\{([^{}]*)\}", v)
    if not names:
        raise ValueError("must use at least one {field}")
    for n in names:
        if n not in allowed:
            raise ValueError(f"unknown field {{{n}}}; use one of {sorted(allowed)}")
    return v


class FileSourceConfig(StrictModel):
    """People and groups from a YAML or CSV file (the local stack's default)."""

    type: Literal["file"]
    path: Path = Field(strict=False)
    format: Literal["auto", "yaml", "csv"] = "auto"
    # Evaluation only: lets the file's `initial_password` be set on newly created accounts,
    # so the local stack's demo people can log in to Element. Leave off in production.
    allow_initial_passwords: bool = False


class LdapSearchConfig(StrictModel):
    base_dn: str
    filter: str
    scope: Literal["base", "one", "sub"] = "sub"


class LdapAttributeMap(StrictModel):
    """LDAP attribute names for each person field (defaults: OpenLDAP inetOrgPerson)."""

    id: str = "entryUUID"
    username: str = "uid"
    display_name: str = "cn"
    email: str = "mail"
    title: str = "title"
    department: str = "departmentNumber"
    location: str = "l"
    manager: str = "manager"
    # OpenLDAP: an attribute whose presence (or value TRUE) marks a disabled person, e.g.
    # 'pwdAccountLockedTime' or a custom flag; none by default. AD always uses
    # userAccountControl & 2.
    disabled: str | None = None
    group_id: str = "cn"
    group_name: str = "description"
    group_member: str = "member"
    group_owner: str = "owner"


class LdapIncrementalConfig(StrictModel):
    # 'modify_timestamp' / 'entry_csn' (OpenLDAP), 'usn' (AD uSNChanged); 'none' = full reads.
    mode: Literal["none", "modify_timestamp", "entry_csn", "usn"] = "none"
    # modifyTimestamp has 1 s resolution and replicas lag: re-read this much before the mark
    overlap_seconds: int = Field(60, ge=0, le=86400)
    # every Nth run is a full read anyway (catches anything an incremental read missed)
    full_every: int = Field(12, ge=1)


class LdapSourceConfig(StrictModel):
    """OpenLDAP or Active Directory, read with ldap3 (paged search)."""

    type: Literal["ldap"]
    dialect: Literal["openldap", "ad"] = "openldap"
    url: str = Field(description="ldap://host:389 or ldaps://host:636")
    start_tls: bool = False
    tls_verify: bool = True
    tls_ca_file: Path | None = Field(None, strict=False)
    bind_dn: str | None = None
    bind_password: SecretRef | None = None
    users: LdapSearchConfig
    groups: LdapSearchConfig | None = None
    attributes: LdapAttributeMap = LdapAttributeMap()
    page_size: int = Field(500, ge=1, le=10000)
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    # AD: resolve nested groups with LDAP_MATCHING_RULE_IN_CHAIN
    nested_groups: bool = True
    incremental: LdapIncrementalConfig = LdapIncrementalConfig()

    @field_validator("url")
    @classmethod
    def _ldap_url(cls, v: str) -> str:
        if not re.match(r"^ldaps?://[^\s/]+/?$", v):
            raise ValueError("must be ldap://host[:port] or ldaps://host[:port]")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _bind(self) -> LdapSourceConfig:
        if (self.bind_dn is None) != (self.bind_password is None):
            raise ValueError("give both bind_dn and bind_password, or neither (anonymous)")
        if self.start_tls and self.url.startswith("ldaps://"):
            raise ValueError("start_tls is for ldap:// URLs; ldaps:// is already TLS")
        return self


class ScimSourceConfig(StrictModel):
    """SCIM 2.0 push: the identity provider provisions into Enclave's /scim/v2 endpoint."""

    type: Literal["scim"]
    token: SecretRef = Field(description="Bearer token the identity provider sends")
    path_prefix: str = "/scim/v2"
    # seconds to wait after a SCIM change before syncing, so a burst becomes one run
    debounce_seconds: float = Field(2.0, ge=0, le=600)

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.match(r"^/[A-Za-z0-9_\-/]*[A-Za-z0-9_\-]$", v):
            raise ValueError("must be a path such as /scim/v2")
        return v


SourceConfig = Annotated[
    FileSourceConfig | LdapSourceConfig | ScimSourceConfig, Field(discriminator="type")
]


class MappingConfig(StrictModel):
    """How a person becomes a Matrix user."""

    # {username}, {email_localpart}, {given_name}.{surname}, … then normalised: lower case,
    # accents stripped, anything outside a-z 0-9 . _ = - / replaced by '.'.
    localpart_template: str = "{username}"
    displayname_template: str = "{display_name}"
    # two people normalising to one localpart: 'suffix' gives the later one (by stable id)
    # '-2', '-3'…; 'refuse' leaves them out of the run and reports them.
    collision: Literal["suffix", "refuse"] = "suffix"

    @field_validator("localpart_template", "displayname_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v, _TEMPLATE_FIELDS)


class SafetyConfig(StrictModel):
    """Limits that make a suspicious directory answer abort the run with nothing changed."""

    max_deactivations: int = Field(25, ge=0)
    max_deactivation_percent: float = Field(5.0, ge=0, le=100)
    # fewer people than this in an answer is an error (an empty answer always is)
    min_people: int = Field(1, ge=1)


class LeaversConfig(StrictModel):
    # who gets a leaver's rooms where the leaver was the only admin: the first of these that
    # exists and is active
    successors: list[Literal["manager", "group_owner", "bot"]] = Field(
        default_factory=lambda: ["manager", "bot"], min_length=1)
    # erase (GDPR: profile and messages hidden from new joiners) this many days after
    # deactivation; None keeps deactivated accounts as they are
    erase_after_days: int | None = Field(None, ge=0)


class PowerRule(StrictModel):
    """A power level for members matching the rule (the highest matching rule wins)."""

    level: int = Field(ge=0, le=100)
    group: str | None = None
    attribute: Literal["title", "department", "location"] | None = None
    equals: str | None = None
    # people who manage at least one member of the room
    managers: bool = False

    @model_validator(mode="after")
    def _one_selector(self) -> PowerRule:
        chosen = sum([self.group is not None, self.attribute is not None, self.managers])
        if chosen != 1:
            raise ValueError("give exactly one of group, attribute (+ equals) or managers: true")
        if (self.attribute is None) != (self.equals is None):
            raise ValueError("attribute and equals go together")
        return self


class ManagedRoomConfig(StrictModel):
    """A space or room Enclave's bot creates and keeps in step with the directory.

    ``for_each`` makes one per distinct value of a person attribute (e.g. one per
    department) whose members are the people with that value; ``groups`` makes one room
    whose members are those groups' members; ``members: all`` is every active person.
    """

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    kind: Literal["space", "room"] = "room"
    for_each: Literal["department", "location", "title"] | None = None
    groups: list[str] | None = None
    members: Literal["all"] | None = None
    # {value} is the for_each value
    name: str
    topic: str | None = None
    # alias localpart template; also what makes creation idempotent after a crash
    alias: str | None = None
    # id of a managed space this room is placed in (same for_each, or a single space)
    parent: str | None = None
    power: list[PowerRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_membership(self) -> ManagedRoomConfig:
        chosen = sum([self.for_each is not None, self.groups is not None,
                      self.members is not None])
        if chosen != 1:
            raise ValueError("give exactly one of for_each, groups or members: all")
        return self


class DirectoryConfig(StrictModel):
    source: SourceConfig
    mapping: MappingConfig = MappingConfig()
    # scheduled full sync; 0 turns scheduling off (SCIM changes still apply as they arrive)
    interval_minutes: float = Field(15.0, ge=0)
    sync_on_start: bool = True
    safety: SafetyConfig = SafetyConfig()
    leavers: LeaversConfig = LeaversConfig()
    managed_rooms: list[ManagedRoomConfig] = Field(default_factory=list)
    # someone kicked from / added to a managed room, or power changed by hand:
    # 'revert' puts it back, 'report' only logs and audits it
    drift: Literal["report", "revert"] = "revert"
    # admin API writes in flight at once (the admin API is not rate limited: this is what
    # keeps a first provisioning of thousands from swamping a busy homeserver)
    max_concurrency: int = Field(8, ge=1, le=64)

    @model_validator(mode="after")
    def _rooms(self) -> DirectoryConfig:
        ids = [r.id for r in self.managed_rooms]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"managed_rooms ids must be unique: {sorted(dup)}")
        by_id = {r.id: r for r in self.managed_rooms}
        for r in self.managed_rooms:
            if r.parent is None:
                continue
            p = by_id.get(r.parent)
            if p is None:
                raise ValueError(f"managed room {r.id!r}: parent {r.parent!r} is not defined")
            if p.kind != "space":
                raise ValueError(f"managed room {r.id!r}: parent {r.parent!r} is not a space")
            if p.for_each is not None and p.for_each != r.for_each:
                raise ValueError(
                    f"managed room {r.id!r}: parent {r.parent!r} is per {p.for_each}, "
                    f"so this room must be too")
        return self
