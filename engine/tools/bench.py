"""``ijepa bench`` and ``ijepa profile``: where the time goes, and how the engine compares.

* ``bench e2e``: the engine's training step against the reference's (imported at run time
  from the user's checkout, see ``engine.tools.refharness``), same model, batch, masks, initial
  weights and precision, steps alternating; median step time, images/s, peak memory, the
  loss of both at every step.
* ``bench kernels``: runs ``benchmarks/bench_*.py`` as subprocesses and tabulates their JSON.
* ``bench flops``: the analytic FLOP model (``engine.tools.flops``), MFU, the paper's derived figure.
* ``profile``: engine (and optionally reference) steps under ``torch.profiler``; the phases are
  the ``record_function`` ranges inside ``engine.train.train_step`` itself (and the reference's
  step), plus a trace and the top operators.

Every output (stdout markdown, ``--json``, PNG footer) names the device, CPU model, thread
count, torch version, git commit, date and the exact command.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, record_function

from engine.config import IJEPAConfig
from engine.errors import DataError, UsageError
from engine.masks import MultiBlockMaskSampler
from engine.schedules import Schedules
from engine.strategy import LocalStrategy, resolve_device
from engine.tools.flops import (device_peak_tflops, flops_from_config, format_table, is_paper_vith14, mfu,
                                paper_reference_figure, sample_masks)
from engine.tools.refharness import ReferenceRunner, check_buildable, load_reference
from engine.train import build_loader, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Schedules need an epoch length; both sides get the same one, so lr/wd/momentum agree.
BENCH_IPE = 100
KERNEL_SCRIPTS = ("bench_gather.py", "bench_ema.py", "bench_attention.py")
PROBE_MARK = "IJEPA_PROBE "
# Loss agreement needed before a speed comparison is reported as valid. fp32 differs only
# by summation order (SDPA vs explicit softmax, fused gathers); bf16 rounds every matmul
# input, so the two sides drift apart faster.
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def git_commit(root: str = ROOT) -> str:
    def git(*cmd) -> str:
        return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        if not sha:
            return "unknown"
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_meta(device: torch.device, threads: int, command: str) -> dict:
    dev = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    return {"device": dev, "cpu_model": cpu_model(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command, "hostname_cpus": os.cpu_count()}


def meta_lines(meta: dict) -> list[str]:
    return [f"device: {meta['device']} | CPU: {meta['cpu_model']} | threads: {meta['threads']} | "
            f"torch {meta['torch']} | commit {meta['git_commit']} | {meta['date']}",
            f"command: {meta['command']}"]


def _header(title: str, meta: dict) -> list[str]:
    return [f"## {title}", ""] + [f"- {x}" for x in meta_lines(meta)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(masks, device):
    return [m.to(device) for m in masks]


def step_inputs(cfg, masks: list, seed: int, device):
    """(images, masks_enc, masks_pred) per batch of masks; standard normal images, fixed by seed and step."""
    shape = (cfg.data.batch_size, cfg.data.in_chans, cfg.data.crop_size, cfg.data.crop_size)
    for i, (me, mp) in enumerate(masks):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        yield torch.randn(*shape, generator=g).to(device), to_device(me, device), to_device(mp, device)


def alternating(items: list, i: int) -> list:
    """Reversed on odd steps, so neither side always runs on a cache warmed by the other."""
    return items if i % 2 == 0 else items[::-1]


def prepare(args, synthetic: bool):
    """``bench e2e``/``profile`` setup, a bad reference path failing before any work: (cfg with the command's
    overrides, device, threads, reference or None, meta); ``synthetic``: images come from the harness."""
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    reference = load_reference(args.reference) if args.reference is not None else None
    d = IJEPAConfig.from_yaml(args.config, list(args.override or []), validate=False).to_dict()
    if synthetic:
        d["data"]["dataset"] = "synthetic"
    if d["logging"]["folder"].startswith("$"):
        d["logging"]["folder"] = "runs/bench"   # never written by the benchmarks
    if args.batch_size is not None:
        d["data"]["batch_size"] = args.batch_size
    if args.precision is not None:
        d["train"]["precision"] = args.precision
    d["train"]["progress"] = False
    cfg = IJEPAConfig.from_dict(d)   # validates
    device = resolve_device(args.device, "--device")
    threads = args.threads or cfg.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if reference is not None:
        check_buildable(cfg, reference)
    return cfg, device, threads, reference, run_meta(device, threads, args.command_line)


class EngineRunner:
    """The engine's one-process strategy; ``step`` is ``engine.train.train_step`` itself."""

    name = "engine"

    def __init__(self, cfg, device, ipe: int, ref_state: dict | None = None):
        self.cfg = cfg
        self.strategy = LocalStrategy(cfg, device)
        if ref_state is not None:
            self.strategy.model.load_reference_state_dict(ref_state)
        self.sched = Schedules.from_config(cfg, ipe)
        self.k = 0

    def step(self, images, masks_enc, masks_pred) -> float:
        k, self.k = self.k, self.k + 1
        loss, _skipped = train_step(
            self.strategy, [(images, masks_enc, masks_pred)], lr=self.sched.lr(k), wd=self.sched.wd(k),
            momentum=self.sched.momentum(k), clip_grad=self.cfg.optimization.clip_grad,
            nonfinite=self.cfg.train.nonfinite)
        with record_function("ijepa::loss_read"):
            return float(loss)


