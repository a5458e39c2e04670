"""``enclave registration`` and ``enclave validate``: setting an install up against its
homeserver (the appservice registration, its tokens, the homeserver.yaml snippet)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets as pysecrets
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, LoadedConfig
from ..config.models import SecretRef
from ..policy.separation import federation_whitelist
from .kit import EXIT_OK, _load


# -- registration -------------------------------------------------------------------------
def registration_dict(loaded: LoadedConfig, as_token: str, hs_token: str) -> dict[str, Any]:
    """The appservice registration the homeserver loads (``app_service_config_files``)."""
    cfg = loaded.config
    server = re.escape(cfg.homeserver.server_name)
    prefix = re.escape(cfg.appservice.namespace_prefix)
    return {
        "id": cfg.appservice.id,
        "url": cfg.appservice.public_url,
        "as_token": as_token,
        "hs_token": hs_token,
        "sender_localpart": cfg.appservice.bot_localpart,
        "rate_limited": False,
        "receive_ephemeral": True,
        "de.sorunome.msc2409.push_ephemeral": True,
        "namespaces": {
            "users": [
                {"exclusive": True, "regex": f"@{prefix}.*:{server}$"},
                # non-exclusive: every local user's events reach us and we may act as them
                {"exclusive": False, "regex": f"@.*:{server}$"},
            ],
            # non-exclusive: Enclave's bot may give the spaces and rooms it manages
            # aliases (Synapse refuses an appservice an alias outside its namespaces)
            "aliases": [{"exclusive": False, "regex": f"#.*:{server}$"}],
            "rooms": [{"exclusive": False, "regex": "!.*"}],
        },
        # MSC4190: the bots create their E2EE devices as the appservice and act as them
        # with the AS token (they do so wherever the homeserver allows it, flag or not)
        **({"io.element.msc4190": True} if cfg.appservice.msc4190 else {}),
    }


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically with mode 0600, whatever mode an old file had.

    A temp file in the same folder, fsync, then rename: a crash leaves the old file or the
    new one, never an empty token file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _write_secret_file(path: Path, value: str) -> None:
    _write_private(path, value + "\n")


def _token_for(loaded: LoadedConfig, ref: SecretRef, key: str, rotate: bool) -> str:
    if ref.env is not None:
        return loaded.secret(ref, key).get()
    assert ref.file is not None
    path = loaded.resolve(ref.file)
    if path.exists() and not rotate:
        try:
            return loaded.secret(ref, key).get()
        except ConfigError:
            pass  # a placeholder left from the example: replace it with a real token
    token = pysecrets.token_urlsafe(48)
    _write_secret_file(path, token)
    print(f"wrote a new {key} to {path} (mode 0600)")
    return token


def cmd_registration(args: argparse.Namespace) -> int:
    loaded, _ = _load(args, secrets=False)
    cfg = loaded.config
    as_token = _token_for(loaded, cfg.appservice.as_token, "appservice.as_token", args.rotate)
    hs_token = _token_for(loaded, cfg.appservice.hs_token, "appservice.hs_token", args.rotate)
    if cfg.gate is not None:
        # the secret the gate module (homeserver.yaml secret_path) and Enclave share
        _token_for(loaded, cfg.gate.secret, "gate.secret", args.rotate)
    reg = registration_dict(loaded, as_token, hs_token)
    out = Path(args.output)
    _write_private(out, (
        "# Enclave appservice registration: add this file to Synapse's\n"
        "# app_service_config_files. It holds tokens: keep it mode 0600.\n"
    ) + yaml.safe_dump(reg, sort_keys=False))
    print(f"wrote registration to {out}")
    if args.homeserver_snippet:
        snippet = Path(args.homeserver_snippet)
        snippet.write_text(homeserver_snippet(loaded))
        print(f"wrote the homeserver.yaml snippet to {snippet}")
    return EXIT_OK


def homeserver_snippet(loaded: LoadedConfig) -> str:
    """Synapse settings separation needs, from the config's policy: the profile limits and,
    with a ``policy:`` section, ``federation_domain_whitelist`` (the company's server plus
    the policy's partner and guest servers) — required for separation without the gate."""
    cfg = loaded.config
    body: dict[str, Any] = {
        "limit_profile_requests_to_users_who_share_rooms": True,
        "require_auth_for_profile_requests": True,
        "allow_profile_lookup_over_federation": False,
    }
    head = ("# Generated by `enclave registration --homeserver-snippet` from "
            f"{loaded.path}.\n# Add to Synapse's homeserver.yaml (or a later -c file) and "
            "restart Synapse;\n# regenerate it whenever the policy's partners or guests "
            "change.\n")
    if cfg.policy is not None:
        body["federation_domain_whitelist"] = federation_whitelist(
            cfg.policy, cfg.homeserver.server_name)
        head += ("# federation_domain_whitelist: only this server and the policy's partners\n"
                 "# and guests federate. Without the gate module it is what keeps staff out of\n"
                 "# rooms hosted on other servers (Synapse refuses the join); required for\n"
                 "# separation without the gate. Note it also blocks federation with any\n"
                 "# server not listed (e.g. matrix.org).\n")
    return head + yaml.safe_dump(body, sort_keys=False)


# -- validate ----------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    loaded, secrets = _load(args)
    cfg = loaded.config
    print(f"{args.config}: valid. homeserver {cfg.homeserver.url} ({cfg.homeserver.server_name}),"
          f" appservice '{cfg.appservice.id}' on {cfg.appservice.bind_host}:"
          f"{cfg.appservice.port}, database {cfg.database.url.split('://')[0]}, "
          f"{len(secrets)} secret(s) readable")
    return EXIT_OK



def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("registration", parents=[common],
                       help="write the appservice registration YAML (and token files)")
    s.add_argument("-o", "--output", default="enclave-registration.yaml")
    s.add_argument("--rotate", action="store_true", help="generate new tokens")
    s.add_argument("--homeserver-snippet", metavar="PATH",
                   help="also write the homeserver.yaml settings separation needs (profile "
                        "limits; federation_domain_whitelist from the policy)")
    s.set_defaults(fn=cmd_registration)

    s = sub.add_parser("validate", parents=[common], help="check a config file and its secrets")
    s.add_argument("config_file", nargs="?", help="config file (overrides -c)")
    s.set_defaults(fn=cmd_validate)

