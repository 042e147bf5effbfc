"""A tiny engine checkpoint in the engine's file format (the reference's keys + ``engine``, laid
out as ``engine.checkpoint.build_state`` writes it),
shared by the evaluation and conversion tests. Width 48 is deliberately not a reference factory
size, so nothing can fall back to a factory head count by accident."""
import torch

import engine
from engine.config import IJEPAConfig
from engine.model import build_model

TINY = {"meta": {"model_name": "vit_tiny", "pred_depth": 1, "pred_emb_dim": 24},
        "model": {"embed_dim": 48, "depth": 2, "num_heads": 3},
        "data": {"crop_size": 32, "dataset": "synthetic", "batch_size": 4},
        "mask": {"patch_size": 4, "min_keep": 4}}


def tiny_config() -> IJEPAConfig:
    return IJEPAConfig.from_dict(TINY, validate=False)


def make_engine_checkpoint(path, seed=0):
    """Two optimizer steps and an EMA update, so the encoder, the target encoder and the AdamW
    state are all distinct, non-trivial tensors."""
    cfg = tiny_config()
    cfg.train.seed = seed
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 32, generator=g)
    masks_enc = [torch.arange(20).repeat(2, 1)]
    masks_pred = [torch.arange(40, 50).repeat(2, 1)]
    for _ in range(2):
        loss = model(images, masks_enc, masks_pred)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target(0.5)
    ckpt = {**model.reference_state_dict(), "opt": opt.state_dict(), "scaler": None, "epoch": 1,
            "loss": float(loss.detach()), "batch_size": 4, "world_size": 1, "lr": 1e-2,
            "engine": {"format": 1, "version": engine.__version__, "config": cfg.to_dict(), "step": 2, "epoch": 1,
                       "batch_in_epoch": 0, "sampler": {"epoch": 1, "counter": 7}, "rng_cpu": torch.get_rng_state(),
                       "rng_cuda": []}}
    torch.save(ckpt, path)
    return ckpt


def assert_same(a, b, where="checkpoint"):
    """Recursive bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b or {})}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