def build_runners(cfg, device, precision, reference, seed) -> list:
    """[engine] or [engine, reference]; the engine starts from the reference's initial weights."""
    if reference is None:
        return [EngineRunner(cfg, device, BENCH_IPE)]
    ref = ReferenceRunner(reference, cfg, device, precision, BENCH_IPE, seed)
    return [EngineRunner(cfg, device, BENCH_IPE, ref.state_dicts()), ref]


def _status_kb(key: str) -> float | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def probe_main(spec_json: str) -> int:
    """Child process: build one side only, run a few steps, print its peak memory as JSON."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    cfg = IJEPAConfig.from_dict(spec["cfg"])
    device = torch.device(spec["device"])
    seed, n = spec["seed"], spec["steps"]
    masks = sample_masks(cfg, cfg.data.batch_size, n, seed)
    runner = (ReferenceRunner(load_reference(spec["reference"]), cfg, device, cfg.precision, BENCH_IPE, seed)
              if spec["side"] == "reference" else EngineRunner(cfg, device, BENCH_IPE))
    inputs = list(step_inputs(cfg, masks, seed, device))
    gc.collect()
    out = {"side": spec["side"], "steps": n}
    sync(device)
    if device.type == "cuda":
        out["cuda_resident_mib"] = torch.cuda.memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _status_kb("VmRSS") or 0
    reset = _reset_peak_rss()
    for imgs, me, mp in inputs:
        runner.step(imgs, me, mp)
    sync(device)
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["cuda_peak_above_resident_mib"] = out["cuda_peak_mib"] - out["cuda_resident_mib"]
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out |= {"rss_before_mib": rss0 / 1024, "peak_rss_mib": peak / 1024,
            "peak_rss_above_build_mib": (peak - rss0) / 1024,
            "rss_method": ("VmHWM after resetting it via /proc/self/clear_refs once the model was built"
                           if reset else "ru_maxrss (peak since process start; reset unavailable)")}
    print(PROBE_MARK + json.dumps(out), flush=True)
    return 0


def memory_probe(side: str, cfg, device, threads: int, seed: int, steps: int, reference_path=None,
                 timeout: float = 1800) -> dict:
    """Peak memory of one side, measured in a fresh process that holds only that side. Running each side
    alone is what makes the number attributable: in the timing process both models (and the allocator's
    cache of both) are resident at once."""
    print(f"memory probe: {side} ({steps} steps in a fresh process)", file=sys.stderr, flush=True)
    spec = {"side": side, "cfg": cfg.to_dict(), "device": str(device), "threads": threads, "seed": seed,
            "steps": steps, "reference": reference_path}
    code = "import sys; from engine.tools.bench import probe_main; sys.exit(probe_main(sys.argv[1]))"
    try:
        p = run_python(["-c", code, json.dumps(spec)], timeout, OMP_NUM_THREADS=str(threads))
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    return {"error": f"memory probe failed (exit {p.returncode}): {last_line(p.stderr)}"}


def run_python(argv: list, timeout: float, **env) -> subprocess.CompletedProcess:
    """This interpreter on ``argv`` in the repository, with the engine importable and ``env`` set."""
    env = dict(os.environ, **env)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


def md_table(headers, rows, align=None) -> str:
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _f(v, fmt="{:.1f}", none="n/a"):
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _emit(args, rep: dict, md: str) -> None:
    print(md)
    if args.json:
        _write(args.json, json.dumps(rep, indent=2))
    if args.markdown:
        _write(args.markdown, md + "\n")


def _describe(cfg) -> str:
    a = cfg.arch
    return (f"{cfg.meta.model_name} (D={a['embed_dim']}, depth {a['depth']}, {a['num_heads']} heads)/"
            f"{cfg.mask.patch_size} @ {cfg.data.crop_size} px, batch {cfg.data.batch_size}, predictor depth "
            f"{cfg.meta.pred_depth} x width {cfg.meta.pred_emb_dim}, masks {cfg.mask.mode} "
            f"({cfg.mask.num_enc_masks} context / {cfg.mask.num_pred_masks} target blocks), "
            f"precision {cfg.precision}")


def run_e2e(args) -> int:
    cfg, device, threads, reference, meta = prepare(args, synthetic=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # the reference's train.py turns it on
    precision, batch, seed = cfg.precision, cfg.data.batch_size, args.seed
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    masks = sample_masks(cfg, batch, total, seed)
    mask_ms = 1000 * (time.perf_counter() - t0) / total
    runners = build_runners(cfg, device, precision, reference, seed)
    times = {r.name: [] for r in runners}
    losses = {r.name: [] for r in runners}
    for i, (imgs, me, mp) in enumerate(step_inputs(cfg, masks, seed, device)):
        if i == args.warmup:
            jit_warm = jit_compilations()
        for r in alternating(runners, i):
            sync(device)
            t = time.perf_counter()
            loss = r.step(imgs, me, mp)
            sync(device)
            times[r.name].append(time.perf_counter() - t)
            losses[r.name].append(loss)
        print(f"step {i + 1}/{total}" + ("" if i >= args.warmup else " (warm-up)") + ": "
              + ", ".join(f"{n} {times[n][-1] * 1000:.0f} ms loss {losses[n][-1]:.6f}" for n in times),
              file=sys.stderr, flush=True)
    jit_after = jit_compilations()
    k_ctx = statistics.mean(enc[0].shape[1] for enc, _ in masks)
    k_pred = statistics.mean(pred[0].shape[1] for _, pred in masks)
    del runners
    gc.collect()
    probed = [] if args.no_memory else ["engine"] + (["reference"] if reference else [])
    memory = {side: memory_probe(side, cfg, device, threads, seed, args.warmup + args.mem_steps,
                                 reference.path if side == "reference" else None) for side in probed}
    report = summarise_e2e(cfg, meta, device, precision, times, losses, memory, args.warmup, k_ctx, k_pred,
                           mask_ms, threads, args.peak_tflops)
    report["recompiled_after_warmup"] = {k: v for k, v in jit_after.items() if v != jit_warm.get(k)}
    _emit(args, report, format_e2e(report))
    if args.plot:
        plot_e2e(report, args.plot)
    if report["losses"].get("agree") is False:
        print(f"ijepa: error: engine and reference losses differ by {report['losses']['max_rel_diff']:.2e} "
              f"(> {report['losses']['rtol']:.0e}); the speed comparison is not valid", file=sys.stderr)
        return 1
    return 0


def jit_compilations() -> dict:
    """Compiled variants so far: per Triton kernel of ``kernels``, and torch.compile graphs. A count
    that grows during the timed steps means a re-specialisation there: those steps include a compile."""
    out = {}
    for module in ("attention", "ema", "gather"):
        for name, fn in vars(importlib.import_module(f"kernels.{module}")).items():
            caches = getattr(fn, "device_caches", None)
            if isinstance(caches, dict):
                out[f"triton {module}.{name}"] = sum(len(c[0]) for c in caches.values())
    from torch._dynamo.utils import counters
    out["torch.compile graphs"] = int(counters["stats"]["unique_graphs"])
    return out


def summarise_e2e(cfg, meta, device, precision, times, losses, memory, warmup, k_ctx, k_pred, mask_ms, threads,
                  peak_tflops=None):
    batch = cfg.data.batch_size
    sf = flops_from_config(cfg, k_ctx=k_ctx, k_pred=k_pred)
    peak = peak_tflops or (device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    mem_key = "cuda_peak_mib" if device.type == "cuda" else "peak_rss_above_build_mib"
    sides = {}
    for name, ts in times.items():
        timed = ts[warmup:]
        q = statistics.quantiles(timed, n=4) if len(timed) >= 2 else [timed[0]] * 3
        st = {"median_s": statistics.median(timed), "q1_s": q[0], "q3_s": q[2], "min_s": min(timed),
              "max_s": max(timed), "n": len(timed)}
        ips = batch / st["median_s"]
        mem = memory.get(name)
        sides[name] = {"step": st, "images_per_s": ips, "step_times_s": ts, "losses": losses[name], "memory": mem,
                       "peak_memory_mib": mem.get(mem_key) if mem and "error" not in mem else None,
                       "achieved_tflops": sf.total * ips / 1e12, "mfu": mfu(sf.total, ips, peak)}
    rep = {"meta": meta, "config": cfg.to_dict(), "description": _describe(cfg),
           "settings": {"warmup": warmup, "timed_steps": len(next(iter(times.values()))) - warmup,
                        "precision": precision, "batch_size": batch, "threads": threads,
                        "images": "synthetic (standard normal), the same tensors for both sides",
                        "order": "alternating, order swapped every step",
                        "timed": "one optimizer step incl. the final float(loss); data and masks prepared "
                                 "outside the timed region for both sides",
                        "memory_method": ("CUDA max_memory_allocated in a process holding one side only"
                                          if device.type == "cuda" else
                                          "peak RSS above the post-build RSS in a process holding one side only "
                                          "(VmHWM reset via /proc/self/clear_refs)")},
           "mask_sampling_ms_per_batch": mask_ms, "tokens": {"K_ctx_mean": k_ctx, "K_pred_mean": k_pred},
           "flops": sf.to_dict(), "peak_tflops": peak, "sides": sides, "ratio": {}, "losses": {}}
    if "reference" in sides:
        e, r = sides["engine"], sides["reference"]
        rep["ratio"] = {"images_per_s": e["images_per_s"] / r["images_per_s"],
                        "step_time": e["step"]["median_s"] / r["step"]["median_s"]}
        if e["peak_memory_mib"] is not None and r["peak_memory_mib"]:
            rep["ratio"]["peak_memory"] = e["peak_memory_mib"] / r["peak_memory_mib"]
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(e["losses"], r["losses"])]
        rtol = LOSS_RTOL.get(precision, 1e-4)
        rep["losses"] = {"rel_diff": rel, "max_rel_diff": max(rel), "rtol": rtol, "agree": max(rel) <= rtol}
    if is_paper_vith14(cfg):
        rep["paper_reference"] = paper_reference_figure(sf.total)
    return rep


def format_e2e(rep: dict) -> str:
    m, s, sides = rep["meta"], rep["settings"], rep["sides"]
    names, has_ref = list(sides), "reference" in sides
    lines = _header("ijepa bench e2e", m) + [
        f"- model: {rep['description']}",
        f"- timed: {s['timed_steps']} steps after {s['warmup']} warm-up steps, {s['order']}; {s['timed']}",
        f"- images: {s['images']}; mask tokens per block (mean): context "
        f"{rep['tokens']['K_ctx_mean']:.1f}, target {rep['tokens']['K_pred_mean']:.1f}; engine mask sampling "
        f"{rep['mask_sampling_ms_per_batch']:.1f} ms/batch (not in the step; the reference collates in workers)",
        f"- peak memory: {s['memory_method']}", ""]
    hdr = ["", *names] + (["engine / reference"] if has_ref else [])

    def row(label, key, fmt, ratio_key=None, ratio_fmt="{:.2f}x", none="n/a"):
        vals = [_f(key(sides[n]), fmt, none) for n in names]
        if has_ref:
            vals.append(_f(rep["ratio"].get(ratio_key), ratio_fmt, "") if ratio_key else "")
        return [label, *vals]
    mem_unit = "MiB, CUDA max allocated" if "cuda" in m["device"] else "MiB, RSS above post-build"
    rows = [row("median step (ms)", lambda x: 1000 * x["step"]["median_s"], "{:.1f}", "step_time"),
            row("step IQR (ms)", lambda x: f"{1000 * x['step']['q1_s']:.0f}-{1000 * x['step']['q3_s']:.0f}", "{}"),
            row("images/s", lambda x: x["images_per_s"], "{:.2f}", "images_per_s", "**{:.2f}x**"),
            row(f"peak memory ({mem_unit})", lambda x: x["peak_memory_mib"], "{:.0f}", "peak_memory"),
            row("model GFLOP/image", lambda x: rep["flops"]["per_image_flops"] / 1e9, "{:.2f}"),
            row("achieved TFLOP/s (model FLOPs)", lambda x: x["achieved_tflops"], "{:.3f}"),
            row("MFU", lambda x: None if x["mfu"] is None else 100 * x["mfu"], "{:.1f} %",
                none="n/a" if rep.get("peak_tflops") else "n/a (no peak for this device)"),
            row("loss first / last", lambda x: f"{x['losses'][0]:.6f} / {x['losses'][-1]:.6f}", "{}")]
    lines.append(md_table(hdr, rows))
    if rep.get("recompiled_after_warmup"):
        lines.append("\nWARNING: compiled during the timed steps (raise --warmup): "
                     + ", ".join(f"{k} ({v})" for k, v in rep["recompiled_after_warmup"].items()))
    lines += [f"\n{n} peak memory: {sides[n]['memory']['error']}" for n in names
              if "error" in (sides[n].get("memory") or {})]
    if has_ref:
        L = rep["losses"]
        verdict = "agree" if L["agree"] else "DISAGREE"
        lines += ["", f"Losses {verdict}: max relative difference over all {len(L['rel_diff'])} steps "
                      f"{L['max_rel_diff']:.2e} (tolerance {L['rtol']:.0e} for {s['precision']})."]
    if rep.get("paper_reference"):
        lines += ["", "Reference speed derived from the paper (ViT-H/14, 16 A100, < 72 h):"]
        lines += [f"- {a}" for a in rep["paper_reference"]["arithmetic"]]
        e = sides["engine"]
        lines.append(f"- engine measured here: {e['images_per_s']:.1f} images/s on {m['device']}"
                     + (f", {100 * e['mfu']:.1f} % MFU" if e["mfu"] is not None else ""))
    lines += ["", "<details><summary>per step</summary>", ""]
    hdr2 = ["step"] + [f"{n} loss" for n in names] + (["rel diff"] if has_ref else []) + [f"{n} ms" for n in names]
    rows2 = [[str(i) + (" (warm-up)" if i < s["warmup"] else "")] + [f"{sides[n]['losses'][i]:.6f}" for n in names]
             + ([f"{rep['losses']['rel_diff'][i]:.1e}"] if has_ref else [])
             + [f"{1000 * sides[n]['step_times_s'][i]:.0f}" for n in names]
             for i in range(len(sides[names[0]]["losses"]))]
    lines += [md_table(hdr2, rows2), "", "</details>"]
    return "\n".join(lines)


def plot_e2e(rep: dict, path: str) -> None:
    from engine.tools import plots
    sides, names = rep["sides"], list(rep["sides"])
    footer = meta_lines(rep["meta"]) + [rep["description"]]
    if rep.get("ratio"):
        footer.append(f"engine/reference images/s {rep['ratio']['images_per_s']:.2f}x; max loss rel diff "
                      f"{rep['losses']['max_rel_diff']:.1e}")
    fig, (bars, loss, steps) = plots.new_figure(3, width=15, height=4.5, footer=footer)
    bars.bar(names, [sides[n]["images_per_s"] for n in names], color=plots.PALETTE[:len(names)])
    bars.set(title=f"throughput ({rep['settings']['precision']}, batch {rep['settings']['batch_size']})",
             ylabel="images/s (median step)")
    for i, n in enumerate(names):
        loss.plot(sides[n]["losses"], label=n, color=plots.PALETTE[i])
        steps.plot([1000 * t for t in sides[n]["step_times_s"]], label=n, color=plots.PALETTE[i])
    loss.set(title="loss per step", xlabel="step", ylabel="smooth-L1 loss")
    steps.set(title="step time", xlabel="step", ylabel="ms")
    loss.legend()
    plots.save(fig, path)


PHASE_ORDER = ("data", "mask_sampling", "schedules", "target_forward", "context_forward", "predictor", "loss",
               "backward", "optimizer", "grad_logger", "zero_grad", "ema", "loss_read", "other")


class ProfiledLoop:
    """One runner's loop -- data, mask sampling, its training step -- inside ``side::<name>``
    ranges, so one profiler session can interleave the engine and the reference step by step
    (fair under a noisy machine) and still attribute every ``ijepa::`` phase to its side.

    Reference-mode mask placement draws from the global RNG, so each loop keeps its own copy of
    that RNG state: both sides see exactly the same images and masks."""

    def __init__(self, runner, cfg, device, seed: int):
        try:
            loader = build_loader(cfg, 0, 1, device)
        except DataError as e:
            raise UsageError(f"{e} (or profile on synthetic images: --override data.dataset=synthetic)") from None
        self.runner, self.device = runner, device
        self.sampler = MultiBlockMaskSampler.from_config(cfg)
        self.rng = torch.Generator().manual_seed(seed).get_state()   # the global RNG's state after manual_seed
        self.batches = (images.to(device) for epoch in itertools.count() for images, _ in loader.epoch_batches(epoch))
        self.wall, self.losses = [], []

    def one_step(self, record: bool = True) -> float:
        sync(self.device)
        t = time.perf_counter()
        with record_function(f"side::{self.runner.name}"):
            with record_function("ijepa::data"):
                images = next(self.batches)
            with record_function("ijepa::mask_sampling"), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.rng)
                me, mp = self.sampler(len(images))
                self.rng = torch.get_rng_state()
                me, mp = to_device(me, self.device), to_device(mp, self.device)
            loss = self.runner.step(images, me, mp)
            sync(self.device)
        dt = time.perf_counter() - t
        if record:
            self.wall.append(dt)
            self.losses.append(loss)
        return dt


def phase_times(prof, device) -> dict:
    """``{side: {phase: total ms}}`` from the ``ijepa::`` ranges under each ``side::`` range (the
    outermost ones: a phase is never counted twice). CUDA: the device time of the kernels each
    range launched; CPU: the range's wall time."""
    out = defaultdict(lambda: defaultdict(float))

    def visit(ev, side):
        if ev.name.startswith("ijepa::"):
            t = ev.device_time_total if device.type == "cuda" else ev.cpu_time_total
            out[side][ev.name[len("ijepa::"):]] += t / 1000
            return
        for child in ev.cpu_children:
            visit(child, side)
    for ev in prof.events():
        if ev.name.startswith("side::") and ev.cpu_parent is None:
            for child in ev.cpu_children:
                visit(child, ev.name[len("side::"):])
    return out


