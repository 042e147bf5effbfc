"""Analytic FLOP model of one I-JEPA training step, per image and per phase.

Counts model FLOPs the way nanoGPT's ``estimate_mfu`` does: 2 FLOPs per multiply-add of
every matmul, elementwise work (LayerNorm, GELU, softmax, residuals, the EMA, AdamW)
ignored, backward = 2x forward (input grads + weight grads), no recompute. What is
counted is what the *reference* computes, so the MFU of two implementations of the same
config is comparable even when one of them skips work (the engine's predictor does).

Per image, with ``N`` patches, ``K_ctx`` context and ``K_pred`` target tokens per block,
``nenc`` context blocks and ``npred`` target blocks:

* target encoder forward on all ``N`` tokens (no backward: it is updated by EMA);
* context encoder forward + backward on ``nenc`` sequences of ``K_ctx`` tokens. The patch
  embedding runs on all ``N`` patches before the masked gather (the reference embeds the
  whole image, then gathers), and its backward only needs the weight gradient (the
  images do not require grad), so it is 1x, not 2x, its forward;
* predictor forward + backward on ``npred * nenc`` sequences of ``K_ctx + K_pred`` tokens;
  ``predictor_embed`` runs once per context token (before the sequences are tiled),
  ``predictor_proj`` only on the ``K_pred`` query tokens.

Per transformer layer and token of a length-``n`` sequence of width ``D`` and MLP ratio
``r``: linears (qkv, proj, fc1, fc2) ``2 * (4 + 2r) * D^2``; attention matmuls
(``QK^T`` and ``AV``) ``4 * n * D``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Dense bf16 tensor-core peaks (vendor data sheets, without sparsity), TFLOP/s, matched against
# torch.cuda.get_device_name(). A100 40 GB and 80 GB, SXM and PCIe, share one figure; the H100 and
# H200 PCIe/NVL boards run at lower clocks than the SXM parts. A device not listed gets no MFU
# unless a peak is given (``--peak-tflops``).
PEAK_TFLOPS_BF16 = {"A100": 312.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
                    "H200 NVL": 835.0}

# The reference's published speed (I-JEPA paper abstract: ViT-H/14 on ImageNet-1K,
# 300 epochs, 16 A100 GPUs, under 72 hours); see docs/anchors.md section 2a.
PAPER_RUN = dict(images=1_281_167, epochs=300, gpus=16, hours=72.0, device="A100")


def device_peak_tflops(name: str | None) -> float | None:
    """Dense bf16 peak for a CUDA device name (``NVIDIA H100 80GB HBM3`` is the SXM part, ``NVIDIA
    H100 PCIe``, ``NVIDIA H100 NVL``, ``NVIDIA H200`` ...), or None when it is not in the table."""
    up = (name or "").upper()
    for family, sxm in (("H200", "H200"), ("H100", "H100 SXM")):
        if family in up:
            variant = "NVL" if "NVL" in up else "PCIe" if "PCIE" in up else None
            return PEAK_TFLOPS_BF16.get(f"{family} {variant}") if variant else PEAK_TFLOPS_BF16[sxm]
    return PEAK_TFLOPS_BF16["A100"] if "A100" in up else None


@dataclass
class Part:
    """FLOPs of one phase per image, split by kind."""
    linear: float = 0.0       # Linear layers (incl. predictor embed/proj)
    attention: float = 0.0    # QK^T and AV matmuls
    patch: float = 0.0        # patch-embedding conv

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.patch

    def scaled(self, k: float) -> "Part":
        return Part(self.linear * k, self.attention * k, self.patch * k)

    def __add__(self, o: "Part") -> "Part":
        return Part(self.linear + o.linear, self.attention + o.attention, self.patch + o.patch)


@dataclass
class StepFlops:
    """Per-image FLOPs of one training step, by phase (forward and backward separately)."""
    parts: dict = field(default_factory=dict)   # name -> Part
    tokens: dict = field(default_factory=dict)  # the token counts used

    @property
    def total(self) -> float:
        return sum(p.total for p in self.parts.values())

    def group(self) -> dict:
        p = self.parts
        return {"target encoder fwd": p["target_fwd"].total,
                "context encoder fwd+bwd": p["context_fwd"].total + p["context_bwd"].total,
                "predictor fwd+bwd": p["predictor_fwd"].total + p["predictor_bwd"].total}

    def split(self) -> dict:
        return asdict(sum(self.parts.values(), Part()))

    def to_dict(self) -> dict:
        return {"per_image_flops": self.total, "tokens": dict(self.tokens),
                "phases": {k: asdict(v) | {"total": v.total} for k, v in self.parts.items()},
                "groups": self.group(), "split": self.split()}


def _layers(tokens_per_seq: float, seqs: float, dim: int, depth: int, mlp_ratio: float) -> Part:
    lin = seqs * tokens_per_seq * depth * 2.0 * (4.0 + 2.0 * mlp_ratio) * dim * dim
    att = seqs * depth * 4.0 * tokens_per_seq * tokens_per_seq * dim
    return Part(linear=lin, attention=att)


def step_flops(*, num_patches: int, in_chans: int, patch_size: int, embed_dim: int, depth: int,
               mlp_ratio: float, pred_dim: int, pred_depth: int, k_ctx: float, k_pred: float,
               nenc: int = 1, npred: int = 4, pred_mlp_ratio: float = 4.0) -> StepFlops:
    """Per-image FLOPs of one step of the reference's computation (see the module docstring)."""
    N, D, Dp = num_patches, embed_dim, pred_dim
    patch_fwd = Part(patch=2.0 * N * in_chans * patch_size * patch_size * D)
    target = patch_fwd + _layers(N, 1, D, depth, mlp_ratio)
    ctx_layers = _layers(k_ctx, nenc, D, depth, mlp_ratio)
    ctx_fwd = patch_fwd + ctx_layers
    ctx_bwd = patch_fwd + ctx_layers.scaled(2.0)   # conv: weight grad only
    seqs = npred * nenc
    pred = _layers(k_ctx + k_pred, seqs, Dp, pred_depth, pred_mlp_ratio)
    pred.linear += nenc * k_ctx * 2.0 * D * Dp        # predictor_embed, before tiling
    pred.linear += seqs * k_pred * 2.0 * Dp * D       # predictor_proj, query tokens only
    return StepFlops(parts={"target_fwd": target, "context_fwd": ctx_fwd, "context_bwd": ctx_bwd,
                            "predictor_fwd": pred, "predictor_bwd": pred.scaled(2.0)},
                     tokens={"N": N, "K_ctx": k_ctx, "K_pred": k_pred, "nenc": nenc, "npred": npred})


