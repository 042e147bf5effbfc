"""``make gpu-check``: validate and measure the engine on one GPU, in at most 10 minutes, in one report.

    PYTHON=python3 make gpu-check [REFERENCE=/path/to/ijepa] [OUT=runs/gpu-check]
    python3 benchmarks/gpu_check.py [--reference PATH] [--out DIR] [--e2e-batch N] [--dry-run]

Runs on the GPU hosts users get -- a cluster node or cloud image with its own PyTorch, no network,
no room for a virtual environment: it uses the Python it is started with and installs nothing
(torch >= 2.11, triton >= 3.6). Every part runs in its own process under its own timeout, so a
hang or a crash costs only that part. A part whose package is missing there (deepspeed,
nvidia-dali, xformers, the reference checkout) is reported "not installed: skipped".

Parts: the CUDA test tier (tests/cuda); attention against every alternative at ViT-L/16 and
ViT-H/14 shapes, dense and packed (head dim 80 runs padded in Triton, natively in SDPA); the
measured table ``kernels.attention: auto`` reads; the gather and EMA kernels (EMA as a fraction of
the device's copy bandwidth); ``ijepa bench e2e`` on a ViT-H/14-shaped bf16 step (against the
reference when ``--reference`` is given) and with each fast-path switch turned off; DALI's GPU
decoder against the DataLoader on real JPEGs; host syncs per training step.

Writes ``{out}/gpu-report.md`` and ``{out}/gpu-report.json`` (device, driver, CUDA, torch, triton,
xformers, DALI, DeepSpeed, commit); exits 1 when a correctness check fails (a CUDA-tier test, engine
and reference losses disagreeing).

``--dry-run`` (``make gpu-check DRY=1``, run by ``make test``): the same parts end to end on the CPU,
under the Triton interpreter, with tiny shapes. It proves the plumbing; it measures nothing.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VITH14 = os.path.join(ROOT, "configs", "in1k_vith14_ep300.yaml")
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
# (switch, the override that turns it off): each is timed alone against the default fast path
TOGGLES = [("fused AdamW", "optimization.fused_optimizer=false"), ("row skipping", "train.skip_unused_rows=false"),
           ("measured attention", "kernels.attention=sdpa"), ("Triton gather", "kernels.gather=torch"),
           ("Triton EMA", "kernels.ema=torch")]


# ============================================================================ the parts
def parts(a) -> list[dict]:
    """Each part: name, timeout (s), packages it needs, argv, extra environment."""
    py, out, dry = sys.executable, a.out, a.dry_run
    bench = lambda script, *args: [py, os.path.join(ROOT, "benchmarks", script), *args]  # noqa: E731
    tier_env = {"IJEPA_CUDA_DRY": "1"} if dry else {"IJEPA_TEST_TIER": "cuda"}
    e2e = [py, __file__, "--e2e-sweep", "--out", out] + (["--dry-run"] if dry else []) + \
        (["--reference", a.reference] if a.reference else []) + ["--e2e-batch", str(a.e2e_batch)]
    return [
        dict(name="cuda tier", timeout=200, needs=(), env=tier_env,
             argv=[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", os.path.join(ROOT, "tests", "cuda"),
                   f"--junitxml={os.path.join(out, 'cuda-tier.xml')}"]),
        dict(name="attention", timeout=75, needs=(), env={},
             argv=bench("bench_attention.py", "--parts", "speed", "--packed", "--json", os.path.join(out, "attention.json"),
                        *(["--quick", "--tokens", "256", "--reps", "1"] if dry else
                          ["--seqlens", "69", "113", "196", "256", "--head-dims", "32", "64", "80"]))),
        dict(name="attention table", timeout=30, needs=(), env={}, argv=[py, __file__, "--fill-table", "--out", out]),
        dict(name="gather", timeout=25, needs=(), env={},
             argv=bench("bench_gather.py", "--json", os.path.join(out, "gather.json"), *(["--batch", "2"] if dry else []))),
        dict(name="ema", timeout=25, needs=(), env={},
             argv=bench("bench_ema.py", "--json", os.path.join(out, "ema.json"), *(["--repeats", "2"] if dry else []))),
        dict(name="e2e", timeout=150, needs=(), env={}, argv=e2e),
        dict(name="dali", timeout=40, needs=("nvidia.dali",), env={},
             argv=bench("bench_loader.py", "--json", os.path.join(out, "dali.json"), "--workdir", os.path.join(out, "jpegs"),
                        *(["--images", "32", "--crop", "64", "--epochs", "1", "--threads", "1", "--decode", "cpu"] if dry
                          else ["--images", "640", "--epochs", "3", "--threads", "2", "--decode", "mixed"]))),
        dict(name="host syncs", timeout=25, needs=(), env={}, argv=[py, __file__, "--syncs", "--out", out]
             + (["--dry-run"] if dry else [])),
    ]


def run_part(p: dict, dry: bool) -> dict:
    missing = [m for m in p["needs"] if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": f"not installed: skipped ({', '.join(missing)})", "seconds": 0.0}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **p["env"])
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    else:
        env["TRITON_INTERPRET"] = "0"
    t = time.time()
    try:
        r = subprocess.run(p["argv"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=p["timeout"])
    except subprocess.TimeoutExpired as e:
        return {"status": f"timed out after {p['timeout']} s", "seconds": time.time() - t,
                "tail": ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-2000:]}
    status = "ok" if r.returncode == 0 else f"failed (exit {r.returncode})"
    return {"status": status, "seconds": time.time() - t, "tail": (r.stdout + r.stderr)[-3000:]}


# ============================================================================ in-process helpers
def fill_table(out: str) -> int:
    """What ``kernels.attention: auto`` reads on this device: measured for the shipped model shapes."""
    import torch
    import kernels.attention as A
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for model, d, n, packed in (("ViT-H/14 encoder", 80, 256, False), ("ViT-L/16 encoder", 64, 196, False),
                                ("predictor (384 / 12 heads)", 32, 256, False), ("ViT-H/14 packed", 80, 256, True),
                                ("ViT-H predictor, 16 heads", 24, 256, False), ("ViT-g/16", 88, 256, False)):
        try:
            backend, why = A.choose_attention(device, "auto", d, torch.bfloat16, packed, n)
        except Exception as e:
            backend, why = "none", f"{type(e).__name__}: {e}"
        rows.append({"shape": model, "head_dim": d, "seqlen": n, "packed": packed, "backend": backend, "why": why})
        print(f"{model:28s} d{d:<4d} -> {backend}: {why}")
    _dump(out, "attention-table.json", {"table": A.table_path(), "rows": rows})
    return 0


def e2e_sweep(a) -> int:
    """The ViT-H/14 bf16 step against the reference (if given), then with each switch turned off."""
    from engine.cli import main as ijepa
    cfg, batch, steps = (SMOKE, 4, ["--steps", "1", "--warmup", "1"]) if a.dry_run else \
        (VITH14, a.e2e_batch, ["--steps", "10", "--warmup", "5"])
    common = ["bench", "e2e", "--config", cfg, "--override", "data.root_path=.", "--precision", "bf16",
              "--batch-size", str(batch)]
    rc = ijepa(common + steps + ["--json", os.path.join(a.out, "e2e.json")]
               + (["--reference", a.reference] if a.reference else []) + (["--no-memory"] if a.dry_run else []))
    toggles = []
    for name, override in TOGGLES:
        path = os.path.join(a.out, f"e2e-{override.split('=')[0]}.json")
        code = ijepa(common + ["--steps", "1" if a.dry_run else "5", "--warmup", "1" if a.dry_run else "3",
                               "--no-memory", "--override", override, "--json", path])
        toggles.append({"switch": name, "off": override, "exit": code, "json": path})
    _dump(a.out, "e2e-toggles.json", toggles)
    return rc


def count_syncs(a) -> int:
    """Host reads per default training step on this device, counted by a dispatch mode (the
    method of tests/sync_audit.py), after warm-up steps."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    from engine import IJEPAConfig
    from engine.data import to_device
    from engine.masks import MultiBlockMaskSampler
    from engine.strategy import LocalStrategy
    from engine.train import train_step
    from sync_audit import count_syncs as counter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = IJEPAConfig.from_yaml(SMOKE, ["train.precision=bf16"] if not a.dry_run else [])
    s = LocalStrategy(cfg, device)
    sampler = MultiBlockMaskSampler.from_config(cfg)
    batches = []
    for _ in range(8):
        me, mp = sampler(8)
        batches.append((torch.randn(8, 3, 32, 32), me, mp))
    put = lambda b: (to_device(b[0], device), [to_device(m, device) for m in b[1]], [to_device(m, device) for m in b[2]])  # noqa: E731
    for b in batches[:3]:
        train_step(s, [put(b)], lr=1e-3, wd=0.04, momentum=0.99)
    with counter() as events:
        for b in batches[3:]:
            train_step(s, [put(b)], lr=1e-3, wd=0.04, momentum=0.99)
    syncs = [e for e in events if e[0] == "sync"]
    _dump(a.out, "syncs.json", {"device": str(device), "steps": 5, "syncs": len(syncs),
                                "per_step": len(syncs) / 5, "where": sorted({e[2] for e in syncs})})
    print(f"{len(syncs)} host reads in 5 default steps on {device}")
    return 0 if not syncs else 1


