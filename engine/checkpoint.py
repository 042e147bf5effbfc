"""Checkpoints: written atomically, read without running code, portable across backends and ranks.

Two layouts, one content
------------------------
* **Single file** (the local strategy, ``ijepa export``): ``{folder}/{tag}-latest.pth.tar`` in the
  reference's ``.pth.tar`` layout -- ``encoder``, ``predictor``, ``target_encoder`` (DDP
  ``module.`` prefix), ``opt``, ``scaler``, ``epoch``, ``loss``, ``batch_size``, ``world_size``,
  ``lr`` -- so the reference and third-party converters read it, plus an ``engine`` entry with
  the exact resume point (step, data position, mask-sampler counter, RNG states, config) and
  the names of the optimizer's parameters.
* **Sharded** (DeepSpeed ZeRO): ``{folder}/{tag}-sharded/<step tag>/rank00000.pt ...``, one
  file per rank, each holding *fragments* ``(name, start, numel)`` of the flattened fp32 tensors
  that rank owns -- master weights, both Adam moments, the EMA target -- plus the same resume
  point. ``{tag}-sharded/latest`` names the newest complete tag (written last, atomically).

``Snapshot`` reads either layout as named full tensors, so any strategy loads any checkpoint:
the same backend and rank count resumes bit for bit, and a run can move between one process
and ZeRO 0-3 or between rank counts (``Strategy.load``). DeepSpeed's own checkpoint format was
not kept: resuming it on another rank count needs DeepSpeed's offline ``ds_to_universal``
conversion and it cannot be read without DeepSpeed; the fragment format is read by one function.

Writes go to a temporary file in the same folder, are fsynced and renamed: a process killed
while saving leaves the previous checkpoint intact. Reads use ``torch.load(weights_only=True)``:
loading never executes code from the file; a file that pickles code is refused in one line.
"""
from __future__ import annotations

import glob
import math
import os
import pickle
import re
import shutil
import tempfile

import torch

from engine.errors import CheckpointError

FORMAT_VERSION = 2          # the ``engine`` entry of a single file
SHARD_FORMAT = 2            # a rank file of the sharded layout
KINDS = ("weights", "exp_avg", "exp_avg_sq", "target")


