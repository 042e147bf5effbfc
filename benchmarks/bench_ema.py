"""Benchmark the fused multi-tensor EMA against the PyTorch formulations.

The parameter list is a ViT encoder's (per block: qkv, proj, fc1, fc2 weights and biases,
two LayerNorms; plus patch embedding and final norm), fp32 target masters.

Providers:
  loop          the I-JEPA reference: per tensor t.mul_(m).add_((1-m)*s)
  foreach       torch._foreach_mul_ + torch._foreach_add_(alpha=1-m)
  foreach_lerp  torch._foreach_lerp_(t, s, 1-m) (timm ModelEmaV3)
  triton        kernels.ema.MultiTensorEMA (CUDA only; tables built once, as in training)
With a bf16 working copy, the torch paths add a torch._foreach_copy_ (or copy_ per tensor).

Minimal bytes per parameter: read + write the fp32 master (8), read the source (4 or 2),
write the low-precision copy (2 if any).

    python benchmarks/bench_ema.py [--model vit_s|vit_b|vit_l|vit_h] [--device ...] [--json OUT]
"""
from __future__ import annotations

import argparse

import _common as C
import torch

from kernels import ema as E

MODELS = {   # (depth, width, patch)
    "vit_t": (12, 192, 16), "vit_s": (12, 384, 16), "vit_b": (12, 768, 16),
    "vit_l": (24, 1024, 16), "vit_h": (32, 1280, 14),
}


def vit_param_shapes(depth: int, dim: int, patch: int) -> list[tuple[int, ...]]:
    shapes = [(dim, 3, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def make_params(shapes, src_dtype, lowp_dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    targets = [(torch.randn(s, generator=g) * 0.02).to(device) for s in shapes]
    sources = [(t + 1e-3 * torch.randn(s, generator=g).to(device)).to(src_dtype) for t, s in zip(targets, shapes)]
    lowp = [t.to(lowp_dtype) for t in targets] if lowp_dtype is not None else None
    return targets, sources, lowp


def providers(targets, sources, lowp, m, use_triton):
    def upcast():
        return sources if sources[0].dtype == torch.float32 else [s.float() for s in sources]

    def loop():
        E.ema_ref_(targets, sources, m, lowp)

    def foreach():
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, upcast(), alpha=1 - m)
        if lowp is not None:
            torch._foreach_copy_(lowp, targets)

    def foreach_lerp():
        E.ema_foreach_(targets, sources, m, lowp)

    fns = dict(loop=loop, foreach=foreach, foreach_lerp=foreach_lerp)
    if use_triton:
        plan = E.MultiTensorEMA(targets, sources, lowp)
        m_dev = torch.tensor(m, dtype=torch.float64, device=targets[0].device)
        fns["triton"] = lambda: plan(m)
        fns["triton (device m)"] = lambda: plan(m_dev)
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), help="default vit_h on CUDA, vit_s on CPU")
    parser.add_argument("--momentum", type=float, default=0.996)
    C.add_common_args(parser)
    args = parser.parse_args(argv)
    device, info, use_triton = C.setup(args)
    model = args.model or ("vit_h" if device.type == "cuda" else "vit_s")
    copy_gbs = C.copy_bandwidth_gbs(device, repeats=args.repeats)
    shapes = vit_param_shapes(*MODELS[model])
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s; {model}: {len(shapes)} tensors, "
          f"{numel / 1e6:.1f} M params, momentum {args.momentum}\n")

    rows = []
    with torch.no_grad():
        for src_dtype, lowp_dtype in ((torch.float32, None), (torch.bfloat16, torch.bfloat16)):
            targets, sources, lowp = make_params(shapes, src_dtype, lowp_dtype, device)
            label = f"fp32 master <- {str(src_dtype)[6:]} online" + (" + bf16 copy" if lowp_dtype else "")
            per_param = 8 + sources[0].element_size() + (2 if lowp_dtype else 0)
            for provider, fn in providers(targets, sources, lowp, args.momentum, use_triton).items():
                row = dict(case=label, model=model, provider=provider, tensors=len(shapes), params=numel,
                           ms=C.median_ms(fn, device, args.repeats))
                rows.append(C.add_bandwidth(row, per_param * numel, copy_gbs))
            del targets, sources, lowp
    C.print_table(rows, [("case", "case", "s"), ("provider", "provider", "s"), ("ms", "median ms", ".2f"),
                         ("gb_per_s", "GB/s (min bytes)", ".1f"), ("frac_of_copy", "of copy BW", ".0%")])
    C.write_json(args.json, info, rows, copy_gb_per_s=copy_gbs)


if __name__ == "__main__":
    main()
