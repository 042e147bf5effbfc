"""Evaluation of a frozen encoder: linear probe, k-NN, collapse diagnostics.

Protocol (the paper's and the project's calibration): the frozen encoder (target encoder by
default) embeds every image; its patch tokens AFTER the final LayerNorm are averaged into one
vector per image (``pool="gridK"``: averaged per cell of a K x K cut of the patch grid and
concatenated, see ``pool_tokens``); features are extracted in fp32 without autocast (bf16
extraction cost 2-3 points in calibration).

* Linear probe: scikit-learn's ``StandardScaler`` (the labelled set's mean/std; zero-variance dims
  left at scale 1), then multinomial ``LogisticRegression(C=...)``, an L2 penalty on the weights
  (not the bias): ``C * sum_i CE_i + ||W||^2 / 2``, full-batch L-BFGS in float64 (stop when the
  largest gradient entry of the per-sample-mean objective is below ``tol`` = 1e-4, or after 1000
  iterations). ``C`` is chosen from ``PROBE_CS`` on a stratified 20 % held-out part of the
  labelled set, then refitted on all of it; the test accuracy of every ``C`` is reported too.
* k-NN: cosine similarity of L2-normalised features, k = 20, votes weighted by
  ``exp(similarity / 0.07)`` (the DINO protocol); ``vote="majority"`` counts neighbours.

Data
* Fashion-MNIST (Debian ``dataset-fashion-mnist``): labelled training images are the first n of
  ``numpy.random.default_rng(0).permutation(60000)`` (``--labels-per-class``: the first n of
  each class in that order), so results compare with the documented raw-pixel baseline; the
  test set is the official 10k split. The images are the training data path's full view, made
  by ``engine.data``'s own functions (pretraining random-resized-crops this view): pixels -> [0, 1];
  crop <= 32 px: zero-pad by 2 on every side to 32x32 (black, like the background), then resize
  to the crop when smaller; crop > 32 px: resize 28 -> crop (bilinear, antialiased); the channel
  is replicated when the encoder takes 3; ImageNet mean/std (1 channel: 0.5 / 0.5).
* ``imagefolder:PATH``: ``PATH/train`` (labelled) and ``PATH/val`` (test), class subfolders; resize
  the short side to ``round(crop * 256 / 224)`` (bilinear), center crop, ImageNet mean/std.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import warnings
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from engine.data import FMNIST_DIR, IMAGENET_MEAN, IMAGENET_STD, fmnist_to_float, load_fmnist as _load_fmnist, normalize
from engine.errors import UsageError
from engine.model import VisionTransformer, _reinit
from engine.strategy import resolve_device
from engine.tools.convert import infer_arch, read_checkpoint

GREY_MEAN, GREY_STD = 0.5, 0.5   # one-channel normalisation of the training data path
PROBE_CS = (0.01, 0.1, 1.0, 10.0)
LABEL_SEED = 0


# ----------------------------------------------------------------------------- encoders
def load_encoder(path: str, which: str = "target", device="cpu", num_heads: Optional[int] = None,
                 fmt: str = "auto") -> VisionTransformer:
    """A frozen encoder (eval mode, on ``device``) from any checkpoint ``ijepa convert`` reads:
    ``encoder(images)`` gives the ``[B, N, D]`` patch features after the final norm. ``which``: the
    EMA ``target`` or the ``context`` encoder of engine/reference files (HF/timm hold one, used for
    both). It carries ``.arch`` (``engine.tools.convert.Arch``) and ``.source`` (path, format, which encoder)."""
    if which not in ("target", "context"):
        raise UsageError(f"--encoder {which!r}: choose target or context")
    dev = resolve_device(device, "--device")
    ck = read_checkpoint(path, fmt, num_heads)
    encoder = ck.arch.build_encoder()
    try:
        encoder.load_state_dict(ck.encoder_state(which), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"{path}: encoder weights do not fit a {ck.arch.describe()} "
                         f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    loaded = which if ck.target_encoder is not None else "only"
    return _frozen(encoder, ck.arch, {"path": path, "format": ck.fmt, "encoder": loaded}, dev)


def random_encoder_like(encoder: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """A randomly initialised encoder of the same shape (the reference's two-pass init: module
    constructors, then trunc-normal(0.02) Linear / LayerNorm 1,0 again; fixed sin-cos
    positions), seeded, without touching the global RNG."""
    arch = getattr(encoder, "arch", None) or infer_arch(encoder.state_dict(), encoder.num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rand = arch.build_encoder()
        _reinit(rand)
    source = {"path": None, "format": "random", "encoder": f"random init, seed {seed}"}
    return _frozen(rand, arch, source, next(encoder.parameters()).device)


def _frozen(encoder, arch, source: dict, device):
    encoder.arch, encoder.source = arch, source
    encoder.eval().requires_grad_(False)
    return encoder.to(device)


# ----------------------------------------------------------------------------- features
def parse_pool(pool: Optional[str], num_tokens: Optional[int] = None) -> Optional[int]:
    """``"mean"`` -> 1, ``"gridK"`` -> K (K x K cells), ``None`` -> None (the tokens themselves);
    a grid must fit ``num_tokens`` patches when given (a square grid of at least K x K)."""
    if pool is None:
        return None
    if pool == "mean":
        return 1
    m = re.fullmatch(r"grid([1-9][0-9]*)", str(pool))
    if not m:
        raise UsageError(f"--pool {pool!r}: use mean or gridK (K x K average-pooled cells, e.g. grid2)")
    k = int(m.group(1))
    if num_tokens is not None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or k > side:
            raise UsageError(f"--pool {pool}: needs a square patch grid of at least {k}x{k} tokens "
                             f"(got {num_tokens} tokens)")
    return k


def pool_tokens(tokens: torch.Tensor, pool: Optional[str]) -> torch.Tensor:
    """Patch tokens ``[B, N, D]`` of a square grid -> probe features. ``mean``: ``[B, D]``, the
    paper's protocol. ``gridK``: the grid cut into K x K cells, each averaged, concatenated
    cell-major -> ``[B, K*K*D]``; it keeps *where* a feature is, which a mean over positions throws
    away (on an 8x8 Fashion-MNIST grid a sleeve and a hem look alike once averaged). ``None``: the
    tokens unchanged."""
    B, N, D = tokens.shape
    k = parse_pool(pool, N)
    if k is None:
        return tokens
    if k == 1:
        return tokens.mean(dim=1)
    side = math.isqrt(N)
    grid = tokens.transpose(1, 2).reshape(B, D, side, side)
    return F.adaptive_avg_pool2d(grid, k).permute(0, 2, 3, 1).reshape(B, k * k * D)


def extract_pooled(encoder: torch.nn.Module, images_or_loader: Union[torch.Tensor, Iterable],
                   pools: Sequence[Optional[str]] = ("mean",), batch_size: int = 256) -> dict:
    """Frozen-encoder features in fp32 (even under a caller's autocast) on the CPU, one tensor per
    entry of ``pools`` (see ``pool_tokens``), from a single pass over ``images_or_loader``: a
    ``[N, C, H, W]`` tensor (split into ``batch_size`` chunks) or an iterable of image batches or
    of ``(images, labels)`` pairs (a DataLoader)."""
    for pool in pools:
        parse_pool(pool)
    if isinstance(images_or_loader, torch.Tensor):
        images_or_loader = images_or_loader.split(batch_size)
    param = next(encoder.parameters())
    if param.dtype != torch.float32:
        raise ValueError(f"feature extraction needs an fp32 encoder (got {param.dtype}); call encoder.float()")
    was_training = encoder.training
    encoder.eval()
    out = {pool: [] for pool in pools}
    try:
        with torch.inference_mode(), torch.autocast(param.device.type, enabled=False):
            for x in images_or_loader:
                x = x[0] if isinstance(x, (tuple, list)) else x     # (images, labels) from a DataLoader
                h = encoder(x.to(param.device, torch.float32, non_blocking=True)).float()
                for pool in pools:
                    out[pool].append(pool_tokens(h, pool).cpu())
    finally:
        encoder.train(was_training)
    if not out[pools[0]]:
        raise ValueError("feature extraction: no images")
    return {pool: torch.cat(parts) for pool, parts in out.items()}


def extract_features(encoder: torch.nn.Module, images_or_loader: Union[torch.Tensor, Iterable],
                     batch_size: int = 256, pool: Optional[str] = "mean") -> torch.Tensor:
    """``extract_pooled`` with one pool: ``"mean"`` gives ``[N, D]`` (mean of the patch tokens
    after the final norm), ``"gridK"`` ``[N, K*K*D]``, ``None`` the tokens ``[N, T, D]``."""
    return extract_pooled(encoder, images_or_loader, (pool,), batch_size)[pool]


# ----------------------------------------------------------------------------- linear probe
# scikit-learn's solver, not a hand-written one: the features of every probe here fit in memory
# (1,000-60,000 rows), its L-BFGS is the reference implementation of the objective the documented
# raw-pixel figures use, and a fit of 1,000 x 384 features takes well under a second on one core.
# A GPU-scale probe (ImageNet features) would want a torch solver; nothing here needs one.
def _as_numpy(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.astype(np.float64).reshape(len(x), -1)


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int):
    """(fit rows, held-out rows): ``fraction`` of every class held out, at least one row of each
    class kept for fitting; ``(None, None)`` when no class has two rows."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) >= 2:
            val.append(idx[:min(max(1, round(len(idx) * fraction)), len(idx) - 1)])
    if not val:
        return None, None
    val = np.concatenate(val)
    return np.setdiff1d(np.arange(len(y)), val), val


def _fit(x, y, C, max_iter, tol):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, tol=tol))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # non-convergence is reported in the result instead
        model.fit(x, y)
    return model, int(np.max(model[-1].n_iter_))


