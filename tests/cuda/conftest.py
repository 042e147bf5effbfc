"""The CUDA tier: compiled kernels on a real device, the system around them, host syncs.

Runs in its own process, on a GPU, without the Triton interpreter: ``make test-gpu`` (or
``IJEPA_TEST_TIER=cuda pytest -m cuda tests/cuda``). Anywhere else every test is skipped with
the reason. ``make gpu-check DRY=1`` (and so ``make test``) runs the same tests on the CPU under the
interpreter with tiny shapes (``IJEPA_CUDA_DRY=1``), which proves the tier's own code; what only a
GPU can show (tensor-core dots, NCCL, nvJPEG, sync debug mode, compute-sanitizer) is skipped there.
"""
import os

import pytest
import torch

TIER = os.environ.get("IJEPA_TEST_TIER") == "cuda"
DRY = os.environ.get("IJEPA_CUDA_DRY") == "1"
ON_GPU = TIER and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    no_device = pytest.mark.skipif(
        not (ON_GPU or DRY), reason="CUDA tier: no CUDA device visible" if TIER else
        "CUDA tier: runs in its own process on a GPU -- make test-gpu (IJEPA_TEST_TIER=cuda)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)
            item.add_marker(no_device)


@pytest.fixture
def device():
    return torch.device("cuda") if ON_GPU else torch.device("cpu")


def gpu_only(what: str):
    """Skip in the dry run: ``what`` only exists on a GPU."""
    return pytest.mark.skipif(not ON_GPU, reason=f"needs a GPU: {what}" + (" (dry run on the CPU)" if DRY else ""))
