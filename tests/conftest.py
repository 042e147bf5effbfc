import os

# The CPU suite never touches a GPU, even on a GPU host. CUDA is hidden before torch is imported,
# so every `auto` device resolves to the CPU, the Triton interpreter only ever sees CPU tensors,
# DeepSpeed picks its CPU accelerator and multi-rank tests run over gloo (subprocesses inherit
# the environment). The interpreter must be on before any @triton.jit decorator runs, i.e. before
# the kernel modules are imported. The AOT compile checks need it OFF and run in a subprocess.
#
# The CUDA tier (tests/cuda, `make test-gpu`) sets IJEPA_TEST_TIER=cuda and runs in its own
# process, on the GPU, without the interpreter.
CUDA_TIER = os.environ.get("IJEPA_TEST_TIER") == "cuda"
if not CUDA_TIER:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DS_ACCELERATOR"] = "cpu"

import torch  # noqa: E402

if not CUDA_TIER:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
