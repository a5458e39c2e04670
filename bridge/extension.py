"""The public extension seam: how bots (Enclave's own and third-party ones) plug in.

Modelled on maubot's ``Plugin``. An extension is found through the ``enclave.extensions``
entry point group (``pyproject.toml``: ``[project.entry-points."enclave.extensions"]``), so
``bridge`` loads the first-party bots without importing them by name. It may bring:

- its own database tables: :meth:`Extension.migrations` (a folder per engine with numbered
  ``NNN_name.sql`` files, versioned apart from Enclave's own, on the same database);
- its own CLI group: :meth:`Extension.add_cli`;
- inbox handlers, scheduled jobs, HTTP routes and a lifetime in a running Enclave: what
  :meth:`Extension.setup` returns (:class:`Plugin`), given the composition root
  (``bridge.root.Root``) whose services it uses.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from .matrix.inbox import EventHandler

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "enclave.extensions"


@dataclass(frozen=True)
class JobReport:
    """What one run of a scheduled job did: ``outcome`` (``ok``, ``partial``: some of its
    work failed, ``failed``, ``refused``: a safety check stopped it, ``skipped``) and a
    ``summary`` of what it changed ("" when nothing). Enclave counts it
    (``enclave_job_runs_total``) and logs one line when it changed something or did not
    end ``ok``."""

    outcome: str = "ok"
    summary: str = ""


@dataclass(frozen=True)
class ScheduledJob:
    """A job the leading replica runs every ``minutes`` (0: never on a schedule) and, if
    ``at_start``, once when it first leads. ``run(reason)``; ``reason`` is "scheduled",
    "start-up" or "takeover"; it may return a :class:`JobReport` (None: ok, nothing to
    report; an exception: failed)."""

    id: str
    minutes: float
    run: Callable[[str], Awaitable[JobReport | None]]
    at_start: bool = True


@dataclass(frozen=True)
class MigrationSet:
    """An extension's own schema: ``folder/<engine>/NNN_name.sql`` (engine: ``sqlite`` or
    ``postgres``), versioned under ``component`` in ``enclave_schema_components``.

    ``adopted``: (version, table, column) — for schema an earlier release created with
    Enclave's own migrations: on a database where that table (and column, if given)
    exists already, the version is recorded as applied instead of being run.
    """

    component: str
    folder: Traversable
    adopted: Sequence[tuple[int, str, str | None]] = ()


@dataclass(frozen=True)
class ConsoleRequest:
    """What an extension's console page is given: the signed-in person (``actor``, their
    Matrix id; ``roles``), the query, and for a POST the form (the console has checked the
    session, the role and the CSRF token before the handler runs, and audits the POST)."""

    method: str
    actor: str
    roles: frozenset[str]
    query: dict[str, str]
    form: dict[str, str]
    csrf: str  # put it in every form as <input type=hidden name=csrf>
    base: str  # the page's own URL path (forms post back to it)


@dataclass(frozen=True)
class ConsoleView:
    """An extension page's answer: ``body_html`` (escaped by the extension), shown inside
    the console's layout; ``outcome``/``detail`` go into the audit record of a POST;
    ``csv`` (filename, text) answers with a download instead."""

    body_html: str = ""
    outcome: str = "applied"
    detail: str | None = None
    csv: tuple[str, str] | None = None


@dataclass(frozen=True)
class ConsolePage:
    """A page an extension adds to the operators' console at ``/console/x/<path>``.

    ``role``: who may open it (``viewer``: anyone signed in); ``post_role``: who may POST
    to it (None: no POST)."""

    path: str
    title: str
    handler: Callable[[ConsoleRequest], Awaitable[ConsoleView]]
    role: str = "viewer"
    post_role: str | None = None


@dataclass(frozen=True)
class Plugin:
    """What an extension adds to a running Enclave."""

    handlers: Sequence[EventHandler] = ()
    jobs: Sequence[ScheduledJob] = ()
    # adds routes (and app keys) to the aiohttp application
    mount: Callable[[web.Application], None] | None = None
    # an aiohttp cleanup context: started after Enclave's own, stopped before them
    lifetime: Callable[[web.Application], AsyncIterator[None]] | None = None
    # pages of the operators' console (``console:``), in menu order
    console_pages: Sequence[ConsolePage] = ()


class Extension:
    """Subclass and name the subclass in the ``enclave.extensions`` entry point group."""

    name: str = "extension"
    # top-level config sections this extension reads (Enclave refuses a config whose
    # section no installed extension handles)
    config_sections: tuple[str, ...] = ()

    def migrations(self) -> MigrationSet | None:
        return None

    def add_cli(self, sub: Any, common: argparse.ArgumentParser) -> None:
        """Add subcommands (``sub.add_parser(..., parents=[common])``)."""

    def setup(self, root: Any) -> Plugin | None:
        """What to run in ``enclave run``; None when the config asks for nothing.

        ``root``: the composition root (``bridge.root.Root``; not imported here, the root
        imports this module): its ``config``, ``stores``, ``client``, ``executor``, ...
        """
        return None


def discover_extensions() -> list[Extension]:
    """The installed extensions, in entry point name order. One that fails to load stops
    Enclave: a half-loaded set of bots would silently drop their work."""
    out = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as e:
            raise RuntimeError(f"extension {ep.name!r} ({ep.value}) cannot be loaded: {e}") from e
        out.append(cls())
    return out
