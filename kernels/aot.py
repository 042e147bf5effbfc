"""Ahead-of-time compile report for every shipped Triton kernel configuration (no GPU needed).

Each module in ``SPEC_MODULES`` may define ``aot_specs() -> list[dict]``; a spec is::

    name        str, unique
    kernel      the @triton.jit function
    signature   {arg: "*bf16" | "*fp32" | "*i64" | "i32" | "fp32" | ...} for every runtime arg
    constexprs  {arg: value} for every tl.constexpr arg
    num_warps   int, default 4
    num_stages  int, default 2
    div16       [arg, ...] args the JIT would see as 16-divisible (16-byte aligned pointers,
                sizes/strides that are multiples of 16)
    uses_mma    bool, default False: the SASS must then contain tensor-core instructions
                (HMMA on sm_80, HGMMA (warpgroup MMA) on sm_90)

``compile_spec`` compiles one spec with Triton's own pipeline and bundled ptxas for
``GPUTarget("cuda", arch, 32)`` and reads registers, spills, shared memory and
instruction counts from the cubin/SASS. A spec is ``ok`` when it compiled, does not
spill, fits the shared-memory limit and, if ``uses_mma``, issues tensor-core MMAs.
This proves resource use, not speed or numerics (the interpreter tests cover numerics).

CLI: ``python -m kernels.aot [--arch sm_80|sm_90 ...] [--only SUBSTR] [--json [OUT]]``;
the exit status is 1 if any spec is not ok. AOT compilation cannot run in a process where
Triton is in interpreter mode, so with ``TRITON_INTERPRET=1`` set, ``main`` re-runs itself
in a subprocess without it (``report`` refuses instead).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Iterable, Optional

from kernels.dispatch import triton_interpreting

SPEC_MODULES = ("kernels.gather", "kernels.ema", "kernels.attention")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Largest dynamic shared memory one block may opt into: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
MMA_OPCODE = {80: "HMMA", 90: "HGMMA"}

_SASS_COUNTS = {
    "hmma": r"\bHMMA\.",
    "hgmma": r"\bHGMMA\.",
    "stl": r"\bSTL\b",                  # local-memory traffic: spills (Triton kernels keep no stack arrays)
    "ldl": r"\bLDL\b",
    "ldg128": r"\bLDG\.E\.128\b",        # 16-byte global loads/stores: the vectorised paths
    "stg128": r"\bSTG\.E\.128\b",
    "atomics": r"\b(?:ATOMG?|REDG?)\.",
}


class InterpreterActive(RuntimeError):
    """AOT compilation was asked for in a process where TRITON_INTERPRET=1."""


def parse_arch(text: str) -> int:
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", text.strip())
    if not m or int(m[1]) not in SHARED_LIMITS:
        raise argparse.ArgumentTypeError(f"unsupported arch {text!r}; use sm_80 or sm_90")
    return int(m[1])


def collect_specs(only: Optional[str] = None, modules: Iterable[str] = SPEC_MODULES
                  ) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(module, spec) pairs from every importable module in ``modules``, and error rows for
    modules that exist but fail to import or to produce specs. Absent modules are skipped."""
    specs, errors = [], []
    for mod_name in modules:
        try:
            if importlib.util.find_spec(mod_name) is None:
                continue
        except ModuleNotFoundError:
            continue
        try:
            mod_specs = getattr(importlib.import_module(mod_name), "aot_specs", list)()
        except Exception:
            errors.append(dict(name=f"{mod_name} (import/aot_specs)", module=mod_name, arch=None, ok=False,
                               error=traceback.format_exc(limit=3)))
            continue
        specs += [(mod_name, spec) for spec in mod_specs if only is None or only in spec["name"]]
    return specs, errors


