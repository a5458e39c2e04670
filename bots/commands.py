"""``!``-commands as data: parsing, argument splitting and permission decisions.

Pure (no I/O, no clock): the bot base (:mod:`bots.bot`) feeds events in and turns the
results into replies.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from bridge.kernel.power import CREATOR_POWER
from bridge.kernel.relations import strip_reply_fallback
from bridge.model.people import StaffRecord

COMMAND_RE = re.compile(r"^!([A-Za-z][A-Za-z0-9_-]*)(?:[ \t]+(.*))?$", re.DOTALL)


class CommandError(Exception):
    """A command that cannot run as given; the message is shown to the sender."""


@dataclass(frozen=True)
class ParsedCommand:
    """``!name arg …``: the lower-cased name and the raw text after it (newlines kept)."""

    name: str
    rest: str

    def args(self) -> list[str]:
        """The text after the name split like a shell (quotes group words)."""
        return split_args(self.rest)


def parse_command(body: str) -> ParsedCommand | None:
    """The command in a message body, or None if it is not one.

    A reply's quoted fallback (``> <@user> …`` lines, then a blank line; see
    :func:`bridge.kernel.relations.strip_reply_fallback`) is skipped, so ``!ack`` sent as a
    reply is still a command."""
    text = strip_reply_fallback(body).strip()
    m = COMMAND_RE.match(text)
    if not m:
        return None
    return ParsedCommand(m.group(1).lower(), (m.group(2) or "").strip())


def split_args(text: str) -> list[str]:
    """Shell-like words; an unbalanced quote is a :class:`CommandError`."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise CommandError(f"cannot read the arguments: {e}") from None


def take_words(text: str, count: int) -> tuple[list[str], str]:
    """The first ``count`` shell-like words of ``text`` and the raw remainder (so a
    message text keeps its line breaks and Markdown)."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = ""
    words: list[str] = []
    try:
        while len(words) < count:
            tok = lex.get_token()
            if tok is None or tok == lex.eof:
                break
            words.append(tok)
    except ValueError as e:
        raise CommandError(f"cannot read the arguments: {e}") from None
    rest = text[lex.instream.tell():] if hasattr(lex.instream, "tell") else ""
    return words, rest.strip()


@dataclass(frozen=True)
class Permission:
    """Who may run a command: members of any of ``groups``, or anyone with at least
    ``min_power`` in the room. Neither given: everyone."""

    groups: tuple[str, ...] = ()
    min_power: int | None = None
    staff_only: bool = False  # the sender must be active staff in the directory


@dataclass(frozen=True)
class PermissionDecision:
    allowed: bool
    reason: str


def decide_permission(perm: Permission, sender: str, staff: StaffRecord | None,
                      power: int | None) -> PermissionDecision:
    """Whether ``sender`` may run a command with ``perm``; the reason says why (it is
    shown to the sender when refused)."""
    open_to_all = not perm.groups and perm.min_power is None
    if (perm.staff_only or perm.groups) and (staff is None or not staff.active):
        if staff is None:
            return PermissionDecision(False, f"{sender} is not in the staff directory")
        return PermissionDecision(False, f"{sender} is not an active staff member")
    if open_to_all:
        return PermissionDecision(True, "open to everyone")
    if perm.groups and staff is not None:
        hit = sorted(set(perm.groups) & staff.groups)
        if hit:
            return PermissionDecision(True, f"member of {', '.join(hit)}")
    if perm.min_power is not None and power is not None and power >= perm.min_power:
        shown = "unlimited (a room creator)" if power >= CREATOR_POWER else power
        return PermissionDecision(True, f"power level {shown} >= {perm.min_power}")
    needs: list[str] = []
    if perm.groups:
        needs.append("membership of " + " or ".join(perm.groups))
    if perm.min_power is not None:
        needs.append(f"power level {perm.min_power} in this room (you have {power or 0})")
    return PermissionDecision(False, "needs " + ", or ".join(needs))


def format_help(bot_name: str, commands: Sequence[tuple[str, str, str]]) -> str:
    """Markdown help: (name, usage, summary) per command."""
    lines = [f"**{bot_name}** understands:"]
    for name, usage, summary in commands:
        lines.append(f"- `!{name}{(' ' + usage) if usage else ''}` — {summary}")
    return "\n".join(lines)
