"""Collapse diagnostics: is the representation still carrying information?

A falling I-JEPA loss proves nothing by itself: predictor and target encoder can agree on
nearly constant features (the loss then goes to ~1e-3 while a linear probe gets worse than a
random encoder; see benchmarks/RESULTS.md). These statistics are computed from tensors the
training step already has (targets ``h`` and predictions ``z``), with no extra forward pass.
"""
from __future__ import annotations

import torch

# Thresholds, set from the Fashion-MNIST runs recorded in benchmarks/RESULTS.md (batch 128, 4 target
# blocks = 512 pooled rows): the collapsed lr 2e-3 reference-recipe run has a target std ~0.004; the
# one run whose probe fell far below a random encoder (paper masks + centred targets, 55 % vs 72.5 %)
# ended at an effective rank of 5.4, every other run stayed at >= 7.8. A rank threshold only means
# something against the number of rows, so for small batches it is capped at rows / 8.
MIN_FEATURE_STD = 0.05      # mean over dims of the per-dim std across the batch (targets are LayerNormed: ~1 healthy)
MIN_EFFECTIVE_RANK = 6.0    # of the batch's pooled target features


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the normalised singular values of the centred rows of ``x`` [n, D]
    (Roy & Vetterli 2007): 1 for rank-one data, D for isotropic data."""
    x = x.float()
    finite = torch.isfinite(x).all()
    x = torch.where(torch.isfinite(x), x, 0.0)   # SVD fails on NaN; report NaN instead (no host sync)
    x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    r = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return torch.where(finite, r, torch.full_like(r, float("nan")))


DIAG_KEYS = ("target_std", "target_erank", "pred_std")


@torch.no_grad()
def collapse_stats(features: torch.Tensor) -> dict:
    """``features`` [n, D] (one row per image or per sequence), as device tensors: the per-dim std
    across rows (``feature_std``, mean over dims; ``std_relative``: divided by the features' RMS,
    scale-free), the effective rank, and the fraction of dims whose std is below 1 % of the RMS
    (``dead_fraction``). ``ijepa eval`` reports the same figures for the evaluation features."""
    f = features.float()
    std = f.std(0, unbiased=False)
    rms = f.pow(2).mean().sqrt()
    return {"feature_std": std.mean(), "std_relative": std.mean() / rms.clamp_min(1e-30),
            "effective_rank": effective_rank(f), "dead_fraction": (std < 1e-2 * rms).float().mean(), "rms": rms}


@torch.no_grad()
def step_stats(z: torch.Tensor, h: torch.Tensor) -> dict:
    """What one step keeps for the diagnostics, on the device: its token-pooled (packed: per-token)
    targets and the predictor's output std. ``summarise`` turns them into the statistics when the
    logging window is read, so the step itself runs no SVD."""
    pooled = h.float().mean(1) if h.dim() == 3 else h.float()
    return {"pooled": pooled, "pred_std": z.float().std(0).mean(), "target_rows": min(pooled.shape)}


@torch.no_grad()
def summarise(kept: dict) -> dict:
    """``target_std``, ``target_erank``, ``pred_std`` (device tensors) from ``step_stats``."""
    t = collapse_stats(kept["pooled"])
    return {"target_std": t["feature_std"], "target_erank": t["effective_rank"], "pred_std": kept["pred_std"]}


def warnings_for(stats: dict) -> list[str]:
    """Human-readable warnings for values below the thresholds (host floats expected)."""
    out = []
    if stats.get("target_std", 1.0) < MIN_FEATURE_STD:
        out.append(f"target features nearly constant across images (std {stats['target_std']:.3g} < "
                   f"{MIN_FEATURE_STD}): representation collapse")
    min_rank = min(MIN_EFFECTIVE_RANK, stats.get("target_rows", 1e9) / 8)
    if stats.get("target_erank", 1e9) < min_rank:
        out.append(f"effective rank of target features {stats['target_erank']:.2f} < {min_rank:g}: "
                   f"representation collapse")
    return out
