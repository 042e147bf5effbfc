"""DALI loader on CPU, end to end, on a JPEG folder made of real Fashion-MNIST images.

Every DALI pipeline here runs with one thread and tiny images (2 shared cores in CI).
"""
import gzip
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import DataError
from engine.data_dali import (DaliImageLoader, IMAGENET_MEAN, IMAGENET_STD, build_dali_loader,
                              distributed_indices, rrc_boxes)
from stats_util import ks_2samp_p

FMNIST = "/usr/share/datasets/fashion-mnist"
PER_CLASS, CLASSES = 40, 2
SIZES = [(64, 48), (48, 64), (56, 56)]   # (width, height): landscape, portrait, square


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``root/train/<class>/*.jpg``: 2 classes x 40 real Fashion-MNIST test images, RGB JPEG."""
    img_path = os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")
    if not os.path.isfile(img_path):
        pytest.fail(f"Fashion-MNIST missing at {FMNIST}: apt-get install -y dataset-fashion-mnist")
    images = _read_idx(img_path)
    labels = _read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))
    root = tmp_path_factory.mktemp("fmnist_jpeg")
    for c in range(CLASSES):
        os.makedirs(root / "train" / f"class{c}")
        for k, i in enumerate(np.flatnonzero(labels == c)[:PER_CLASS]):
            im = Image.fromarray(images[i]).convert("RGB").resize(SIZES[k % 3], Image.BILINEAR)
            im.save(root / "train" / f"class{c}" / f"{k:03d}.jpg", quality=90)
    return root


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "index-cache")


def make(root, crop=32, batch=8, cache_dir=False, **kw):
    kw.setdefault("num_threads", 1)
    return DaliImageLoader(str(root), crop, batch, cache_dir=cache_dir, **kw)


def torchvision_reference(plan, j, crop):
    """The same crop box through PIL + torchvision, as the reference's transforms do it."""
    import torchvision.transforms.functional as TF
    with Image.open(plan.paths[j]) as im:
        im = im.convert("RGB")
        out = TF.resized_crop(im, int(plan.top[j]), int(plan.left[j]), int(plan.height[j]),
                              int(plan.width[j]), [crop, crop], antialias=True)
    return TF.normalize(TF.to_tensor(out), IMAGENET_MEAN, IMAGENET_STD)


def test_end_to_end_layout_and_pixels_match_torchvision(folder):
    loader = make(folder / "train")
    assert loader.decode_device == "cpu"                       # auto without a GPU
    assert len(loader) == (CLASSES * PER_CLASS) // 8 == 10
    n = 0
    for images, labels in loader:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
        assert labels.shape == (8,) and labels.dtype == torch.int64
        plan = loader.last_plan
        assert torch.equal(labels, torch.as_tensor(plan.labels))
        assert all(os.path.basename(os.path.dirname(p)) == f"class{int(y)}" for p, y in zip(plan.paths, labels))
        if n < 2:   # DALI's decode+crop+resize+normalise = torchvision's on the same box
            for j in range(8):
                diff = (images[j] - torchvision_reference(plan, j, 32)).abs()
                assert diff.mean() < 0.01 and diff.max() < 0.15, (plan.paths[j], diff.mean(), diff.max())
        n += 1
    assert n == len(loader)


def test_sharding_is_disjoint_complete_and_reshuffled_each_epoch(folder):
    N = CLASSES * PER_CLASS
    ranks = [make(folder / "train", batch=8, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [5, 5]                  # floor(ceil(80/2)/8)
    orders = {}
    for epoch in range(2):
        seen = []
        for r, loader in enumerate(ranks):
            loader.set_epoch(epoch)
            got = []
            for images, _ in loader:
                got.extend(loader.last_plan.indices.tolist())
                assert images.shape[0] == 8
            seen.append(got)
            # exactly torch's DistributedSampler order for this epoch
            ds = torch.utils.data.DistributedSampler(range(N), num_replicas=2, rank=r, shuffle=True, seed=0)
            ds.set_epoch(epoch)
            assert got == list(ds)
        assert not set(seen[0]) & set(seen[1])                # disjoint
        assert sorted(seen[0] + seen[1]) == list(range(N))    # complete
        orders[epoch] = seen[0]
    assert orders[0] != orders[1]                             # a fresh shuffle every epoch
    # an odd count pads like DistributedSampler: 81 -> 41 per rank, one index used twice
    idx = [distributed_indices(81, 3, 0, r, 2) for r in range(2)]
    assert len(idx[0]) == len(idx[1]) == 41 and set(np.concatenate(idx)) == set(range(81))


def test_resume_gives_bit_identical_batches(folder):
    a = make(folder / "train")
    a.set_epoch(0)
    for _ in a:
        pass
    a.set_epoch(1)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 3)
    rest = [x for x, _ in it]
    a.set_epoch(2)
    rest += [x for x, _ in a]

    b = make(folder / "train")
    b.load_state_dict(state)
    again = [x for x, _ in b]
    b.set_epoch(2)
    again += [x for x, _ in b]
    assert len(rest) == len(again) == len(a) - 3 + len(a)
    assert all(torch.equal(x, y) for x, y in zip(rest, again))
    # the training loop's entry point gives the same stream
    c = make(folder / "train")
    assert all(torch.equal(x, y) for x, (y, _) in zip(rest, c.epoch_batches(1, 3)))
    with pytest.raises(DataError, match="batch_size was 8, now 4"):
        make(folder / "train", batch=4).load_state_dict(state)


def test_consecutive_epochs_keep_one_pipeline(folder):
    loader = make(folder / "train")
    pipe = loader._pipe
    for epoch in range(2):
        assert sum(1 for _ in loader.epoch_batches(epoch)) == len(loader)
    assert loader._pipe is pipe   # the prefetched next-epoch batches were used, not thrown away


def _corrupt_folder(src, dst):
    shutil.copytree(src, dst)
    good = (dst / "class0" / "000.jpg").read_bytes()
    (dst / "class0" / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    (dst / "class1" / "zz_text.jpg").write_text("this is not an image\n")
    # complete headers and an end marker but no image data: passes the header check, DALI fails
    sos = good.find(b"\xff\xda")
    (dst / "class1" / "zz_noscan.jpg").write_bytes(good[:sos] + b"\xff\xd9")
    return dst


def test_corrupt_files_are_reported_counted_and_replaced(folder, tmp_path, caplog, cache):
    root = _corrupt_folder(folder / "train", tmp_path / "corrupt")
    with caplog.at_level(logging.WARNING, logger="engine.data_dali"):
        loader = make(root, batch=8, cache_dir=cache)
    assert len(loader.paths) == 83
    assert len(loader.bad_files) == 2
    assert any("zz_truncated.jpg (truncated JPEG" in b for b in loader.bad_files)
    assert any("zz_text.jpg (UnidentifiedImageError" in b for b in loader.bad_files)
    assert "zz_truncated.jpg" in caplog.text and "zz_text.jpg" in caplog.text
    bad_idx = {i for i, p in enumerate(loader.paths) if "zz_" in p}
    epochs = 0
    for epoch in range(4):   # until the header-valid but undecodable file has come up
        loader.set_epoch(epoch)
        n = 0
        for images, _ in loader:
            assert not set(loader.last_plan.indices.tolist()) & bad_idx   # replaced, never decoded
            assert torch.isfinite(images).all()
            n += 1
        assert n == len(loader) == 10                          # the epoch keeps its length
        epochs += 1
        if len(loader.bad_files) == 3:
            break
    assert len(loader.bad_files) == 3, loader.bad_files
    assert "zz_noscan.jpg (failed to decode" in loader.bad_files[2]
    assert loader.num_bad_files == 3
    # the next run knows all three from the cache, without opening a file
    again = make(root, batch=8, cache_dir=cache)
    assert again.index.probed == 0 and len(again.bad_files) == 3


def test_index_cache_rescans_only_changed_files(folder, tmp_path, cache):
    root = tmp_path / "copy"
    shutil.copytree(folder / "train", root)
    first = make(root, cache_dir=cache)
    assert first.index.probed == CLASSES * PER_CLASS
    assert make(root, cache_dir=cache).index.probed == 0
    p = root / "class0" / "001.jpg"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10 ** 9))
    assert make(root, cache_dir=cache).index.probed == 1


def test_mixed_decode_without_gpu_is_a_clear_error(folder):
    if torch.cuda.is_available():   # on a GPU host the same request must simply work
        loader = make(folder / "train", decode_device="mixed", device="cuda")
        images, _ = next(iter(loader))
        assert images.device.type == "cuda" and images.shape == (8, 3, 32, 32)
        return
    with pytest.raises(DataError) as err:
        make(folder / "train", decode_device="mixed", device="cuda")
    msg = str(err.value)
    assert "needs a CUDA GPU" in msg and "decode_device='cpu'" in msg and "\n" not in msg
    assert isinstance(err.value.__cause__, RuntimeError) and "CUDA" in str(err.value.__cause__)
    with pytest.raises(DataError, match="device='cuda'"):
        make(folder / "train", decode_device="mixed", device="cpu")


def test_crop_boxes_follow_torchvision_rule(folder):
    """Same augmentation distribution as torchvision.transforms.RandomResizedCrop(scale=(0.3, 1))."""
    from torchvision.transforms import RandomResizedCrop
    rng = np.random.default_rng(0)
    widths = np.array([w for w, _ in SIZES] * 1000 + [400, 30])   # plus two extreme aspect ratios
    heights = np.array([h for _, h in SIZES] * 1000 + [30, 400])
    left, top, w, h = rrc_boxes(widths, heights, rng)
    assert ((left >= 0) & (top >= 0) & (left + w <= widths) & (top + h <= heights)).all()
    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.empty(1, hh, ww), (0.3, 1.0), (3 / 4, 4 / 3))
                   for ww, hh in zip(widths, heights)])                            # (top, left, h, w)
    area, tv_area = w * h / (widths * heights), tv[:, 3] * tv[:, 2] / (widths * heights)
    ratio, tv_ratio = np.log(w / h), np.log(tv[:, 3] / tv[:, 2])
    assert ks_2samp_p(area, tv_area) > 1e-3 and ks_2samp_p(ratio, tv_ratio) > 1e-3
    assert ks_2samp_p(left / widths, tv[:, 1] / widths) > 1e-3
    # the fallback for extreme shapes: a centre crop at the nearest allowed ratio, as torchvision
    assert (w[-2], h[-2]) == (40, 30) and (w[-1], h[-1]) == (30, 40)
    assert (tv[-2, 3], tv[-2, 2]) == (40, 30)
    # the test can fail: uniform (not log-uniform) aspect ratios are rejected
    u = rng.uniform(3 / 4, 4 / 3, size=len(widths))
    assert ks_2samp_p(np.log(u), tv_ratio) < 1e-6


def test_output_statistics_match_a_torchvision_pipeline(folder):
    """Loose check on whole outputs: DALI vs RandomResizedCrop + ToTensor + Normalize."""
    from torchvision import transforms as T
    loader = make(folder / "train", batch=16)
    dali = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        dali += [x for x, _ in loader]
    dali = torch.cat(dali)
    tf = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.manual_seed(0)
    images = []
    for p in loader.paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    tv = torch.stack([tf(im) for _ in range(4) for im in images])
    assert dali.shape == tv.shape
    assert torch.allclose(dali.mean((0, 2, 3)), tv.mean((0, 2, 3)), atol=0.06)
    assert torch.allclose(dali.std((0, 2, 3)), tv.std((0, 2, 3)), rtol=0.03)
    assert ks_2samp_p(dali.mean((1, 2, 3)), tv.mean((1, 2, 3))) > 1e-3   # per-image brightness


def test_file_list_gray_and_partial_last_batch(folder, tmp_path):
    lst = tmp_path / "list.txt"
    files = sorted((folder / "train").rglob("*.jpg"))[:30]
    lst.write_text("".join(f"{os.path.relpath(f, tmp_path)} {i % 3}\n" for i, f in enumerate(files)))
    loader = DaliImageLoader(str(lst), 16, 8, num_threads=1, drop_last=False, in_chans=1, cache_dir=False)
    assert len(loader) == math.ceil(30 / 8)
    shapes = [x.shape for x, _ in loader]
    assert shapes == [(8, 1, 16, 16)] * 3 + [(6, 1, 16, 16)]
    assert sorted(set(loader.labels.tolist())) == [0, 1, 2]


def test_config_factory_reads_root_train_and_rejects_other_datasets(folder):
    from engine.config import IJEPAConfig
    cfg = IJEPAConfig.from_dict({
        "meta": {"model_name": "vit_tiny", "pred_emb_dim": 96},
        "data": {"root_path": str(folder.parent), "image_folder": folder.name, "crop_size": 32,
                 "batch_size": 8, "num_workers": 1, "loader": "dali"},
        "mask": {"patch_size": 4, "min_keep": 4},
        "logging": {"folder": "runs/x"}})
    loader = build_dali_loader(cfg, rank=1, world_size=2, device=torch.device("cpu"))
    assert loader.paths[0].startswith(str(folder / "train"))   # <root>/train, like the reference
    assert (loader.rank, loader.world_size, len(loader)) == (1, 2, 5)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32)
    with pytest.raises(DataError, match="use data.loader: torch"):
        build_dali_loader(cfg.replace(data={"dataset": "synthetic"}))
    with pytest.raises(DataError, match="neither an image folder nor a file list"):
        DaliImageLoader(str(folder / "missing"), 32, 8)
