"""Portable image data: ImageFolder, Fashion-MNIST (Debian package), synthetic images.

Every random choice (sample order, crop boxes) is a function of ``(seed, epoch, index)``,
so a run resumed from a checkpoint sees exactly the batches it would have seen, and the
global torch RNG (which the reference's mask placement uses) is never touched by data
loading. Augmentation is the reference's: RandomResizedCrop(scale=crop_scale,
ratio=3/4..4/3, bilinear) then ImageNet normalisation; flips/colour/blur are off in every
reference config.

A corrupt or unreadable image is replaced by the next readable one, reported by name and
counted (``TrainLoader.bad_files``); the epoch goes on.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import queue
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"   # where the Debian package puts it


# ----------------------------------------------------------------- augmentation
def _gen(*keys) -> torch.Generator:
    h = 0
    for k in keys:
        h = (h * 1_000_003 + int(k) + 1) % (2 ** 61 - 1)
    return torch.Generator().manual_seed(h)


def rrc_box(height: int, width: int, scale, ratio, g: torch.Generator):
    """A RandomResizedCrop box (top, left, h, w) with torchvision's sampling rule, drawn from ``g``."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(1, generator=g).item())
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    # fallback: central crop at the nearest allowed ratio
    in_ratio, w, h = width / height, width, height
    if in_ratio < ratio[0]:
        h = int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: torch.Tensor, size: int, scale, g, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """``img`` float [C, H, W] -> [C, size, size]."""
    top, left, h, w = rrc_box(img.shape[-2], img.shape[-1], scale, ratio, g)
    return F.interpolate(img[None, :, top:top + h, left:left + w], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0]


def normalize(img: torch.Tensor, channels: int) -> torch.Tensor:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    mean, std = (torch.tensor(v, dtype=img.dtype).view(-1, 1, 1) for v in (mean, std))
    return (img - mean) / std


# ----------------------------------------------------------------- datasets
class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>``; the reference reads ``root/train/`` when it exists."""

    def __init__(self, root: str, crop_size: int, crop_scale=(0.3, 1.0), in_chans: int = 3):
        if os.path.isdir(os.path.join(root, "train")):
            root = os.path.join(root, "train")
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist; set data.root_path/data.image_folder")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.samples = [(os.path.join(dirpath, f), ci) for ci, c in enumerate(classes)
                        for dirpath, _, files in sorted(os.walk(os.path.join(root, c)))
                        for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if not self.samples:
            raise DataError(f"no images under {root}; expected class folders with .jpg/.png files")
        self.classes, self.root = classes, root
        self.crop_size, self.crop_scale, self.in_chans = crop_size, tuple(crop_scale), in_chans
        self.epoch, self.seed = 0, 0

    def __len__(self):
        return len(self.samples)

    def _read(self, path):
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB" if self.in_chans == 3 else "L"), dtype=np.uint8).copy()
        t = torch.from_numpy(arr)
        return (t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)).float().div_(255)

    def __getitem__(self, i):
        """(image, label, names of unreadable files skipped to get here)."""
        bad = []
        for j in range(len(self.samples)):
            path, label = self.samples[(i + j) % len(self.samples)]
            try:
                img = self._read(path)
            except Exception as e:  # truncated, not an image, permission, ...
                bad.append(f"{path} ({type(e).__name__})")
                log.warning("unreadable image skipped: %s", bad[-1])
                continue
            img = random_resized_crop(img, self.crop_size, self.crop_scale, _gen(self.seed, self.epoch, i))
            return normalize(img, self.in_chans), label, "\n".join(bad)
        raise DataError(f"no readable image in {self.root}")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip or plain) of unsigned bytes as a writable numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file")
    if data[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{data[2]:02x}; only unsigned bytes (0x08) are read")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fmnist(split: str = "train", folder: str = FMNIST_DIR):
    """``(images uint8 [N, 28, 28], labels int64 [N])`` numpy arrays of the official ``train``
    (60k) or ``test`` (10k) split, from the Debian package's files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path, lbl_path = (os.path.join(folder, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))
    for path in (img_path, lbl_path):
        if not os.path.isfile(path):
            raise DataError(f"{path}: missing; install Fashion-MNIST with 'apt-get install -y "
                            f"dataset-fashion-mnist' (as root), or set data.fmnist_dir")
    images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def fmnist_to_float(images_u8, size: int, in_chans: int = 3) -> torch.Tensor:
    """28x28 uint8 -> float [N, C, size, size] in [0, 1]. Crops up to 32 px: padded by 2 to 32
    (the demo's layout) then resized if smaller; larger crops: resized from 28. Channels
    replicated to ``in_chans``."""
    x = torch.as_tensor(np.ascontiguousarray(images_u8)).float().div(255).unsqueeze(1)
    if size <= 32:
        x = F.pad(x, (2, 2, 2, 2))
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.expand(-1, in_chans, -1, -1)