def summarise_profile(lp, phases: dict) -> dict:
    n = len(lp.wall)
    per_step = {p: ms / n for p, ms in phases.items()}
    wall_ms = 1000 * statistics.mean(lp.wall)
    per_step["other"] = max(0.0, wall_ms - sum(per_step.values()))
    total = sum(per_step.values())
    names = [p for p in PHASE_ORDER if p in per_step] + sorted(set(per_step) - set(PHASE_ORDER))
    return {"phases": [{"phase": p, "ms_per_step": per_step[p], "percent": 100 * per_step[p] / total}
                       for p in names],
            "mean_step_ms": wall_ms, "median_step_ms": 1000 * statistics.median(lp.wall), "losses": lp.losses,
            "steps": n, "top_ops": []}


def top_ops(prof, device, steps: int, limit: int = 15) -> list[dict]:
    rows = [{"op": e.key, "calls_per_step": e.count / steps,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
             "self_device_ms_per_step": (e.self_device_time_total or 0.0) / 1000 / steps}
            for e in prof.key_averages() if not e.key.startswith(("ijepa::", "side::", "ProfilerStep"))]
    key = "self_device_ms_per_step" if device.type == "cuda" else "self_cpu_ms_per_step"
    rows.sort(key=lambda r: -r[key])
    tot = sum(r[key] for r in rows) or 1.0
    for r in rows:
        r["percent_of_op_time"] = 100 * r[key] / tot
    return rows[:limit]


