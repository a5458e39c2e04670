"""A cross-signing identity for each bot user, so Element trusts the bot's device.

Since April 2026 Element (MSC4153, "invisible crypto") neither shares room keys with a device
its owner has not cross-signed nor shows messages from one. So every Enclave user with an
E2EE device gets the three cross-signing keys of the Matrix spec ("Cross-signing"):

* **master** — the user's identity; what staff clients pin on first sight (TOFU) and what a
  company may verify once for a green shield;
* **self-signing** — signed by the master key, signs the user's own devices;
* **user-signing** — signed by the master key (signs other users; Enclave never uses it, but
  clients expect it to exist).

The private keys (ed25519 seeds) are generated once and kept in ``cross_signing.json``
(mode 0600) in the bot's crypto store directory, uploaded with
``POST /keys/device_signing/upload`` as the appservice (a first upload needs no interactive
auth, MSC3967; replacing them is allowed to an appservice, MSC4190), and the bot's device is
signed with the self-signing key (``POST /keys/signatures/upload``).

A restart reuses the keys. What to do at start is the pure :func:`decide_identity`: a key
file that is gone (or does not match what the homeserver publishes) while the homeserver has
an identity is **reported, never silently replaced** — a new identity makes every staff
client show "identity changed" for the bot. The fix is explicit: restore the directory from
backup, or ``enclave bots reset-identity BOT`` (a marker file read at the next start).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

log = logging.getLogger(__name__)

__all__ = [
    "KEYS_FILE",
    "RESET_FILE",
    "CrossSigningKeys",
    "IdentityDecision",
    "KeysUnreadable",
    "canonical_json",
    "decide_identity",
    "device_signed_by",
    "owner_signed_devices",
    "request_reset",
]

KEYS_FILE = "cross_signing.json"
RESET_FILE = "cross_signing.reset"
KINDS = ("master", "self_signing", "user_signing")
USAGE = {"master": "master", "self_signing": "self_signing", "user_signing": "user_signing"}


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The Matrix canonical JSON of ``obj`` without ``signatures`` and ``unsigned``: what
    an ed25519 signature covers (spec "Signing JSON")."""
    from nio.api import Api  # heavy (~0.3 s): paid only when a bot encrypts

    return Api.to_canonical_json(
        {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}).encode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


# -- the decision -------------------------------------------------------------------------------
IdentityAction = Literal["create", "reuse", "upload", "replace", "lost", "conflict"]


@dataclass(frozen=True)
class IdentityDecision:
    """What to do about a bot's cross-signing identity at start, and why.

    ``create``: no identity anywhere, make one; ``reuse``: the local keys are the published
    ones; ``upload``: the homeserver has none (e.g. restored from an older backup), publish
    the local one; ``replace``: a reset was requested, make and publish a new one;
    ``lost``/``conflict``: refuse (keys missing or unreadable / another identity published),
    the reason names the fix."""

    action: IdentityAction
    reason: str
    rule_id: str = "e2ee.cross_signing"

    @property
    def usable(self) -> bool:
        return self.action not in ("lost", "conflict")


def decide_identity(*, local_master: str | None, local_problem: str | None,
                    server_master: str | None, reset_requested: bool,
                    store_dir: str, bot: str) -> IdentityDecision:
    """Decide what to do with a bot's cross-signing identity at start.

    ``local_master``: public master key of the keys on disk (None: no usable keys);
    ``local_problem``: why the key file could not be read (None: absent or fine);
    ``server_master``: the master key the homeserver publishes for the bot (None: none).
    """
    fix = (f"restore {store_dir} from a backup, or reset the identity with "
           f"`enclave bots reset-identity {bot}` (staff clients then show 'identity changed' "
           "for the bot once)")
    if reset_requested:
        return IdentityDecision("replace", "identity reset requested")
    if local_master is None and server_master is None:
        if local_problem is not None:
            # nothing published yet: an unreadable file hides no identity anyone pinned
            return IdentityDecision("create", f"new identity (unreadable key file ignored: "
                                              f"{local_problem})")
        return IdentityDecision("create", "no cross-signing identity yet")
    if local_master is None:
        what = (f"the key file is unreadable ({local_problem})" if local_problem
                else "the key file is missing")
        return IdentityDecision(
            "lost", f"the homeserver publishes a cross-signing identity for {bot} but {what}: "
                    f"it is not replaced silently; {fix}")
    if server_master is None:
        return IdentityDecision("upload", "the homeserver has no cross-signing identity for "
                                          "the bot: publishing the stored one")
    if server_master != local_master:
        return IdentityDecision(
            "conflict", f"the homeserver publishes another cross-signing identity for {bot} "
                        f"than the one stored ({server_master[:8]}… vs {local_master[:8]}…); "
                        f"{fix}")
    return IdentityDecision("reuse", "stored identity is the published one")


def device_signed_by(device_keys: Mapping[str, Any] | None, user_id: str,
                     self_signing_public: str) -> bool:
    """Whether published device keys carry a signature by this self-signing key."""
    sigs = ((device_keys or {}).get("signatures") or {}).get(user_id) or {}
    return f"ed25519:{self_signing_public}" in sigs


