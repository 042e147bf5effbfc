"""Timing, environment and table helpers shared by the kernel benchmarks.

CUDA: ``triton.testing.do_bench`` (median of its repetitions, L2 flushed between runs).
CPU: ``time.perf_counter`` medians; only PyTorch paths run there (the Triton interpreter is
a correctness tool, not something to time).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402


def cpu_name() -> str:
    from engine.tools.bench import cpu_model
    return cpu_model()


def environment(device: torch.device) -> dict:
    import triton
    info = dict(
        device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU: {cpu_name()}, {os.cpu_count()} cores"),
        device_type=device.type,
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        cpu_threads=torch.get_num_threads(),
        command=" ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
    )
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def print_environment(info: dict) -> None:
    print(f"device: {info['device']}")
    print(f"torch {info['torch']}, triton {info['triton']}, python {info['python']}"
          + (f", CUDA {info['cuda']}" if "cuda" in info else f", {info['cpu_threads']} CPU threads"))
    print(f"command: {info['command']}")
    if info["device_type"] == "cpu":
        print("NOTE: CPU run: PyTorch paths only, time.perf_counter medians; no Triton numbers.")
    print()


def median_ms(fn, device: torch.device, repeats: int = 7) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()                                               # warm-up (allocator, first-touch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Measured device-memory copy bandwidth (read + write bytes per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / ms / 1e6


def add_bandwidth(row: dict, min_bytes: int, copy_gbs: float) -> dict:
    row["min_bytes"] = int(min_bytes)
    row["gb_per_s"] = min_bytes / row["ms"] / 1e6
    row["frac_of_copy"] = row["gb_per_s"] / copy_gbs
    return row


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        padded = [c.rjust(w) if n and i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("| " + " | ".join(padded) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()


def write_json(path: str | None, info: dict, rows: list[dict], **extra) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(environment=info, rows=rows, **extra), f, indent=1)
        print(f"wrote {path}")


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def triton_runnable(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def add_common_args(parser) -> None:
    """The options every kernel benchmark takes."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=7, help="CPU timing repetitions")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 gives steadier CPU timings)")
    parser.add_argument("--json", metavar="OUT")


def setup(args):
    """Apply the common options and print the environment: (device, environment info, Triton runs)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    info = environment(device)
    print_environment(info)
    return device, info, triton_runnable(device)
