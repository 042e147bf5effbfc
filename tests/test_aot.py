"""kernels/aot.py: every shipped kernel configuration compiles for sm_80 and sm_90 without
spills, within shared memory, and the report catches deliberately bad configurations.

AOT compilation cannot share a process with the interpreter this test session runs in, so
the report runs in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys

import pytest

from kernels import aot
from kernels.gather import ENGINE_WIDTHS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def run_report(args, tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS])
    env.setdefault("TRITON_CACHE_DIR", os.path.join(REPO, ".cache", "triton"))
    done = subprocess.run([sys.executable, "-m", "kernels.aot", *args, "--json", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.exists(), done.stdout + done.stderr
    return done.returncode, json.loads(out.read_text())["rows"], done.stdout


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    return run_report(["--arch", "sm_80", "--arch", "sm_90", "--module", "aot_fixtures"],
                      tmp_path_factory.mktemp("aot"))


def shipped(rows):
    return [r for r in rows if r.get("module", "").startswith("kernels.")]


def fixture_row(rows, name, arch):
    (row,) = [r for r in rows if r["name"] == name and r["arch"] == arch]
    return row


def test_every_shipped_spec_is_clean(full_report):
    _, rows, _ = full_report
    errors = [r for r in rows if r.get("error")]
    assert not errors, errors
    ship = shipped(rows)
    assert {r["module"] for r in ship} >= {"kernels.gather", "kernels.ema", "kernels.attention"}
    for arch in ("sm_80", "sm_90"):
        assert len([r for r in ship if r["arch"] == arch]) == len(ship) // 2
    for r in ship:
        where = f"{r['name']} [{r['arch']}]"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["stl"] == 0 and r["ldl"] == 0, where
        assert r["shared_bytes"] <= aot.SHARED_LIMITS[int(r["arch"][3:])], where
        if r["uses_mma"]:
            assert r["mma_count"] > 0, where
        assert r["ok"], where


def test_launch_table_covers_every_engine_width(full_report):
    _, rows, _ = full_report
    for kind in ("gather_fwd x:bf16->bf16", "gather_layernorm fp32", "scatter_bwd sorted fp32->fp32"):
        served = set()
        for r in shipped(rows):
            if r["name"].startswith(kind) and r["arch"] == "sm_80":
                served |= {int(w) for w in r["name"].rsplit("D=", 1)[1].split("/")}
        assert served == set(ENGINE_WIDTHS), kind


def test_streaming_kernels_use_16_byte_accesses(full_report):
    # The EMA reads its pointers from a table: without the alignment hint every access
    # would be 4 bytes wide. The gather relies on the D/stride divisibility for the same.
    _, rows, _ = full_report
    for r in shipped(rows):
        if r["name"].startswith(("ema", "gather_fwd", "gather_layernorm")):
            assert r["ldg128"] > 0 and r["stg128"] > 0, r["name"]


def test_report_catches_bad_configs(full_report):
    rc, rows, table = full_report
    assert rc == 1 and "FAIL" in table
    for arch, mma_op in (("sm_80", "HMMA"), ("sm_90", "HGMMA")):
        good = fixture_row(rows, "fixture small-tile (good)", arch)
        assert good["ok"] and good["spill_stores"] == 0
        spills = fixture_row(rows, "fixture huge-tile (spills)", arch)
        assert spills["spill_stores"] > 0 and spills["stl"] > 0 and not spills["ok_spills"] and not spills["ok"]
        mma = fixture_row(rows, "fixture matmul (mma)", arch)
        assert mma["mma_op"] == mma_op and mma["mma_count"] > 0 and mma["ok"]
        fake = fixture_row(rows, "fixture no-dot claims mma", arch)
        assert fake["mma_count"] == 0 and not fake["ok_mma"] and not fake["ok"]
        smem = fixture_row(rows, "fixture matmul (smem overflow)", arch)
        assert smem["shared_bytes"] > aot.SHARED_LIMITS[int(arch[3:])] and not smem["ok_shared"]


def test_main_reruns_itself_outside_the_interpreter(tmp_path, capsys):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(aot.InterpreterActive):
        aot.report()
    out = tmp_path / "ema.json"
    rc = aot.main(["--arch", "sm_80", "--only", "m=host", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and len(rows) == 1 and rows[0]["ok"] and rows[0]["arch"] == "sm_80"


def test_missing_spec_module_is_skipped(monkeypatch):
    monkeypatch.setattr(aot, "SPEC_MODULES", ("kernels.no_such_kernel",))
    assert aot.collect_specs(modules=aot.SPEC_MODULES) == ([], [])
