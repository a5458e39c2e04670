"""The ``gate:`` section: what Enclave needs to answer the Synapse module's checks.

Everything else about the gate (Enclave's URL, timeout, what to do when Enclave cannot be
reached) is the module's own config in homeserver.yaml: see bridge/gate/module.py.
"""

from __future__ import annotations

from pydantic import Field

from .base import SecretRef, StrictModel


class GateConfig(StrictModel):
    """Enclave answers ``POST /_enclave/gate/v1/check`` on the appservice listener."""

    secret: SecretRef = Field(
        description="Shared secret the Synapse module sends (its secret_path file)")
