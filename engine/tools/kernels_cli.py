"""``ijepa kernels report``: the ahead-of-time compile report of every shipped Triton kernel;
``ijepa gpu-check``: ``benchmarks/gpu_check.py`` (``make gpu-check``) with this Python."""
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
    g = sub.add_parser("gpu-check", help="validate and measure on one GPU in <= 10 min (benchmarks/gpu_check.py)",
                       description="make gpu-check: the CUDA test tier, kernel and end-to-end timings, the DALI "
                                   "decoder and host syncs on this GPU, each part under its own timeout, into "
                                   "OUT/gpu-report.md. Uses this Python and installs nothing.")
    g.add_argument("--out", default="runs/gpu-check", help="report folder (default runs/gpu-check)")
    g.add_argument("--reference", default=None, metavar="PATH", help="a checkout of facebookresearch/ijepa")
    g.add_argument("--e2e-batch", type=int, default=32, help="ViT-H/14 batch for bench e2e (default 32)")
    g.add_argument("--dry-run", action="store_true", help="on the CPU, interpreter, tiny shapes: plumbing only")
    g.set_defaults(func=_gpu_check)


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


def _gpu_check(args) -> int:
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", "gpu_check.py")
    argv = ["--out", args.out, "--e2e-batch", str(args.e2e_batch)] + (["--dry-run"] if args.dry_run else []) + \
        (["--reference", args.reference] if args.reference else [])
    return subprocess.call([sys.executable, script, *argv])
