"""The ``enclave`` command line.

Exit codes (also in docs/operators/cli.md):
  0 success · 1 runtime error · 2 usage error · 3 invalid config or secret ·
  4 database problem (unreachable, schema newer than this code, migration needed) ·
  5 directory sync refused (source error or safety limit; nothing was changed)

One module per command group; each adds its subcommands with ``add_parsers``. The
extensions' groups (the bots': announcements, bots) plug in through
:meth:`bridge.extension.Extension.add_cli` and share :mod:`bridge.cli.kit`.
"""

from __future__ import annotations

import argparse
import os

from ..config import ConfigError
from ..extension import discover_extensions
from ..store import DatabaseError, SchemaError
from . import database, directory, policy, registration, retention, separation, serve
from .kit import (
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    _err,
    parse_time,
)
from .registration import registration_dict

__all__ = ["EXIT_CONFIG", "EXIT_DATABASE", "EXIT_ERROR", "EXIT_OK", "EXIT_REFUSED",
           "EXIT_USAGE", "build_parser", "main", "parse_time", "registration_dict"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enclave", description=__doc__.split("\n")[0])
    default_cfg = os.environ.get("ENCLAVE_CONFIG", "config.yaml")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=default_cfg,
                        help="config file (default: $ENCLAVE_CONFIG or ./config.yaml)")
    sub = p.add_subparsers(dest="cmd", required=True)
    # in the order ``enclave --help`` lists them
    registration.add_parsers(sub, common)
    serve.add_run_parser(sub, common)
    database.add_parsers(sub, common)
    directory.add_parsers(sub, common)
    separation.add_parsers(sub, common)
    policy.add_parsers(sub, common)
    serve.add_reload_parser(sub, common)
    retention.add_parsers(sub, common)
    # the extensions' own command groups (the bots': announcements, bots)
    for ext in discover_extensions():
        ext.add_cli(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config_file", None):
        args.config = args.config_file
    try:
        return args.fn(args)
    except ConfigError as e:
        _err(str(e))
        return EXIT_CONFIG
    except (SchemaError, DatabaseError) as e:
        _err(f"database: {e}")
        return EXIT_DATABASE
    except argparse.ArgumentTypeError as e:
        _err(f"enclave: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_ERROR

