"""``ijepa kernels report``: the ahead-of-time compile report of every shipped Triton kernel."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("kernels", help="inspect the Triton kernels (AOT compile report for A100/H100)")
    ks = p.add_subparsers(dest="kernels_command", metavar="ACTION")
    r = ks.add_parser("report", help="compile every shipped kernel configuration for sm_80/sm_90 (no GPU "
                                     "needed) and print registers, spills, shared memory and MMA instructions")
    r.add_argument("--arch", action="append", choices=["sm_80", "sm_90"],
                   help="target architecture (repeatable; default: both)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.add_argument("--only", default=None, help="only kernels whose name contains this string")
    r.set_defaults(func=_report)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _report(args) -> int:
    from kernels import aot
    argv = []
    for a in args.arch or []:
        argv += ["--arch", a]
    if args.json:
        argv.append("--json")
    if args.only:
        argv += ["--only", args.only]
    return aot.main(argv)