def run_profile(args) -> int:
    cfg, device, threads, reference, meta = prepare(args, synthetic=False)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")   # kineto's start/stop chatter on stderr
    runners = build_runners(cfg, device, cfg.precision, reference, args.seed)
    loops = [ProfiledLoop(r, cfg, device, args.seed) for r in runners]
    for i in range(args.warmup):
        for lp in alternating(loops, i):
            lp.one_step(record=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.steps):
            for lp in alternating(loops, i):
                dt = lp.one_step()
                print(f"{lp.runner.name} step {i + 1}/{args.steps}: {1000 * dt:.0f} ms", file=sys.stderr, flush=True)
    phases = phase_times(prof, device)
    results = {lp.runner.name: summarise_profile(lp, phases[lp.runner.name]) for lp in loops}
    results["engine"]["top_ops"] = top_ops(prof, device, args.steps)
    if args.trace:
        os.makedirs(os.path.dirname(os.path.abspath(args.trace)), exist_ok=True)
        prof.export_chrome_trace(args.trace)
        results["engine"]["trace"] = args.trace
    rep = {"meta": meta, "config": cfg.to_dict(), "description": _describe(cfg),
           "settings": {"steps": args.steps, "warmup": args.warmup,
                        "phase_timing": ("the record_function ranges of the training step itself, under "
                                         "torch.profiler: " + ("device time of the kernels each launched"
                                                               if device.type == "cuda" else "wall time")
                                         + "; mean per step; other = step wall time minus the phases")},
           "sides": results}
    _emit(args, rep, format_profile(rep))
    return 0


