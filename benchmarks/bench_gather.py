"""Benchmark the fused masked-token gather against the PyTorch formulations.

Shapes are I-JEPA ViT-H/14 at 224 px (N = 256 patches, encoder width 1280, predictor width
384): one context mask of K = 69 tokens and four target masks of K = 44 tokens each.

Providers:
  ref           the I-JEPA reference: index repeated over D, torch.gather per mask, torch.cat
  index_select  one index_select over the flattened [B*N, D] tokens for all masks
  triton        kernels.gather (CUDA only); fwd+bwd also with the atomic backward

GB/s counts the minimal bytes each case must move (documented per case) over the median
time; "of copy" divides by the measured device copy bandwidth.

    python benchmarks/bench_gather.py [--batch B] [--device auto|cpu|cuda] [--json OUT]
"""
from __future__ import annotations

import argparse

import _common as C
import torch
import torch.nn.functional as F

from kernels import gather as G


def index_select_gather(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src [B, N, D], idx [M, B, K] -> [M*B, K, D] with one flat index_select."""
    M, B, K = idx.shape
    N, D = src.shape[1], src.shape[2]
    flat = (idx + torch.arange(B, device=idx.device).view(1, B, 1) * N).reshape(-1)
    return src.reshape(B * N, D).index_select(0, flat).view(M * B, K, D)


def make_case(B, N, D, M, K, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # I-JEPA masks hold distinct tokens per row; sorted like the collator's output.
    idx = torch.stack([torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)])
                       for _ in range(M)]).to(device)
    return idx


def cases(B: int):
    N, D_enc, D_pred = 256, 1280, 384
    ctx, tgt = (1, 69), (4, 44)
    return [
        # name, kind, (N, D, M, K), x dtype, pos dtype
        ("context gather x bf16", "gather", (N, D_enc) + ctx, torch.bfloat16, None),
        ("context gather x bf16 + pos fp32", "gather_pos", (N, D_enc) + ctx, torch.bfloat16, torch.float32),
        ("targets layernorm+gather h fp32", "layernorm", (N, D_enc) + tgt, torch.float32, None),
        ("predictor pos-only gather fp32", "pos_only", (N, D_pred) + tgt, None, torch.float32),
        ("context gather fwd+bwd fp32", "fwd_bwd", (N, D_enc) + ctx, torch.float32, None),
    ]


def minimal_bytes(kind, B, N, D, M, K, x_dt, pos_dt):
    rows = M * B * K
    es = lambda dt: torch.empty((), dtype=dt).element_size()   # noqa: E731
    out_es = es(x_dt if pos_dt is None else (pos_dt if x_dt is None else torch.promote_types(x_dt, pos_dt)))
    idx_bytes = rows * 8
    if kind == "pos_only":
        return N * D * es(pos_dt) + rows * D * out_es + idx_bytes
    read = rows * D * es(x_dt)
    total = read + rows * D * out_es + idx_bytes
    if kind == "gather_pos":
        total += N * D * es(pos_dt)                       # the table once (it stays in L2)
    if kind == "fwd_bwd":
        total += rows * D * out_es + B * N * D * es(x_dt) + idx_bytes   # read grad, write dx
    return total


def providers(kind, x, pos, h, idx, masks, use_triton):
    fns = {}
    if kind == "gather":
        fns["ref"] = lambda: G.gather_tokens_ref(x, masks)
        fns["index_select"] = lambda: index_select_gather(x, idx)
        if use_triton:
            fns["triton"] = lambda: G.gather_tokens(x, idx, backend="triton")
    elif kind == "gather_pos":
        fns["ref"] = lambda: G.gather_tokens_ref(x, masks, pos)
        fns["index_select"] = lambda: index_select_gather(x, idx) + pos.index_select(0, idx.reshape(-1)).view(
            -1, idx.shape[2], pos.shape[1])
        if use_triton:
            fns["triton"] = lambda: G.gather_tokens(x, idx, pos, backend="triton")
    elif kind == "layernorm":
        fns["ref"] = lambda: G.gather_layernorm_ref(h, masks)
        fns["index_select"] = lambda: F.layer_norm(index_select_gather(h, idx), (h.shape[-1],))
        if use_triton:
            fns["triton"] = lambda: G.gather_layernorm(h, idx, backend="triton")
    elif kind == "pos_only":
        fns["ref"] = lambda: G.gather_tokens_ref(None, masks, pos)
        fns["index_select"] = lambda: pos.index_select(0, idx.reshape(-1)).view(-1, idx.shape[2], pos.shape[1])
        if use_triton:
            fns["triton"] = lambda: G.gather_tokens(None, idx, pos, backend="triton")
    elif kind == "fwd_bwd":
        def run(forward):
            out = forward()
            (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
            return grad
        fns["ref"] = lambda: run(lambda: G.gather_tokens_ref(x, masks))
        fns["index_select"] = lambda: run(lambda: index_select_gather(x, idx))
        if use_triton:
            fns["triton sorted"] = lambda: run(lambda: G.gather_tokens(x, idx, backend="triton", deterministic=True))
            fns["triton atomic"] = lambda: run(lambda: G.gather_tokens(x, idx, backend="triton", deterministic=False))
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, help="batch size (default 128 on CUDA, 16 on CPU)")
    C.add_common_args(parser)
    args = parser.parse_args(argv)
    device, info, use_triton = C.setup(args)
    B = args.batch or (128 if device.type == "cuda" else 16)
    copy_gbs = C.copy_bandwidth_gbs(device, repeats=args.repeats)
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s; batch {B}\n")

    rows = []
    for name, kind, (N, D, M, K), x_dt, pos_dt in cases(B):
        g = torch.Generator(device="cpu").manual_seed(1)
        idx = make_case(B, N, D, M, K, device)
        masks = list(idx.unbind(0))
        x = torch.randn(B, N, D, generator=g).to(device, x_dt) if x_dt is not None and kind != "layernorm" else None
        h = torch.randn(B, N, D, generator=g).to(device, x_dt) if kind == "layernorm" else None
        pos = torch.randn(N, D, generator=g).to(device, pos_dt) if pos_dt is not None else None
        if kind == "fwd_bwd":
            x.requires_grad_()
        grad_ctx = torch.enable_grad() if kind == "fwd_bwd" else torch.no_grad()
        with grad_ctx:
            for provider, fn in providers(kind, x, pos, h, idx, masks, use_triton).items():
                row = dict(case=name, provider=provider, B=B, N=N, D=D, M=M, K=K,
                           ms=C.median_ms(fn, device, args.repeats))
                rows.append(C.add_bandwidth(row, minimal_bytes(kind, B, N, D, M, K, x_dt, pos_dt), copy_gbs))
    C.print_table(rows, [("case", "case", "s"), ("provider", "provider", "s"), ("ms", "median ms", ".3f"),
                         ("gb_per_s", "GB/s (min bytes)", ".1f"), ("frac_of_copy", "of copy BW", ".0%")])
    C.write_json(args.json, info, rows, copy_gb_per_s=copy_gbs)


if __name__ == "__main__":
    main()
