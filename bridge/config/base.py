"""Building blocks of every config section."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    # strict: YAML already yields typed values, so no lax coercion. Without it ``port: yes``
    # (a YAML 1.1 boolean) silently became port 1 and ``max_retries: true`` became 1.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SecretRef(StrictModel):
    """Where a secret lives: a file path or an environment variable name, never the value."""

    file: Path | None = Field(None, strict=False)  # a YAML string becomes a Path
    env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: object) -> object:
        if isinstance(data, str | int | float):
            # never echo the value: it is probably the secret itself
            raise ValueError(
                "a secret is never written inline: give {file: PATH} or {env: VARIABLE}"
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of 'file' or 'env'")
        return self
