"""Separation: every Synapse config Enclave ships limits who may read a profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from devstack.synapse import SynapseServer

ROOT = Path(__file__).resolve().parents[3]
LIMITS = {"limit_profile_requests_to_users_who_share_rooms": True,
          "require_auth_for_profile_requests": True,
          "allow_profile_lookup_over_federation": False}


@pytest.mark.parametrize("path", [
    "deploy/synapse/homeserver-snippet.yaml",
    "deploy/compose/synapse/homeserver.yaml",
    "deploy/kubernetes/synapse/homeserver.yaml",
])
def test_deploy_configs_limit_profile_lookups(path: str) -> None:
    cfg = yaml.safe_load((ROOT / path).read_text())
    assert {k: cfg.get(k) for k in LIMITS} == LIMITS


def test_devstack_synapse_limits_profile_lookups(tmp_path: Path) -> None:
    # the local stack and every integration test run on this Synapse config
    overrides = SynapseServer(base_dir=tmp_path, server_name="corp.test").overrides()
    assert {k: overrides.get(k) for k in LIMITS} == LIMITS
