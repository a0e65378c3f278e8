"""`wideep` command line: one sub-command per concept, each registered by its own package.

Every entry below names a module with `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed args; its return value is the exit code). Those modules keep
their top-level imports light so `wideep --help` stays fast; heavy imports live in `func`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that package has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
