"""Masked-token gather (placeholder: PyTorch reference only; the Triton kernel lands separately)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_tokens_ref(x, masks, pos=None):
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    outs = []
    for m in masks:
        g = None
        if x is not None:
            g = torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        if pos is not None:
            p = pos.reshape(-1, pos.shape[-1])[m]
            g = p if g is None else g + p
        outs.append(g)
    return torch.cat(outs, dim=0)


def gather_layernorm_ref(h, masks, eps=1e-5):
    return gather_tokens_ref(F.layer_norm(h, (h.size(-1),), eps=eps), masks)


def gather_tokens(x, masks, pos=None, backend="auto"):
    return gather_tokens_ref(x, masks, pos)


def gather_layernorm(h, masks, eps=1e-5, backend="auto"):
    return gather_layernorm_ref(h, masks, eps)
