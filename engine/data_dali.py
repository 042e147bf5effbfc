"""NVIDIA DALI image loader: the fast path for image-folder pretraining.

Pipeline: file bytes -> decode (``mixed`` = nvJPEG on the GPU, ``cpu`` = libjpeg-turbo)
fused with the RandomResizedCrop region -> bilinear resize (antialiased, like PIL) ->
ImageNet normalisation -> float32 CHW on the training device.

Design choices (why, not what):

* **Order and crops are pure functions of (seed, epoch, batch).** The sample order is
  ``torch.utils.data.DistributedSampler``'s (``randperm`` seeded with ``seed + epoch``,
  padded by repetition, rank-strided), so the DALI loader, the portable torch loader and
  the reference visit the same images in the same order. Crop boxes follow torchvision's
  ``RandomResizedCrop.get_params`` rule (10 attempts, log-uniform aspect, centre-crop
  fallback), drawn in numpy from a generator keyed by (seed, epoch, rank, batch). The
  pipeline itself has no random state, so resuming needs only ``(epoch, batch)``: the
  same batches come out bit for bit, with no DALI checkpoint blob to store per rank,
  and the training loop's ``epoch_batches(epoch, start)`` works after a restart.
* **File bytes and crop boxes enter through ``external_source``;** the decoder decodes
  only the crop region (``decoders.image_slice``), which is DALI's fused
  decode-and-crop. Feeding happens in the consuming thread, two batches ahead
  (``prefetch``), so memory stays at a few batches.
* **Bad files never stop an epoch.** Every file's header is read once up front (that
  also gives the image size the crop boxes need) and checked for a complete stream
  (JPEG end-of-image / PNG IEND marker); the results are cached per (path, size, mtime).
  A bad file is reported by name, counted in ``bad_files`` and replaced by the next
  readable file of the list (the portable loader's rule), so the epoch keeps its
  length and order. If DALI still fails on a batch, the files of that batch are
  decoded one by one to find the culprit, which is then treated the same way.
* No EXIF rotation (``adjust_orientation=False``): the reference's PIL loader does not
  apply it either, and the crop boxes are computed on the stored image size.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import warnings

import numpy as np
import torch

from engine.data import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, distributed_indices
from engine.errors import DataError, first_line
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

log = logging.getLogger(__name__)

_DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}   # PIL's names of what DALI decodes
_INDEX_VERSION = 1


def rrc_boxes(widths, heights, rng: np.random.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3),
              attempts: int = 10):
    """torchvision ``RandomResizedCrop.get_params`` for a whole batch at once.

    Per image: up to ``attempts`` draws of area ~ U(scale) * W*H and aspect ~ exp(U(log ratio));
    the first box that fits wins, its corner is uniform over the valid positions (inclusive
    bounds); if none fits, a centre crop clamped to the ratio range. Returns int arrays
    ``(left, top, w, h)``.
    """
    W, H = np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)
    n = len(W)
    target = (W * H).astype(np.float64)[:, None] * rng.uniform(scale[0], scale[1], size=(n, attempts))
    ar = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts)))
    # np.round is half-to-even like Python's round() that torchvision uses
    cw = np.round(np.sqrt(target * ar)).astype(np.int64)
    ch = np.round(np.sqrt(target / ar)).astype(np.int64)
    fits = (cw > 0) & (ch > 0) & (cw <= W[:, None]) & (ch <= H[:, None])
    first = (np.arange(n), np.argmax(fits, axis=1))   # each image's first fitting attempt
    ok, w, h = fits[first], cw[first], ch[first]
    top = np.minimum((rng.random(n) * (H - h + 1)).astype(np.int64), H - h)   # draws: top, then left
    left = np.minimum((rng.random(n) * (W - w + 1)).astype(np.int64), W - w)
    if not ok.all():   # torchvision's fallback: whole image, clamped to the ratio range
        fw = np.where(W / H > ratio[1], np.round(H * ratio[1]), W).astype(np.int64)
        fh = np.where(W / H < ratio[0], np.round(W / ratio[0]), H).astype(np.int64)
        w, h = np.where(ok, w, fw), np.where(ok, h, fh)
        top, left = np.where(ok, top, (H - fh) // 2), np.where(ok, left, (W - fw) // 2)
    return left, top, w, h


# ---------------------------------------------------------------------- file index
def probe_image(path: str, full: bool = False):
    """``(width, height, None)`` for a file DALI can decode, else ``(0, 0, reason)``.

    Reads only the header (PIL) and the last bytes: a JPEG without its end-of-image marker
    or a PNG without IEND is truncated, and DALI's decoder fails on it. ``full`` also
    decodes the image with PIL (slow; catches corrupt data inside a complete stream).
    """
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(f) as im:
                (w, h), fmt = im.size, im.format
                if full:
                    im.load()
            if fmt not in _DALI_FORMATS:
                return 0, 0, f"format {fmt} is not readable by DALI"
            marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt)
            if marker is not None:
                f.seek(max(0, os.path.getsize(path) - 4096))
                if marker not in f.read():
                    return 0, 0, f"truncated {fmt} (no end marker)"
        if w < 1 or h < 1:
            return 0, 0, f"empty image {w}x{h}"
        return int(w), int(h), None
    except Exception as e:  # unreadable, not an image, truncated header, permissions, ...
        return 0, 0, f"{type(e).__name__}: {first_line(e)}"


def list_image_folder(root: str):
    """ImageFolder listing: sorted class folders, files sorted as torchvision walks them."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    samples = [(os.path.join(dirpath, f), ci) for ci, c in enumerate(classes)
               for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True))
               for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    return [p for p, _ in samples], [ci for _, ci in samples], classes