class FashionMNISTDataset(torch.utils.data.Dataset):
    def __init__(self, folder, crop_size, crop_scale=(0.3, 1.0), in_chans=3, split="train", max_images=None):
        images, labels = load_fmnist(split, folder)
        self.images = fmnist_to_float(images[:max_images or None], max(32, crop_size), 1)   # replicated after the crop
        self.labels = torch.from_numpy(labels[:max_images or None])
        self.crop_size, self.crop_scale, self.in_chans = crop_size, tuple(crop_scale), in_chans
        self.epoch, self.seed = 0, 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = random_resized_crop(self.images[i], self.crop_size, self.crop_scale, _gen(self.seed, self.epoch, i))
        img = normalize(img.expand(self.in_chans, -1, -1), self.in_chans)
        return img, int(self.labels[i]), ""


class SyntheticDataset(torch.utils.data.Dataset):
    """Deterministic random images, for benchmarks and plumbing tests (no files needed)."""

    def __init__(self, n, crop_size, in_chans=3):
        self.n, self.crop_size, self.in_chans = n, crop_size, in_chans
        self.epoch, self.seed = 0, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.randn(self.in_chans, self.crop_size, self.crop_size, generator=_gen(self.seed, 7919, i)), 0, ""


def build_dataset(cfg):
    d = cfg.data
    if d.dataset == "fmnist":
        return FashionMNISTDataset(d.fmnist_dir, d.crop_size, d.crop_scale, d.in_chans, "train", d.max_images)
    if d.dataset == "synthetic":
        return SyntheticDataset(d.max_images or d.synthetic_size, d.crop_size, d.in_chans)
    root = os.path.join(d.root_path, d.image_folder) if d.image_folder else d.root_path
    ds = ImageFolderDataset(root, d.crop_size, d.crop_scale, d.in_chans)
    ds.samples = ds.samples[:d.max_images or None]
    return ds


# ----------------------------------------------------------------- loader
def distributed_indices(n: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample order for ``epoch``: exactly ``DistributedSampler(shuffle=True)``, which
    both loaders follow (a permutation seeded with ``seed + epoch``, padded by repetition to equal
    shards, rank-strided)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    total = math.ceil(n / world_size) * world_size
    if total > n:
        perm = np.concatenate([perm, np.resize(perm, total - n)])
    return perm[rank:total:world_size]


class TrainLoader:
    """Sharded, drop-last batches with DistributedSampler semantics and an exact resume point.

    ``len(loader)`` = batches per epoch per rank = floor(ceil(N / world) / batch), as the
    reference's DataLoader. ``epoch_batches(epoch, start)`` yields ``(images, labels)``
    from batch ``start`` of ``epoch`` on; the order is a seeded permutation of the epoch.
    """

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0,
                 pin_memory=False, device=torch.device("cpu")):
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers, self.pin_memory, self.device = num_workers, pin_memory, device
        self.per_rank = math.ceil(len(dataset) / world_size)
        self.bad_files: list[str] = []
        if len(self) == 0:
            raise DataError(f"{len(dataset)} images give no full batch of {batch_size} per rank "
                            f"(world size {world_size}); lower data.batch_size")

    def __len__(self):
        return self.per_rank // self.batch_size

    def indices(self, epoch: int) -> list[int]:
        return distributed_indices(len(self.dataset), epoch, self.seed, self.rank, self.world_size).tolist()

    def epoch_batches(self, epoch: int, start: int = 0):
        self.dataset.epoch, self.dataset.seed = epoch, self.seed
        idx = self.indices(epoch)[start * self.batch_size: len(self) * self.batch_size]
        sampler = torch.utils.data.BatchSampler(idx, self.batch_size, drop_last=True)
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory and self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.seed))   # DataLoader's seeds: not the global RNG
        for images, labels, bad in dl:
            self.bad_files.extend(name for b in bad if b for name in b.split("\n"))
            yield to_device(images, self.device), labels


