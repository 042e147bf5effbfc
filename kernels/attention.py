"""Attention entry point (placeholder: PyTorch backends only; the Triton kernel lands separately)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import select

_ALLOWED = ("triton", "xformers", "sdpa", "naive")


def attention_backend(device, backend: str = "auto") -> str:
    return select("attention", backend, torch.device(device), ("sdpa",), _ALLOWED)


def attention_naive(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn.softmax(dim=-1) @ v


def attention(q, k, v, cu_seqlens=None, max_seqlen=None, backend="auto", scale=None):
    if cu_seqlens is not None:
        raise NotImplementedError("packed attention arrives with the Triton attention kernel")
    b = attention_backend(q.device, backend)
    if b == "naive":
        return attention_naive(q, k, v, scale)
    if b == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    raise NotImplementedError(b)