def read_file_list(source):
    """A text file of ``path [label]`` lines (paths relative to the list's folder), or a
    sequence of paths or ``(path, label)`` pairs."""
    if isinstance(source, (str, os.PathLike)):
        base = os.path.dirname(os.path.abspath(source))   # join(base, p) keeps an absolute p as it is
        items = []
        with open(source) as f:
            for line in map(str.strip, f):
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(maxsplit=1)
                if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                    items.append((os.path.join(base, parts[0]), int(parts[1])))
                else:
                    items.append((os.path.join(base, line), 0))
    else:
        items = [(x, 0) if isinstance(x, (str, os.PathLike)) else (x[0], int(x[1])) for x in source]
    return [os.fspath(p) for p, _ in items], [lab for _, lab in items]


class FileIndex:
    """Image sizes and bad files of a list of paths, probed once and cached on disk."""

    def __init__(self, paths, key: str, validate: str = "header", cache_dir=None, threads: int = 1):
        self.paths = list(paths)
        n = len(self.paths)
        self.width, self.height = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.bad: dict[int, str] = {}
        self._sig = sig = np.full((n, 2), -1, np.int64)   # (size, mtime_ns) per file; -1: cannot stat
        for i, p in enumerate(self.paths):
            with contextlib.suppress(OSError):
                st = os.stat(p)
                sig[i] = st.st_size, st.st_mtime_ns
        self._cache_file = None
        if cache_dir is not False:
            digest = hashlib.sha1(f"{_INDEX_VERSION}|{validate}|{key}".encode()).hexdigest()[:20]
            if not cache_dir:
                base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
                cache_dir = os.path.join(base, "ijepa-engine", "dali-index")
            self._cache_file = os.path.join(cache_dir, f"{digest}.npz")
        cached = self._load(self._cache_file)
        found = {}   # index -> (width, height, why bad or None)
        for i, p in enumerate(self.paths):
            hit = cached.get(p)
            if hit is not None and hit[0] == sig[i, 0] and hit[1] == sig[i, 1] and sig[i, 0] >= 0:
                found[i] = hit[2:]
        todo = [i for i in range(n) if i not in found]
        self.probed = len(todo)   # files actually opened this time (the rest came from the cache)
        # threads overlap the file-system latency; header parsing itself is cheap
        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as ex:
            found.update(zip(todo, ex.map(lambda j: probe_image(self.paths[j], validate == "full"), todo)))
        for i, (w, h, why) in found.items():
            self.width[i], self.height[i] = w, h
            if why is not None:
                self.bad[i] = why
        if todo:
            self._save()

    def record_bad(self, i: int, why: str) -> None:
        """A file that passed the scan but failed to decode: remember it for the next run."""
        self.bad[i] = why
        self._save()

    @staticmethod
    def _load(cache_file):
        if not cache_file or not os.path.isfile(cache_file):
            return {}
        try:
            z = np.load(cache_file)
            paths = bytes(z["paths"]).decode().split("\n")
            bad = {int(k): v for k, v in json.loads(bytes(z["bad"]).decode()).items()}
            sig, wh = z["sig"], z["wh"]
            return {p: (sig[i, 0], sig[i, 1], wh[i, 0], wh[i, 1], bad.get(i)) for i, p in enumerate(paths)}
        except Exception as e:   # a damaged cache only costs a re-scan
            log.warning("ignoring unreadable DALI file-index cache %s (%s)", cache_file, first_line(e))
            return {}

    def _save(self):
        if not self._cache_file:
            return
        try:
            os.makedirs(os.path.dirname(self._cache_file), exist_ok=True)
            tmp = f"{self._cache_file}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.savez(f, paths=np.frombuffer("\n".join(self.paths).encode(), np.uint8),
                         sig=self._sig, wh=np.stack([self.width, self.height], 1),
                         bad=np.frombuffer(json.dumps({str(k): v for k, v in self.bad.items()}).encode(),
                                           np.uint8))
            os.replace(tmp, self._cache_file)   # atomic: ranks writing at once leave one whole file
        except OSError as e:
            log.warning("could not write the DALI file-index cache %s (%s); the next run re-scans",
                        self._cache_file, first_line(e))


