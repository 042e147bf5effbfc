"""Attention benchmark: kernel speed (TFLOP/s) and activation memory of a ViT training step.

    python benchmarks/bench_attention.py [--json OUT] [--quick] [--parts speed memory]
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --parts memory   # + triton's memory on CPU

Part 1, speed. Forward and forward+backward of every backend that can run here, at I-JEPA
shapes (N = 69 context, 113 predictor, 196 / 256 encoder, 1024 long) and head dims 32
(predictor), 64 (ViT-B/L), 80 (ViT-H/14).
* CUDA: bf16, timed with ``triton.testing.do_bench`` (median ms); backends triton, sdpa,
  xformers, naive.
* CPU: sdpa, chunked and naive run (xformers has no CPU kernel; the Triton kernels only run in
  the interpreter, which measures Python, not the kernel), fp32 or ``--dtype bf16`` (bf16 inputs
  under ``torch.autocast``, as a bf16 training step runs them: naive's softmax is then fp32, as
  in the reference), timed with a wall clock (median of --reps runs after one warm-up).
  These numbers describe PyTorch's CPU kernels, nothing else.
FLOP count (nominal, the same for every backend): forward = 4*B*H*N^2*d (QK^T and PV, 2 FLOP
per multiply-add); forward+backward = 3.5 x forward (backward = 2.5 x forward: it recomputes
QK^T and runs dV, dP, dQ, dK). Naive attention stores P instead of recomputing it, so it does
less work than the nominal count.

Part 2, memory. One training step (forward + backward, mean-square loss) of ``--depth``
pre-norm ViT blocks at N=256 with each attention backend. Measured three ways, all printed:
* saved: bytes of the distinct storages autograd keeps for backward (``saved_tensors_hooks``),
  parameters excluded, i.e. the activation memory held between forward and backward. Exact
  and device-independent.
* peak (CPU): the highest level of (allocated - freed) bytes during the step, replayed in time
  order from the allocation events ``torch.profiler`` records with profile_memory=True
  (includes transients such as the score matrix and the gradients being built).
* peak (CUDA): ``torch.cuda.max_memory_allocated()`` during the step minus the allocation
  before it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as C                                                   # noqa: E402
import kernels.attention as katt                                      # noqa: E402
from kernels.dispatch import BackendUnavailable                       # noqa: E402

HEADS = {32: 12, 64: 12, 80: 16, 96: 16, 128: 8}   # predictor 384/12, ViT-B 768/12, ViT-H 1280/16


def env_info() -> dict:
    envs = [f"{k}={os.environ[k]}" for k in ("TRITON_INTERPRET", "IJEPA_ATTENTION_BACKEND") if k in os.environ]
    info = dict(command=" ".join(envs + [shlex.quote(a) for a in [sys.executable] + sys.argv]),
                python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.is_available())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import importlib.metadata as md
        info["xformers"] = md.version("xformers")
    except Exception:
        info["xformers"] = None
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return info


# ----------------------------------------------------------------------------- part 1: speed
def _sdpa_only(name):
    """``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_cudnn``: SDPA held to one of its kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name])


