"""Person -> Matrix user: localparts, display names and what to do when two people collide.

Pure: the sync, ``plan`` and ``explain`` all call :func:`map_people` with what the store
remembers (``known``) and get the same answer. Matrix user ids cannot be renamed, so a
person who already has an account keeps its user id forever, whatever the template says now;
only people without an account get a localpart from the template.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..kernel.ids import localpart_of
from ..model.people import Person
from .lookalike import reserved_lookalike

if TYPE_CHECKING:
    # only for annotations: importing bridge.config at runtime runs its __init__, which
    # pulls in the YAML loader (yaml, socket), and policy modules must stay I/O free
    from ..config.directory import MappingConfig

# Localparts are capped well below Synapse's 255-character user id limit.
MAX_LOCALPART = 64
# Synapse refuses longer display names (MAX_DISPLAYNAME_LEN).
MAX_DISPLAYNAME = 256
# suffix mode tries -2 … -MAX_SUFFIX before giving up on a person
MAX_SUFFIX = 1000

TEMPLATE_FIELDS = (
    "username", "email_localpart", "given_name", "surname", "display_name", "department",
    "title", "location", "email", "id",
)

# Letters that NFKD does not decompose into an ASCII letter plus combining marks (applied
# after casefold, so only lower-case forms are needed; casefold already turns ß into ss).
_TRANSLITERATE = str.maketrans({
    "ø": "o", "ł": "l", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "ŧ": "t", "ŋ": "n",
    "þ": "th", "æ": "ae", "œ": "oe", "ß": "ss",
})
_OUTSIDE = re.compile(r"[^a-z0-9._=\-/]+")
_DOTS = re.compile(r"\.{2,}")
_EDGES = "._-/"
_FIELD = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class MappedUser:
    """The Matrix user a person is (or will be) provisioned as."""

    person: Person
    user_id: str  # "@localpart:server"
    localpart: str
    displayname: str


@dataclass(frozen=True)
class MappingResult:
    """Everyone :func:`map_people` could map, and who it left out of this run and why."""

    users: dict[str, MappedUser]  # by person id
    refused: list[tuple[str, str]]  # (person id, reason) left out of this run
    # (person id, what changed silently): a localpart cut to fit, a suffix added
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def normalise_localpart(raw: str) -> str:
    """Turn a rendered template into a valid Matrix localpart ('' if nothing is left).

    Case-folded (``ß`` -> ``ss``), letters NFKD leaves alone transliterated (``ø ł đ ð ħ ı
    ŧ ŋ`` -> ``o l d d h i t n``, ``þ æ œ`` -> ``th ae oe``), NFKD-decomposed with the
    combining marks dropped (``é`` -> ``e``), lower-cased; every run of characters outside
    ``a-z 0-9 . _ = - /`` becomes one ``.``, repeated dots collapse, leading and trailing
    ``. _ - /`` are stripped, and the result is cut to :data:`MAX_LOCALPART` characters
    (stripping the edges again after the cut).
    """
    return _uncut_localpart(raw)[:MAX_LOCALPART].strip(_EDGES)


def _uncut_localpart(raw: str) -> str:
    s = raw.casefold().translate(_TRANSLITERATE)
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    s = s.lower()
    s = _OUTSIDE.sub(".", s)
    s = _DOTS.sub(".", s)
    return s.strip(_EDGES)


def template_fields(person: Person) -> dict[str, str]:
    """The values templates can use for one person; a missing attribute is ``""``.

    ``given_name`` and ``surname`` are the first and last word of the display name (a
    one-word display name gives that word as ``given_name`` and an empty ``surname``);
    ``email_localpart`` is the email address up to its last ``@``.
    """
    words = person.display_name.split()
    email = person.email or ""
    return {
        "id": person.id,
        "username": person.username,
        "display_name": person.display_name,
        "email": email,
        "email_localpart": email.rpartition("@")[0] if "@" in email else email,
        "given_name": words[0] if words else "",
        "surname": words[-1] if len(words) > 1 else "",
        "department": person.department or "",
        "title": person.title or "",
        "location": person.location or "",
    }


def render_template(template: str, person: Person) -> str:
    """Replace each ``{field}`` of the template (see :data:`TEMPLATE_FIELDS`).

    Unknown fields raise ValueError (the config loader already refuses them).
    """
    values = template_fields(person)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in values:
            raise ValueError(f"unknown template field {{{name}}}")
        return values[name]

    return _FIELD.sub(sub, template)


def render_displayname(person: Person, template: str) -> str:
    """The person's Matrix display name: the rendered template, stripped, runs of
    whitespace collapsed to one space, cut to :data:`MAX_DISPLAYNAME` characters; the
    username when that leaves nothing."""
    name = " ".join(render_template(template, person).split())[:MAX_DISPLAYNAME].strip()
    return name or person.username


def _numeric(localpart: str) -> bool:
    # Synapse refuses localparts that int() accepts ("Numeric user IDs are reserved for
    # guest users"), including "1_000".
    try:
        int(localpart)
    except ValueError:
        return False
    return True


def _with_suffix(localpart: str, n: int) -> str:
    suffix = f"-{n}"
    base = localpart[: MAX_LOCALPART - len(suffix)].rstrip(_EDGES)
    return base + suffix


def map_people(people: Iterable[Person], config: MappingConfig, server_name: str, *,
               known: Mapping[str, str], reserved: Callable[[str], bool],
               reserved_names: Iterable[str] = (),
               existing: Mapping[str, str | None] | None = None,
               skeleton: Callable[[str], str] | None = None) -> MappingResult:
    """Give every person a Matrix user id and display name.

    ``known`` maps person id -> user id already provisioned: those people keep that id
    (Matrix ids cannot be renamed) and every id in it stays taken, even for people no
    longer in the directory. Other people get ``config.localpart_template`` rendered and
    normalised (:func:`normalise_localpart`); an empty or all-numeric result is refused.
    ``reserved(localpart)`` true (Enclave's bot, the admin, the appservice namespace) counts
    as taken.

    Collisions (with a known user id, a reserved localpart or another new person):

    * ``suffix``: new people are handled in person-id order (string order). First everyone
      whose plain localpart is free gets it (the lowest id wins a shared one); then the
      others, still in id order, get the first free of ``-2``, ``-3`` …
    * ``refuse``: every new person whose localpart is taken or reserved, or shared with
      another new person, is refused with a reason naming the other person / user id.

    Look-alikes (new people only; who has an account keeps it): a localpart that is, or
    extends with a separator or digit, one of ``reserved_names`` (Enclave's own users:
    ``enclave-2``, ``enclave-admin-2``) is refused in either mode, never suffixed into
    one. With ``skeleton`` (the TR39 confusable skeleton), a localpart or display name
    whose skeleton equals that of another account (``existing``: user id -> display name
    of every account on the homeserver, plus everyone mapped) while the text differs is
    refused, naming the account it imitates. Silent changes are reported in ``notes``: a
    localpart cut to :data:`MAX_LOCALPART`, a suffix added.

    Disabled people are mapped like everyone else; the sync decides what to do with them.
    """
    by_id: dict[str, Person] = {}
    for p in people:
        if p.id in by_id:
            raise ValueError(f"person id {p.id!r} given twice")
        by_id[p.id] = p

    # lower-cased localpart -> who holds it, for reasons
    taken: dict[str, str] = {
        localpart_of(uid).lower(): f"{uid} (person {pid})" for pid, uid in known.items()
    }
    users: dict[str, MappedUser] = {}
    refused: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    new: list[tuple[Person, str]] = []

    def assign(p: Person, localpart: str, user_id: str | None = None) -> None:
        uid = user_id or f"@{localpart}:{server_name}"
        users[p.id] = MappedUser(p, uid, localpart,
                                 render_displayname(p, config.displayname_template))

    for pid in sorted(by_id):
        p = by_id[pid]
        uid = known.get(pid)
        if uid is not None:
            assign(p, localpart_of(uid), uid)
            continue
        rendered = render_template(config.localpart_template, p)
        lp = normalise_localpart(rendered)
        if lp and len(_uncut_localpart(rendered)) > MAX_LOCALPART:
            notes.append((pid, f"localpart cut to {MAX_LOCALPART} characters: {lp!r}"))
        look = reserved_lookalike(lp, reserved_names) if lp else None
        if look is not None:
            refused.append((pid, f"localpart {lp!r} imitates Enclave's own user "
                                 f"@{look}:{server_name} (reserved prefix {look!r})"))
        elif not lp:
            refused.append((pid, "localpart template gives an empty localpart"))
        elif _numeric(lp):
            refused.append((pid, f"localpart template gives the all-numeric localpart {lp!r}, "
                                 "which Synapse reserves for guests"))
        else:
            new.append((p, lp))

    if config.collision == "refuse":
        sharing: dict[str, list[str]] = {}
        for p, lp in new:
            sharing.setdefault(lp, []).append(p.id)
        for p, lp in new:
            others = [o for o in sharing[lp] if o != p.id]
            if lp in taken:
                refused.append((p.id, f"localpart {lp!r} is already {taken[lp]}"))
            elif reserved(lp):
                refused.append((p.id, f"localpart {lp!r} is reserved"))
            elif others:
                refused.append((p.id, f"localpart {lp!r} is also what person(s) "
                                      f"{', '.join(others)} map to"))
            else:
                assign(p, lp)
    else:
        later: list[tuple[Person, str]] = []
        for p, lp in new:
            if lp in taken or reserved(lp):
                later.append((p, lp))
            else:
                taken[lp] = f"person {p.id}"
                assign(p, lp)
        for p, lp in later:
            for n in range(2, MAX_SUFFIX + 1):
                cand = _with_suffix(lp, n)
                if cand not in taken and not reserved(cand):
                    notes.append((p.id, f"localpart {lp!r} is already "
                                        f"{taken.get(lp, 'reserved')}; given {cand!r}"))
                    taken[cand] = f"person {p.id}"
                    assign(p, cand)
                    break
            else:
                refused.append((p.id, f"no free localpart: {lp!r} and {lp}-2 … "
                                      f"{lp}-{MAX_SUFFIX} are all taken or reserved"))

    if skeleton is not None:
        _refuse_confusables(users, known, existing or {}, skeleton, refused)
    return MappingResult(users=dict(sorted(users.items())), refused=sorted(refused),
                         notes=sorted(notes))


def _refuse_confusables(users: dict[str, MappedUser], known: Mapping[str, str],
                        existing: Mapping[str, str | None], skeleton: Callable[[str], str],
                        refused: list[tuple[str, str]]) -> None:
    """Refuse new people whose localpart or display name only looks like another account's
    (equal TR39 skeletons, different text); earlier people in id order win."""
    seen_lp: dict[str, tuple[str, str]] = {}  # skeleton -> (localpart, user id)
    seen_dn: dict[str, tuple[str, str]] = {}  # skeleton -> (display name, user id)
    for uid, dn in sorted(existing.items()):
        seen_lp.setdefault(skeleton(localpart_of(uid)), (localpart_of(uid), uid))
        if dn:
            seen_dn.setdefault(skeleton(dn), (dn, uid))
    new_people = set()
    for pid, mu in sorted(users.items()):
        if pid in known:
            seen_lp.setdefault(skeleton(mu.localpart), (mu.localpart, mu.user_id))
            seen_dn.setdefault(skeleton(mu.displayname), (mu.displayname, mu.user_id))
        else:
            new_people.add(pid)
    for pid in sorted(new_people):
        mu = users[pid]
        why = None
        lp_other = seen_lp.get(skeleton(mu.localpart))
        dn_other = seen_dn.get(skeleton(mu.displayname))
        if lp_other is not None and lp_other[0] != mu.localpart \
                and lp_other[1] != mu.user_id:
            why = (f"localpart {mu.localpart!r} looks like {lp_other[1]} "
                   "(Unicode TR39 confusable)")
        elif dn_other is not None and dn_other[0] != mu.displayname \
                and dn_other[1] != mu.user_id:
            why = (f"display name {mu.displayname!r} looks like {dn_other[0]!r} of "
                   f"{dn_other[1]} (Unicode TR39 confusable)")
        if why is not None:
            del users[pid]
            refused.append((pid, why))
            continue
        seen_lp.setdefault(skeleton(mu.localpart), (mu.localpart, mu.user_id))
        seen_dn.setdefault(skeleton(mu.displayname), (mu.displayname, mu.user_id))
