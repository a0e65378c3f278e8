"""`wideep` command line: one sub-command per concept, each registered by its own package.

Every entry below names a module with `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed args; its return value is the exit code). Those modules keep
their top-level imports light so `wideep --help` stays fast; heavy imports live in `func`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from wideep.errors import EXIT_USAGE, ConfigError, UsageExit

COMMAND_MODULES = [
    "wideep.model.cli",      # make-model
    "wideep.engine.cli",     # generate (offline demo)
    "wideep.server.cli",     # serve
    "wideep.router.sidecar_cli",  # sidecar
    "wideep.router.cli",     # router
    "wideep.deploy.cli",     # up, render, status
    "wideep.bench.cli",      # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wideep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    parser.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 ok, 2 usage or configuration error (as argparse), 1 any other failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"wideep {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageExit as exc:
        print(exc.message, file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