def bench_speed(device, dtype, backends, seqlens, head_dims, tokens, reps, packed=False) -> list[dict]:
    """Dense ``[B, H, N, d]``, or with ``packed`` the same tokens as B sequences of length N packed
    back to back (``cu_seqlens``), which is how the packed predictor runs."""
    import contextlib
    rows = []
    cpu_autocast = device.type == "cpu" and dtype == torch.bfloat16
    for d in head_dims:
        H = HEADS[d]
        for N in seqlens:
            B = max(1, tokens // N)
            fwd_flop = 4 * B * H * N * N * d
            shape = (B * N, H, d) if packed else (B, H, N, d)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn(shape, device=device, dtype=dtype)
            kw = dict(cu_seqlens=torch.arange(0, B * N + 1, N, device=device, dtype=torch.int32), max_seqlen=N,
                      seqlens=[N] * B) if packed else {}
            for be in backends:
                row = dict(backend=be, B=B, H=H, N=N, d=d, dtype=str(dtype).replace("torch.", ""),
                           layout="packed" if packed else "dense")
                impl = "sdpa" if be.startswith("sdpa_") else be
                only = (lambda: _sdpa_only(be)) if be.startswith("sdpa_") else contextlib.nullcontext
                try:
                    katt.attention_backend(device, impl, head_dim=d, dtype=dtype, packed=packed)

                    def fwd():
                        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=cpu_autocast), only():
                            katt.attention(q, k, v, backend=impl, **kw)

                    def fwd_bwd():
                        with torch.autocast("cpu", torch.bfloat16, enabled=cpu_autocast), only():
                            o = katt.attention(q, k, v, backend=impl, **kw)
                        torch.autograd.grad(o, (q, k, v), do)
                    fwd()
                    fwd_bwd()
                    ms_f = C.median_ms(fwd, device, reps)
                    ms_fb = C.median_ms(fwd_bwd, device, reps)
                    row.update(fwd_ms=ms_f, fwd_tflops=fwd_flop / ms_f / 1e9,
                               fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3.5 * fwd_flop / ms_fb / 1e9)
                except (BackendUnavailable, NotImplementedError, RuntimeError) as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                print(_fmt_speed(row), flush=True)
    return rows


def _fmt_speed(r: dict) -> str:
    head = f"{r['backend']:>8s} B={r['B']:<4d} H={r['H']:<3d} N={r['N']:<5d} d={r['d']:<4d}"
    if "error" in r:
        return f"{head} unavailable: {r['error']}"
    return (f"{head} fwd {r['fwd_ms']:9.3f} ms {r['fwd_tflops']:8.3f} TFLOP/s | "
            f"fwd+bwd {r['fwd_bwd_ms']:9.3f} ms {r['fwd_bwd_tflops']:8.3f} TFLOP/s")


# ----------------------------------------------------------------------------- part 2: memory
class Block(nn.Module):
    """Pre-norm ViT block with the reference's module layout; attention through kernels.attention."""

    def __init__(self, dim, heads, backend):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2, self.act = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.GELU()

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = katt.attention(qkv[0], qkv[1], qkv[2], backend=self.backend)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def _saved_bytes(step, params) -> int:
    """Distinct storages autograd saves for backward, excluding the parameters themselves."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        if t.layout == torch.strided:
            s = t.untyped_storage()
            if s.data_ptr() not in param_storages:
                seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _cpu_peak_bytes(step) -> int:
    """Peak of (bytes allocated - bytes freed) since the step began, from the allocation events
    torch.profiler records with profile_memory=True (every CPU allocator call, in time order)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak


