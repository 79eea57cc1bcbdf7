"""`netmon` / `python -m netmon`: the command line.

`netmon serve` (the default: `netmon --addr :9090` is `netmon serve --addr :9090`)
captures connects and serves the HTTP API; `netmon trace` prints them as they happen.
settings.py holds what both share: the settings table, the flag parsers, the exit codes.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Optional, Sequence

from . import serve, trace
from .settings import Parser, parse, parse_addr, run_command

__all__ = ["build_parser", "main", "parse_addr", "parse_args"]

COMMANDS = {"serve": serve, "trace": trace}


def build_parser() -> argparse.ArgumentParser:
    """netmon's own flags are serve's (the default command); --help lists the commands."""
    root = serve.add_flags(Parser(prog="netmon", allow_abbrev=False,
                                  usage="netmon [serve] [options]\n       netmon trace [options]",
                                  **serve.PARSER))
    commands = root.add_subparsers(title="commands", prog="netmon", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.configure(commands.add_parser(name, help=command.SUMMARY, allow_abbrev=False,
                                              **command.PARSER))
    return root


def _with_command(argv: Sequence[str]) -> list:
    """argv naming its command: serve unless it names one. `netmon --help` stays the root
    parser's, so that it lists the commands."""
    argv = list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "serve")
    return argv


def parse_args(argv: Optional[Sequence[str]] = None,
               environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """The settings of the command argv names, completed from the environment (serve)."""
    return parse(build_parser(), _with_command(sys.argv[1:] if argv is None else argv), environ)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _with_command(sys.argv[1:] if argv is None else argv)
    prog = COMMANDS[argv[0]].PROG if argv[0] in COMMANDS else serve.PROG
    return run_command(build_parser(), argv, prog, os.environ)
