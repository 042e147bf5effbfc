"""Fused EMA (placeholder: PyTorch reference only; the Triton kernel lands separately)."""
from __future__ import annotations

import torch


@torch.no_grad()
def ema_ref_(targets, sources, momentum):
    m = float(momentum)
    torch._foreach_mul_(targets, m)
    torch._foreach_add_(targets, torch._foreach_mul(sources, 1.0 - m))


@torch.no_grad()
def fused_ema_(targets, sources, momentum, targets_lowp=None, backend="auto"):
    ema_ref_(targets, sources, momentum)
    if targets_lowp is not None:
        torch._foreach_copy_(targets_lowp, targets)