# ---------------------------------------------------------------------- pipeline
@pipeline_def
def _crop_pipeline(source, crop_size, decode_device, in_chans):
    data, anchor, shape = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                             dtype=[types.UINT8, types.INT32, types.INT32])
    images = fn.decoders.image_slice(
        data, anchor, shape, device=decode_device, axis_names="WH",
        normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
        output_type=types.RGB if in_chans == 3 else types.GRAY)
    # linear + antialias = PIL's BILINEAR resize that torchvision uses on PIL images
    images = fn.resize(images, size=[crop_size, crop_size], interp_type=types.INTERP_LINEAR, antialias=True)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[m * 255 for m in mean], std=[s * 255 for s in std])


@pipeline_def
def _probe_pipeline(source):
    data = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    return fn.decoders.image(data, device="cpu", output_type=types.RGB, adjust_orientation=False)


def _decode_failure(path: str) -> str | None:
    """Why ``path`` does not decode in full (with PIL, then on its own in DALI), or None."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(f) as im:
                im.load()
    except Exception as e:
        return f"{type(e).__name__}: {first_line(e)}"
    try:
        data = np.fromfile(path, dtype=np.uint8)
        pipe = _probe_pipeline(lambda: [data], batch_size=1, num_threads=1, device_id=None)
        try:
            pipe.build()
            pipe.run()
        except RuntimeError:
            return "DALI cannot decode it"
    except OSError as e:
        return f"{type(e).__name__}: {first_line(e)}"
    return None


BatchPlan = collections.namedtuple("BatchPlan", "epoch batch indices paths labels left top width height")


class DaliImageLoader:
    """Sharded, resumable DALI loader of an image folder or a file list.

    Iterating yields ``(images float32 [B, C, S, S], labels int64 [B])`` on ``device``.
    ``len(loader)`` is the number of batches per epoch per rank, ``floor(ceil(N/world)/B)``
    with ``drop_last`` (the reference's ``ipe``). Call ``set_epoch(e)`` before each epoch
    (fresh shuffle, like DistributedSampler), or use ``epoch_batches(epoch, start)``.
    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch with identical batches.
    ``bad_files`` lists every unreadable file as ``"path (reason)"``.
    """

    def __init__(self, source, crop_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_threads: int = 2, decode_device: str = "auto",
                 crop_scale=(0.3, 1.0), drop_last: bool = True, in_chans: int = 3, *,
                 device=None, prefetch: int = 2, validate: str = "header", cache_dir=None,
                 max_images: int | None = None, crop_ratio=(3 / 4, 4 / 3)):
        if decode_device not in ("auto", "cpu", "mixed"):
            raise DataError(f"decode_device: {decode_device!r} is not allowed; choose auto, cpu or mixed")
        if validate not in ("header", "full"):
            raise DataError(f"validate: {validate!r} is not allowed; choose header or full")
        if in_chans not in (1, 3):
            raise DataError(f"in_chans: {in_chans}; DALI decodes to 1 (gray) or 3 (RGB) channels")
        if not (0 <= rank < world_size):
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.crop_size, self.batch_size = int(crop_size), int(batch_size)
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.num_threads, self.prefetch = max(1, int(num_threads)), max(1, int(prefetch))
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.drop_last, self.in_chans = drop_last, in_chans

        self.device = torch.device(device if device is not None else ("cuda" if decode_device == "mixed" else "cpu"))
        if decode_device == "auto":
            decode_device = "mixed" if self.device.type == "cuda" and torch.cuda.is_available() else "cpu"
        self.decode_device = decode_device
        if decode_device == "mixed" and self.device.type != "cuda":
            raise DataError(f"decode_device='mixed' decodes on the GPU but device is {self.device}; "
                            f"pass device='cuda' or use decode_device='cpu'")

        # ---- the file list
        is_path = isinstance(source, (str, os.PathLike))
        if is_path and os.path.isdir(source):
            root = os.fspath(source)
            paths, labels, self.classes = list_image_folder(root)
            if not paths:
                raise DataError(f"no images under {root}; expected class folders with "
                                f"{'/'.join(IMG_EXTENSIONS[:3])}... files")
        elif is_path and not os.path.isfile(source):
            raise DataError(f"{source} is neither an image folder nor a file list; check data.root_path "
                            f"and data.image_folder")
        else:
            paths, labels = read_file_list(source)
            self.classes = sorted(set(labels))
            if not paths:
                raise DataError(f"the file list {source if isinstance(source, str) else ''} is empty")
        key = os.path.abspath(source) if is_path else hashlib.sha1("\n".join(paths).encode()).hexdigest()
        self.paths = paths[:max_images or None]
        self.labels = np.asarray(labels[:max_images or None], dtype=np.int64)
        self.index = FileIndex(self.paths, key, validate, cache_dir, threads=self.num_threads)
        self.bad_files: list[str] = []
        self._bad, self._replacement = set(), None   # bad indices; index -> next readable index (lazily)
        for i, why in sorted(self.index.bad.items()):
            self._mark_bad(i, why)
        n = len(self.paths)
        if len(self._bad) == n:
            raise DataError(f"none of the {n} files is a readable image (first: {self.bad_files[0]}); "
                            f"check the data folder")
        if self._bad:
            log.warning("%d of %d files are unreadable and will be replaced by the next readable file "
                        "(loader.bad_files lists them)", len(self._bad), n)

        self.num_samples = math.ceil(n / world_size)   # per rank, after DistributedSampler padding
        if len(self) == 0:
            raise DataError(f"{n} images give no full batch of {batch_size} per rank (world size "
                            f"{world_size}); lower data.batch_size or use drop_last=False")

        self.epoch = 0
        self._start = 0                   # first batch of the next __iter__ (set by load_state_dict)
        self._served = (0, 0)             # (epoch, next batch to hand out)
        self._order_cache = (None, None)  # (epoch, this rank's indices)
        self.last_plan = None                 # BatchPlan of the batch handed out last
        self._pending = collections.deque()   # plans fed to DALI, not yet returned
        self._build(0, 0)   # fail now, not at the first batch, if DALI cannot run as asked

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _mark_bad(self, i: int, why: str):
        if i in self._bad:
            return
        self._bad.add(i)
        self.bad_files.append(f"{self.paths[i]} ({why})")
        log.warning("unreadable image, replaced by the next readable one: %s", self.bad_files[-1])
        self._replacement = None   # recomputed lazily

    def _replace(self, idx: np.ndarray) -> np.ndarray:
        """Bad indices -> the next readable index (cyclic)."""
        if not self._bad:
            return idx
        if self._replacement is None:
            n = len(self.paths)
            good = np.setdiff1d(np.arange(n), np.fromiter(self._bad, np.int64))
            self._replacement = good[np.searchsorted(good, np.arange(n)) % len(good)]
        return self._replacement[idx]

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache[0] != epoch:
            self._order_cache = (epoch, distributed_indices(len(self.paths), epoch, self.seed,
                                                            self.rank, self.world_size))
        return self._order_cache[1]

    def batch_plan(self, epoch: int, batch: int) -> BatchPlan:
        """Which files, labels and crop boxes make up ``batch`` of ``epoch`` on this rank."""
        idx = self._replace(self._order(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size])
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch, self.rank, batch, 0x1D1])))
        left, top, w, h = rrc_boxes(self.index.width[idx], self.index.height[idx], rng,
                                    self.crop_scale, self.crop_ratio)
        return BatchPlan(epoch, batch, idx, [self.paths[i] for i in idx], self.labels[idx], left, top, w, h)

    def _advance(self, pos):
        e, b = pos
        return (e + 1, 0) if b + 1 >= len(self) else (e, b + 1)

    # ------------------------------------------------------------------ DALI plumbing
    def _source(self, info):
        """Called by DALI, in order, once per batch it schedules: the next batch's bytes and boxes."""
        while True:   # until every file of the plan reads (a bad file changes the plan)
            plan = self.batch_plan(*self._feed_pos)
            data = []
            for i, p in zip(plan.indices, plan.paths):
                try:
                    data.append(np.fromfile(p, dtype=np.uint8))
                except OSError as e:   # vanished or unreadable since the scan
                    self._mark_bad(int(i), f"{type(e).__name__}: {first_line(e)}")
            if len(data) == len(plan.paths):
                break
        self._pending.append(plan)
        self._feed_pos = self._advance(self._feed_pos)
        anchor = np.stack([plan.left, plan.top], 1).astype(np.int32)
        shape = np.stack([plan.width, plan.height], 1).astype(np.int32)
        return data, list(anchor), list(shape)

    def _build(self, epoch: int, batch: int):
        self.close()
        self._feed_pos = (epoch, batch)     # of the next batch DALI asks for
        self._stream_pos = (epoch, batch)   # of the next pipeline output
        device_id = None
        if self.decode_device == "mixed":
            device_id = self.device.index if self.device.index is not None else (
                torch.cuda.current_device() if torch.cuda.is_available() else 0)
        pipe = _crop_pipeline(self._source, self.crop_size, self.decode_device, self.in_chans,
                              batch_size=self.batch_size, num_threads=self.num_threads,
                              device_id=device_id, seed=self.seed, prefetch_queue_depth=self.prefetch)
        try:
            pipe.build()
        except RuntimeError as e:
            if self.decode_device == "mixed":
                raise DataError(f"DALI decode_device='mixed' needs a CUDA GPU with its driver and could not "
                                f"get one ({first_line(e)}); use decode_device='cpu' (or 'auto', which "
                                f"picks cpu when there is no GPU)") from e
            raise DataError(f"DALI could not build the pipeline ({first_line(e)})") from e
        self._pipe = pipe

    def _to_torch(self, out):
        tl = out.as_tensor()
        if self.decode_device == "mixed":
            x = torch.empty(tl.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tl, x, cuda_stream=torch.cuda.current_stream(self.device))
            return x
        x = torch.empty(tl.shape(), dtype=torch.float32,
                        pin_memory=self.device.type == "cuda" and torch.cuda.is_available())
        feed_ndarray(tl, x)
        return x.to(self.device, non_blocking=True)

    def _next_batch(self):
        """The next batch of the stream; a failing batch is repaired and re-run."""
        while True:   # each retry marks at least one more file bad; _repair raises when none is left
            try:
                (out,) = self._pipe.run()
                plan = self._pending.popleft()
                break
            except RuntimeError as e:   # DALI reports decode failures as RuntimeError
                if not self._pending:
                    raise
                self._repair(list(self._pending), e)
        assert (plan.epoch, plan.batch) == self._stream_pos, "DALI returned batches out of order"
        self._stream_pos = self._advance(self._stream_pos)
        self.last_plan = plan
        return self._to_torch(out), torch.from_numpy(plan.labels.copy()).to(self.device, non_blocking=True)

    def _repair(self, plans, err):
        """DALI failed on one of the batches in flight: find the files to blame, mark them bad,
        rebuild the pipeline at the first of those batches."""
        found = 0
        first_plan = plans[0]
        for plan in plans:
            for i, p in zip(map(int, plan.indices), plan.paths):
                why = None if i in self._bad else _decode_failure(p)
                if why is not None:
                    self._mark_bad(i, f"failed to decode: {why}")
                    self.index.record_bad(i, f"failed to decode: {why}")
                    found += 1
            if found:
                break
        if not found:
            raise DataError(f"DALI failed on batch {first_plan.batch} of epoch {first_plan.epoch} but every "
                            f"file of it decodes on its own ({first_line(err)}); files: "
                            f"{', '.join(first_plan.paths[:4])}...") from err
        if len(self._bad) == len(self.paths):
            raise DataError("no readable image is left; check the data folder") from err
        self._build(first_plan.epoch, first_plan.batch)

    # ------------------------------------------------------------------ public iteration
    def epoch_batches(self, epoch: int, start: int = 0):
        """Batches ``start, start+1, ...`` of ``epoch`` (the training loop's entry point)."""
        n = len(self)
        if not (0 <= start <= n):
            raise DataError(f"batch {start} is outside the epoch's {n} batches")
        # an uninterrupted run keeps one pipeline whose prefetch already holds the next
        # epoch's first batches; any other position (resume, a repeated epoch) rebuilds it
        if start < n and (self._pipe is None or self._stream_pos != (epoch, start)):
            self._build(epoch, start)
        self._served = (epoch, start)
        for b in range(start, n):
            item = self._next_batch()
            self._served = (epoch, b + 1)
            yield item

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._start = int(epoch), 0

    def __iter__(self):
        start, self._start = self._start, 0
        return self.epoch_batches(self.epoch, start)

    def state_dict(self) -> dict:
        """Where the stream stands: the next batch is ``batch`` of ``epoch``."""
        return {"epoch": self._served[0], "batch": self._served[1], "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "num_files": len(self.paths), "bad_files": list(self.bad_files)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_files", len(self.paths)), ("world_size", self.world_size),
                          ("batch_size", self.batch_size), ("seed", self.seed)):
            if key in state and state[key] != mine:
                raise DataError(f"loader state: {key} was {state[key]}, now {mine}; the data stream cannot "
                                f"resume exactly; restore the old setting or start a fresh epoch")
        self.epoch, self._start = int(state["epoch"]), int(state["batch"])
        self._served = (self.epoch, self._start)

    def close(self) -> None:
        self._pipe = None   # DALI joins its threads when the pipeline is released
        self._pending.clear()

    @property
    def num_bad_files(self) -> int:
        return len(self.bad_files)


def build_dali_loader(cfg, rank: int = 0, world_size: int = 1, device=torch.device("cpu")) -> DaliImageLoader:
    """The DALI loader for an ``IJEPAConfig`` (``data.dataset: imagefolder``)."""
    d = cfg.data
    if d.dataset != "imagefolder":
        raise DataError(f"data.loader: dali reads image folders only (data.dataset is {d.dataset!r}); "
                        f"use data.loader: torch")
    root = os.path.join(d.root_path, d.image_folder) if d.image_folder else d.root_path
    if os.path.isdir(os.path.join(root, "train")):   # the reference trains on <root>/train/
        root = os.path.join(root, "train")
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist; set data.root_path/data.image_folder")
    threads = max(1, min(d.num_workers or 1, os.cpu_count() or 1))
    return DaliImageLoader(root, d.crop_size, d.batch_size, rank=rank, world_size=world_size, seed=cfg.train.seed,
                           num_threads=threads, decode_device="auto", crop_scale=d.crop_scale, drop_last=True,
                           in_chans=d.in_chans, device=device, max_images=d.max_images)
