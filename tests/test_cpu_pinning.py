"""`make test` on a GPU host runs exactly as on a CPU one: the CPU suite cannot touch CUDA.

Proven without a GPU: the suite is started with the environment of a GPU host (a visible device,
the interpreter off, DeepSpeed free to pick CUDA) and still pins itself to the CPU."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_this_process_is_pinned_to_the_cpu():
    from engine.strategy import resolve_device
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["TRITON_INTERPRET"] == "1"
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert resolve_device("auto") == torch.device("cpu")


def test_a_gpu_host_environment_is_overridden_before_torch_loads(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import os, torch\n"
        "def test_probe():\n"
        "    assert os.environ['CUDA_VISIBLE_DEVICES'] == '' and os.environ['TRITON_INTERPRET'] == '1'\n"
        "    assert os.environ['DS_ACCELERATOR'] == 'cpu' and torch.cuda.device_count() == 0\n")
    # the probe runs under the project's conftest, as every test of the suite does
    (tmp_path / "conftest.py").write_text(open(os.path.join(ROOT, "tests", "conftest.py")).read())
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0", TRITON_INTERPRET="0", DS_ACCELERATOR="cuda")
    env.pop("IJEPA_TEST_TIER", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr
    # control: the same probe without the conftest sees the GPU host's settings
    os.unlink(tmp_path / "conftest.py")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
