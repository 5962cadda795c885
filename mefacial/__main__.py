"""Command line: python -m mefacial animate | checkpoints | variants ..."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import MefacialError


def _cmd_variants(args: argparse.Namespace) -> int:
    from .variants import list_variants

    print(json.dumps(list_variants(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mefacial", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list the variants and what each needs").set_defaults(func=_cmd_variants)
    from . import checkpoints

    checkpoints.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MefacialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