def sample_masks(cfg, batch: int, n: int, seed: int = 0) -> list:
    """``n`` batches of (masks_enc, masks_pred). Reference-mode placement draws from the global
    RNG, so it is seeded here and restored afterwards (the same masks in every process)."""
    import torch

    from engine.masks import MultiBlockMaskSampler
    sampler = MultiBlockMaskSampler.from_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [sampler(batch) for _ in range(n)]


def expected_tokens(cfg, batch_size: int | None = None, batches: int = 32, seed: int = 0) -> tuple[float, float]:
    """Mean (K_ctx, K_pred) after the batch-minimum truncation, by sampling the mask sampler. K depends on
    the batch size (every mask is cut to the batch's shortest), so sample with the batch size that will run."""
    masks = sample_masks(cfg, batch_size or cfg.data.batch_size, batches, seed)
    return sum(enc[0].shape[1] for enc, _ in masks) / batches, sum(pred[0].shape[1] for _, pred in masks) / batches


def flops_from_config(cfg, k_ctx: float | None = None, k_pred: float | None = None,
                      batch_size: int | None = None, batches: int = 32) -> StepFlops:
    """``step_flops`` for an ``IJEPAConfig``; token counts sampled unless both are given."""
    if k_ctx is None or k_pred is None:
        sc, sp = expected_tokens(cfg, batch_size, batches)
        k_ctx, k_pred = (sc if k_ctx is None else k_ctx), (sp if k_pred is None else k_pred)
    a = cfg.arch
    return step_flops(num_patches=cfg.grid ** 2, in_chans=cfg.data.in_chans, patch_size=cfg.mask.patch_size,
                      embed_dim=a["embed_dim"], depth=a["depth"], mlp_ratio=a["mlp_ratio"],
                      pred_dim=cfg.meta.pred_emb_dim, pred_depth=cfg.meta.pred_depth,
                      k_ctx=k_ctx, k_pred=k_pred, nenc=cfg.mask.num_enc_masks, npred=cfg.mask.num_pred_masks)


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float | None) -> float | None:
    return flops_per_image * images_per_s / (peak_tflops * 1e12) if peak_tflops and images_per_s else None


def paper_reference_figure(flops_per_image: float) -> dict:
    """The reference's derived speed and MFU from the paper's wall-clock claim, with the arithmetic."""
    r = PAPER_RUN
    samples = r["images"] * r["epochs"]
    ips = samples / (r["gpus"] * r["hours"] * 3600.0)
    peak = PEAK_TFLOPS_BF16[r["device"]]
    achieved = flops_per_image * ips
    return {
        "images_per_s_per_gpu": ips, "tflops_per_gpu": achieved / 1e12, "peak_tflops": peak,
        "mfu": achieved / (peak * 1e12), "flops_per_image": flops_per_image,
        "arithmetic": [
            f"{r['images']:,} images x {r['epochs']} epochs = {samples / 1e6:.2f} M samples",
            f"{samples / 1e6:.2f} M / ({r['gpus']} GPUs x {r['hours']:.0f} h x 3600 s) = {ips:.1f} images/s per "
            f"{r['device']} (a lower bound: the paper says 'under 72 hours')",
            f"{ips:.1f} images/s x {flops_per_image / 1e9:.0f} GFLOP/image = {achieved / 1e12:.1f} TFLOP/s",
            f"{achieved / 1e12:.1f} / {peak:.0f} TFLOP/s ({r['device']} bf16 dense peak) = "
            f"{100 * achieved / (peak * 1e12):.1f} % MFU",
        ],
    }


def is_paper_vith14(cfg) -> bool:
    a = cfg.arch
    return (cfg.meta.model_name == "vit_huge" and cfg.mask.patch_size == 14 and cfg.data.crop_size == 224
            and a["embed_dim"] == 1280 and a["depth"] == 32 and cfg.meta.pred_depth == 12
            and cfg.meta.pred_emb_dim == 384)


def format_table(sf: StepFlops) -> str:
    tot = sf.total
    rows = ["| phase | GFLOP/image | share | of which attention |", "|---|---:|---:|---:|"]
    for name, part in sf.parts.items():
        rows.append(f"| {name} | {part.total / 1e9:.3f} | {100 * part.total / tot:.1f} % | "
                    f"{100 * part.attention / max(part.total, 1e-30):.1f} % |")
    rows.append(f"| **total** | **{tot / 1e9:.3f}** | 100 % | {100 * sf.split()['attention'] / tot:.1f} % |")
    t = sf.tokens
    rows += ["", "groups: " + ", ".join(f"{k} {100 * v / tot:.1f} %" for k, v in sf.group().items()),
             f"tokens: N={t['N']}, K_ctx={t['K_ctx']:.1f}, K_pred={t['K_pred']:.1f}, "
             f"nenc={t['nenc']}, npred={t['npred']}"]
    return "\n".join(rows)

