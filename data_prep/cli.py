"""The `data_prep` command line: one sub-command per module, each with its own --help."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from data_prep.cli_common import command_line
from data_prep.records import InputFormatError

COMMAND_MODULES = ("pairs", "vqa", "retrieval", "nlvr2", "classify", "gqa", "snli_ve", "clotho", "audiocaps",
                   "wavcaps", "audio_pairs", "esc50", "synth", "tokenizer", "verify", "extract")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data_prep", description=__import__("data_prep").__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"data_prep.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    args.command_line = command_line(argv)
    del args.log_level
    try:
        return args.func(args)
    except (InputFormatError, OSError, ValueError) as exc:  # OSError: e.g. a full disk (OutputWriteError)
        print(f"data_prep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