def _run_on_file(content: bytes | str, name: str, command) -> subprocess.CompletedProcess:
    """Run ``command(path)`` on a temporary file ``name`` holding ``content``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return subprocess.run(command(path), capture_output=True, text=True, check=True)


def _cuobjdump_resources(cubin: bytes) -> dict:
    from triton import knobs
    tool = knobs.nvidia.cuobjdump.path
    out = _run_on_file(cubin, "k.cubin", lambda path: [tool, "--dump-resource-usage", path]).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump resource usage:\n{out}")
    return dict(registers=int(m[1]), stack_bytes=int(m[2]), static_shared=int(m[3]), local_bytes=int(m[4]))


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int]:
    """Spill bytes as ptxas -v reports them, with the flags Triton itself passes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    log = _run_on_file(ptx, "k.ptx", lambda path: [
        get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
        f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", path + ".o"]).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not found:
        raise RuntimeError(f"cannot parse ptxas -v output:\n{log}")
    return sum(int(s) for s, _ in found), sum(int(l) for _, l in found)


def _inspect(compiled, arch: int) -> dict:
    """Registers, spills and SASS counts of one compiled kernel. Disassembly dominates a
    warm run, so the result is cached next to Triton's cache, keyed by the cubin's hash."""
    from triton import knobs
    cubin = compiled.asm["cubin"]
    cache_dir = os.path.join(knobs.cache.dir, "aot_report")
    path = os.path.join(cache_dir, f"{hashlib.sha256(cubin).hexdigest()}-sm{arch}-v1.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    facts = _cuobjdump_resources(cubin)
    facts["spill_stores"], facts["spill_loads"] = _ptxas_spills(compiled.asm["ptx"], arch)
    sass = compiled.asm["sass"]
    facts.update({key: len(re.findall(pattern, sass)) for key, pattern in _SASS_COUNTS.items()})
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(facts, f)
    os.replace(tmp, path)
    return facts


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile one spec for sm_<arch> and return its resource row (see module docstring)."""
    if triton_interpreting():
        raise InterpreterActive("kernels.aot cannot compile while TRITON_INTERPRET=1 (interpreted kernels "
                                "have no compiler front end); run `python -m kernels.aot` or unset it")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["kernel"]
    signature = {**spec["signature"], **dict.fromkeys(spec["constexprs"], "constexpr")}
    if missing := [a for a in fn.arg_names if a not in signature]:
        raise ValueError(f"spec {spec['name']!r}: signature lacks {missing}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.get("div16", ())}
    num_warps, num_stages = spec.get("num_warps", 4), spec.get("num_stages", 2)
    uses_mma = bool(spec.get("uses_mma", False))
    row = dict(name=spec["name"], arch=f"sm_{arch}", kernel=fn.__name__, num_warps=num_warps,
               num_stages=num_stages, uses_mma=uses_mma, shared_limit=SHARED_LIMITS[arch])
    started = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec["constexprs"]), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
        facts = _inspect(compiled, arch)
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000],
                   compile_s=round(time.perf_counter() - started, 2))
        return row
    # Triton's launcher refuses a kernel whose dynamic shared memory exceeds the device's
    # opt-in limit; cuobjdump's static figure includes sm_90's 1 KB per-block system
    # reserve, which is outside that limit, so it is reported but not added.
    row.update(facts, shared_bytes=compiled.metadata.shared, mma_op=MMA_OPCODE[arch],
               mma_count=facts[MMA_OPCODE[arch].lower()],
               global_scratch=getattr(compiled.metadata, "global_scratch_size", 0),
               compile_s=round(time.perf_counter() - started, 2))
    row.update(ok_spills=all(facts[k] == 0 for k in ("spill_stores", "spill_loads", "stl", "ldl")),
               ok_shared=row["shared_bytes"] <= SHARED_LIMITS[arch], ok_mma=row["mma_count"] > 0 or not uses_mma)
    row["ok"] = row["ok_spills"] and row["ok_shared"] and row["ok_mma"]
    return row


_SPECS: list[tuple[str, dict]] = []     # report()'s specs, inherited by its forked workers


def _compile_job(job: tuple[int, int]) -> dict:
    index, arch = job
    module, spec = _SPECS[index]
    return dict(compile_spec(spec, arch), module=module)


def report(archs: Iterable[int] = (80, 90), only: Optional[str] = None,
           modules: Iterable[str] = SPEC_MODULES, jobs: Optional[int] = None) -> list[dict]:
    """Compile every spec for every arch; one row per (spec, arch), plus error rows.

    ``jobs`` > 1 compiles in forked worker processes (specs hold @triton.jit functions,
    which do not pickle, so the workers inherit them); default: one per CPU core."""
    if triton_interpreting():
        raise InterpreterActive("kernels.aot.report() needs a process without TRITON_INTERPRET=1; "
                                "call kernels.aot.main(argv), which re-runs itself in a clean subprocess")
    specs, rows = collect_specs(only, modules)
    work = [(i, arch) for arch in archs for i in range(len(specs))]
    jobs = min(jobs or os.cpu_count() or 1, len(work))
    _SPECS[:] = specs
    try:
        if jobs <= 1:
            return rows + [_compile_job(job) for job in work]
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return rows + pool.map(_compile_job, work, chunksize=1)
    finally:
        _SPECS.clear()


def _cell(row: dict, key: str) -> str:
    if key == "ok":
        return "ok" if row.get("ok") else "FAIL"
    v = row.get(key, "")
    if key == "mma_count" and row.get("uses_mma"):
        v = f"{v} {row.get('mma_op', '')}"
    return "" if v is None else str(v)


def format_table(rows: list[dict]) -> str:
    cols = [("arch", "arch"), ("name", "kernel config"), ("registers", "regs"), ("spill_stores", "spill st"),
            ("spill_loads", "spill ld"), ("shared_bytes", "smem B"), ("mma_count", "mma"),
            ("ldg128", "ldg128"), ("stg128", "stg128"), ("atomics", "atom"), ("compile_s", "s"), ("ok", "ok")]
    table = [[h for _, h in cols]] + [[_cell(r, key) for key, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"\n{r['name']} [{r.get('arch')}]: {r['error']}" for r in rows if r.get("error")]
    bad = [r for r in rows if not r.get("ok")]
    lines.append(f"\n{len(rows) - len(bad)}/{len(rows)} ok"
                 + (f"; limits: smem {SHARED_LIMITS}, no spills, MMA where uses_mma" if bad else ""))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ijepa kernels report",
                                     description="AOT-compile the shipped Triton kernels for A100/H100 "
                                                 "and report registers, spills, shared memory and MMA use.")
    parser.add_argument("--arch", action="append", type=parse_arch,
                        help="sm_80 or sm_90 (repeatable; default both)")
    parser.add_argument("--only", help="only specs whose name contains this text")
    parser.add_argument("--module", action="append", default=[],
                        help="also compile the aot_specs() of this importable module (repeatable)")
    parser.add_argument("--jobs", type=int, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT",
                        help="write the rows as JSON to OUT (or stdout) instead of the table")
    args = parser.parse_args(argv)
    if triton_interpreting():            # re-run in a subprocess without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        return subprocess.call([sys.executable, "-m", "kernels.aot", *argv], env=env)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_PACKAGE_ROOT, ".cache", "triton"))
    rows = report(archs=tuple(args.arch or (80, 90)), only=args.only,
                  modules=tuple(SPEC_MODULES) + tuple(args.module), jobs=args.jobs)
    if args.json is not None:
        import triton
        payload = json.dumps(dict(triton=triton.__version__, rows=rows), indent=1, default=str)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload)
    if args.json != "-":
        print(format_table(rows))
    return 0 if rows and all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
