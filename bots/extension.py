"""Enclave's first-party bots as an extension (entry point ``enclave.extensions``: ``bots``).

Nothing in ``bridge`` names this module: ``bridge.extension.discover_extensions`` finds it
through the entry point, as it finds a third-party bot.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from bridge.extension import Extension, MigrationSet, Plugin

from .cli import add_announcements_parser, add_bots_parser
from .store import MIGRATIONS
from .wiring import build_bots

if TYPE_CHECKING:
    from bridge.root import Root


class BotsExtension(Extension):
    name = "bots"
    config_sections = ("bots",)

    def migrations(self) -> MigrationSet:
        return MIGRATIONS

    def add_cli(self, sub: Any, common: argparse.ArgumentParser) -> None:
        add_announcements_parser(sub, common)
        add_bots_parser(sub, common)

    def setup(self, root: Root) -> Plugin | None:
        return build_bots(root)
