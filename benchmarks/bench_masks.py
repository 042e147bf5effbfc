"""Time per batch of the vectorised mask sampler vs the reference-style loop sampler.

Default: B=128 on the ViT-H/14 grid (224/14 = 16 x 16) with the reference configs' values
(enc scale 0.85-1.0, pred scale 0.15-0.2, aspect 0.75-1.5, npred 4, min_keep 10), plus a
config where about half of the samples need the region-dropping fallback. Both samplers
run in the same process, one thread, alternating so that changing machine load hits both
alike; wall-clock and thread-CPU medians are reported. "warm": blocks of consecutive calls
(caches and allocator hot); "cold": the two samplers alternate call by call, closer to a
training loop where model work runs between two sampler calls.

    python benchmarks/bench_masks.py --json bench_masks.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.masks import MultiBlockMaskSampler, VectorizedMaskSampler  # noqa: E402

CONFIGS = {
    "reference (ViT-H/14, 16x16)": dict(
        input_size=224, patch_size=14, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
        aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10, allow_overlap=False),
    "fallback-heavy (14x14, ~50% fallbacks)": dict(
        input_size=224, patch_size=16, enc_mask_scale=(0.2, 0.3), pred_mask_scale=(0.25, 0.35),
        aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=20, allow_overlap=False),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(sampler, batch, calls, device):
    """Per-call (wall, thread-CPU) seconds over ``calls`` calls."""
    wall, cpu = [], []
    for _ in range(calls):
        sync(device)
        t, c = time.perf_counter(), time.thread_time()
        sampler(batch)
        sync(device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6, help="alternating blocks per sampler")
    ap.add_argument("--loop-calls", type=int, default=5, help="loop-sampler calls per block")
    ap.add_argument("--vec-calls", type=int, default=50, help="vectorised-sampler calls per block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="device of the vectorised sampler (cpu, cuda)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)   # both samplers warn on every fallback
    device = torch.device(args.device)

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    from engine.tools.bench import cpu_model
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": args.threads,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
           "python": platform.python_version(), "torch": torch.__version__, "loadavg_start": os.getloadavg()}
    print(f"command: {cmd}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    rows = []
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        loop = MultiBlockMaskSampler(**cfg)
        vec = VectorizedMaskSampler(**cfg, device=device)
        for _ in range(3):   # warm-up (allocator, lazy init, CUDA context)
            loop(args.batch)
            vec(args.batch)
        for regime in ("warm", "cold"):
            lw, lc, vw, vc = [], [], [], []
            for _ in range(args.rounds):
                if regime == "warm":
                    w, c = measure(loop, args.batch, args.loop_calls, torch.device("cpu"))
                    lw += w
                    lc += c
                    w, c = measure(vec, args.batch, args.vec_calls, device)
                    vw += w
                    vc += c
                else:
                    for _ in range(args.loop_calls):
                        w, c = measure(loop, args.batch, 1, torch.device("cpu"))
                        lw += w
                        lc += c
                        w, c = measure(vec, args.batch, 1, device)
                        vw += w
                        vc += c
            med = {k: statistics.median(v) * 1e3 for k, v in (("loop_wall", lw), ("loop_cpu", lc),
                                                               ("vec_wall", vw), ("vec_cpu", vc))}
            row = {"config": name, "regime": regime, "batch": args.batch, "device": str(device),
                   **{f"{k}_ms": v for k, v in med.items()},
                   "speedup_wall": med["loop_wall"] / med["vec_wall"],
                   "speedup_cpu": med["loop_cpu"] / med["vec_cpu"]}
            rows.append(row)
            print(f"  {name}, {regime}: loop {med['loop_wall']:.2f} ms, vectorised {med['vec_wall']:.3f} ms "
                  f"-> {row['speedup_wall']:.1f}x (CPU time {row['speedup_cpu']:.1f}x)", flush=True)
    print()
    print(f"| config (B={args.batch}) | regime | loop ms/batch | vectorised ({device}) ms/batch | speed-up (wall) "
          f"| loop CPU ms | vectorised CPU ms | speed-up (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['regime']} | {r['loop_wall_ms']:.2f} | {r['vec_wall_ms']:.3f} | {r['speedup_wall']:.1f}x "
              f"| {r['loop_cpu_ms']:.2f} | {r['vec_cpu_ms']:.3f} | {r['speedup_cpu']:.1f}x |")
    env["loadavg_end"] = os.getloadavg()
    print(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "environment": env, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
