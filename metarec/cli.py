"""The ``metarec`` command: one entry point, one subcommand per job.

The library never sees argparse: each subcommand turns flags into keyword arguments for
the module that does the work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from metarec.errors import ConfigError, MetarecError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from metarec.evaluate_cli import add_eval_arguments

    parser = argparse.ArgumentParser(
        prog="metarec", description="Streaming meta-learning recommender.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ev = sub.add_parser("eval", help="prequential comparison against the baselines",
                        description="Prequential (test-then-train) evaluation, full ranking, "
                                    "of metarec against the baselines (DESIGN.md).")
    add_eval_arguments(ev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "eval":
            from metarec.evaluate_cli import run_eval

            return run_eval(args)
    except ConfigError as exc:
        print(f"metarec: configuration error: {exc}", file=sys.stderr)
        return 2
    except MetarecError as exc:
        print(f"metarec: {exc}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