def linear_probe(train_feats, train_labels, test_feats, test_labels, Cs: Sequence[float] = PROBE_CS,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000, tol: float = 1e-4) -> dict:
    """Logistic-regression probe (see the module doc). Returns a dict with ``top1`` (test accuracy
    in %, with ``C`` chosen on the held-out split), ``C``, ``val_top1`` and ``test_top1`` per C
    (the latter an oracle view for comparison with grids reported elsewhere), sizes and whether
    L-BFGS converged within ``max_iter`` iterations for every fit."""
    x_tr, x_te = _as_numpy(train_feats), _as_numpy(test_feats)
    y_tr, y_te = np.asarray(train_labels).astype(np.int64), np.asarray(test_labels).astype(np.int64)
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise ValueError("linear_probe: features must be [N, D] with one label per row")
    Cs = sorted(float(c) for c in Cs)
    iters, val_top1, test_top1 = [], {}, {}
    fit_idx, val_idx = _stratified_holdout(y_tr, val_fraction, seed)

    def top1(x, y, C, x_eval, y_eval):   # fit on (x, y), accuracy in % on (x_eval, y_eval)
        model, it = _fit(x, y, C, max_iter, tol)
        iters.append(it)
        return 100.0 * float((model.predict(x_eval) == y_eval).mean())
    for C in Cs:
        if val_idx is not None:
            val_top1[C] = top1(x_tr[fit_idx], y_tr[fit_idx], C, x_tr[val_idx], y_tr[val_idx])
        test_top1[C] = top1(x_tr, y_tr, C, x_te, y_te)
    # ties -> stronger regularisation
    chosen = max(Cs, key=lambda c: (val_top1[c], -c)) if val_top1 else Cs[len(Cs) // 2]
    selection = (f"best of {len(Cs)} on a stratified {val_fraction:.0%} held-out split of the labelled set"
                 if val_idx is not None else "default (too few labels per class to hold out)")
    return {"top1": test_top1[chosen], "C": chosen, "C_selection": selection, "val_top1": val_top1,
            "test_top1": test_top1, "n_train": len(y_tr), "n_test": len(y_te),
            "n_classes": int(max(y_tr.max(), y_te.max())) + 1, "dim": x_tr.shape[1],
            "converged": all(it < max_iter for it in iters), "max_iter": max_iter}


def raw_pixel_probe(train_images, train_labels, test_images, test_labels, **probe_kwargs) -> dict:
    """The raw-pixel baseline with the same probe: images flattened (uint8 or float, any shape
    ``[N, ...]``), then ``linear_probe``."""
    return linear_probe(train_images, train_labels, test_images, test_labels, **probe_kwargs)


# ----------------------------------------------------------------------------- k-NN
def knn(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07,
        vote: str = "weighted", batch_size: int = 1024) -> dict:
    """k-nearest-neighbour classification by cosine similarity (see the module doc)."""
    if vote not in ("weighted", "majority"):
        raise ValueError(f"vote {vote!r}: use 'weighted' or 'majority'")
    with torch.inference_mode():
        tr, te = (F.normalize(torch.as_tensor(f).float(), dim=1) for f in (train_feats, test_feats))
        y_tr, y_te = (torch.as_tensor(np.asarray(y)).long() for y in (train_labels, test_labels))
        n_classes = int(max(y_tr.max(), y_te.max())) + 1
        k = min(k, len(tr))
        correct = 0
        for start in range(0, len(te), batch_size):
            sim = te[start:start + batch_size] @ tr.T
            top, idx = sim.topk(k, dim=1)
            weights = (top / temperature).exp() if vote == "weighted" else torch.ones_like(top)
            scores = torch.zeros(len(sim), n_classes).scatter_add_(1, y_tr[idx], weights)
            correct += int((scores.argmax(1) == y_te[start:start + batch_size]).sum())
    return {"top1": 100.0 * correct / len(te), "k": k, "metric": "cosine", "vote": vote,
            "temperature": temperature if vote == "weighted" else None, "n_train": len(tr), "n_test": len(te)}


# ----------------------------------------------------------------------------- collapse
def collapse_stats(features) -> dict:
    """Diagnostics of representation collapse for features ``[N, D]`` (N >= 2): the training
    loop's statistics (``engine.diagnostics.collapse_stats``, in float64 here) plus
    * ``std_normalized``: the per-dim std of the L2-normalised rows (SimSiam's collapse monitor):
      about ``1/sqrt(D)`` (``std_normalized_healthy``) for isotropic zero-mean features, lower when
      a shared mean direction dominates, 0 when collapsed;
    * ``collapsed``: the per-dim std below 1 % of the feature RMS, or an effective rank below 2
      (0 when every row is the same).
    """
    from engine.diagnostics import collapse_stats as stats
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"collapse_stats: need features [N>=2, D], got {tuple(x.shape)}")
    n, d = x.shape
    s = {k: float(v) for k, v in stats(x).items()}
    if float(torch.linalg.svdvals(x - x.mean(0)).max()) <= 1e-9 * max(float(x.norm()), 1e-300):
        s["effective_rank"] = 0.0   # only rounding noise left after centring: all rows equal
    if s["rms"] == 0:
        s.update(std_relative=0.0, dead_fraction=1.0)
    reasons = [f"per-dim std is {s['std_relative']:.2g} of the feature RMS"] if s["std_relative"] < 1e-2 else []
    if s["effective_rank"] < 2:
        reasons.append(f"effective rank {s['effective_rank']:.2f}")
    return {"n": n, "dim": d, "rms": s["rms"], "std_mean": s["feature_std"], "std_relative": s["std_relative"],
            "std_normalized": float(F.normalize(x, dim=1).std(0, unbiased=False).mean()),
            "std_normalized_healthy": 1.0 / math.sqrt(d), "effective_rank": s["effective_rank"],
            "effective_rank_fraction": s["effective_rank"] / min(n, d), "dead_fraction": s["dead_fraction"],
            "collapsed": bool(reasons), "reason": "; ".join(reasons)}