def format_profile(rep: dict) -> str:
    sides, names = rep["sides"], list(rep["sides"])
    lines = _header("ijepa profile", rep["meta"]) + [
        f"- model: {rep['description']}",
        f"- {rep['settings']['steps']} profiled steps after {rep['settings']['warmup']} warm-up"
        f"{', engine and reference interleaved (order swapped every step)' if len(names) > 1 else ''}; "
        f"{rep['settings']['phase_timing']}", ""]
    by_phase = {n: {x["phase"]: x for x in sides[n]["phases"]} for n in names}
    hdr = ["phase"] + [f"{n} {unit}" for n in names for unit in ("ms", "%")]

    def cells(ph):
        return [f"{ph['ms_per_step']:.1f}", f"{ph['percent']:.1f}"] if ph else ["-", "-"]
    rows = [[p] + [c for n in names for c in cells(by_phase[n].get(p))]
            for p in PHASE_ORDER if any(p in by_phase[n] for n in names)]
    rows.append(["**step (wall, mean)**"] + [c for n in names for c in (f"**{sides[n]['mean_step_ms']:.1f}**", "100")])
    lines.append(md_table(hdr, rows))
    ops = sides["engine"].get("top_ops") or []
    if ops:
        key = "self_device_ms_per_step" if "cuda" in rep["meta"]["device"] else "self_cpu_ms_per_step"
        lines += ["", "### top operators (self time per step, all profiled steps"
                  + (f"; trace {sides['engine']['trace']}" if sides["engine"].get("trace") else "") + ")", ""]
        lines.append(md_table(["operator", "calls/step", "self ms/step", "% of op time"],
                              [[o["op"], f"{o['calls_per_step']:.0f}", f"{o[key]:.2f}",
                                f"{o['percent_of_op_time']:.1f}"] for o in ops]))
    return "\n".join(lines)


