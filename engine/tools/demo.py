"""``ijepa demo``: pretrain on real Fashion-MNIST on the CPU, then show what was learned.

1. Pretrain ``configs/fmnist_vit_tiny.yaml`` (bounded by ``train.max_minutes``).
2. Linear probe with 1,000 labels (the first 1,000 of ``default_rng(0).permutation(60000)``) on
   the official 10k test split: the pretrained target encoder, a randomly initialised encoder of
   the same shape, and raw pixels, with the collapse figures of each. Two poolings of the
   encoders' patch tokens (``engine.tools.eval.pool_tokens``): the paper's mean over all tokens, and
   the 8x8 grid cut into 2x2 cells (4 x width features), which keeps the garment's layout that
   a mean over positions averages away.
3. Print the table, write ``demo.json`` and ``demo.png`` (loss curve + table) next to the checkpoint.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "fmnist_vit_tiny.yaml")
RAW_PIXEL_DOC = 80.1   # ../shared/docs/datasets.md: StandardScaler + LogisticRegression, 1,000 labels
POOLS = ("mean", "grid2")
POOL_TITLES = {"mean": "mean-pooled", "grid2": "2x2 grid"}


def add_parser(sub):
    p = sub.add_parser("demo", help="pretrain on Fashion-MNIST on the CPU and evaluate (the `make demo` job)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config (default: configs/fmnist_vit_tiny.yaml)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="change a config value")
    p.add_argument("--out", default=None, help="run folder (default: logging.folder of the config)")
    p.add_argument("--labels", type=int, default=1000, help="labelled training images for the probe (default 1000)")
    p.add_argument("--skip-train", action="store_true", help="evaluate the run folder's checkpoint without training")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from engine.tools import eval as ev
    from engine.config import IJEPAConfig
    from engine.tools.plots import save_line_plot, save_table_png
    from engine.train import train
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    cfg = IJEPAConfig.from_yaml(args.config, list(args.override) + ([f"logging.folder={args.out}"] if args.out else []))
    folder = cfg.logging.folder
    t0 = time.time()
    if not args.skip_train:
        print(f"ijepa demo: pretraining {cfg.meta.model_name} (width {cfg.arch['embed_dim']}, depth "
              f"{cfg.arch['depth']}) on Fashion-MNIST, {cfg.precision}, masks '{cfg.mask.mode}', "
              f"up to {cfg.train.max_minutes} min", flush=True)
        out = train(cfg)
        print(f"\npretraining: {out['steps']} steps in {(time.time() - t0) / 60:.1f} min, loss "
              f"{out['losses'][0]:.4f} -> {out['losses'][-1]:.4f} ({out['stop_reason']})", flush=True)
    ckpt = os.path.join(folder, f"{cfg.logging.write_tag}-latest.pth.tar")
    losses = _losses_from_csv(os.path.join(folder, f"{cfg.logging.write_tag}_r0.csv"))

    print(f"linear probe: {args.labels} labels, Fashion-MNIST test split (10,000 images)", flush=True)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    enc = ev.load_encoder(ckpt, "target")
    data = ev.load_eval_data("fmnist", enc.arch.img_size, enc.arch.in_chans, labels=args.labels)
    rows = []
    for name, encoder in (("pretrained (target encoder)", enc),
                          ("random init, same shape", ev.random_encoder_like(enc, 0))):
        f_tr, f_te = (ev.extract_pooled(encoder, images, POOLS) for images in (data.train, data.test))
        top1 = {pool: ev.linear_probe(f_tr[pool], data.train_labels, f_te[pool], data.test_labels)["top1"]
                for pool in POOLS}
        c = ev.collapse_stats(f_te["mean"])
        rows.append({"encoder": name, "top1": top1, "effective_rank": c["effective_rank"],
                     "feature_std": c["std_relative"], "collapsed": c["collapsed"]})
    (tr_img, tr_lbl), (te_img, te_lbl) = ev.load_fmnist("train"), ev.load_fmnist("test")
    idx = ev.labelled_subset(tr_lbl, n=args.labels)
    raw = ev.raw_pixel_probe(tr_img[idx], tr_lbl[idx], te_img, te_lbl)
    rows.append({"encoder": "raw pixels", "top1": {pool: raw["top1"] for pool in POOLS}, "effective_rank": None,
                 "feature_std": None, "collapsed": None})

    gain = {pool: rows[0]["top1"][pool] - rows[1]["top1"][pool] for pool in POOLS}
    table = [["encoder"] + [f"top-1 % {POOL_TITLES[p]}" for p in POOLS] + ["eff. rank", "rel. std", "collapse"]]
    for r in rows:
        table.append([r["encoder"]] + [f"{r['top1'][p]:.1f}" for p in POOLS] + [
                      "-" if r["effective_rank"] is None else f"{r['effective_rank']:.1f}",
                      "-" if r["feature_std"] is None else f"{r['feature_std']:.3f}",
                      {None: "-", True: "YES", False: "no"}[r["collapsed"]]])
    print()
    widths = [max(map(len, column)) for column in zip(*table)]
    for row in [table[0], ["-" * w for w in widths], *table[1:]]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print("\npretraining gain over random init: " + ", ".join(f"{gain[p]:+.1f} points {POOL_TITLES[p]}" for p in POOLS)
          + f"; raw pixels (documented): {RAW_PIXEL_DOC} %")
    result = {"config": args.config, "checkpoint": ckpt, "labels": args.labels, "pools": list(POOLS), "rows": rows,
              "gain_over_random": gain, "minutes": (time.time() - t0) / 60, "losses": losses}
    with open(os.path.join(folder, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    if losses:
        save_line_plot(os.path.join(folder, "demo_loss.png"), {"train loss": (list(range(1, len(losses) + 1)), losses)},
                       title="I-JEPA pretraining on Fashion-MNIST (CPU)", xlabel="step", ylabel="smooth-L1 loss")
    save_table_png(os.path.join(folder, "demo.png"), table,
                   title=f"Linear probe, {args.labels} labels, Fashion-MNIST test")
    print(f"wrote {folder}/demo.json, demo.png, demo_loss.png; checkpoint {ckpt}")
    return 0


def _losses_from_csv(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
