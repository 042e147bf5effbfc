"""``ijepa`` command line: one entry point, one subcommand per module.

Each subcommand lives in the module that does the work; that module exposes
``add_parser(subparsers)`` which registers its options and sets ``func(args) -> int``.

Exit codes (one handler, ``engine.errors.report``): 0 success; 2 bad usage, bad config, bad data
or bad checkpoint (one line naming the problem and the fix, no traceback, nothing written);
1 a failure while running; 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

# subcommand modules, in the order ``ijepa --help`` lists them
SUBCOMMANDS = (
    "engine.train",              # train
    "engine.tools.demo",         # demo
    "engine.tools.eval",         # eval
    "engine.tools.convert",      # convert, export
    "engine.tools.bench",        # bench, profile
    "engine.tools.kernels_cli",  # kernels report
)


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
        importlib.import_module(mod_name).add_parser(sub)
    return p


def main(argv=None) -> int:
    from engine.errors import report
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["ijepa", *argv])   # what outputs quote as "the exact command"
    if args.version:
        from engine import __version__
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BaseException as e:   # noqa: B902 -- the one place every error becomes an exit code
        if isinstance(e, SystemExit):
            raise
        rank, world = _rank_world()
        code = report(e, rank, world)
        if world > 1:
            # interpreter shutdown with a broken process group can hang or abort; the other ranks
            # fail fast on their next collective (or after IJEPA_DIST_TIMEOUT_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


def _rank_world():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return None, 1


if __name__ == "__main__":
    # ``python -m engine.cli`` (how torchrun/srun start it) runs this file as __main__
    sys.exit(main())
