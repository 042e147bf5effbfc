"""Every command that reads a checkpoint refuses a file that pickles code: one line naming the file,
exit code 2, nothing executed and nothing written."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_file(path, marker):
    torch.save({"encoder": Payload(marker), "engine": {"step": 1}}, str(path))
    return str(path)


def commands(tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    latest = payload_file(run / "jepa-latest.pth.tar", marker)
    shards = run / "jepa-sharded" / "step00000001"
    shards.mkdir(parents=True)
    payload_file(shards / "rank00000.pt", marker)
    (run / "jepa-sharded" / "latest").write_text("step00000001")
    one = payload_file(tmp_path / "one.pth.tar", marker)
    return {
        "train --resume": ["train", "--config", SMOKE, "--resume", "--override", f"logging.folder={run}"],
        "eval": ["eval", "--checkpoint", one],
        "convert": ["convert", "--input", one, "--output", str(tmp_path / "out.pth.tar"), "--to", "engine"],
        "export (sharded)": ["export", "--checkpoint", str(run / "jepa-sharded"), "--output", str(tmp_path / "x")],
        "export (file)": ["export", "--checkpoint", latest, "--output", str(tmp_path / "x")],
        "demo --skip-train": ["demo", "--skip-train", "--out", str(run)],
    }


@pytest.mark.parametrize("name", ["train --resume", "eval", "convert", "export (sharded)", "export (file)",
                                  "demo --skip-train"])
def test_a_payload_checkpoint_is_refused_in_one_line(tmp_path, name):
    marker = tmp_path / "executed"
    argv = commands(tmp_path, marker)[name]
    p = subprocess.run([sys.executable, "-m", "engine.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("ijepa: error:") and "refused" in lines[0], p.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.pth.tar").exists() and not (tmp_path / "x").exists()