# ============================================================================ report
def _dump(out, name, obj):
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _load(out, name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for dist, key in (("torch", "torch"), ("triton", "triton"), ("xformers", "xformers"),
                      ("nvidia-dali-cuda130", "dali"), ("nvidia-dali-cuda120", "dali"), ("deepspeed", "deepspeed")):
        if out.get(key) not in (None, "not installed"):
            continue
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    try:
        import torch
        out["cuda"] = torch.version.cuda
        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU visible)"
    except Exception as e:
        out["device"] = f"torch failed to import: {e}"
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        out["driver"] = "n/a (no nvidia-smi)"
    out["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or "unknown"
    return out


def tier_summary(out) -> dict:
    path = os.path.join(out, "cuda-tier.xml")
    if not os.path.isfile(path):
        return {}
    cases = ET.parse(path).getroot().iter("testcase")
    res = {"passed": 0, "failed": [], "skipped": {}}
    for c in cases:
        name = f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}"
        if c.find("failure") is not None or c.find("error") is not None:
            res["failed"].append(name)
        elif c.find("skipped") is not None:
            why = c.find("skipped").get("message", "")
            res["skipped"].setdefault(why, []).append(name)
        else:
            res["passed"] += 1
    return res


def goals(out, dry) -> list[str]:
    """The issue's targets, met or missed by how much (only from what was measured here)."""
    if dry:
        return ["dry run: nothing measured"]
    lines = []
    att = (_load(out, "attention.json") or {}).get("speed", [])
    h14 = [r for r in att if r.get("d") == 80 and r.get("N") == 256 and r.get("layout") == "dense" and "fwd_bwd_ms" in r]
    tri = next((r["fwd_bwd_ms"] for r in h14 if r["backend"] == "triton"), None)
    sdpa = min((r["fwd_bwd_ms"] for r in h14 if r["backend"].startswith("sdpa")), default=None)
    if tri and sdpa:
        lines.append(f"Triton attention vs best SDPA, ViT-H/14 bf16 fwd+bwd: {sdpa / tri:.2f}x "
                     f"({'met' if tri <= sdpa else 'missed: auto does not pick it when it is slower'})")
    e2e = _load(out, "e2e.json")
    if e2e and e2e.get("ratio"):
        r, m = e2e["ratio"]["images_per_s"], e2e["sides"]["engine"]["mfu"]
        lines.append(f"e2e engine/reference images/s {r:.2f}x (goal 2.2x: {'met' if r >= 2.2 else 'missed'}); MFU "
                     f"{100 * m:.1f} % (goal 45 %: {'met' if m >= 0.45 else 'missed'})" if m is not None else
                     f"e2e engine/reference images/s {r:.2f}x; MFU n/a")
    ema = _load(out, "ema.json")
    if ema:
        fr = [r["gb_per_s"] / ema["copy_gb_per_s"] for r in ema.get("rows", []) if r.get("provider") == "triton"
              and r.get("gb_per_s")]
        if fr:
            lines.append(f"EMA at {100 * max(fr):.0f} % of copy bandwidth (goal 85 %: {'met' if max(fr) >= 0.85 else 'missed'})")
    dali = _load(out, "dali.json")
    if dali and len(dali.get("results", [])) >= 2:
        d, t = dali["results"][0], dali["results"][1]
        r = d["img_per_cpu_s"] / t["img_per_cpu_s"]
        lines.append(f"DALI mixed / DataLoader images per CPU-second {r:.2f}x (goal 2x: {'met' if r >= 2 else 'missed'})")
    return lines