# ----------------------------------------------------------------- prefetch
def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: pinned, then copied asynchronously."""
    if t.is_cuda or torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class BatchPrefetcher:
    """Loads batches and samples their masks ahead of the training step, in a background thread.

    Reference-mode masks draw positions from the global torch RNG, so the order of draws is
    what makes a run reproducible. Only this producer draws from it while it runs, and every
    produced item remembers the RNG state and sampler counter from before its draw. ``stop()``
    rewinds both to the first item that was produced but not consumed, so a checkpoint saved
    after ``stop()`` (and the run continuing after it) sees exactly the state of a run without
    prefetching. ``depth=0`` produces inline, on demand.
    """

    def __init__(self, loader, sampler, device, depth: int = 2, packed: bool = False):
        self.loader, self.sampler, self.device, self.depth = loader, sampler, device, depth
        self.packed = packed   # whole masks per sample, as a PackedLayout, instead of [B, K] tensors
        self._thread = self._gen = None

    def _produce(self, batches):
        """One batch: images, masks (or the packed layout) on the device. Everything the host builds goes
        through pinned memory with non-blocking copies, so the training thread never waits for a transfer."""
        from engine.model import PackedLayout
        snap = (torch.get_rng_state(), self.sampler.state_dict())
        images, labels = next(batches)
        if self.packed:
            return snap, images, PackedLayout(*self.sampler.sample_ragged(len(images)), self.device), None
        masks_enc, masks_pred = self.sampler(len(images))
        return snap, images, [to_device(m, self.device) for m in masks_enc], \
            [to_device(m, self.device) for m in masks_pred]

    def start(self, epoch: int, start_batch: int, count: int):
        """Serve ``count`` batches of ``epoch`` from batch ``start_batch`` on."""
        batches = self.loader.epoch_batches(epoch, start_batch)
        self._pending = []
        if self.depth <= 0:
            self._gen = (self._produce(batches) for _ in range(count))
            return
        self._q = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()

        def run():
            try:
                for _ in range(count):
                    item = self._produce(batches)
                    while not self._stop.is_set():
                        with contextlib.suppress(queue.Full):
                            self._q.put(item, timeout=0.1)
                            break
                    if self._stop.is_set():
                        self._pending.append(item)   # produced, never served: rewound by stop()
                        return
            except BaseException as e:  # surfaces in get(), on the training thread
                self._q.put(e)

        self._thread = threading.Thread(target=run, name="ijepa-prefetch", daemon=True)
        self._thread.start()

    def get(self):
        """(images, masks_enc, masks_pred) of the next batch."""
        item = next(self._gen) if self._thread is None else self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item[1:]

    def stop(self):
        """Stop producing and rewind the RNG/sampler to the first unserved batch."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        queued = [self._q.get_nowait() for _ in range(self._q.qsize())]
        unserved = [item for item in queued if not isinstance(item, BaseException)] + self._pending
        if unserved:
            rng, sampler_state = unserved[0][0]
            torch.set_rng_state(rng)
            self.sampler.load_state_dict(sampler_state)