# Which provider is "the PyTorch baseline" in a group of rows, in order of preference: the
# reference-equivalent path first (gather "ref", attention "naive", EMA "loop").
BASELINE_NAMES = ("ref", "naive", "loop", "torch", "sdpa")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def normalise_kernel_json(data, script: str) -> list[dict]:
    """Rows ``{script, case, impl, baseline, ms, baseline_ms, speedup}`` from what a
    ``benchmarks/bench_*.py`` writes: ``rows`` (or ``speed``) of one row per provider
    (``provider`` or ``backend``), each with ``ms`` or ``<metric>_ms`` values. Rows are grouped by
    case (``case``, else their string/integer fields); every metric is compared with the group's
    baseline provider (``BASELINE_NAMES``). Rows with an ``error`` are skipped."""
    rows = next((data[k] for k in ("rows", "speed") if isinstance(data, dict) and isinstance(data.get(k), list)), None)
    if rows is None:
        raise ValueError("no list of results found (expected 'rows' or 'speed')")
    rows = [r for r in rows if isinstance(r, dict) and "error" not in r]
    pkey = next((k for k in ("provider", "backend") if any(k in r for r in rows)), None)
    metrics = sorted({k for r in rows for k, v in r.items() if _num(v) and (k == "ms" or k.endswith("_ms"))},
                     key=lambda k: (k != "ms", k))
    groups: dict = {}
    for r in rows:
        case = str(r["case"]) if "case" in r else ", ".join(
            f"{k}={v}" for k, v in r.items() if k != pkey and (isinstance(v, str) or type(v) is int))
        groups.setdefault(case, []).append(r)
    out = []
    for case, grp in groups.items():
        low = {str(r.get(pkey)).lower(): r for r in grp}
        base = next((low[b] for b in BASELINE_NAMES if b in low), {})
        for metric in metrics:
            for r in grp:
                if r is base or not _num(r.get(metric)):
                    continue
                bms = base.get(metric)
                out.append({"script": script, "case": case if metric == "ms" else f"{case} [{metric[:-3]}]",
                            "impl": str(r.get(pkey)), "baseline": base.get(pkey),
                            "ms": r[metric], "baseline_ms": bms,
                            "speedup": (bms / r[metric]) if _num(bms) and r[metric] else None})
    if not out:
        raise ValueError("the results list holds no usable rows")
    return out


