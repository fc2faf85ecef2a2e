"""The ``idl-ray`` command (also ``python -m idl_ray``).

Usable locally or as a Ray job: ``ray job submit --working-dir . -- idl-ray <command> ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from idl_ray._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="idl-ray",
        description="Implicit deep learning and state-driven implicit modelling (SIM) on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"idl-ray {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idl-ray`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stdout)
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