def bench_memory(device, dtype, backends, batch, width, heads, depth, N) -> list[dict]:
    rows = []
    for be in backends:
        row = dict(backend=be, B=batch, N=N, width=width, heads=heads, depth=depth,
                   dtype=str(dtype).replace("torch.", ""))
        try:
            katt.attention_backend(device, be, head_dim=width // heads, dtype=dtype)
        except BackendUnavailable as e:
            row["error"] = str(e)
            rows.append(row)
            print(_fmt_mem(row), flush=True)
            continue
        torch.manual_seed(0)
        model = nn.Sequential(*[Block(width, heads, be) for _ in range(depth)]).to(device, dtype)
        x = torch.randn(batch, N, width, device=device, dtype=dtype)

        def step():
            loss = model(x).float().pow(2).mean()
            loss.backward()
        step()                                                    # warm-up (lazy init, caches)
        model.zero_grad(set_to_none=True)
        row["saved_MiB"] = _saved_bytes(step, list(model.parameters())) / 2 ** 20
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            row["peak_method"] = "torch.cuda.max_memory_allocated"
        else:
            row["peak_MiB"] = _cpu_peak_bytes(step) / 2 ** 20
            row["peak_method"] = "torch.profiler allocation events (profile_memory=True)"
        model.zero_grad(set_to_none=True)
        rows.append(row)
        print(_fmt_mem(row), flush=True)
    return rows


def _fmt_mem(r: dict) -> str:
    head = f"{r['backend']:>8s} B={r['B']} N={r['N']} width={r['width']} heads={r['heads']} depth={r['depth']}"
    if "error" in r:
        return f"{head} unavailable: {r['error']}"
    return f"{head} saved-for-backward {r['saved_MiB']:8.1f} MiB | step peak {r['peak_MiB']:8.1f} MiB"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    p.add_argument("--parts", nargs="+", choices=["speed", "memory"], default=["speed", "memory"])
    p.add_argument("--seqlens", type=int, nargs="+", default=[69, 113, 196, 256, 1024])
    p.add_argument("--head-dims", type=int, nargs="+", default=[32, 64, 80])
    p.add_argument("--packed", action="store_true", help="also time packed variable-length layouts")
    p.add_argument("--tokens", type=int, default=None,
                   help="B = tokens // N (default: 16384 on CUDA, 1024 on CPU)")
    p.add_argument("--reps", type=int, default=7, help="CPU timing repetitions")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="CPU dtype (CUDA: always bf16)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steadier medians on a shared machine)")
    p.add_argument("--mem-batch", type=int, default=8)
    p.add_argument("--mem-width", type=int, default=384)
    p.add_argument("--mem-heads", type=int, default=6)
    p.add_argument("--mem-depth", type=int, default=4)
    p.add_argument("--mem-n", type=int, default=256)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(a.threads)
    info = env_info()
    print("# attention benchmark")
    for k, v in info.items():
        print(f"# {k}: {v}")
    if a.quick:
        a.seqlens, a.head_dims = [69, 256], [64]
    speed_on = "speed" in a.parts
    if cuda:
        dtype, tokens = torch.bfloat16, a.tokens or 16384
        backends = ["triton", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "xformers", "naive"]
        speed_on and print("# speed: CUDA, bf16, triton.testing.do_bench (median ms)")
    else:
        dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        backends, tokens = ["sdpa", "chunked", "naive"], a.tokens or 1024
        speed_on and print(f"# speed: CPU ONLY (no GPU here), {a.dtype}{' under autocast' if a.dtype == 'bf16' else ''}, "
              f"wall clock median of {a.reps} runs; sdpa = PyTorch's CPU flash kernel, chunked = this "
              "project's CPU path, naive = materialised softmax(QK^T)V. "
              "triton/xformers do not run on CPU (interpreter timing would be meaningless)")
    speed_on and print("# FLOPs: fwd = 4*B*H*N^2*d, fwd+bwd = 3.5 * fwd (nominal, same for every backend)")
    speed = memory = []
    if "speed" in a.parts:
        speed = bench_speed(device, dtype, backends, a.seqlens, a.head_dims, tokens, a.reps)
        if a.packed:   # SDPA has no kernel choice for nested tensors, naive runs one sequence at a time
            speed += bench_speed(device, dtype, [b for b in backends if not b.startswith("sdpa_")], a.seqlens,
                                 a.head_dims, tokens, a.reps, packed=True)
    if "memory" in a.parts:
        mem_backends = [b for b in backends if not b.startswith("sdpa_")] if cuda else ["naive", "sdpa", "chunked"]
        if not cuda and os.environ.get("TRITON_INTERPRET") == "1":
            # Saved-for-backward bytes do not depend on where the kernel runs, so the
            # interpreter gives the Triton backend's true activation memory (not its speed).
            mem_backends.append("triton")
        print(f"# memory: one fwd+bwd step of {a.mem_depth} ViT blocks, {dtype}, device {device}"
              f"{' (triton via TRITON_INTERPRET=1)' if 'triton' in mem_backends and not cuda else ''}; "
              "saved = distinct non-parameter storages saved for backward (saved_tensors_hooks); "
              "peak = " + ("torch.cuda.max_memory_allocated minus baseline" if cuda else
                           "max of (allocated - freed) bytes over the step, from torch.profiler "
                           "allocation events (profile_memory=True)"))
        memory = bench_memory(device, dtype, mem_backends, a.mem_batch, a.mem_width, a.mem_heads,
                              a.mem_depth, a.mem_n)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(env=info, speed=speed, memory=memory), indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