def run_kernel_script(path: str, out: str, timeout: int) -> tuple[dict, list[dict]]:
    """Run one ``benchmarks/bench_*.py`` with ``--json out``: (its status entry, its normalised rows)."""
    entry = {"script": os.path.basename(path)}
    if not os.path.isfile(path):
        return entry | {"status": "not present"}, []
    t = time.perf_counter()
    try:
        # kernel timings under the Triton interpreter would measure the interpreter
        p = run_python([path, "--json", out], timeout, TRITON_INTERPRET="0")
    except subprocess.TimeoutExpired:
        return entry | {"status": f"timed out after {timeout} s"}, []
    entry["seconds"] = time.perf_counter() - t
    if p.returncode != 0:
        return entry | {"status": f"failed (exit {p.returncode}): {last_line(p.stderr)}"}, []
    if not os.path.isfile(out):
        return entry | {"status": "ran but wrote no JSON"}, []
    try:
        with open(out) as f:
            data = json.load(f)
        rows = normalise_kernel_json(data, entry["script"])
    except ValueError as e:   # json.JSONDecodeError included
        return entry | {"status": f"unreadable JSON: {e}"}, []
    env = data.get("environment") or data.get("env") or {}   # a dict: normalise_kernel_json accepted it
    if env.get("device"):
        entry["device"] = str(env["device"])
    return entry | {"status": "ok", "rows": len(rows)}, rows


def run_kernels(args) -> int:
    bench_dir = os.path.abspath(args.bench_dir or os.path.join(ROOT, "benchmarks"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = run_meta(torch.device(device), torch.get_num_threads(), args.command_line)
    with tempfile.TemporaryDirectory() as tmp:
        done = [run_kernel_script(os.path.join(bench_dir, name), os.path.join(tmp, f"{name}.json"), args.timeout)
                for name in KERNEL_SCRIPTS]
    rep = {"meta": meta, "device": device, "bench_dir": bench_dir, "scripts": [entry for entry, _ in done],
           "results": [r for _, rows in done for r in rows]}
    _emit(args, rep, format_kernels(rep))
    if args.png:
        plot_kernels(rep, args.png)
    return 0


def format_kernels(rep: dict) -> str:
    lines = _header("ijepa bench kernels", rep["meta"])
    if rep["device"] == "cpu":
        lines.append("- no GPU here: this is a CPU run; only what runs on a CPU is reported, and CPU "
                     "speedups say nothing about GPU kernels")
    lines += ["", md_table(["script", "status", "device"],
                           [[s["script"], s["status"], s.get("device", "")] for s in rep["scripts"]],
                           ["l", "l", "l"]), ""]
    lines.append(md_table(["script", "case", "impl", "ms", "baseline", "baseline ms", "speedup"],
                          [[r["script"], r["case"], r["impl"], _f(r["ms"], "{:.3f}"), r["baseline"] or "",
                            _f(r["baseline_ms"], "{:.3f}"), _f(r["speedup"], "{:.2f}x")] for r in rep["results"]],
                          ["l", "l", "l", "r", "l", "r", "r"]) if rep["results"] else "no kernel results")
    return "\n".join(lines)


def plot_kernels(rep: dict, path: str) -> None:
    from engine.tools import plots
    rows = [r for r in rep["results"] if _num(r.get("speedup"))]
    labels = [f"{r['script'][6:-3]}: {r['case']}: {r['impl']} vs {r['baseline']}" for r in rows] or ["(no results)"]
    scripts = sorted({r["script"] for r in rows})
    fig, (ax,) = plots.new_figure(width=11, height=1.2 + 0.28 * len(labels),
                                  footer=meta_lines(rep["meta"]) + [f"{s['script']}: {s['status']}"
                                                                   for s in rep["scripts"]])
    ax.barh(range(len(labels)), [r["speedup"] for r in rows] or [0.0],
            color=[plots.PALETTE[scripts.index(r["script"]) % 10] for r in rows] or None)
    ax.axvline(1.0, color="0.3", linestyle="--")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="speedup (x)", title=f"speedup vs the PyTorch baseline ({rep['device']}; dashed: 1x)")
    plots.save(fig, path)


def run_flops(args) -> int:
    cfg = IJEPAConfig.from_yaml(args.config, list(args.override or []), validate=False)
    if args.batch_size is not None:
        cfg.data.batch_size = args.batch_size
    cfg.arch   # unknown model name -> ConfigError, one line
    try:
        sf = flops_from_config(cfg, args.k_ctx, args.k_pred)
    except Exception as e:   # e.g. a mask config that cannot be sampled
        raise UsageError(f"{args.config}: cannot sample masks ({e}); pass --k-ctx and --k-pred") from None
    peak = args.peak_tflops or device_peak_tflops(args.gpu)
    meta = run_meta(torch.device("cpu"), torch.get_num_threads(), args.command_line)
    meta["device"] = "analytic (no device used)"
    print("\n".join(_header(f"FLOP model: {_describe(cfg)}", meta)) + "\n")
    print(format_table(sf))
    if args.images_per_s:
        u = mfu(sf.total, args.images_per_s, peak)
        print(f"\nmeasured {args.images_per_s:.2f} images/s -> {sf.total * args.images_per_s / 1e12:.3f} TFLOP/s"
              + (f" = {100 * u:.1f} % MFU of {peak:.0f} TFLOP/s" if u is not None else
                 " (MFU needs --gpu NAME or --peak-tflops)"))
    paper = paper_reference_figure(sf.total) if is_paper_vith14(cfg) else None
    if paper:
        print("\nreference, derived from the paper:\n" + "\n".join(f"- {a}" for a in paper["arithmetic"]))
    if args.json:
        out = sf.to_dict() | {"meta": meta, "peak_tflops": peak}
        if paper:
            out["paper_reference"] = paper
        _write(args.json, json.dumps(out, indent=2))
    return 0


def _common(p, steps_default):
    p.add_argument("--config", required=True, help="YAML config (engine or reference layout)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one config value, e.g. data.batch_size=32 (repeatable)")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="a checkout of facebookresearch/ijepa to compare against (imported at run time)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when visible")
    p.add_argument("--steps", type=int, default=steps_default, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: from the config")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads or torch's)")
    p.add_argument("--batch-size", type=int, default=None, help="override data.batch_size")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, images and masks")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    p.add_argument("--markdown", default=None, metavar="OUT", help="write the markdown report to a file too")


