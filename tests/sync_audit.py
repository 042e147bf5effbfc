"""Counting host syncs without a GPU: every operation that reads a tensor's value back to Python.

On a GPU each of these waits for the device to finish everything queued before it. On the CPU
they cost nothing, but they are the same calls, so counting them in a CPU run shows exactly where
a GPU run would stall. Counted, on the training (calling) thread only:

* ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``int(t)``), seen by a
  ``TorchDispatchMode``;
* ``Tensor.tolist`` and ``Tensor.numpy``, which read CPU memory directly and never reach the
  dispatcher, so they are wrapped.

``steady_syncs(events)`` returns the syncs of the training steps themselves: after the first
logging-window read (``RunLog.flush``) and outside every marked region (window reads, checkpoints).
"""
import threading
import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default}


def _where():
    """The innermost frames that are not torch's own: where in the project (or a library the
    project calls, e.g. DeepSpeed) the value was read."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if "sync_audit" not in f.filename and "/site-packages/torch/" not in f.filename]
    inner = frames[-1]
    return f"[{(inner.line or '').strip()}] " + " <- ".join(
        f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[-4:][::-1])


class _Mode(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.events.append(("sync", str(func), _where()))
        return func(*args, **(kwargs or {}))


@contextmanager
def count_syncs(mark=()):
    """Record host syncs (and ``("start"|"end", name)`` around the methods in ``mark``: pairs of
    (class, method name)) into the yielded list."""
    events, main = [], threading.current_thread()
    saved = {}

    def wrap_read(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if threading.current_thread() is main:
                events.append(("sync", f"Tensor.{name}", _where()))
            return orig(self, *a, **k)
        saved[(torch.Tensor, name)] = orig
        setattr(torch.Tensor, name, read)

    def wrap_mark(cls, name):
        orig = getattr(cls, name)

        def marked(*a, **k):
            events.append(("start", name, ""))
            try:
                return orig(*a, **k)
            finally:
                events.append(("end", name, ""))
        saved[(cls, name)] = orig
        setattr(cls, name, marked)

    for name in ("tolist", "numpy"):
        wrap_read(name)
    for cls, name in mark:
        wrap_mark(cls, name)
    try:
        with _Mode(events):
            yield events
    finally:
        for (cls, name), orig in saved.items():
            setattr(cls, name, orig)


def steady_syncs(events, first="flush"):
    """The syncs after the first ``first`` region ended (start-up -- building, loading -- is over)
    that happened outside every marked region (a window read, a checkpoint): what the training
    steps themselves read back. A test of the default path wants this to be empty."""
    depth, started, out = 0, False, []
    for kind, name, where in events:
        if kind == "start":
            depth += 1
        elif kind == "end":
            depth -= 1
            started = started or name == first
        elif started and depth == 0:
            out.append((kind, name, where))
    return out
