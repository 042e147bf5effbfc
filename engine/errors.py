"""Every error the engine raises on purpose, and the one rule that turns an error into an exit code.

A leaf module: it imports nothing from ``engine``, so any module may raise these.

* ``UsageError`` and its kinds (``ConfigError``, ``DataError``, ``CheckpointError``): bad input
  from the user -- a config, data, a checkpoint, a command-line argument. Raised before any
  work starts where it can be checked then; printed as ONE line naming the problem and the
  fix; exit code 2; nothing on disk is changed.
* ``NonFiniteError``: a non-finite loss or gradient stopped the run (``train.nonfinite: stop``);
  exit code 1, the last checkpoint is kept.
* A failed or timed-out collective (gloo/NCCL raise it, whatever they wrap it in): another
  rank died or hung; ``report`` says so in one line, exit 1.

``kernels.BackendUnavailable`` (an explicitly requested kernel backend that cannot run here) is
a usage error too; it is defined in ``kernels`` because ``kernels`` never imports ``engine``.
"""
from __future__ import annotations

import sys
import traceback


class UsageError(Exception):
    """Bad input from the user. The message is one line: what is wrong and how to fix it."""


class ConfigError(UsageError, ValueError):
    """A config that cannot run (unknown key, bad value, a key a backend cannot honour)."""


class DataError(UsageError):
    """Unusable data: missing files, empty folders, a loader that cannot run here."""


class CheckpointError(UsageError):
    """An unusable checkpoint: missing, unreadable, refused (it pickles code), or mismatched."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient with ``train.nonfinite: stop``."""


def first_line(e: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


def is_usage_error(e: BaseException) -> bool:
    from kernels.dispatch import BackendUnavailable
    return isinstance(e, (UsageError, BackendUnavailable))


def is_comm_error(e: BaseException) -> bool:
    """A failed or timed-out collective (gloo/NCCL), whatever the library wrapped it in."""
    import torch.distributed as dist
    if isinstance(e, (getattr(dist, "DistError", ()), getattr(dist, "DistBackendError", ()))):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(k in msg for k in (
        "Connection reset", "Connection closed", "Connection refused", "Broken pipe", "Timed out",
        "timed out", "Timeout", "NCCL", "gloo", "ProcessGroup", "Socket"))


def report(e: BaseException, rank: int | None = None, world: int = 1) -> int:
    """Print ``e`` the way the ``ijepa`` command does and return its exit code.

    Usage errors: one line, 2. A non-finite stop: one line, 1. A failed collective: one line
    saying another rank died or hung, 1. Ctrl-C: 130. Anything else is a bug or an environment
    failure: the traceback, then one line, 1.
    """
    who = "" if rank is None or world <= 1 else f"rank {rank}/{world}: "
    if is_usage_error(e):
        print(f"ijepa: error: {who}{first_line(e, 2000)}", file=sys.stderr)
        return 2
    if isinstance(e, NonFiniteError):
        print(f"ijepa: stopped: {who}{first_line(e, 2000)}", file=sys.stderr)
        return 1
    if isinstance(e, KeyboardInterrupt):
        print(f"ijepa: {who}interrupted", file=sys.stderr)
        return 130
    if world > 1 and is_comm_error(e):
        print(f"ijepa: error: {who}a collective failed, so another rank died or hung (see the first failing "
              f"rank's log); stopping. [{type(e).__name__}: {first_line(e)}]", file=sys.stderr)
        return 1
    traceback.print_exc()
    print(f"ijepa: error: {who}{type(e).__name__}: {first_line(e)}", file=sys.stderr)
    return 1