def add_parser(sub):
    b = sub.add_parser("bench", help="benchmarks: engine vs reference end to end, kernels, FLOP model",
                       description="Benchmarks. Outputs name the device, CPU, threads, torch, commit, date and "
                                   "the command.")
    bs = b.add_subparsers(dest="bench_command", metavar="ACTION")
    e = bs.add_parser("e2e", help="engine training step vs the reference's, same model/batch/masks/weights")
    _common(e, 20)
    e.add_argument("--mem-steps", type=int, default=3,
                   help="steps (after the warm-up) run by each side's memory probe process")
    e.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    e.add_argument("--plot", default=None, metavar="PNG", help="throughput bars + loss curves")
    e.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: the table in engine/tools/flops.py)")
    e.set_defaults(func=run_e2e)
    k = bs.add_parser("kernels", help="run benchmarks/bench_*.py and tabulate speedups vs PyTorch")
    k.add_argument("--bench-dir", default=None, help="folder holding the scripts (default: benchmarks/)")
    k.add_argument("--timeout", type=int, default=1800, help="seconds per script")
    k.add_argument("--json", default=None, metavar="OUT")
    k.add_argument("--markdown", default=None, metavar="OUT")
    k.add_argument("--png", default=None, metavar="OUT", help="bar chart of speedups")
    k.set_defaults(func=run_kernels)
    f = bs.add_parser("flops", help="analytic FLOPs per image and phase, MFU, the paper's derived figure")
    f.add_argument("--config", required=True)
    f.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--batch-size", type=int, default=None, help="batch size for sampling token counts")
    f.add_argument("--k-ctx", type=float, default=None, help="context tokens per block (default: sampled)")
    f.add_argument("--k-pred", type=float, default=None, help="target tokens per block (default: sampled)")
    f.add_argument("--images-per-s", type=float, default=None, help="a measured throughput to convert")
    f.add_argument("--gpu", default=None, help="GPU name for the peak (A100, H100 SXM, H200)")
    f.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s (overrides --gpu)")
    f.add_argument("--json", default=None, metavar="OUT")
    f.set_defaults(func=run_flops)
    b.set_defaults(func=lambda a: (b.print_help(), 2)[1])

    p = sub.add_parser("profile", help="engine step split into phases + torch.profiler trace and top operators",
                       description="Profile training steps: per-phase wall time (data, masks, target forward, "
                                   "context forward, predictor, backward, optimizer, EMA, ...), a Chrome/Perfetto "
                                   "trace and the top operators. With --reference the reference is profiled too.")
    _common(p, 10)
    p.add_argument("--trace", default=None, metavar="OUT.json", help="Chrome/Perfetto trace of the profiled steps")
    p.set_defaults(func=run_profile)
