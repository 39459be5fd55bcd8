"""The ``neuqi`` command line: ``neuqi quantize | eval | export | distill | report``.

Each sub-command lives in ``neuqi.commands.<name>`` and exposes ``register(subparsers)``, which adds its parser and
sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import NeuqiError

COMMANDS = ("quantize", "eval", "export", "distill", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuqi", description="Low-bit post-training quantization of LLMs with NeUQI parameters."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"neuqi.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except NeuqiError as exc:
        print(f"neuqi {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
