"""Images/s of the DALI loader vs a PyTorch DataLoader doing the same work.

Both read the same JPEG folder and do decode -> RandomResizedCrop(224, scale=(0.3, 1),
ratio=(3/4, 4/3), bilinear) -> float32 CHW ImageNet normalisation, in batches of 32.
The DataLoader side is the reference's: PIL + torchvision transforms, ``default_collate``
(persistent workers, the stronger baseline). Each configuration runs one warm-up epoch
and then ``--epochs`` timed epochs back to back; the table shows the median (and range)
and images per CPU-second of the whole loader (all threads, worker processes included),
which depends less on other jobs sharing the machine than wall-clock rates do.

The folder is made from real Fashion-MNIST images (Debian package dataset-fashion-mnist),
upscaled to a mix of ImageNet-like sizes and saved as RGB JPEG (quality 90), unless
``--folder`` points at an existing ImageFolder tree.

    python benchmarks/bench_loader.py --json bench_loader.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = [(256, 256), (320, 240), (240, 320), (400, 300), (500, 375)]   # (width, height)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_folder(root: str, n: int, fmnist: str) -> str:
    """``root/<class>/*.jpg`` from the first ``n`` Fashion-MNIST training images."""
    from PIL import Image
    marker = os.path.join(root, f".done-{n}")
    if os.path.isfile(marker):
        return root
    with gzip.open(os.path.join(fmnist, "train-images-idx3-ubyte.gz")) as f:
        data = f.read()
    images = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(fmnist, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        im = Image.fromarray(images[i]).resize((w, h), Image.BICUBIC)
        # a per-image colour tint so the three channels differ, as in photos
        tint = rng.uniform(0.5, 1.0, size=3)
        rgb = (np.asarray(im, np.float32)[..., None] * tint).clip(0, 255).astype(np.uint8)
        d = os.path.join(root, f"class{labels[i]}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rgb).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()
    return root


class TorchFolder(torch.utils.data.Dataset):
    def __init__(self, paths, labels, crop):
        from torchvision import transforms as T
        self.paths, self.labels = paths, labels
        self.tf = T.Compose([T.RandomResizedCrop(crop, scale=(0.3, 1.0)), T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), self.labels[i]


def _worker_init(_):
    torch.set_num_threads(1)


def cpu_seconds():
    """CPU time of this process (all threads) and its live children (DataLoader workers)."""
    import psutil
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def time_epochs(run_epoch, epochs):
    """Images/s per timed epoch, and images per CPU-second over all timed epochs."""
    run_epoch(0)   # warm-up: pipeline build, worker start, page cache
    rates, images = [], 0
    cpu0 = cpu_seconds()
    for e in range(1, epochs + 1):
        t = time.perf_counter()
        n = run_epoch(e)
        rates.append(n / (time.perf_counter() - t))
        images += n
    return rates, images / (cpu_seconds() - cpu0)


def bench_dali(folder, crop, batch, threads, epochs, cache_dir, decode="cpu"):
    from engine.data_dali import DaliImageLoader
    loader = DaliImageLoader(folder, crop, batch, num_threads=threads, decode_device=decode, cache_dir=cache_dir,
                             device=torch.device("cuda") if decode == "mixed" else None)

    def run(epoch):
        loader.set_epoch(epoch)
        n = 0
        for x, _ in loader:
            n += x.shape[0]
        return n
    result = time_epochs(run, epochs)
    loader.close()
    return result


def bench_torch(folder, crop, batch, workers, epochs):
    from engine.data_dali import list_image_folder
    paths, labels, _ = list_image_folder(folder)
    ds = TorchFolder(paths, labels, crop)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                     persistent_workers=workers > 0, worker_init_fn=_worker_init)

    def run(epoch):
        n = 0
        for x, _ in dl:
            n += x.shape[0]
        return n
    result = time_epochs(run, epochs)
    del dl
    return result


def environment():
    import PIL
    import torchvision
    import nvidia.dali as dali
    from engine.tools.bench import cpu_model
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "loadavg_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "dali": dali.__version__, "pillow": PIL.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", help="existing ImageFolder tree (default: build one from Fashion-MNIST)")
    ap.add_argument("--workdir", default=".cache/bench_loader", help="where the generated folder and index go")
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per configuration (after 1 warm-up)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="DALI threads / DataLoader workers")
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--decode", choices=["cpu", "mixed"], default="cpu",
                    help="DALI decoder: cpu (libjpeg-turbo) or mixed (nvJPEG on the GPU)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)   # the main process only collates / copies; workers do the decoding

    folder = args.folder or make_folder(os.path.join(args.workdir, "jpeg"), args.images, args.fmnist)
    env = environment()
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"command: {cmd}")
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    nfiles = sum(f.endswith(".jpg") for _, _, fs in os.walk(folder) for f in fs)
    mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 2 ** 20
    print(f"data: {folder} ({nfiles} files, {mb:.1f} MB), crop {args.crop}, batch {args.batch}, "
          f"{args.epochs} timed epochs after 1 warm-up")

    rows = []
    for t in args.threads:
        for name, fn in ((f"DALI {args.decode}, num_threads={t}", lambda: bench_dali(
                              folder, args.crop, args.batch, t, args.epochs, os.path.join(args.workdir, "index"),
                              args.decode)),
                         (f"DataLoader + PIL/torchvision, num_workers={t}", lambda: bench_torch(
                              folder, args.crop, args.batch, t, args.epochs))):
            rates, per_cpu_s = fn()
            rows.append({"loader": name, "threads": t, "median_img_s": statistics.median(rates),
                         "min_img_s": min(rates), "max_img_s": max(rates), "img_per_cpu_s": per_cpu_s,
                         "epochs": rates})
            print(f"  {name:48s} {statistics.median(rates):7.1f} img/s  ({min(rates):.0f}-{max(rates):.0f}), "
                  f"{per_cpu_s:.0f} img per CPU-second", flush=True)
    print()
    print("| loader | img/s (median) | range | DALI / DataLoader | img per CPU-second |")
    print("|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        d, tch = rows[i], rows[i + 1]
        ratio = d["median_img_s"] / tch["median_img_s"]
        for r in (d, tch):
            print(f"| {r['loader']} | {r['median_img_s']:.0f} | {r['min_img_s']:.0f}-{r['max_img_s']:.0f} | "
                  f"{f'{ratio:.2f}x' if r is d else ''} | {r['img_per_cpu_s']:.0f} |")
    env["loadavg_end"] = os.getloadavg()
    print(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "environment": env, "folder": folder, "files": nfiles,
                       "crop": args.crop, "batch": args.batch, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
