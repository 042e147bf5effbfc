"""``ijepa`` command line: one entry point, one subcommand per module.

Each subcommand lives in the module that does the work; that module exposes
``add_parser(subparsers)`` which registers its options and sets ``func(args) -> int``.

Exit codes: 0 success; 2 bad usage, bad config, bad data or bad checkpoint (one line
naming the problem and the fix, no traceback); 1 a failure while running.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order ``ijepa --help`` lists them
SUBCOMMANDS = (
    "engine.train",      # train
    "engine.demo",       # demo
    "engine.eval",       # eval
    "engine.convert",    # convert
    "engine.distributed",  # export (DeepSpeed ZeRO checkpoints)
    "engine.bench",      # bench, profile
    "engine.kernels_cli",  # kernels report
)


class UsageError(Exception):
    """Bad input from the user (arguments, files, data). Printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line + exit 2
        self.print_usage(sys.stderr)
        print(f"ijepa: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ijepa", description="I-JEPA pretraining engine: train, evaluate, convert, benchmark.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod_name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:      # subcommand not built in this version
                continue
            raise
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    from engine.config import ConfigError
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from engine import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as e:
        print(f"ijepa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ijepa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # ``python -m engine.cli`` (how torchrun/srun start it) runs this file as __main__; go through
    # the imported module so ``except UsageError`` matches the class other modules raise
    from engine.cli import main as _main
    sys.exit(_main())