# ============================================================================ files
def save_atomic(obj, path: str) -> None:
    """``torch.save`` to ``path`` so that a crash at any moment leaves the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth.tar", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)   # mkstemp makes owner-only files; a checkpoint is shared like any output
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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


def load_file(path: str, mmap: bool = False):
    """A checkpoint file's contents: tensors and plain data only, or one-line ``CheckpointError``.
    ``mmap``: tensors stay on disk until touched (reading one fragment of a big file is cheap)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:   # the legacy (pre-zip) format cannot be memory-mapped
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if isinstance(e, pickle.UnpicklingError) and (found or "Unsupported global" in msg
                                                      or "Unsupported class" in msg):
            what = f"the Python object {found.group(1)}" if found else "Python objects"
            raise CheckpointError(f"{path}: refused: it pickles {what}, which loading would execute; only "
                                  f"tensors and plain data are accepted (re-save it with tensors and containers "
                                  f"only)") from None
        # zip / header errors of files that are not checkpoints at all
        lines = [ln.strip() for ln in msg.splitlines() if "Unsupported operand" in ln or "load key" in ln] or \
            [ln.strip() for ln in msg.splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: not a readable checkpoint ({(lines or [type(e).__name__])[0][:160]})") from None


def paths(folder: str, tag: str) -> dict:
    return {"latest": os.path.join(folder, f"{tag}-latest.pth.tar"),
            "step": os.path.join(folder, f"{tag}-step{{step:08d}}.pth.tar"),
            "epoch": os.path.join(folder, f"{tag}-ep{{epoch}}.pth.tar"),
            "sharded": os.path.join(folder, f"{tag}-sharded")}


def prune_step_checkpoints(folder: str, tag: str, keep_last: int) -> None:
    files = sorted(glob.glob(os.path.join(folder, f"{tag}-step*.pth.tar")),
                   key=lambda p: int(re.search(r"step(\d+)", p).group(1)))
    for p in files[: max(0, len(files) - keep_last)]:
        os.unlink(p)


def rank_file(tagdir: str, rank: int) -> str:
    return os.path.join(tagdir, f"rank{rank:05d}.pt")


def read_latest(shard_root: str):
    p = os.path.join(shard_root, "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return f.read().strip() or None


def write_latest(shard_root: str, tag: str) -> None:
    """Point ``latest`` at ``tag``, only once every rank's file of it is complete."""
    tmp = os.path.join(shard_root, f".latest.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(shard_root, "latest"))


def prune_tags(shard_root: str, keep_last: int) -> None:
    latest = read_latest(shard_root)
    tags = sorted(t for t in os.listdir(shard_root) if re.fullmatch(r"step\d{8}", t) and t != latest)
    for t in tags[: max(0, len(tags) - keep_last)]:
        shutil.rmtree(os.path.join(shard_root, t), ignore_errors=True)


# ============================================================================ one content, two layouts
def fragments_of(tensors: dict) -> dict:
    """Whole tensors as one fragment each: ``{"fragments": [(name, 0, numel)], "data": flat fp32}``."""
    frags = [(n, 0, t.numel()) for n, t in tensors.items()]
    data = [t.detach().reshape(-1).float().cpu() for t in tensors.values()]
    return {"fragments": frags, "data": torch.cat(data) if data else torch.zeros(0)}


class Snapshot:
    """One checkpoint of either layout, read as named full fp32 tensors.

    Tensor kinds: ``weights`` (``encoder.x`` / ``predictor.y``, every parameter), ``exp_avg`` and
    ``exp_avg_sq`` (trained parameters, once a step was taken), ``target`` (``x``: the EMA target
    encoder). ``meta``: step, epoch, batch_in_epoch, world_size, strategy, precision, config,
    adam_step, param_names / param_hparams (the optimizer's four groups), sampler, rng_cpu,
    rng_cuda, skipped_steps, bad_files, loss.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            self._open_sharded(path)
        else:
            self._open_file(path)

    # ---------------------------------------------------------------- single file
    def _open_file(self, path):
        from engine.model import param_group_names
        ck = load_file(path, mmap=True)
        if not isinstance(ck, dict) or not isinstance(ck.get("engine"), dict):
            raise CheckpointError(f"{path}: not an engine checkpoint (no 'engine' entry); to start from reference "
                                  f"weights use 'ijepa convert --to engine' first")
        eng = ck["engine"]
        if eng.get("encoder_only") or not ck.get("predictor"):
            raise CheckpointError(f"{path}: holds an encoder only (converted from HF/timm); it can be evaluated, "
                                  f"not resumed")
        strip = lambda sd: {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}  # noqa: E731
        weights = {f"{part}.{k}": v for part in ("encoder", "predictor") for k, v in strip(ck[part]).items()}
        self._full = {"weights": weights, "target": strip(ck["target_encoder"]), "exp_avg": {}, "exp_avg_sq": {}}
        names = param_group_names(weights)
        opt, adam_step, hparams = ck.get("opt"), 0, None
        if opt:
            flat = [n for group in names for n in group]
            for idx, st in opt["state"].items():
                self._full["exp_avg"][flat[int(idx)]] = st["exp_avg"]
                self._full["exp_avg_sq"][flat[int(idx)]] = st["exp_avg_sq"]
                adam_step = int(float(st["step"]))
            hparams = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        self.meta = {**{k: eng.get(k) for k in ("step", "epoch", "batch_in_epoch", "sampler", "rng_cpu",
                                                "rng_cuda", "config", "skipped_steps", "bad_files")},
                     "world_size": ck.get("world_size", 1), "strategy": eng.get("strategy", "local"),
                     "precision": eng.get("precision"), "loss": ck.get("loss", float("nan")),
                     "adam_step": adam_step, "param_names": names, "param_hparams": hparams}

    # ---------------------------------------------------------------- sharded
    def _open_sharded(self, tagdir):
        first = self._rank_file(tagdir, 0)
        world = first["world_size"]
        self._ranks = [first] + [self._rank_file(tagdir, r) for r in range(1, world)]
        self.meta = {k: first.get(k) for k in ("world_size", "strategy", "precision", "config", "adam_step",
                                               "param_names", "param_hparams")}
        self.meta.update(first["progress"])
        self._shapes = first["shapes"]
        self._index = {kind: {} for kind in KINDS}   # kind -> name -> [(rank, start, numel, offset)]
        for r, rf in enumerate(self._ranks):
            for kind, sh in rf["tensors"].items():
                off = 0
                for name, start, numel in sh["fragments"]:
                    self._index[kind].setdefault(name, []).append((r, start, numel, off))
                    off += numel
        self._full = None

    def _rank_file(self, tagdir, rank):
        path = rank_file(tagdir, rank)
        rf = load_file(path, mmap=True)
        if not isinstance(rf, dict) or rf.get("format") != SHARD_FORMAT:
            raise CheckpointError(f"{path}: not a rank file of an engine sharded checkpoint (format {SHARD_FORMAT})")
        return rf

    # ---------------------------------------------------------------- access
    def names(self, kind: str) -> list:
        return list(self._full[kind]) if self._full is not None else list(self._index[kind])

    def tensor(self, kind: str, name: str) -> torch.Tensor:
        """The full fp32 tensor; for the sharded layout assembled from every rank's fragments
        (each element exactly once, else ``CheckpointError``)."""
        if self._full is not None:
            if name not in self._full[kind]:
                raise CheckpointError(f"{self.path}: no {kind} entry for {name}")
            return self._full[kind][name].float()
        shape = self._shapes["target" if kind == "target" else "weights"].get(name)
        if shape is None or name not in self._index[kind]:
            raise CheckpointError(f"{self.path}: no {kind} entry for {name}; is a rank file missing?")
        out = torch.empty(math.prod(shape), dtype=torch.float32)
        seen = 0
        for r, start, numel, off in self._index[kind][name]:
            out[start:start + numel] = self._ranks[r]["tensors"][kind]["data"][off:off + numel]
            seen += numel
        if seen != out.numel():
            raise CheckpointError(f"{self.path}: the fragments of {kind} {name} hold {seen} of {out.numel()} "
                                  f"elements; a rank file is missing or from another checkpoint")
        return out.view(shape)


def find_resume_point(folder: str, tag: str):
    """The newest checkpoint of the run in ``folder``, single file or sharded: ``(path, step)``
    or ``(None, None)``."""
    p = paths(folder, tag)
    found = []
    if os.path.isfile(p["latest"]):
        eng = load_file(p["latest"], mmap=True).get("engine") or {}
        found.append((eng.get("step", -1), 0, p["latest"]))
    latest = read_latest(p["sharded"]) if os.path.isdir(p["sharded"]) else None
    if latest is not None:
        tagdir = os.path.join(p["sharded"], latest)
        progress = load_file(rank_file(tagdir, 0), mmap=True).get("progress") or {}
        found.append((progress.get("step", -1), 1, tagdir))
    if not found:
        return None, None
    step, _, path = max(found)
    return path, step
