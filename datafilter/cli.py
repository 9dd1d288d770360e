"""The ``datafilter`` command. Each stage package contributes its subcommands through a ``register`` function.

Handlers import their heavy dependencies (torch, faiss) themselves, so ``datafilter --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from datafilter import __version__
from datafilter.common.log import setup_logging

# Modules with a ``register(commands: Commands)`` function, in the order the pipeline runs.
STAGES = (
    "datafilter.pool.cli",
    "datafilter.micro.cli",
    "datafilter.embed.cli",
    "datafilter.filters.cli",
    "datafilter.pool.reshard",
    "datafilter.train.cli",
    "datafilter.evaluate.cli",
    "datafilter.bench.cli",
)

log = logging.getLogger("datafilter")


class Commands:
    """Hands stage modules top-level commands and shared command groups (``datafilter pool ...``)."""

    def __init__(self, sub: argparse._SubParsersAction):
        self._sub = sub
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def command(self, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return self._sub.add_parser(name, help=help, description=description or help,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)

    def group(self, name: str, help: str) -> argparse._SubParsersAction:
        if name not in self._groups:
            p = self._sub.add_parser(name, help=help, description=help)
            self._groups[name] = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
        return self._groups[name]

    def subcommand(self, group: str, group_help: str, name: str, help: str,
                   description: str | None = None) -> argparse.ArgumentParser:
        return self.group(group, group_help).add_parser(
            name, help=help, description=description or help, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datafilter",
        description="A DataComp-style benchmark harness for image-text data filtering: ingest or build a pool, "
                    "embed it, filter it, train a fixed-budget CLIP on the subset and evaluate it zero-shot.",
    )
    parser.add_argument("--version", action="version", version=f"datafilter {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v: debug messages, -vv: also those of the libraries used)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = Commands(sub)
    for module in STAGES:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted; finished shards are kept and a rerun resumes")
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose >= 2:
            raise
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