def report(a, results: dict) -> str:
    v = versions()
    lines = ["# gpu-check report" + (" (DRY RUN: CPU, interpreter, tiny shapes -- nothing measured)" if a.dry_run else ""),
             "", f"- device: {v.get('device')} | driver {v.get('driver')} | CUDA {v.get('cuda')}",
             f"- torch {v.get('torch')} | triton {v.get('triton')} | xformers {v.get('xformers')} | DALI {v.get('dali')} | "
             f"DeepSpeed {v.get('deepspeed')} | python {v.get('python')}",
             f"- commit {v['commit']} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}",
             f"- command: {' '.join([os.path.relpath(sys.executable)] + sys.argv)}", "",
             "| part | status | seconds |", "|---|---|---:|"]
    lines += [f"| {n} | {r['status']} | {r['seconds']:.0f} |" for n, r in results.items()]
    tier = tier_summary(a.out)
    if tier:
        lines += ["", f"## CUDA tier: {tier['passed']} passed, {len(tier['failed'])} failed, "
                      f"{sum(len(x) for x in tier['skipped'].values())} skipped"]
        lines += [f"- FAILED {n}" for n in tier["failed"]]
        lines += [f"- skipped ({len(n)}): {why}" for why, n in tier["skipped"].items()]
    att = _load(a.out, "attention.json")
    if att:
        lines += ["", "## attention (ms, fwd / fwd+bwd; bf16 on a GPU)", "",
                  "| layout | d | N | B x H | backend | fwd | fwd+bwd | fwd+bwd TFLOP/s |", "|---|---|---|---|---|---:|---:|---:|"]
        for r in att.get("speed", []):
            cells = (f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.1f}" if "fwd_ms" in r
                     else f"{r.get('error', '')[:60]} | | ")
            lines.append(f"| {r.get('layout', 'dense')} | {r['d']} | {r['N']} | {r['B']}x{r['H']} | {r['backend']} | {cells} |")
    table = _load(a.out, "attention-table.json")
    if table:
        lines += ["", f"## what `kernels.attention: auto` picks ({table['table']})", ""]
        lines += [f"- {r['shape']} (d {r['head_dim']}, N {r['seqlen']}): **{r['backend']}** -- {r['why']}" for r in table["rows"]]
    for name, title in (("gather.json", "gather"), ("ema.json", "EMA")):
        d = _load(a.out, name)
        if d:
            lines += ["", f"## {title} (median ms; GB/s of the minimum bytes)", "", "| case | provider | ms | GB/s |",
                      "|---|---|---:|---:|"]
            lines += [f"| {r.get('case')} | {r.get('provider')} | {r.get('ms', float('nan')):.3f} | "
                      f"{r.get('gb_per_s', float('nan')):.1f} |" for r in d.get("rows", [])]
            if d.get("copy_gb_per_s"):
                lines.append(f"\ndevice-to-device copy: {d['copy_gb_per_s']:.1f} GB/s")
    e2e, tog = _load(a.out, "e2e.json"), _load(a.out, "e2e-toggles.json")
    if e2e:
        lines += ["", "## bench e2e: " + e2e.get("description", ""), ""]
        for side, r in e2e["sides"].items():
            mfu = f"{100 * r['mfu']:.1f} % MFU" if r.get("mfu") is not None else "MFU n/a"
            lines.append(f"- {side}: {r['images_per_s']:.1f} images/s, {mfu}, peak memory "
                         f"{r.get('peak_memory_mib') or 'n/a'} MiB")
        if e2e.get("ratio"):
            lines.append(f"- engine/reference: {e2e['ratio']['images_per_s']:.2f}x images/s; losses "
                         f"{'agree' if e2e['losses']['agree'] else 'DISAGREE'} (max rel diff {e2e['losses']['max_rel_diff']:.1e})")
        for t in tog or []:
            d = _load(a.out, os.path.basename(t["json"]))
            ips = d["sides"]["engine"]["images_per_s"] if d else None
            lines.append(f"- without {t['switch']} ({t['off']}): " + (f"{ips:.1f} images/s" if ips else f"exit {t['exit']}"))
    dali = _load(a.out, "dali.json")
    if dali:
        lines += ["", "## loader (images/s, images per CPU-second)", ""]
        lines += [f"- {r['loader']}: {r['median_img_s']:.0f} img/s, {r['img_per_cpu_s']:.0f} per CPU-second"
                  for r in dali.get("results", [])]
    syncs = _load(a.out, "syncs.json")
    if syncs:
        lines += ["", f"## host syncs: {syncs['per_step']:.1f} per default training step on {syncs['device']}"]
        lines += [f"- {w}" for w in syncs["where"]]
    lines += ["", "## goals"] + [f"- {g}" for g in goals(a.out, a.dry_run)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu-check"), help="report folder")
    ap.add_argument("--reference", default=None, metavar="PATH", help="a checkout of facebookresearch/ijepa")
    ap.add_argument("--e2e-batch", type=int, default=32, help="ViT-H/14 batch for bench e2e (one that fits)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes: the plumbing only")
    for flag in ("--fill-table", "--e2e-sweep", "--syncs"):
        ap.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.out = os.path.abspath(a.out)
    os.makedirs(a.out, exist_ok=True)
    if a.reference and not os.path.isdir(os.path.join(a.reference, "src")):
        print(f"gpu-check: error: --reference {a.reference}: not a checkout of facebookresearch/ijepa (no src/)",
              file=sys.stderr)
        return 2
    if a.fill_table:
        return fill_table(a.out)
    if a.e2e_sweep:
        return e2e_sweep(a)
    if a.syncs:
        return count_syncs(a)
    results = {}
    for p in parts(a):
        print(f"gpu-check: {p['name']} ...", file=sys.stderr, flush=True)
        results[p["name"]] = r = run_part(p, a.dry_run)
        print(f"gpu-check: {p['name']}: {r['status']} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
    md = report(a, results)
    _dump(a.out, "gpu-report.json", {"dry_run": a.dry_run, "versions": versions(), "parts": results,
                                     "cuda_tier": tier_summary(a.out), "goals": goals(a.out, a.dry_run)})
    with open(os.path.join(a.out, "gpu-report.md"), "w") as f:
        f.write(md)
    print(md)
    # correctness failures: a CUDA-tier test, the reference comparison (bench e2e exits 1), host syncs
    broken = [n for n in ("cuda tier", "e2e", "host syncs") if results[n]["status"].startswith("failed")]
    if broken:
        print(f"gpu-check: correctness failure in: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
