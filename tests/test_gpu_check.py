"""`make gpu-check DRY=1`: the GPU check end to end on the CPU (interpreter, tiny shapes), so its
plumbing is proven here; on a GPU the same script validates and measures."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
PARTS = ["cuda tier", "attention", "attention table", "gather", "ema", "e2e", "dali", "host syncs"]


@pytest.mark.slow
def test_dry_run_writes_the_whole_report(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, IJEPA_ATTENTION_TABLE=str(tmp_path / "t.json")))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu-report.json").read_text())
    assert list(rep["parts"]) == PARTS and rep["dry_run"]
    for name, part in rep["parts"].items():
        assert part["status"] == "ok" or part["status"].startswith("not installed: skipped"), (name, part)
    tier = rep["cuda_tier"]
    assert tier["passed"] >= 20 and tier["failed"] == [], tier   # the tier's own code ran, under the interpreter
    assert all("needs a GPU" in why for why in tier["skipped"]), tier["skipped"]
    for key in ("device", "driver", "cuda", "torch", "triton", "xformers", "dali", "deepspeed", "commit"):
        assert rep["versions"].get(key), key
    md = (tmp_path / "gpu-report.md").read_text()
    assert "DRY RUN" in md and "## attention" in md and "## bench e2e" in md and "host syncs: 0.0 per" in md


def test_a_missing_package_skips_its_part_and_a_bad_reference_is_one_line(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    r = gpu_check.run_part({"name": "x", "needs": ("no_such_package_here",), "argv": ["false"], "env": {},
                            "timeout": 5}, dry=True)
    assert r["status"] == "not installed: skipped (no_such_package_here)"
    r = gpu_check.run_part({"name": "x", "needs": (), "argv": [sys.executable, "-c", "import time; time.sleep(9)"],
                            "env": {}, "timeout": 1}, dry=True)
    assert r["status"] == "timed out after 1 s"
    p = subprocess.run([sys.executable, SCRIPT, "--reference", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "not a checkout" in p.stderr
