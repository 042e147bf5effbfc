"""Checkpoints: the reference's ``.pth.tar`` layout plus the engine's own state.

A file holds the reference's keys (``encoder``, ``predictor``, ``target_encoder`` with the
DDP ``module.`` prefix, ``opt``, ``scaler``, ``epoch``, ``loss``, ``batch_size``,
``world_size``, ``lr``), so the reference and third-party converters read it, and an
``engine`` entry with everything needed for an exact resume (step, data position, mask
sampler counter, RNG states, config).

Writes are atomic (temporary file in the same folder, fsync, rename, fsync of the folder):
a process killed while saving leaves the previous checkpoint intact. Reads use
``torch.load(weights_only=True)``: loading never executes code from the file.
"""
from __future__ import annotations

import glob
import os
import re
import tempfile

import torch

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """Unusable checkpoint file. One line naming the file and the problem."""


def save_atomic(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth.tar", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_file(path: str) -> dict:
    """Load a checkpoint safely (tensors and plain data only)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        if "Unsupported global" in msg or "GLOBAL" in msg or "Unsupported class" in msg:
            raise CheckpointError(f"{path}: refused, the file contains Python objects that loading would "
                                  f"execute (only tensors and plain data are accepted)") from None
        detail = next((l.strip() for l in msg.splitlines() if "Unsupported operand" in l or "load key" in l), first)
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (got {type(obj).__name__})")
    return obj


def is_engine_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt.get("engine"), dict)


def paths(folder: str, tag: str) -> dict:
    return {"latest": os.path.join(folder, f"{tag}-latest.pth.tar"),
            "step": os.path.join(folder, f"{tag}-step{{step:08d}}.pth.tar"),
            "epoch": os.path.join(folder, f"{tag}-ep{{epoch}}.pth.tar")}


def prune_step_checkpoints(folder: str, tag: str, keep_last: int) -> None:
    files = sorted(glob.glob(os.path.join(folder, f"{tag}-step*.pth.tar")),
                   key=lambda p: int(re.search(r"step(\d+)", p).group(1)))
    for p in files[: max(0, len(files) - keep_last)]:
        os.unlink(p)


def build_state(model, optimizer, cfg, *, epoch: int, step: int, batch_in_epoch: int, loss: float,
                sampler, world_size: int = 1, extra: dict | None = None) -> dict:
    """The dict saved to disk (reference keys + ``engine``)."""
    ref = model.reference_state_dict(module_prefix=True)
    state = {
        **ref,
        "opt": optimizer.state_dict() if optimizer is not None else None,
        "scaler": None,
        "epoch": epoch,
        "loss": float(loss),
        "batch_size": cfg.data.batch_size,
        "world_size": world_size,
        "lr": cfg.optimization.lr,
        "engine": {
            "format": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "sampler": sampler.state_dict() if sampler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **(extra or {}),
        },
    }
    return state


def restore(ckpt: dict, model, optimizer, sampler) -> dict:
    """Load model/optimizer/sampler/RNG from ``ckpt``; returns the ``engine`` entry."""
    if not is_engine_checkpoint(ckpt):
        raise CheckpointError("not an engine checkpoint (no 'engine' entry); to start from reference "
                              "weights use model.load_reference_state_dict or 'ijepa convert'")
    model.load_reference_state_dict(ckpt)
    if optimizer is not None and ckpt.get("opt") is not None:
        optimizer.load_state_dict(ckpt["opt"])
    eng = ckpt["engine"]
    if sampler is not None and eng.get("sampler") is not None:
        sampler.load_state_dict(eng["sampler"])
    torch.set_rng_state(eng["rng_cpu"])
    if torch.cuda.is_available() and eng.get("rng_cuda"):
        torch.cuda.set_rng_state_all(eng["rng_cuda"])
    return eng
