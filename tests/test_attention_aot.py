"""AOT compile of every shipped attention kernel configuration for A100 (sm_80) and H100 (sm_90).

No GPU needed: Triton compiles to PTX, the bundled ptxas assembles, cuobjdump/nvdisasm give SASS.
Gates: zero register spills (ptxas -v), dynamic + static shared memory within the per-block
opt-in limit, and tensor-core instructions in the SASS (HMMA on sm_80, warpgroup HGMMA on sm_90).
What this cannot prove: that the kernels are fast, or launch-time failures on real hardware;
the interpreter tests in test_attention.py prove the numerics.

The compile must run without TRITON_INTERPRET (conftest turns it on for this process), so the
test re-runs this file as a script in a subprocess, one per architecture, in parallel.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}      # max dynamic shared memory per block (opt-in)
MMA_RE = {80: re.compile(r"\bHMMA\."), 90: re.compile(r"\bHGMMA\.")}


def _compile_one(spec: dict, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = spec["kernel"]
    sig = dict(spec["signature"])
    for name in spec["constexprs"]:
        sig[name] = "constexpr"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.get("div16", [])}
    src = ASTSource(fn=fn, signature=sig, constexprs=spec["constexprs"], attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=spec.get("num_warps", 4), num_stages=spec.get("num_stages", 2)))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        Path(ptx).write_text(k.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                              ptx, "-o", ptx + ".o"], capture_output=True, text=True, check=True).stderr
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(k.asm["cubin"])
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    static = re.search(r"SHARED:(\d+)", usage)
    sass = k.asm["sass"]
    return dict(name=spec["name"], arch=arch, regs=int(regs[1]),
                spill_stores=int(spill[1]), spill_loads=int(spill[2]),
                smem=int(k.metadata.shared) + (int(static[1]) if static else 0),
                mma=len(MMA_RE[arch].findall(sass)), local_ld_st=len(re.findall(r"\b(?:STL|LDL)\b", sass)),
                uses_mma=bool(spec.get("uses_mma", False)))


def _main(argv: list[str]) -> int:
    arch = int(argv[0])
    only = argv[1] if len(argv) > 1 else ""
    sys.path.insert(0, str(ROOT))
    from kernels.attention import aot_specs
    rows = [_compile_one(s, arch) for s in aot_specs() if only in s["name"]]
    print(json.dumps(rows))
    return 0


def _run(arch: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton"))
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, __file__, str(arch)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_attention_kernels_compile_for_a100_and_h100():
    procs = {arch: _run(arch) for arch in (80, 90)}       # 2 cores: one process per target
    failures, n = [], 0
    for arch, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"sm_{arch} compile failed:\n{err[-4000:]}"
        rows = json.loads(out.strip().splitlines()[-1])
        assert rows, "aot_specs() is empty"
        for r in rows:
            n += 1
            where = f"{r['name']} sm_{arch}"
            if r["spill_stores"] or r["spill_loads"] or r["local_ld_st"]:
                failures.append(f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B, "
                                f"{r['local_ld_st']} STL/LDL")
            if r["smem"] > SMEM_LIMIT[arch]:
                failures.append(f"{where}: shared memory {r['smem']} B > {SMEM_LIMIT[arch]} B")
            if r["uses_mma"] and r["mma"] == 0:
                failures.append(f"{where}: no {'HMMA' if arch == 80 else 'HGMMA'} in SASS")
    assert not failures, "\n".join(failures)
    # 3 kernels x {bf16, fp16} x 5 head dims, per architecture
    assert n == 2 * 30


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
