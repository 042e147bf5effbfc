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
import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.profiler import record_function

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
    grid = np.arange(grid_size, dtype=np.float64)
    cols, rows = (np.einsum("m,d->md", pos.reshape(-1), omega) for pos in np.meshgrid(grid, grid))
    table = np.concatenate([np.sin(cols), np.cos(cols), np.sin(rows), np.cos(rows)], axis=1)
    return torch.from_numpy(table).float()


def repeat_interleave_batch(x: torch.Tensor, batch: int, repeat: int) -> torch.Tensor:
    """Split ``x`` into chunks of ``batch`` rows and repeat each chunk ``repeat`` times in place:
    [c0, c1] -> [c0, c0, c1, c1] for repeat 2."""
    if repeat == 1:
        return x
    n, rest = x.shape[0] // batch, x.shape[1:]
    return x.reshape(n, 1, batch, *rest).expand(n, repeat, batch, *rest).reshape(n * repeat * batch, *rest)


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

    def forward(self, x, keep_from: int | None = None, packed=None):
        """``keep_from``: only rows ``keep_from:`` are wanted downstream, so the output projection
        runs on those rows only (every row still serves as key/value).
        ``packed=(cu_seqlens, max_seqlen, seqlens)``: ``x`` is ``[T, C]``, sequences back to back, each token
        attending only within its own sequence (no padding, no truncation)."""
        if packed is not None:
            T, C = x.shape
            q, k, v = (t.contiguous() for t in self.qkv(x).reshape(T, 3, self.num_heads, C // self.num_heads).unbind(1))
            x = katt.attention(q, k, v, cu_seqlens=packed[0], max_seqlen=packed[1], seqlens=packed[2],
                               backend=self.backend, scale=self.scale)
            return self.proj(x.reshape(T, C))
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = katt.attention(qkv[0], qkv[1], qkv[2], backend=self.backend, scale=self.scale).transpose(1, 2)
        if keep_from is not None:
            x = x[:, keep_from:]
        return self.proj(x.reshape(B, -1, C))


class Block(nn.Module):
    """Pre-norm transformer block; module order matches the reference (init RNG order)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6, attn_backend="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    checkpointed = False   # recompute activations in backward (saves memory, costs a forward)

    def forward(self, x, keep_from: int | None = None, packed=None):
        """``keep_from``: return only rows ``keep_from:``; the rows before it serve as keys/values
        only (no projection, residual or MLP for them). ``packed``: see ``Attention.forward``."""
        if self.checkpointed and torch.is_grad_enabled():
            # preserve_rng_state would save the global RNG here and RESTORE it in the backward
            # recompute, rewinding the reference-mode mask draws the data thread makes meanwhile;
            # a block draws no random numbers, so there is nothing to preserve
            return torch.utils.checkpoint.checkpoint(self._forward, x, keep_from, packed, use_reentrant=False,
                                                     preserve_rng_state=False)
        return self._forward(x, keep_from, packed)

    def _forward(self, x, keep_from: int | None = None, packed=None):
        y = self.attn(self.norm1(x), keep_from, packed)
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
    a, b = ((1.0 + math.erf(x / math.sqrt(2.0))) / 2.0 for x in (lo / std, hi / std))   # normal CDF
    t.uniform_(2 * a - 1, 2 * b - 1).erfinv_().mul_(std * math.sqrt(2.0)).add_(0.0)
    return t.clamp_(min=lo, max=hi)


def _init(m: nn.Module, std: float, trunc_normal=(nn.Linear,)):
    if isinstance(m, trunc_normal):
        _trunc_normal_(m.weight, std)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def _ctor_init(module: nn.Module, blocks, std=0.02):
    """First init pass (the reference's constructors): trunc-normal Linear/Conv, LN 1/0,
    then divide each block's proj/fc2 weight by sqrt(2*layer)."""
    module.apply(lambda m: _init(m, std, (nn.Linear, nn.Conv2d)))
    with torch.no_grad():
        for layer_id, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def _reinit(module: nn.Module, std=0.02):
    """Second pass (the reference's ``init_model``): every Linear and LayerNorm again, which
    undoes the depth rescale; Conv2d and mask_token keep their first-pass values."""
    for m in module.modules():
        _init(m, std)


def _set_backends(self, attention=None, gather=None):
    """``set_backends`` of the encoder and the predictor: every block's attention, the gather."""
    if attention is not None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = attention
    if gather is not None:
        self.gather_backend = gather


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
        self.pos_embed = nn.Parameter(
            sincos_pos_embed_2d(embed_dim, int(self.patch_embed.num_patches ** 0.5)).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps, attn_backend)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.gather_backend = gather_backend
        _ctor_init(self, self.blocks)

    set_backends = _set_backends

    def forward(self, x, masks=None):
        x = self.patch_embed(x)
        if masks is None:
            x = x + self.pos_embed
        else:   # (x + pos)[idx] == x[idx] + pos[idx]: gather and add in one pass
            x = kgather.gather_tokens(x, _as_list(masks), pos=self.pos_embed, backend=self.gather_backend)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_packed(self, x, batch_idx, token_idx, packed):
        """Context tokens of ragged masks, packed: rows ``(batch_idx[t], token_idx[t])`` of the
        patch grid, sequences delimited by ``packed=(cu_seqlens, max_seqlen, seqlens)`` -> ``[T, D]``."""
        x = self.patch_embed(x)[batch_idx, token_idx] + self.pos_embed[0, token_idx]
        for blk in self.blocks:
            x = blk(x, packed=packed)
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

    set_backends = _set_backends

    def forward(self, x, masks_x, masks):
        masks_x, masks = _as_list(masks_x), _as_list(masks)
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x += kgather.gather_tokens(None, masks_x, pos=self.predictor_pos_embed, backend=self.gather_backend)
        n_ctx = x.shape[1]
        pos_embs = kgather.gather_tokens(None, masks, pos=self.predictor_pos_embed, backend=self.gather_backend)
        pos_embs = repeat_interleave_batch(pos_embs, B, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1)
        pred_tokens += pos_embs
        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
        last = len(self.predictor_blocks) - 1
        for i, blk in enumerate(self.predictor_blocks):
            # only the query tokens' outputs are used: in the last block the context rows are
            # keys/values only (the reference computes and discards them: ~1/depth of the FLOPs)
            x = blk(x, keep_from=n_ctx if (i == last and self.skip_unused_rows) else None)
        if not self.skip_unused_rows or last < 0:
            x = x[:, n_ctx:]
        return self.predictor_proj(self.predictor_norm(x))

    def forward_packed(self, z, layout):
        """Predictions for ragged masks. ``z``: packed context-encoder output; ``layout``: a
        ``PackedLayout``. One sequence per (target i, context j, sample b): that sample's context
        tokens then its target-block queries, packed without padding -> ``[T_pred, D]`` in
        (i, j, b, token) order, like the reference's flattened ``[npred*nenc*B, K, D]``."""
        pos = self.predictor_pos_embed[0]
        x = self.predictor_embed(z) + pos[layout.ctx_tokens]
        queries = self.mask_token[0] + pos[layout.pred_tokens]
        x = torch.cat([x, queries], 0)[layout.seq_rows]
        for blk in self.predictor_blocks:
            x = blk(x, packed=layout.pred_packed)
        return self.predictor_proj(self.predictor_norm(x[layout.query_rows]))


class PackedLayout:
    """Index tables that pack ragged I-JEPA masks into variable-length sequences.

    ``masks_enc[b][j]`` / ``masks_pred[b][i]``: 1-D token indices of context block j / target
    block i of sample b (what ``MultiBlockMaskSampler.sample_ragged`` returns: no truncation to
    the batch minimum, so no context token is dropped and no padding is computed).

    Built on the host (the data thread builds it, see ``engine.data.BatchPrefetcher``), then
    moved with one pinned, non-blocking copy per table: the training step never waits for it.
    Sequence lengths stay on the host too (``*_packed[2]``), so no attention backend has to
    read ``cu_seqlens`` back.
    """

    def __init__(self, masks_enc, masks_pred, device=None):
        B, nenc, npred = len(masks_enc), len(masks_enc[0]), len(masks_pred[0])
        # context blocks ordered (j, b): the encoder sees one sequence per (context block, sample);
        # target blocks ordered (i, b). Sequence s of either list is sample s % B's.
        ctx = [masks_enc[b][j] for j in range(nenc) for b in range(B)]
        pred = [masks_pred[b][i] for i in range(npred) for b in range(B)]
        lens_c, lens_p = [len(t) for t in ctx], [len(t) for t in pred]
        self.ctx_tokens, self.pred_tokens = (torch.cat([t.cpu().long() for t in ts]) for ts in (ctx, pred))
        self.ctx_batch, pred_batch = (torch.cat([torch.full((n,), s % B, dtype=torch.long) for s, n in enumerate(lens)])
                                      for lens in (lens_c, lens_p))
        self.enc_packed = _cu(lens_c)
        ctx_start, q_start = ([0, *itertools.accumulate(lens)][:-1] for lens in (lens_c, lens_p))
        n_ctx = sum(lens_c)
        rows, qrows, tgt, seq_lens, pos = [], [], [], [], 0
        # predictor sequences, ordered (i, j, b)
        for i, j, b in itertools.product(range(npred), range(nenc), range(B)):
            c, p = j * B + b, i * B + b
            lc, lp, cs, qs = lens_c[c], lens_p[p], ctx_start[c], q_start[p]
            rows += [torch.arange(cs, cs + lc), torch.arange(n_ctx + qs, n_ctx + qs + lp)]
            qrows.append(torch.arange(pos + lc, pos + lc + lp))
            tgt.append(torch.arange(qs, qs + lp))
            seq_lens.append(lc + lp)
            pos += lc + lp
        self.seq_rows, self.query_rows = torch.cat(rows), torch.cat(qrows)
        self.pred_packed = _cu(seq_lens)
        # targets in prediction order (i, j, b, token): rows of the [B, N] target map
        tgt = torch.cat(tgt)
        self.target_batch, self.target_tokens = pred_batch[tgt], self.pred_tokens[tgt]
        self.mean_ctx = n_ctx / (B * nenc)
        self.mean_pred = sum(lens_p) / (B * npred)
        if device is not None:
            self.to(device)

    _TABLES = ("ctx_tokens", "ctx_batch", "pred_tokens", "seq_rows", "query_rows", "target_batch", "target_tokens")

    def to(self, device) -> "PackedLayout":
        device = torch.device(device)
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else \
            (lambda t: t.to(device))
        for name in self._TABLES:
            setattr(self, name, move(getattr(self, name)))
        self.enc_packed = (move(self.enc_packed[0]),) + self.enc_packed[1:]
        self.pred_packed = (move(self.pred_packed[0]),) + self.pred_packed[1:]
        return self


def _cu(lens):
    """(cu_seqlens int32 [S+1], max length, host lengths) of packed sequences."""
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return cu, max(lens), list(lens)


def is_ragged(masks) -> bool:
    """Per-sample lists of per-block index tensors (``sample_ragged``), not ``[B, K]`` tensors."""
    return isinstance(masks, (list, tuple)) and len(masks) > 0 and isinstance(masks[0], (list, tuple))


def mask_lengths(masks_enc, masks_pred) -> tuple[float, float]:
    """(context, target) tokens per block: the reference's mask-A / mask-B log columns (the mean
    length for a packed layout)."""
    if isinstance(masks_enc, PackedLayout):
        return masks_enc.mean_ctx, masks_enc.mean_pred
    return masks_enc[0].shape[1], masks_pred[0].shape[1]


# ----------------------------------------------------------------- the whole model
class IJEPA(nn.Module):
    """Context encoder + predictor (trained) and EMA target encoder (frozen).

    ``loss = model(images, masks_enc, masks_pred)`` runs one I-JEPA forward in the
    reference's order (targets first, under no_grad) and returns the smooth-L1 loss;
    ``parts=True`` also returns the predictions and targets (for the collapse diagnostics).
    Every backend trains through this forward: under DeepSpeed the engine wraps this module
    with the target encoder unregistered (``detach_target``), so the step is written once.
    """

    def __init__(self, cfg=None, **arch):
        super().__init__()
        from engine.config import IJEPAConfig
        self.cfg = cfg = cfg if cfg is not None else IJEPAConfig()
        a = {**cfg.arch, **arch}
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
        if cfg.model.patch_embed_std is not None:   # rescale: same RNG draws as the reference init
            with torch.no_grad():
                self.encoder.patch_embed.proj.weight.mul_(cfg.model.patch_embed_std / 0.02)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        self.target_stats_across_ranks = False   # loss.target_norm center/batch: global-batch statistics
        if cfg.train.activation_checkpointing:
            for blk in list(self.encoder.blocks) + list(self.predictor.predictor_blocks):
                blk.checkpointed = True
        if cfg.train.compile:
            self.compile_blocks()

    def compile_blocks(self):
        """Regional compilation: each block is compiled once and reused by every layer, with the
        token dimension dynamic so changing mask sizes do not recompile every step."""
        for blk in [*self.encoder.blocks, *self.predictor.predictor_blocks, *self.target_encoder.blocks]:
            blk.compile(dynamic=True)

    def set_backends(self, attention=None, gather=None, ema=None):
        for m in (self.encoder, self.predictor, self.target_encoder):
            m.set_backends(attention, gather)
        if ema is not None:
            self.ema_backend = ema

    def resolve_attention(self, measure: bool = True) -> str:
        """Which attention backend each part runs, with the head dim and dtype that decide it. With
        ``measure`` (on a GPU), ``kernels.attention: auto`` becomes the measured fastest backend for
        the part's shape class (``kernels.attention.choose_attention``: the full patch grid)."""
        if getattr(self, "attention_choice", None):
            return self.attention_choice
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        device, packed = next(self.encoder.parameters()).device, self.cfg.mask.packed
        parts = []
        for part, blocks in (("encoder", list(self.encoder.blocks) + list(self.target_encoder.blocks)),
                             ("predictor", list(self.predictor.predictor_blocks))):
            attn = blocks[0].attn
            d = attn.qkv.in_features // attn.num_heads
            if measure:
                backend, why = katt.choose_attention(device, attn.backend, d, dtype, packed,
                                                     self.encoder.patch_embed.num_patches)
                for blk in blocks:
                    blk.attn.backend = backend
            else:
                backend, why = katt.attention_backend(device, attn.backend, d, dtype, packed), ""
            parts.append(f"{backend} ({part}: head dim {d}, {str(dtype)[6:]}{', packed' if packed else ''}"
                         f"{'; ' + why if why else ''})")
        if measure:
            self.attention_choice = " / ".join(parts)
        return " / ".join(parts)

    def detach_target(self) -> nn.Module:
        """Unregister the target encoder (it stays reachable as ``self.target_encoder``), so a
        wrapper that walks ``parameters()`` -- DeepSpeed -- sees only what is trained."""
        target = self._modules.pop("target_encoder")
        self.__dict__["target_encoder"] = target
        return target

    # -------------------------------------------------------------- forward
    @torch.no_grad()
    def targets(self, images, masks_enc, masks_pred):
        """Target features in the predictions' order (packed ``[T, D]`` for a ``PackedLayout``)."""
        h = normalise_over_batch(self.target_encoder(images), self.cfg.loss.target_norm,
                                 self.target_stats_across_ranks)
        # LayerNorm without affine (eps 1e-5) of the already-normed output, then the target blocks
        if isinstance(masks_enc, PackedLayout):
            return F.layer_norm(h, (h.size(-1),), eps=1e-5)[masks_enc.target_batch, masks_enc.target_tokens]
        h = kgather.gather_layernorm(h, list(masks_pred), eps=1e-5, backend=self.encoder.gather_backend)
        return repeat_interleave_batch(h, len(images), repeat=len(masks_enc))

    def forward(self, images, masks_enc, masks_pred=None, parts: bool = False):
        """The smooth-L1 loss (``parts``: ``(loss, predictions z, targets h)``).

        Masks: ``[B, K]`` index tensors per block (the reference's collator format), or, for
        packed training, a ``PackedLayout`` (or the ragged per-sample lists it is built from):
        context and predictor sequences packed without truncation or padding, z and h ``[T, D]``
        in (target, context, sample, token) order. On equal-length masks the packed computation
        is the padded one, token for token."""
        if is_ragged(masks_enc):
            masks_enc = PackedLayout(masks_enc, masks_pred, images.device)
        lay = masks_enc if isinstance(masks_enc, PackedLayout) else None
        if lay is None:
            masks_enc, masks_pred = _as_list(masks_enc), _as_list(masks_pred)
        with record_function("ijepa::target_forward"):
            h = self.targets(images, masks_enc, masks_pred)
        with record_function("ijepa::context_forward"):
            z = (self.encoder(images, masks_enc) if lay is None
                 else self.encoder.forward_packed(images, lay.ctx_batch, lay.ctx_tokens, lay.enc_packed))
        with record_function("ijepa::predictor"):
            z = self.predictor(z, masks_enc, masks_pred) if lay is None else self.predictor.forward_packed(z, lay)
        with record_function("ijepa::loss"):
            loss = F.smooth_l1_loss(z, h)
        return (loss, z, h) if parts else loss

    def forward_parts(self, images, masks_enc, masks_pred=None):
        return self.forward(images, masks_enc, masks_pred, parts=True)

    @torch.no_grad()
    def update_target(self, momentum):
        """target = m * target + (1 - m) * encoder over ALL parameters (frozen pos_embed too),
        in ``parameters()`` order, as the reference does; one fused launch on the Triton backend."""
        if getattr(self, "_ema", None) is None:
            self._ema = kema.EMAPlan(self.ema_backend)
        self._ema.backend = self.ema_backend
        self._ema(self.target_encoder.parameters(), self.encoder.parameters(), momentum)

    def param_groups(self):
        """The reference's four AdamW groups (``param_group_names``)."""
        params = {f"{part}.{n}": p for part in ("encoder", "predictor")
                  for n, p in getattr(self, part).named_parameters()}
        groups = [{"params": [params[n] for n in names]} for names in param_group_names(params)]
        for g in groups[2:]:
            g.update(WD_exclude=True, weight_decay=0)
        return groups

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
            sd = ckpt.get(name, ckpt["encoder"])   # only target_encoder may be missing (checked above)
            getattr(self, name).load_state_dict(strip_module_prefix(sd), strict=strict)


def param_group_names(params: dict) -> list:
    """Names of the reference's four AdamW groups, in its order, from ``{"encoder.x": tensor,
    "predictor.y": tensor}``: decayed encoder / predictor weights, then the non-decayed ('bias' in
    the name, or 1-D) encoder / predictor parameters. Frozen tables are included, as the
    reference includes them (they never get a gradient, so never an optimizer state)."""
    def split(part, decay):
        return [n for n, p in params.items() if n.startswith(part + ".")
                and (("bias" not in n) and (p.ndim != 1)) == decay]
    return [split("encoder", True), split("predictor", True), split("encoder", False), split("predictor", False)]


def normalise_over_batch(h: torch.Tensor, mode: str, across_ranks: bool = False) -> torch.Tensor:
    """``loss.target_norm``: for ``center`` / ``batch``, statistics over the batch at each token
    position (fp32), applied to target features ``[B, N, D]`` before the per-token LayerNorm.
    ``layer`` (the reference) returns ``h`` untouched. ``across_ranks``: the statistics are those of
    the global batch (summed over the default process group, equal batch per rank), so a run gives
    the same targets whatever its number of ranks."""
    if mode == "layer":
        return h
    hf = h.float()

    def batch_mean(x):
        x, count = x.sum(0, keepdim=True), x.shape[0]
        if across_ranks:
            import torch.distributed as dist
            dist.all_reduce(x)
            count *= dist.get_world_size()
        return x / count

    hf = hf - batch_mean(hf)
    if mode == "batch":
        hf = hf * torch.rsqrt(batch_mean(hf.pow(2)) + 1e-5)
    return hf.to(h.dtype)


def strip_module_prefix(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _as_list(m):
    return list(m) if isinstance(m, (list, tuple)) else [m]


def build_model(cfg, device: torch.device | None = None) -> IJEPA:
    """Seed-then-build, so the weights are a function of ``cfg.train.seed`` alone. On a GPU the
    attention backends are resolved here (measured once per device and shape class)."""
    torch.manual_seed(cfg.train.seed)
    model = IJEPA(cfg)
    if device is not None:
        model = model.to(device)
        if torch.device(device).type == "cuda":
            model.resolve_attention(measure=True)
    return model
