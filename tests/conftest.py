import os

# The Triton interpreter must be on before any @triton.jit decorator runs, i.e. before
# the kernel modules are imported, so it is set here, ahead of every project import.
# The AOT compile checks need it OFF and run in a subprocess (tests/test_aot.py).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
