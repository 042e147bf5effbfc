"""``ijepa demo``: pretrain on real Fashion-MNIST on the CPU, then show what was learned.

Trains ``configs/fmnist_vit_tiny.yaml`` (bounded by ``train.max_minutes``), then, when the
evaluation module is present, a linear probe with 1,000 labels on the official test split
comparing the pretrained encoder, a randomly initialised one and raw pixels.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "fmnist_vit_tiny.yaml")


def add_parser(sub):
    p = sub.add_parser("demo", help="pretrain on Fashion-MNIST on the CPU and evaluate (the `make demo` job)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config (default: configs/fmnist_vit_tiny.yaml)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="change a config value")
    p.add_argument("--out", default=None, help="run folder (default: logging.folder of the config)")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.config import IJEPAConfig
    from engine.train import train
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    overrides = list(args.override)
    if args.out:
        overrides.append(f"logging.folder={args.out}")
    cfg = IJEPAConfig.from_yaml(args.config, overrides)
    print(f"ijepa demo: pretraining {cfg.meta.model_name} (depth {cfg.arch['depth']}) on Fashion-MNIST, "
          f"{cfg.precision}, up to {cfg.train.max_minutes} min", flush=True)
    out = train(cfg)
    losses = out["losses"]
    print(f"\npretraining: {out['steps']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f} ({out['stop_reason']})")
    print(f"checkpoint: {out['checkpoint']}\nlog:        {out['csv']}")
    return 0