# ----------------------------------------------------------------------------- data: Fashion-MNIST, image folders
def load_fmnist(split: str = "train", root: str = FMNIST_DIR):
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the official split (engine.data's reader;
    a missing or malformed file is a usage error here)."""
    return _load_fmnist(split, root)


def labelled_subset(labels: np.ndarray, n: Optional[int] = None, per_class: Optional[int] = None,
                    seed: int = LABEL_SEED) -> np.ndarray:
    """Indices of the labelled training images, in ``default_rng(seed).permutation(len(labels))``
    order: its first ``n``, or the first ``per_class`` of every class."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    if (n is None) == (per_class is None):
        raise ValueError("labelled_subset: give exactly one of n, per_class")
    if n is not None:
        if not 0 < n <= len(labels):
            raise UsageError(f"--labels {n}: must be between 1 and {len(labels)}")
        return perm[:n]
    counts = np.bincount(labels)
    if per_class <= 0 or per_class > counts.min():
        raise UsageError(f"--labels-per-class {per_class}: must be between 1 and {counts.min()} (the smallest class)")
    in_order = labels[perm]
    keep = np.concatenate([np.flatnonzero(in_order == c)[:per_class] for c in range(len(counts))])
    return perm[np.sort(keep)]


def fmnist_to_tensor(images: np.ndarray, crop_size: int, in_chans: int = 3) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> normalised float ``[N, in_chans, crop, crop]`` (the rule in the module doc)."""
    if in_chans not in (1, 3):
        raise UsageError(f"Fashion-MNIST gives 1 or 3 channels; the encoder takes {in_chans}")
    return normalize(fmnist_to_float(images, crop_size, in_chans), in_chans)


def fmnist_batches(images: np.ndarray, crop_size: int, in_chans: int, batch_size: int):
    """Normalised batches, converted on the fly (60k images at 224 px would not fit in memory)."""
    for start in range(0, len(images), batch_size):
        yield fmnist_to_tensor(images[start:start + batch_size], crop_size, in_chans)


def imagefolder_transform(crop_size: int, in_chans: int = 3):
    from torchvision import transforms
    grey = [transforms.Grayscale(1)] if in_chans == 1 else []
    mean, std = ((GREY_MEAN,), (GREY_STD,)) if grey else (IMAGENET_MEAN, IMAGENET_STD)
    return transforms.Compose([transforms.Resize(int(round(crop_size * 256 / 224))), transforms.CenterCrop(crop_size),
                               *grey, transforms.ToTensor(), transforms.Normalize(mean, std)])


def _imagefolder(root: str, split: str, crop_size: int, in_chans: int):
    from torchvision.datasets import ImageFolder
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f"imagefolder:{root}: no {split}/ subfolder (expected {root}/train and {root}/val "
                         f"with one folder per class)")
    try:
        return ImageFolder(folder, transform=imagefolder_transform(crop_size, in_chans))
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"{folder}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- evaluation driver
class EvalData:
    """Labelled training images and test images as re-iterable batch sources plus labels."""
    def __init__(self, name, train, train_labels, test, test_labels, description):
        self.name, self.train, self.train_labels = name, train, train_labels
        self.test, self.test_labels, self.description = test, test_labels, description


def load_eval_data(spec: str, crop_size: int, in_chans: int, labels: Optional[int] = None,
                   labels_per_class: Optional[int] = None, test_limit: Optional[int] = None,
                   batch_size: int = 256, workers: int = 2) -> EvalData:
    """``spec``: ``fmnist`` (or ``fmnist:DIR``) or ``imagefolder:PATH``. Default labelled set:
    1,000 images for Fashion-MNIST (the raw-pixel table's first row), all of ``train/`` for an
    image folder."""
    if spec == "fmnist" or spec.startswith("fmnist:"):
        root = spec.split(":", 1)[1] if ":" in spec else FMNIST_DIR
        (tr_img, tr_lbl), (te_img, te_lbl) = load_fmnist("train", root), load_fmnist("test", root)
        if labels is None and labels_per_class is None:
            labels = 1000
        idx = labelled_subset(tr_lbl, labels, labels_per_class)
        te_img, te_lbl = te_img[:test_limit or None], te_lbl[:test_limit or None]
        rule = (f"first {labels} of numpy.random.default_rng(0).permutation(60000)" if labels else
                f"first {labels_per_class} per class in numpy.random.default_rng(0).permutation(60000)")
        resize = ("28->32 zero pad" if crop_size == 32 else f"28->32 zero pad, resize to {crop_size}"
                  if crop_size < 32 else f"28->{crop_size} bilinear resize")
        norm = "ImageNet mean/std" if in_chans == 3 else "mean/std 0.5"
        test = "official t10k split" + (f", first {test_limit}" if test_limit else "")

        class _Source:   # re-iterable: the baseline encoder walks the same images again
            def __init__(self, imgs):
                self.imgs = imgs

            def __iter__(self):
                return fmnist_batches(self.imgs, crop_size, in_chans, batch_size)
        return EvalData("fmnist", _Source(tr_img[idx]), tr_lbl[idx], _Source(te_img), te_lbl,
                        {"labelled": rule, "test": test, "preprocess": f"{resize}, {in_chans} channel(s), {norm}",
                         "n_train": len(idx), "n_test": len(te_lbl)})
    if spec.startswith("imagefolder:"):
        from torch.utils.data import DataLoader, Subset
        root = spec.split(":", 1)[1]
        train_ds, test_ds = (_imagefolder(root, split, crop_size, in_chans) for split in ("train", "val"))
        targets = np.asarray(train_ds.targets, dtype=np.int64)
        if labels is None and labels_per_class is None:
            idx, rule = np.arange(len(targets)), "all of train/"
        else:
            idx = labelled_subset(targets, labels, labels_per_class)
            rule = (f"first {labels} of numpy.random.default_rng(0).permutation({len(targets)})" if labels else
                    f"first {labels_per_class} per class in numpy.random.default_rng(0).permutation")
        test_idx = np.arange(min(len(test_ds), test_limit) if test_limit else len(test_ds))
        if train_ds.classes != test_ds.classes:
            raise UsageError(f"imagefolder:{root}: train/ and val/ have different class folders")

        def loader(ds, ids):
            return DataLoader(Subset(ds, ids.tolist()), batch_size=batch_size, shuffle=False, num_workers=workers)
        test_labels = np.asarray(test_ds.targets, dtype=np.int64)[test_idx]
        return EvalData("imagefolder", loader(train_ds, idx), targets[idx], loader(test_ds, test_idx), test_labels,
                        {"root": root, "labelled": rule, "test": "val/", "n_train": len(idx), "n_test": len(test_idx),
                         "preprocess": f"resize {int(round(crop_size * 256 / 224))}, center crop {crop_size}, "
                                       f"ImageNet mean/std"})
    raise UsageError(f"--data {spec!r}: use fmnist, fmnist:DIR or imagefolder:PATH")


def evaluate_encoder(encoder, data: EvalData, protocol: str = "both", batch_size: int = 256,
                     knn_k: int = 20, pool: str = "mean") -> dict:
    """Features of ``data`` through ``encoder`` -> linear probe and/or k-NN on ``pool``-ed
    features (``pool_tokens``), collapse stats of the mean-pooled test features (the figure the
    training loop watches, whatever the probe's pooling)."""
    t0 = time.perf_counter()
    pools = ("mean",) if pool == "mean" else ("mean", pool)
    f_tr = extract_pooled(encoder, data.train, (pool,), batch_size)[pool]
    f_te = extract_pooled(encoder, data.test, pools, batch_size)
    out = {"extract_seconds": round(time.perf_counter() - t0, 2), "pool": pool}
    if protocol in ("linear", "both"):
        out["linear"] = linear_probe(f_tr, data.train_labels, f_te[pool], data.test_labels)
    if protocol in ("knn", "both"):
        out["knn"] = knn(f_tr, data.train_labels, f_te[pool], data.test_labels, k=knn_k)
    out["collapse"] = collapse_stats(f_te["mean"])
    return out


def evaluate(checkpoint: str, data: str = "fmnist", protocol: str = "both", labels: Optional[int] = None,
             labels_per_class: Optional[int] = None, encoder: str = "target", baseline: Optional[str] = None,
             device="cpu", batch_size: int = 256, test_limit: Optional[int] = None, num_heads: Optional[int] = None,
             knn_k: int = 20, seed: int = 0, workers: int = 2, log=print, pool: str = "mean") -> dict:
    """What ``ijepa eval`` does, as a function; returns the JSON-able result dict."""
    cells = parse_pool(pool)
    if protocol not in ("linear", "knn", "both"):
        raise UsageError(f"--protocol {protocol!r}: choose linear, knn or both")
    if baseline not in (None, "random"):
        raise UsageError(f"--baseline {baseline!r}: only 'random' is available")
    t0 = time.perf_counter()
    enc = load_encoder(checkpoint, encoder, device, num_heads)
    parse_pool(pool, enc.arch.grid ** 2)   # before any image is read
    ds = load_eval_data(data, enc.arch.img_size, enc.arch.in_chans, labels, labels_per_class, test_limit,
                        batch_size, workers)
    log(f"encoder: {enc.source['encoder']} of {checkpoint} ({enc.source['format']}; {enc.arch.describe()})")
    log(f"data: {ds.name}, {ds.description['n_train']} labelled ({ds.description['labelled']}), "
        f"{ds.description['n_test']} test; {ds.description['preprocess']}")
    features = ("mean of patch tokens" if pool == "mean" else
                f"patch grid cut into {cells}x{cells} cells, each averaged, concatenated")
    result = {"checkpoint": checkpoint, "format": enc.source["format"], "encoder": enc.source["encoder"],
              "arch": dataclasses.asdict(enc.arch), "data": dict(ds.description, name=data),
              "features": features + " after the final LayerNorm, fp32, no autocast",
              "device": str(next(enc.parameters()).device)}
    result.update(evaluate_encoder(enc, ds, protocol, batch_size, knn_k, pool))
    _log_results(log, "", result)
    if baseline == "random":
        base = result["baseline_random"] = {
            "seed": seed, "init": "reference init (trunc-normal 0.02, LayerNorm 1/0, sin-cos positions)",
            **evaluate_encoder(random_encoder_like(enc, seed), ds, protocol, batch_size, knn_k, pool)}
        _log_results(log, f"random-init encoder (seed {seed}) ", base)
        gain = {k: result[k]["top1"] - base[k]["top1"] for k in ("linear", "knn") if k in result}
        result["gain_over_random"] = gain
        log("gain over random init: " + ", ".join(f"{k} {v:+.2f} points" for k, v in gain.items()))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _log_results(log, prefix, r):
    if "linear" in r:
        lp = r["linear"]
        grid = ", ".join(f"{c:g}: {a:.1f}" for c, a in lp["test_top1"].items())
        log(f"{prefix}linear probe top-1: {lp['top1']:.2f} %  (C={lp['C']:g} chosen on held-out labels; "
            f"test top-1 per C: {grid}){'' if lp['converged'] else '  [L-BFGS hit max_iter]'}")
    if "knn" in r:
        k = r["knn"]
        log(f"{prefix}k-NN top-1: {k['top1']:.2f} %  (k={k['k']}, cosine, "
            f"{'exp(sim/%g)-weighted' % k['temperature'] if k['vote'] == 'weighted' else 'majority'} vote)")
    c = r["collapse"]
    log(f"{prefix}features: effective rank {c['effective_rank']:.1f} of {c['dim']}, per-dim std "
        f"{c['std_mean']:.3g} ({c['std_relative']:.2g} of RMS), {c['dead_fraction']:.0%} near-constant dims"
        + (f"  COLLAPSED: {c['reason']}" if c["collapsed"] else ""))


# ----------------------------------------------------------------------------- CLI
def add_parser(sub):
    p = sub.add_parser("eval", help="linear-probe / k-NN evaluation of a checkpoint's frozen encoder",
                       description="Frozen-encoder evaluation: pooled patch features (fp32) -> logistic-regression "
                                   "probe and/or cosine k-NN. Fashion-MNIST labelled images: the first N of "
                                   "numpy.random.default_rng(0).permutation(60000); test: the official 10k split.")
    p.add_argument("--checkpoint", required=True,
                   help="engine or reference .pth.tar, HF model directory or timm .safetensors")
    p.add_argument("--data", default="fmnist", help="fmnist (default), fmnist:DIR or imagefolder:PATH "
                                                    "(PATH/train and PATH/val)")
    p.add_argument("--protocol", default="both", choices=("linear", "knn", "both"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--labels", type=int,
                   help="labelled training images (default: 1000 for fmnist, all for imagefolder)")
    g.add_argument("--labels-per-class", type=int)
    p.add_argument("--encoder", default="target", choices=("target", "context"),
                   help="target (EMA, default, as in the paper) or context encoder")
    p.add_argument("--baseline", choices=("random",),
                   help="also evaluate a randomly initialised encoder of the same shape")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    p.add_argument("--test-limit", type=int,
                   help="evaluate on the first N test images only (quick checks; not comparable)")
    p.add_argument("--num-heads", type=int, help="attention heads, for widths that are not reference factory sizes")
    p.add_argument("--pool", default="mean", metavar="{mean,gridK}",
                   help="probe features: mean of the patch tokens (default, the paper's protocol) or gridK: "
                        "the patch grid cut into K x K cells, each averaged and concatenated (keeps layout)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline encoder")
    p.add_argument("--workers", type=int, default=2, help="image-folder decoding workers")
    p.set_defaults(func=_main)


def _main(args) -> int:
    for name in ("labels", "labels_per_class", "batch_size", "test_limit", "num_heads", "knn_k"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a positive integer")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"--device {args.device!r}: use cpu or cuda")
    result = evaluate(args.checkpoint, args.data, args.protocol, args.labels, args.labels_per_class,
                      args.encoder, args.baseline, args.device, args.batch_size, args.test_limit,
                      args.num_heads, args.knn_k, args.seed, args.workers, pool=args.pool)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")
    return 0
