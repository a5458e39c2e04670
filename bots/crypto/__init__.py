"""End-to-end encrypted sending for Enclave's bots (Megolm through matrix-nio + vodozemac).

Element encrypts private rooms and DMs by default, so a bot that posts there must encrypt
for every device of every member, or staff see "unable to decrypt". One bot identity (an
appservice user) gets one real device:

* **Device.** The first start creates the bot's device as the appservice (MSC4190:
  ``PUT /devices/{deviceId}`` with the AS token) and from then on acts as that device with
  the AS token and ``?user_id=…&device_id=…`` (no access token of its own: the path that
  keeps working when the homeserver delegates auth, next-gen auth / MAS). Where the
  homeserver does not support that, it falls back to the appservice login
  (``m.login.application_service``), which yields a device and an access token. The device
  id, how it authenticates, any token and the key that encrypts the Olm account in nio's
  SQLite store are kept in ``<store_dir>/session.json`` (mode 0600; never logged). A restart
  reuses them; an invalid token is replaced by logging in again *with the same device id*
  (or, where the login is refused, by adopting that device through MSC4190), so the device
  and its published keys survive.
* **Cross-signing.** Once the device's keys are published, the bot user's cross-signing
  identity (``bots/cross_signing.py``) is created or reused and the device signed with it:
  Element neither shares room keys with nor shows messages from a device its owner has not
  signed. A lost or conflicting identity keeps the device from becoming ready, and sends
  are refused with the reason and the fix.
* **Keys.** nio's ``SqliteStore`` in ``store_dir`` keeps the Olm account, Olm sessions and
  device lists. A background sync loop (device token, no room data) keeps one-time keys
  topped up and receives to-device messages (room keys for :meth:`EncryptedSender.decrypt`).
* **Sending.** Before each message the room's members are read from the homeserver
  (``joined_members``), their device keys queried afresh, Olm sessions claimed and the room's
  Megolm session (re)shared when a member device lacks it or someone who has it left. The
  pure :func:`decide_share` / :func:`assess_coverage` make those decisions. The encrypted
  event is then sent with the **appservice token** masquerading as the bot *and its device*
  (``?user_id=…&device_id=…``): appservice requests are exempt from rate limits
  (``rate_limited: false``), and with a device id Synapse keeps the transaction id in its
  database, so a resend with the same ``txn_id`` (after a crash of either side) returns the
  first event instead of creating a second one.
* **Who gets the key.** Joined members at once. Invited members (a DM's invitee) get the
  first key of each session started while they were invited a few seconds after they join
  (:meth:`EncryptedSender.member_joined`; kept in ``invitee_keys.json``, 0600, until then):
  Element tries a message at the join and gives up for good if the key is there but it has
  not fetched the bot's device yet. With ``require_signed_devices`` (Element's rule, the
  default) a member counts as reached only through a device signed by its owner's
  cross-signing key, checked cryptographically from the homeserver's key query.
* **Refusal, not silence.** A room the bot cannot encrypt for (not joined, a member with
  no device, a member with no device signed by its owner, a member none of whose (signed)
  devices got the key, device not ready in time) raises :class:`CannotEncrypt` with the
  reason; nothing is sent.

The package: :mod:`.decisions` (pure), :mod:`.identity` (the device's identity on disk),
:mod:`.provisioning` (creating, adopting and cross-signing the device), :mod:`.device`
(:class:`EncryptedDevice`: the device's lifetime) and :mod:`.sender`
(:class:`EncryptedSender`, :class:`EncryptedSenders`).
"""

from .decisions import (
    Coverage,
    SessionView,
    ShareDecision,
    assess_coverage,
    decide_share,
    join_settle_wait,
)
from .device import EncryptedDevice
from .identity import SESSION_FILE, DeviceSession
from .sender import CannotEncrypt, EncryptedSender, EncryptedSenders

__all__ = [
    "SESSION_FILE",
    "CannotEncrypt",
    "Coverage",
    "DeviceSession",
    "EncryptedDevice",
    "EncryptedSender",
    "EncryptedSenders",
    "SessionView",
    "ShareDecision",
    "assess_coverage",
    "decide_share",
    "join_settle_wait",
]
