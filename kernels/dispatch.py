"""One rule that picks the implementation of every kernel op.

Each op in ``kernels/`` has a pure-PyTorch reference (``torch``) and one or more
accelerated backends (``triton``, and for attention ``xformers`` / ``sdpa``).
``select`` turns a requested backend into the one that runs:

* ``auto``: the environment variable ``IJEPA_<OP>_BACKEND`` if set, else the
  op's preference list filtered by what can run on the tensor's device.
* anything else: used as is if it can run, otherwise ``BackendUnavailable``.
  A requested backend is never swapped for another one silently.

Triton kernels can run on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how the test-suite proves them without a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401  (prints a warning when its C++ part cannot load)
    except Exception:
        return False
    return True


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else a one-line reason with the fix."""
    if backend in ("torch", "naive", "sdpa", "chunked"):
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed (pip install triton==3.8.0)"
        if device.type == "cuda" or triton_interpreting():
            return None
        return (f"triton kernels need a CUDA device (got {device.type}); "
                "use backend 'torch'/'auto', or set TRITON_INTERPRET=1 to run them in the interpreter")
    if backend == "xformers":
        if device.type != "cuda":
            return (f"xformers memory_efficient_attention has no {device.type} kernel; "
                    "use backend 'sdpa' or 'auto'")
        return None if xformers_available() else "xformers is not importable (pip install xformers==0.0.35)"
    return f"unknown backend {backend!r}"


def select(op: str, requested: str, device: torch.device, preference: tuple[str, ...],
           allowed: tuple[str, ...]) -> str:
    """Resolve ``requested`` for ``op`` on ``device``.

    ``preference``: the order tried by ``auto`` (the last entry must always run).
    ``allowed``: every backend name this op implements.
    """
    if requested == "auto":
        requested = os.environ.get(f"IJEPA_{op.upper()}_BACKEND", "").strip() or "auto"
    if requested == "auto":
        # Triton on a CPU tensor means the interpreter: run only when asked for, never picked.
        for cand in preference:
            if why_unavailable(cand, device) is None and (cand != "triton" or device.type == "cuda"):
                return cand
        return preference[-1]
    if requested not in allowed:
        raise BackendUnavailable(
            f"{op}: unknown backend {requested!r}; choose one of {', '.join(('auto',) + allowed)}")
    if (reason := why_unavailable(requested, device)) is not None:
        raise BackendUnavailable(f"{op}: backend {requested!r} cannot run here: {reason}")
    return requested
