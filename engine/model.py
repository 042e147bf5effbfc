"""The I-JEPA model: ViT context encoder, predictor, EMA target encoder and the loss.

Computes exactly what the reference computes (same modules, parameter names, init
and RNG consumption, op order and dtype promotions), with three seams where the
engine's kernels plug in: ``kernels.attention`` (never a materialised score matrix
unless ``naive`` is asked for), ``kernels.gather`` (masked-token gather, fused with
the position-embedding add / the target LayerNorm) and ``kernels.ema``.

Batch layout conventions (the reference's):
* a list of M masks applied to a ``[B, N, D]`` batch gives ``[M*B, K, D]``, mask-major:
  row ``i*B + b`` is mask ``i`` of sample ``b``;
* predictions and targets are ordered (target block i, context block j, sample b).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import kernels.attention as katt
import kernels.ema as kema
import kernels.gather as kgather


# ----------------------------------------------------------------- position embedding
def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[grid*grid, embed_dim]`` in the reference's layout.

    First half of the channels encodes the COLUMN index, second half the ROW index; each
    half is [sin(p*w_0..), cos(p*w_0..)] with w_k = 10000^(-k/(D/4)). Computed in float64
    (numpy, as the reference does) and rounded once to float32, so values match bit for bit.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    cols, rows = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))

    def one_axis(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    return torch.from_numpy(table).float()


def repeat_interleave_batch(x: torch.Tensor, batch: int, repeat: int) -> torch.Tensor:
    """Split ``x`` into chunks of ``batch`` rows and repeat each chunk ``repeat`` times in place:
    [c0, c1] -> [c0, c0, c1, c1] for repeat 2."""
    if repeat == 1:
        return x
    n = x.shape[0] // batch
    return x.reshape(n, 1, batch, *x.shape[1:]).expand(n, repeat, batch, *x.shape[1:]).reshape(
        n * repeat * batch, *x.shape[1:])


# ----------------------------------------------------------------- ViT building blocks
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def forward(self, x, keep_from: int | None = None):
        """``keep_from``: only rows ``keep_from:`` are wanted downstream, so queries (and the
        output projection) are computed for those rows only; keys/values still use all rows."""
        B, N, C = x.shape
        H, d = self.num_heads, C // self.num_heads
        if keep_from is None:
            qkv = self.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            w, b = self.qkv.weight, self.qkv.bias
            kv = F.linear(x, w[C:], None if b is None else b[C:]).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
            xq = x[:, keep_from:]
            q = F.linear(xq, w[:C], None if b is None else b[:C]).reshape(B, -1, H, d).transpose(1, 2)
        x = katt.attention(q, k, v, backend=self.backend, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, -1, C)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block; module order matches the reference (init RNG order)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    checkpointed = False   # recompute activations in backward (saves memory, costs a forward)

    def forward(self, x, keep_from: int | None = None):
        """``keep_from``: return only rows ``keep_from:``; the rows before it still serve as
        keys/values but their own query, projection and MLP are never computed."""
        if self.checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, keep_from, use_reentrant=False)
        return self._forward(x, keep_from)

    def _forward(self, x, keep_from: int | None = None):
        y = self.attn(self.norm1(x), keep_from)
        x = (x if keep_from is None else x[:, keep_from:]) + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


@torch.no_grad()
def _trunc_normal_(t: torch.Tensor, std: float = 0.02, lo: float = -2.0, hi: float = 2.0):
    """Truncated normal by inverse CDF: one uniform draw per element, mapped through erfinv.

    This is the reference's algorithm and RNG consumption (torch >= 2.14's own
    ``nn.init.trunc_normal_`` switched to rejection sampling and draws different numbers).
    The bounds are ABSOLUTE (+-2), so with std 0.02 the draw is effectively untruncated.
    """
    def cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0
    a, b = cdf(lo / std), cdf(hi / std)
    t.uniform_(2 * a - 1, 2 * b - 1)
    t.erfinv_()
    t.mul_(std * math.sqrt(2.0))
    t.add_(0.0)
    return t.clamp_(min=lo, max=hi)


def _ctor_init(module: nn.Module, blocks, std=0.02):
    """First init pass (the reference's constructors): trunc-normal Linear/Conv, LN 1/0,
    then divide each block's proj/fc2 weight by sqrt(2*layer)."""
    def init(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            _trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
    module.apply(init)
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def _reinit(module: nn.Module, std=0.02):
    """Second pass (the reference's ``init_model``): every Linear and LayerNorm again, which
    undoes the depth rescale; Conv2d and mask_token keep their first-pass values."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)


# ----------------------------------------------------------------- encoder / predictor
class VisionTransformer(nn.Module):
    """ViT encoder without cls token. ``forward(x, masks=None)`` -> ``[len(masks)*B, K, D]``
    (or ``[B, N, D]`` without masks), after the final LayerNorm."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, eps=1e-6, attn_backend="auto", gather_backend="auto"):
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, int(n ** 0.5)).unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps, attn_backend)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.gather_backend = gather_backend
        _ctor_init(self, self.blocks)

    def set_backends(self, attention=None, gather=None):
        for blk in self.blocks:
            if attention is not None:
                blk.attn.backend = attention
        if gather is not None:
            self.gather_backend = gather

    def forward(self, x, masks=None):
        x = self.patch_embed(x)
        if masks is None:
            x = x + self.pos_embed
        else:
            if not isinstance(masks, (list, tuple)):
                masks = [masks]
            # (x + pos)[idx] == x[idx] + pos[idx]: gather and add in one pass
            x = kgather.gather_tokens(x, list(masks), pos=self.pos_embed, backend=self.gather_backend)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VisionTransformerPredictor(nn.Module):
    """Narrow ViT that predicts target-block representations from context tokens."""

    def __init__(self, num_patches, embed_dim=768, predictor_embed_dim=384, depth=6, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, eps=1e-6, attn_backend="auto", gather_backend="auto"):
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(predictor_embed_dim, int(num_patches ** 0.5)).unsqueeze(0), requires_grad=False)
        self.predictor_blocks = nn.ModuleList([
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, eps, attn_backend) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=eps)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)
        self.gather_backend = gather_backend
        self.skip_unused_rows = True
        _trunc_normal_(self.mask_token.data)   # before the module pass: RNG order of the reference
        _ctor_init(self, self.predictor_blocks)

    def set_backends(self, attention=None, gather=None):
        for blk in self.predictor_blocks:
            if attention is not None:
                blk.attn.backend = attention
        if gather is not None:
            self.gather_backend = gather

    def forward(self, x, masks_x, masks):
        masks_x = list(masks_x) if isinstance(masks_x, (list, tuple)) else [masks_x]
        masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x += kgather.gather_tokens(None, masks_x, pos=self.predictor_pos_embed, backend=self.gather_backend)
        n_ctx = x.shape[1]
        pos_embs = kgather.gather_tokens(None, masks, pos=self.predictor_pos_embed, backend=self.gather_backend)
        pos_embs = repeat_interleave_batch(pos_embs, B, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1)
        pred_tokens += pos_embs
        x = x.repeat(len(masks), 1, 1)
        x = torch.cat([x, pred_tokens], dim=1)
        last = len(self.predictor_blocks) - 1
        for i, blk in enumerate(self.predictor_blocks):
            # only the query tokens' outputs are used: in the last block the context rows are
            # keys/values only (the reference computes and discards them: ~1/depth of the FLOPs)
            x = blk(x, keep_from=n_ctx if (i == last and self.skip_unused_rows) else None)
        if not self.skip_unused_rows or last < 0:
            x = x[:, n_ctx:]
        x = self.predictor_norm(x)
        return self.predictor_proj(x)


