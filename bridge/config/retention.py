"""The ``retention:`` section: how long history is kept, the archive, and the purge job.

Durations are strings (``"90d"``, ``"12h"``, ``"2y"``, ``"forever"``) checked by
:func:`bridge.kernel.durations.parse_duration_ms`; each model offers ``*_ms`` properties (None:
forever). Every period names a rule id: class entries their ``id``, ``retention.default``
and the ``dms`` id.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..kernel.durations import parse_duration_ms
from ..policy.retention import DEFAULT_RULE, DM_CLASS, HOLD_RULE, STATE_RULE
from .base import SecretRef, StrictModel
from .policy import RULE_ID_PATTERN


def _duration(v: object) -> object:
    # before the strict str check, so ``keep: 30`` says what a duration looks like
    if v is not None:
        parse_duration_ms(v)  # type: ignore[arg-type]  # raises ValueError for non-strings too
    return v


Duration = Annotated[str, BeforeValidator(_duration)]


def _ms(v: str | None) -> int | None:
    return None if v is None else parse_duration_ms(v)


def _longer(a: str | None, b: str | None) -> bool:
    """Whether duration ``a`` is longer than ``b`` ("forever" is longest)."""
    ma, mb = _ms(a), _ms(b)
    if ma is None:
        return mb is not None
    return mb is not None and ma > mb


def fail(title: str, errors: Iterable[tuple[tuple[str | int, ...], str, Any]]) -> NoReturn:
    """Raise a ValidationError at the given locations, relative to the model validated.

    A plain ValueError from a model validator points at the whole model; this points at the
    offending key, so the loader names its path and YAML line.
    """
    raise ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("value_error", "{detail}", {"detail": msg}),
                         loc=loc, input=value)
        for loc, msg, value in errors
    ])


class AdjustableConfig(StrictModel):
    """A period and whether moderators may change it within bounds."""

    keep: Duration
    adjustable_by: Literal["nobody", "moderators"] = "nobody"
    min: Duration | None = Field(None, description="shortest period moderators may choose")
    max: Duration | None = Field(None, description="longest period moderators may choose")

    @model_validator(mode="after")
    def _bounds(self) -> AdjustableConfig:
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        if self.min is not None and self.min_ms is None:
            # forever as a lower bound leaves one choice: that is keep: forever, not adjustable
            errors.append((("min",), "min cannot be 'forever': leave it out for no lower bound",
                           self.min))
        elif self.min is not None and self.max is not None and _longer(self.min, self.max):
            errors.append((("max",), f"max {self.max!r} is shorter than min {self.min!r}",
                           self.max))
        elif self.min is not None and _longer(self.min, self.keep):
            errors.append((("keep",), f"keep {self.keep!r} is shorter than min {self.min!r}",
                           self.keep))
        elif self.max is not None and _longer(self.keep, self.max):
            errors.append((("keep",), f"keep {self.keep!r} is longer than max {self.max!r}",
                           self.keep))
        if errors:
            fail(type(self).__name__, errors)
        return self

    @property
    def keep_ms(self) -> int | None:
        return _ms(self.keep)

    @property
    def min_ms(self) -> int | None:
        """The lower bound (None: no bound)."""
        return _ms(self.min)

    @property
    def max_ms(self) -> int | None:
        """The upper bound (None: no bound; "forever" parses to None too, also no bound)."""
        return _ms(self.max)


class RetentionClassConfig(AdjustableConfig):
    id: str = Field(pattern=RULE_ID_PATTERN)
    room_class: str = Field(description="a policy.room_classes id")
    archive_keep: Duration | None = Field(None, description="default: archive.keep")

    @field_validator("room_class")
    @classmethod
    def _not_dm(cls, v: str) -> str:
        if v == DM_CLASS:
            raise ValueError(f"{DM_CLASS!r} is not a room class here: use retention.dms")
        return v

    @model_validator(mode="after")
    def _archive_outlives(self) -> RetentionClassConfig:
        # the archive is what remains after a purge: pruning it earlier loses history that
        # the policy still promises to keep
        if self.archive_keep is not None and _longer(self.keep, self.archive_keep):
            fail(type(self).__name__, [(
                ("archive_keep",),
                f"archive_keep {self.archive_keep!r} is shorter than keep {self.keep!r}",
                self.archive_keep)])
        return self

    @property
    def archive_keep_ms(self) -> int | None:
        return _ms(self.archive_keep)


class RetentionDmsConfig(AdjustableConfig):
    id: str = Field("retention-dms", pattern=RULE_ID_PATTERN)
    keep: Duration = "365d"


class RetentionDefaultConfig(StrictModel):
    keep: Duration = "365d"

    @property
    def keep_ms(self) -> int | None:
        return _ms(self.keep)


class RetentionMediaConfig(StrictModel):
    # null: media follows the period of the event that references it
    keep: Duration | None = None

    @property
    def keep_ms(self) -> int | None:
        """None for "forever" and for null alike: check ``keep is None`` to tell them apart."""
        return _ms(self.keep)


class ArchiveS3Config(StrictModel):
    """The archive in an S3 bucket with Object Lock (instead of ``archive.path``)."""

    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s]+$",
                                     description="default: AWS's endpoint for the region")
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
    region: str = Field("us-east-1", min_length=1)
    prefix: str = Field("", pattern=r"^([^/\s][^\s]*/)?$",
                        description="key prefix, ending in '/' (empty: the bucket's root)")
    access_key_id: str | None = Field(None, min_length=1,
                                      description="null: the SDK's default credentials")
    secret_access_key: SecretRef | None = None
    lock_mode: Literal["compliance", "governance"] = "compliance"
    concurrency: int = Field(16, ge=1, le=256, description="requests in flight per write")
    seal_seconds: float = Field(30.0, gt=0, le=86400,
                                description="staged entries are written as objects at "
                                            "the latest this long after their append")

    @model_validator(mode="after")
    def _key_pair(self) -> ArchiveS3Config:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            fail(type(self).__name__, [(("secret_access_key",),
                 "give both access_key_id and secret_access_key, or neither (the SDK's "
                 "default credentials)", None)])
        return self


class ArchiveConfig(StrictModel):
    path: Path = Field(Path("var/archive"), strict=False,
                       description="relative to the config file's folder")
    s3: ArchiveS3Config | None = Field(None, description="null: the local directory at path")
    keep: Duration = "forever"
    media: bool = True
    max_media_bytes: int = Field(100 * 1024 * 1024, ge=0)
    segment_max_bytes: int = Field(8 * 1024 * 1024, ge=4096)

    @property
    def keep_ms(self) -> int | None:
        return _ms(self.keep)


class PurgeConfig(StrictModel):
    interval_minutes: int = Field(60, ge=0, description="0: only by the CLI")
    window_events: int = Field(5000, ge=1, le=1_000_000)
    poll_seconds: float = Field(1.0, gt=0, le=600)
    step_timeout_seconds: float = Field(900.0, gt=0)
    pause_seconds: float = Field(0.5, ge=0, le=3600)


class VisibilityConfig(StrictModel):
    set_state: bool = True
    notice: Literal["none", "message", "topic"] = "message"
    text: str = "Messages here are kept for {period}."

    @field_validator("text")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            v.format(period="90 days")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                "only the placeholder {period} may appear in braces (write {{ }} for a brace)"
            ) from None
        return v


RESERVED_RULE_IDS = frozenset({DEFAULT_RULE, STATE_RULE, HOLD_RULE})


class RetentionConfig(StrictModel):
    enabled: bool = True
    default: RetentionDefaultConfig = RetentionDefaultConfig()
    classes: list[RetentionClassConfig] = Field(default_factory=list)
    dms: RetentionDmsConfig = RetentionDmsConfig()
    media: RetentionMediaConfig = RetentionMediaConfig()
    archive: ArchiveConfig = ArchiveConfig()
    purge: PurgeConfig = PurgeConfig()
    visibility: VisibilityConfig = VisibilityConfig()
    adjust_power: int = Field(50, ge=0, description="power needed for !retention")

    @model_validator(mode="after")
    def _unique(self) -> RetentionConfig:
        errors: list[tuple[tuple[str | int, ...], str, Any]] = []
        ids: dict[str, str] = {self.dms.id: "dms.id"}
        if self.dms.id in RESERVED_RULE_IDS:
            errors.append((("dms", "id"), f"rule id {self.dms.id!r} is reserved", self.dms.id))
        classes: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            if c.id in RESERVED_RULE_IDS:
                errors.append((("classes", i, "id"), f"rule id {c.id!r} is reserved", c.id))
            elif c.id in ids:
                errors.append((("classes", i, "id"),
                               f"rule id {c.id!r} already used at retention.{ids[c.id]}", c.id))
            ids.setdefault(c.id, f"classes[{i}].id")
            if c.room_class in classes:
                errors.append((("classes", i, "room_class"),
                               f"room class {c.room_class!r} already has a period at "
                               f"retention.classes[{classes[c.room_class]}]", c.room_class))
            classes.setdefault(c.room_class, i)
        if errors:
            fail("RetentionConfig", errors)
        return self


def check_room_classes(retention: RetentionConfig, known: Iterable[str]) -> None:
    """Every ``retention.classes[i].room_class`` must be a ``policy.room_classes`` id.

    Raises a ValidationError located at ``classes[i].room_class`` (relative to the
    retention section).
    """
    ids = list(known)
    errors: list[tuple[tuple[str | int, ...], str, Any]] = [
        (("classes", i, "room_class"),
         f"unknown room class {c.room_class!r}: not one of policy.room_classes "
         f"({', '.join(ids)})", c.room_class)
        for i, c in enumerate(retention.classes) if c.room_class not in ids
    ]
    if errors:
        fail("RetentionConfig", errors)