def _verify(public: str, signature: str, obj: Mapping[str, Any]) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(_unb64(public)).verify(_unb64(signature),
                                                                  canonical_json(obj))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _single_key(key: Any, user_id: str, usage: str) -> str | None:
    """The public ed25519 key of a cross-signing key object, if it is well-formed."""
    if not isinstance(key, Mapping) or key.get("user_id") != user_id \
            or usage not in (key.get("usage") or []):
        return None
    keys = key.get("keys") or {}
    if not isinstance(keys, Mapping) or len(keys) != 1:
        return None
    ((key_id, public),) = keys.items()
    if not isinstance(public, str) or key_id != f"ed25519:{public}":
        return None
    return public


def _signature(obj: Mapping[str, Any], user_id: str, public: str) -> str | None:
    sig = ((obj.get("signatures") or {}).get(user_id) or {}).get(f"ed25519:{public}")
    return sig if isinstance(sig, str) else None


def owner_signed_devices(query: Mapping[str, Any], user_id: str) -> frozenset[str]:
    """The devices of ``user_id`` signed by their owner, from a ``/keys/query`` answer.

    What Element's "only signed devices" rule asks: the device keys carry a valid signature
    by the user's self-signing key, which carries a valid signature by the user's master
    key (each checked here, not taken from the homeserver's word)."""
    master = _single_key((query.get("master_keys") or {}).get(user_id), user_id, "master")
    ssk_obj = (query.get("self_signing_keys") or {}).get(user_id)
    ssk = _single_key(ssk_obj, user_id, "self_signing")
    if master is None or ssk is None:
        return frozenset()
    sig = _signature(ssk_obj, user_id, master)
    if sig is None or not _verify(master, sig, ssk_obj):
        return frozenset()
    out = set()
    for device_id, keys in ((query.get("device_keys") or {}).get(user_id) or {}).items():
        if not isinstance(keys, Mapping) or keys.get("user_id") != user_id \
                or keys.get("device_id") != device_id:
            continue
        sig = _signature(keys, user_id, ssk)
        if sig is not None and _verify(ssk, sig, keys):
            out.add(device_id)
    return frozenset(out)


# -- the keys -----------------------------------------------------------------------------------
class KeysUnreadable(Exception):
    """The key file exists but cannot be used (the message says why, never a key)."""


@dataclass(frozen=True)
class CrossSigningKeys:
    """The three private keys (ed25519 seeds). Secrets: never logged, file mode 0600."""

    master: bytes = field(repr=False)
    self_signing: bytes = field(repr=False)
    user_signing: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> CrossSigningKeys:
        return cls(os.urandom(32), os.urandom(32), os.urandom(32))

    @classmethod
    def load(cls, path: Path) -> CrossSigningKeys | None:
        """The stored keys; None when there is no file; :class:`KeysUnreadable` when there is
        one that cannot be used (a file that is gone and one that is broken differ)."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            keys = cls(*(_unb64(raw[k]) for k in KINDS))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KeysUnreadable(f"{path.name}: {type(e).__name__}") from None
        if any(len(k) != 32 for k in (keys.master, keys.self_signing, keys.user_signing)):
            raise KeysUnreadable(f"{path.name}: a key is not 32 bytes")
        return keys

    def save(self, path: Path) -> None:
        """Write atomically, readable by the owner only."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({k: _b64(getattr(self, k)) for k in KINDS}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def _private(self, kind: str) -> Any:
        return Ed25519PrivateKey.from_private_bytes(getattr(self, kind))

    def public(self, kind: str) -> str:
        """Unpadded base64 public key (also the key's id after ``ed25519:``)."""
        return _b64(self._private(kind).public_key().public_bytes(Encoding.Raw,
                                                                  PublicFormat.Raw))

    def sign(self, kind: str, obj: Mapping[str, Any]) -> str:
        """The unpadded base64 signature of ``obj``'s canonical JSON by key ``kind``."""
        return _b64(self._private(kind).sign(canonical_json(obj)))

    def _signed_by(self, kind: str, obj: dict[str, Any], user_id: str) -> dict[str, Any]:
        key_id = f"ed25519:{self.public(kind)}"
        sig = self.sign(kind, obj)
        sigs = {u: dict(s) for u, s in (obj.get("signatures") or {}).items()}
        sigs.setdefault(user_id, {})[key_id] = sig
        return {**obj, "signatures": sigs}

    def _key(self, kind: str, user_id: str) -> dict[str, Any]:
        pub = self.public(kind)
        return {"user_id": user_id, "usage": [USAGE[kind]], "keys": {f"ed25519:{pub}": pub}}

    def upload_body(self, user_id: str) -> dict[str, Any]:
        """The body of ``POST /keys/device_signing/upload``: the master key, and the
        self-/user-signing keys each signed by the master key."""
        return {
            "master_key": self._key("master", user_id),
            "self_signing_key": self._signed_by("master", self._key("self_signing", user_id),
                                                user_id),
            "user_signing_key": self._signed_by("master", self._key("user_signing", user_id),
                                                user_id),
        }

    def device_signature(self, device_keys: Mapping[str, Any], user_id: str) -> dict[str, Any]:
        """The device's published keys signed by the self-signing key (for
        ``POST /keys/signatures/upload``; other signatures left out, as the spec allows)."""
        body = {k: v for k, v in device_keys.items() if k not in ("signatures", "unsigned")}
        return self._signed_by("self_signing", body, user_id)


def request_reset(store_dir: Path) -> Path:
    """Ask the bot's next start to replace its cross-signing identity (``enclave bots
    reset-identity``). The old key file is kept aside, never deleted."""
    store_dir.mkdir(parents=True, exist_ok=True)
    marker = store_dir / RESET_FILE
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("reset requested\n")
    return marker