# ----------------------------------------------------------------- the whole model
class IJEPA(nn.Module):
    """Context encoder + predictor (trained) and EMA target encoder (frozen).

    ``loss = model(images, masks_enc, masks_pred)`` runs one I-JEPA forward in the
    reference's order (targets first, under no_grad) and returns the smooth-L1 loss.
    """

    def __init__(self, cfg=None, **arch):
        super().__init__()
        from engine.config import IJEPAConfig
        self.cfg = cfg = cfg if cfg is not None else IJEPAConfig()
        a = cfg.arch
        a.update(arch)
        att, gat = cfg.kernels.attention, cfg.kernels.gather
        self.ema_backend = cfg.kernels.ema
        self.encoder = VisionTransformer(
            img_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, in_chans=cfg.data.in_chans,
            embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"],
            attn_backend=att, gather_backend=gat)
        self.predictor = VisionTransformerPredictor(
            num_patches=self.encoder.patch_embed.num_patches, embed_dim=a["embed_dim"],
            predictor_embed_dim=cfg.meta.pred_emb_dim, depth=cfg.meta.pred_depth,
            num_heads=a["pred_num_heads"], attn_backend=att, gather_backend=gat)
        self.predictor.skip_unused_rows = cfg.train.skip_unused_rows
        _reinit(self.encoder)
        _reinit(self.predictor)
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        if cfg.train.activation_checkpointing:
            for blk in list(self.encoder.blocks) + list(self.predictor.predictor_blocks):
                blk.checkpointed = True
        if cfg.train.compile:
            self.compile_blocks()

    def compile_blocks(self):
        """Regional compilation: each block is compiled once and reused by every layer, with the
        token dimension dynamic so changing mask sizes do not recompile every step."""
        for blocks in (self.encoder.blocks, self.predictor.predictor_blocks, self.target_encoder.blocks):
            for blk in blocks:
                blk.compile(dynamic=True)

    def set_backends(self, attention=None, gather=None, ema=None):
        for m in (self.encoder, self.predictor, self.target_encoder):
            m.set_backends(attention, gather)
        if ema is not None:
            self.ema_backend = ema

    # -------------------------------------------------------------- forward
    @torch.no_grad()
    def targets(self, images, masks_enc, masks_pred):
        h = self.target_encoder(images)
        # LayerNorm without affine (eps 1e-5) of the already-normed output, then the target blocks
        h = kgather.gather_layernorm(h, list(masks_pred), eps=1e-5, backend=self.encoder.gather_backend)
        return repeat_interleave_batch(h, len(images), repeat=len(masks_enc))

    def predict(self, images, masks_enc, masks_pred):
        z = self.encoder(images, masks_enc)
        return self.predictor(z, masks_enc, masks_pred)

    def forward_parts(self, images, masks_enc, masks_pred):
        """(loss, predictions z, targets h) for diagnostics."""
        masks_enc, masks_pred = _as_list(masks_enc), _as_list(masks_pred)
        h = self.targets(images, masks_enc, masks_pred)
        z = self.predict(images, masks_enc, masks_pred)
        return F.smooth_l1_loss(z, h), z, h

    def forward(self, images, masks_enc, masks_pred):
        return self.forward_parts(images, masks_enc, masks_pred)[0]

    # -------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_target(self, momentum, targets_lowp=None):
        """target = m * target + (1 - m) * encoder over ALL parameters (frozen pos_embed too),
        in ``parameters()`` order, as the reference does."""
        kema.fused_ema_(list(self.target_encoder.parameters()), list(self.encoder.parameters()),
                        momentum, targets_lowp=targets_lowp, backend=self.ema_backend)

    # -------------------------------------------------------------- optimiser groups
    def param_groups(self):
        """The reference's four AdamW groups: decayed encoder / predictor weights, then
        non-decayed ('bias' in name or 1-D) encoder / predictor params flagged WD_exclude."""
        def split(mod, decay):
            return [p for n, p in mod.named_parameters()
                    if (("bias" not in n) and (p.ndim != 1)) == decay]
        return [
            {"params": split(self.encoder, True)},
            {"params": split(self.predictor, True)},
            {"params": split(self.encoder, False), "WD_exclude": True, "weight_decay": 0},
            {"params": split(self.predictor, False), "WD_exclude": True, "weight_decay": 0},
        ]

    # -------------------------------------------------------------- reference checkpoints
    def reference_state_dict(self, module_prefix: bool = True) -> dict:
        """``{"encoder", "predictor", "target_encoder"}`` state dicts in the reference's naming
        (with the DDP ``module.`` prefix by default, as its checkpoints carry it)."""
        pre = "module." if module_prefix else ""
        return {name: {pre + k: v for k, v in getattr(self, name).state_dict().items()}
                for name in ("encoder", "predictor", "target_encoder")}

    def load_reference_state_dict(self, ckpt: dict, strict: bool = True) -> None:
        """Load a reference checkpoint dict (keys ``encoder``, ``predictor``, ``target_encoder``;
        ``module.`` prefix or not). A missing ``target_encoder`` is copied from ``encoder``."""
        missing = [k for k in ("encoder", "predictor") if k not in ckpt]
        if missing:
            raise KeyError(f"reference checkpoint lacks {missing}; expected keys encoder, predictor, target_encoder")
        for name in ("encoder", "predictor", "target_encoder"):
            sd = ckpt.get(name, ckpt["encoder"] if name == "target_encoder" else None)
            getattr(self, name).load_state_dict(strip_module_prefix(sd), strict=strict)


def strip_module_prefix(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _as_list(m):
    return list(m) if isinstance(m, (list, tuple)) else [m]


def build_model(cfg, device: Optional[torch.device] = None) -> IJEPA:
    """Seed-then-build, so the weights are a function of ``cfg.train.seed`` alone."""
    torch.manual_seed(cfg.train.seed)
    model = IJEPA(cfg)
    return model.to(device) if device is not None else model
