"""Multi-block masks: one context block and several target blocks per image.

Two modes:

``reference``
    The reference collator, bit for bit, quirks included, so that given the same
    global torch RNG state and batch counter it returns exactly the reference's masks:
    one uniform draw drives both scale and aspect ratio; block sizes are drawn once
    per batch from a generator seeded with the batch counter; block positions are
    drawn per sample from the *global* torch RNG with an exclusive upper bound (so a
    block never touches the last row or column); a mask is valid when it holds
    strictly more than ``min_keep`` patches; every mask of the batch is truncated to
    the batch's shortest one.

``paper``
    The corrected variant that follows the paper's description: blocks may touch
    every row and column (inclusive bound, sizes up to the full grid), scale and
    aspect ratio are drawn independently. Positions come from the sampler's own
    generator (seeded per batch), so the masks do not depend on anything else using
    the global RNG. Returned in the same ``[B, K]`` format (truncated to the batch
    minimum so masks stack); ``sample_ragged`` gives the untruncated lists for the
    packed predictor.

Output format (both modes): ``masks_enc`` is a list of ``nenc`` int64 tensors
``[B, K_enc]``, ``masks_pred`` a list of ``npred`` int64 tensors ``[B, K_pred]``,
indices into the row-major patch grid in ascending order.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from engine.errors import ConfigError

log = logging.getLogger(__name__)

_MAX_TRIES_PAPER = 1000


def _as_pair(x):
    return (x, x) if isinstance(x, (int, float)) else tuple(x)


def block_size(u: float, scale, aspect, height: int, width: int, mode: str = "reference",
               u_aspect: float | None = None) -> tuple[int, int]:
    """Block (h, w) for a uniform draw ``u`` (and, in paper mode, a separate ``u_aspect``)."""
    min_s, max_s = scale
    max_keep = int(height * width * (min_s + u * (max_s - min_s)))
    min_ar, max_ar = aspect
    ua = u if (mode == "reference" or u_aspect is None) else u_aspect
    ar = min_ar + ua * (max_ar - min_ar)
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    if mode == "reference":   # reference clamp: a block is at most (H-1) x (W-1)
        return min(h, height - 1), min(w, width - 1)
    return max(1, min(h, height)), max(1, min(w, width))


def _smallest_block(scale, aspect, height, width, mode):
    """Smallest h*w over every size the sampler can draw (sizes are step functions of u)."""
    n = 2001
    us = [i / (n - 1) for i in range(n - 1)] + [1.0 - 1e-12]
    u_aspects = [None] if mode == "reference" else [0.0, 0.5, 1.0 - 1e-12]
    return min(math.prod(block_size(u, scale, aspect, height, width, mode, ua)) for u in us for ua in u_aspects)


def check_mask_config(input_size, patch_size, enc_mask_scale, pred_mask_scale, aspect_ratio,
                      min_keep, mode="reference", npred=4, allow_overlap=False) -> None:
    """Reject configs for which sampling can never finish.

    The reference redraws a block until it holds more than ``min_keep`` patches; a target
    block whose drawn size is ``h*w <= min_keep`` therefore loops forever (crop 96 / patch 16 /
    min_keep 4 hangs on a 2x2 target). Every drawable size must be large enough.
    """
    hh, ww = (s // patch_size for s in _as_pair(input_size))
    lo = _smallest_block(pred_mask_scale, aspect_ratio, hh, ww, mode)
    if lo <= min_keep:
        raise ConfigError(
            f"mask: target blocks on a {hh}x{ww} grid can be as small as {lo} patches, not more than "
            f"mask.min_keep={min_keep}, so sampling would never finish; lower mask.min_keep below {lo} "
            f"or raise mask.pred_mask_scale")
    lo = _smallest_block(enc_mask_scale, (1.0, 1.0), hh, ww, mode)
    if lo <= min_keep:
        raise ConfigError(
            f"mask: context blocks on a {hh}x{ww} grid can be as small as {lo} patches, not more than "
            f"mask.min_keep={min_keep}; lower mask.min_keep or raise mask.enc_mask_scale")


class MultiBlockMaskSampler:
    """Samples I-JEPA context/target masks for one batch per call.

    ``sampler(batch_size)`` returns ``(masks_enc, masks_pred)`` and advances the batch
    counter, exactly like one call of the reference collator (reference mode).
    """

    def __init__(self, input_size=(224, 224), patch_size=16, enc_mask_scale=(0.2, 0.8),
                 pred_mask_scale=(0.2, 0.8), aspect_ratio=(0.3, 3.0), nenc=1, npred=2,
                 min_keep=4, allow_overlap=False, mode="reference", seed_offset: int = 0):
        if mode not in ("reference", "paper"):
            raise ValueError(f"mode: {mode!r}; choose 'reference' or 'paper'")
        self.patch_size = patch_size
        self.height, self.width = (s // patch_size for s in _as_pair(input_size))
        self.enc_mask_scale = tuple(enc_mask_scale)
        self.pred_mask_scale = tuple(pred_mask_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.nenc, self.npred = nenc, npred
        self.min_keep, self.allow_overlap, self.mode = min_keep, allow_overlap, mode
        self.seed_offset = seed_offset   # paper mode: lets ranks draw different positions
        self.counter = -1                # like the reference: the first batch uses seed 0
        check_mask_config(input_size, patch_size, enc_mask_scale, pred_mask_scale, aspect_ratio,
                          min_keep, mode, npred, allow_overlap)

    @classmethod
    def from_config(cls, cfg, **kw) -> "MultiBlockMaskSampler":
        m = cfg.mask
        return cls(input_size=cfg.data.crop_size, patch_size=m.patch_size,
                   enc_mask_scale=m.enc_mask_scale, pred_mask_scale=m.pred_mask_scale,
                   aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks, npred=m.num_pred_masks,
                   min_keep=m.min_keep, allow_overlap=m.allow_overlap, mode=m.mode, **kw)

    # resume support: the counter is the only state of its own (reference mode also
    # consumes the global RNG, which the checkpoint saves separately)
    def state_dict(self) -> dict:
        return {"counter": self.counter, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])

    def step(self) -> int:
        self.counter += 1
        return self.counter

    def _sizes(self, g: torch.Generator):
        """(target, context) block sizes of a batch, drawn from the counter-seeded generator ``g``."""
        if self.mode == "reference":
            u, ua = torch.rand(1, generator=g).item(), None   # one draw drives scale and aspect
        else:
            u, ua = torch.rand(2, generator=g).tolist()
        p = block_size(u, self.pred_mask_scale, self.aspect_ratio, self.height, self.width, self.mode, ua)
        u = torch.rand(1, generator=g).item()
        e = block_size(u, self.enc_mask_scale, (1.0, 1.0), self.height, self.width, self.mode, 0.0)
        return p, e

    def _pos_high(self, h: int, w: int) -> tuple[int, int]:
        """Exclusive upper bounds for (top, left) of an h x w block."""
        if self.mode == "reference":   # the reference's randint(0, H - h): never the last row/column
            return self.height - h, self.width - w
        return self.height - h + 1, self.width - w + 1

    def _block(self, size, regions, gen):
        """One block: (ascending flat indices, complement map). Redraws until > min_keep."""
        h, w = size
        hi_top, hi_left = self._pos_high(h, w)
        failures = 0
        while True:
            top = int(torch.randint(0, hi_top, (1,), generator=gen))
            left = int(torch.randint(0, hi_left, (1,), generator=gen))
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if regions is not None:
                # the reference drops the LAST acceptable regions first after every 20 failures
                for region in regions[:max(len(regions) - failures // 20, 0)]:
                    mask *= region
            idx = torch.nonzero(mask.flatten()).squeeze(-1)
            if len(idx) > self.min_keep:
                break
            failures += 1
            if failures % 20 == 0:
                log.warning("mask sampler: no valid mask found, dropping acceptable regions [%d]", failures // 20)
            if self.mode == "paper" and failures > _MAX_TRIES_PAPER:
                raise RuntimeError(f"mask sampler: no block of size {h}x{w} holds more than "
                                   f"min_keep={self.min_keep} patches after {failures} tries")
        comp = torch.ones((self.height, self.width), dtype=torch.int32)
        comp[top:top + h, left:left + w] = 0
        return idx, comp

    def sample_ragged(self, batch_size: int):
        """Untruncated masks: lists (per sample) of lists (per block) of 1-D int64 tensors."""
        seed = self.step()
        p_size, e_size = self._sizes(torch.Generator().manual_seed(seed))
        pos_gen = None   # reference: the global RNG, as the reference does
        if self.mode == "paper":
            pos_gen = torch.Generator().manual_seed(((seed + 1) * 1_000_003 + self.seed_offset) % (2 ** 63))
        enc, pred = [], []
        for _ in range(batch_size):
            targets = [self._block(p_size, None, pos_gen) for _ in range(self.npred)]
            regions = None if self.allow_overlap else [comp for _, comp in targets]
            pred.append([idx for idx, _ in targets])
            enc.append([self._block(e_size, regions, pos_gen)[0] for _ in range(self.nenc)])
        return enc, pred

    def __call__(self, batch_size: int):
        enc, pred = self.sample_ragged(batch_size)
        return collate_truncated(enc), collate_truncated(pred)


def collate_truncated(per_sample: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """[sample][block] index lists -> per block a [B, K] tensor, K = shortest mask of the batch.

    Indices are ascending, so truncation keeps the lowest flat indices (the reference's quirk).
    """
    k = min(len(m) for ms in per_sample for m in ms)
    return [torch.stack([ms[j][:k] for ms in per_sample]) for j in range(len(per_sample[0]))]


class VectorizedMaskSampler(MultiBlockMaskSampler):
    """The multi-block sampler for a whole batch at once, with tensor ops on ``device``.

    Same arguments, modes, block-size rule (counter-seeded generator, one draw per batch)
    and ``[B, K]`` output as :class:`MultiBlockMaskSampler`, but no per-sample Python loop,
    so it can run next to the model on the GPU. It reads two scalars back per batch (does
    any sample need the fallback; ``K``); on CUDA the work runs on a side stream, so those
    reads wait for the sampler's own kernels only, not for the queued training step.

    Distribution: the same as the loop sampler of the chosen mode, not the same numbers.
    Block positions come from the sampler's own generator seeded with (batch counter,
    ``seed_offset``), not from the global torch RNG, so reference-mode *bit* parity stays
    with :class:`MultiBlockMaskSampler`. The loop redraws an invalid context block (not more
    than ``min_keep`` patches left once the sample's targets are removed) and, after every
    20 failures, drops the last remaining target region. Here every sample gets 20
    candidate positions for each of the ``npred + 1`` region levels at once (all targets,
    all but the last, ..., none) and the first valid candidate in that order wins. That is
    the loop's own sequence of independent draws, so the fallback and the resulting
    distribution are reproduced exactly, not approximately.

    Counting every candidate's overlap without a [candidates x grid] tensor: each patch
    gets a bit mask of the targets covering it (one broadcast AND of per-row and
    per-column masks, since targets are rectangles); an integral image of "covered by any
    target" gives the first level's overlap for any position with one gather. Only when
    some sample needs the fallback: at the level that keeps the first ``k`` targets a patch
    is forbidden iff its lowest set bit is below ``k``, and a lookup table turns the bit mask
    into one int64 whose bit fields hold that indicator for every level, so one more
    integral image serves all remaining levels.
    """

    CANDIDATES_PER_LEVEL = 20   # the reference's redraw budget before dropping a region
    MAX_NPRED = 16              # the lookup table has 2**npred entries

    def __init__(self, *args, device="cpu", **kw):
        super().__init__(*args, **kw)
        if self.npred > self.MAX_NPRED:
            raise ValueError(f"VectorizedMaskSampler: npred={self.npred} > {self.MAX_NPRED} target blocks; "
                             f"use MultiBlockMaskSampler for that many")
        self.device = torch.device(device)
        self.last_fallbacks = 0   # context blocks of the last batch that had to drop target regions
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._tables = self._lookup_tables()
        self._pos_gen = None
        self._size_gen = torch.Generator()
        self._first_call = True

    def _lookup_tables(self):
        """``lut[plane, mask]``: packed 'forbidden at level k' bits for a patch covered by ``mask``."""
        npred, H, W = self.npred, self.height, self.width
        bits = (H * W).bit_length()                 # a field counts up to H*W patches
        per = max(1, 62 // bits)                    # fields per int64 plane
        planes = -(-npred // per)
        masks = torch.arange(1 << npred)
        lowest = torch.full((1 << npred,), npred)   # index of the first covering target
        for j in reversed(range(npred)):
            lowest = torch.where((masks >> j) & 1 == 1, j, lowest)
        lut = torch.zeros((planes, 1 << npred), dtype=torch.int64)
        for k in range(1, npred + 1):               # level keeping targets 0..k-1
            lut[(k - 1) // per] += (lowest < k).long() << (bits * ((k - 1) % per))
        # per candidate level t (keeps k = npred - t targets): which plane and field to read;
        # the last level keeps none and reads bit 63, which is 0 in every non-negative sum
        ks = [npred - t for t in range(npred + 1)]
        plane = torch.tensor([max(k - 1, 0) // per for k in ks])
        shift = torch.tensor([bits * ((k - 1) % per) if k > 0 else 63 for k in ks])
        keep_mask = torch.tensor([(1 << k) - 1 for k in ks], dtype=torch.int32).to(torch.int16)

        def spans(n):   # [size, start, n] bool: positions start..start+size-1 of n
            i = torch.arange(n + 1)
            return (i[None, :, None] <= torch.arange(n)) & (torch.arange(n) < i[None, :, None] + i[:, None, None])

        dev, span_r, span_c = self.device, spans(H), spans(W)
        weights = 1 << torch.arange(npred)
        return dict(lut=lut.to(dev), plane=plane.to(dev), shift=shift.to(dev), field=(1 << bits) - 1,
                    keep_mask=keep_mask.to(dev), planes=planes,
                    span_r=span_r.to(dev), span_c=span_c.to(dev), pos=torch.arange(H * W, device=dev),
                    # bits[size][j, start] = span with target j's bit set (int16 wraps bit 15 harmlessly)
                    bits_r=(span_r[:, None] * weights[:, None, None]).to(torch.int16).to(dev),
                    bits_c=(span_c[:, None] * weights[:, None, None]).to(torch.int16).to(dev),
                    target_index=torch.arange(npred, device=dev),
                    count_dtype=torch.int16 if H * W < 2 ** 15 else torch.int32)

    def _generator(self, seed: int) -> torch.Generator:
        if self._pos_gen is None:   # one generator object, reseeded per batch (creating one costs more)
            self._pos_gen = torch.Generator(device=self.device)
        self._pos_gen.manual_seed(((seed + 1) * 2_147_483_647 + self.seed_offset * 1_000_003 + 0x5EED) % (2 ** 63))
        return self._pos_gen

    def _rects(self, top, left, h: int, w: int):
        """h x w rectangles at corners ``top``, ``left`` (same shape ``[...]``) as bool maps ``[..., H*W]``."""
        tb = self._tables
        return (tb["span_r"][h][top][..., :, None] & tb["span_c"][w][left][..., None, :]).flatten(-2)

    def sample_maps(self, batch_size: int):
        """Untruncated context masks as bool maps ``[nenc, B, H*W]`` with their patch counts
        ``[nenc, B]``, target corners ``(top, left)`` (each ``[B, npred]``), target size ``(h, w)``,
        and how many context blocks dropped target regions (an int)."""
        B, H, W, dev, npred = batch_size, self.height, self.width, self.device, self.npred
        seed = self.step()
        self._size_gen.manual_seed(seed)   # the reference's counter-seeded size draws
        (ph, pw), (eh, ew) = self._sizes(self._size_gen)
        if ph * pw <= self.min_keep or eh * ew <= self.min_keep:   # check_mask_config rules this out
            raise RuntimeError(f"mask sampler: block {ph}x{pw} / {eh}x{ew} cannot hold more than "
                               f"min_keep={self.min_keep} patches")
        gen = self._generator(seed)
        tb = self._tables
        hi_t, hi_l = self._pos_high(ph, pw)
        top = torch.randint(0, hi_t, (B, npred), generator=gen, device=dev)
        left = torch.randint(0, hi_l, (B, npred), generator=gen, device=dev)
        hi_t, hi_l = self._pos_high(eh, ew)
        fallbacks = 0
        enc_maps = []
        if self.allow_overlap:
            for _ in range(self.nenc):
                et = torch.randint(0, hi_t, (B,), generator=gen, device=dev)
                el = torch.randint(0, hi_l, (B,), generator=gen, device=dev)
                enc_maps.append(self._rects(et, el, eh, ew))
            counts = torch.full((self.nenc, B), eh * ew, device=dev)
            return torch.stack(enc_maps), counts, (top, left), (ph, pw), fallbacks

        R = self.CANDIDATES_PER_LEVEL
        # bit j of cover[b, r, c] = patch (r, c) lies in target j; int16 keeps the maps small
        j = tb["target_index"]
        row_bits = tb["bits_r"][ph][j, top].sum(1, dtype=torch.int16)                          # [B, H]
        col_bits = tb["bits_c"][pw][j, left].sum(1, dtype=torch.int16)                         # [B, W]
        cover = row_bits[:, :, None] & col_bits[:, None, :]                                     # [B, H, W]

        def box_sums(x):   # [..., H, W] -> sum over the eh x ew block at every corner it can take
            s = F.pad(x.cumsum(-1, dtype=x.dtype).cumsum(-2, dtype=x.dtype), (1, 0, 1, 0))
            box = s[..., eh:, ew:] - s[..., :-eh, ew:] - s[..., eh:, :-ew] + s[..., :-eh, :-ew]
            return box.flatten(-2)

        box_w = W - ew + 1
        if hi_t * hi_l == 1:   # one possible context position (every reference config): no integral image
            union_box = (cover[:, :eh, :ew] != 0).sum((1, 2), keepdim=True).view(B, 1)
        else:
            union_box = box_sums((cover != 0).to(tb["count_dtype"]))                          # [B, corners]
        limit = eh * ew - self.min_keep            # valid iff overlap < limit (> min_keep kept)
        level_box, counts = None, []
        for _ in range(self.nenc):
            # level 0 (every target forbidden): the loop's first 20 draws
            ct = torch.randint(0, hi_t, (B, R), generator=gen, device=dev)
            cl = torch.randint(0, hi_l, (B, R), generator=gen, device=dev)
            overlap = torch.gather(union_box, 1, ct * box_w + cl)                               # [B, R]
            valid = overlap < limit
            first = torch.argmax(valid.to(torch.uint8), dim=1, keepdim=True)
            et, el = ct.gather(1, first).squeeze(1), cl.gather(1, first).squeeze(1)            # [B]
            overlap = overlap.gather(1, first).squeeze(1)
            ok = valid.any(1)
            if bool(ok.all()):   # the common case: every sample kept all its targets out
                allowed = cover == 0
            else:   # some sample needs the loop's region-dropping fallback (costs a host sync)
                if level_box is None:
                    # every level's overlap from one integral image of bit-packed indicators
                    packed = tb["lut"].index_select(1, cover.view(-1).long() & 0xFFFF).view(-1, B, H, W)
                    level_box = box_sums(packed).transpose(0, 1)[:, tb["plane"][1:]]           # [B, npred, corners]
                # levels 1..npred: 20 fresh draws each, as after every 20 failures
                ct2 = torch.randint(0, hi_t, (B, npred, R), generator=gen, device=dev)
                cl2 = torch.randint(0, hi_l, (B, npred, R), generator=gen, device=dev)
                over = (torch.gather(level_box, 2, ct2 * box_w + cl2) >> tb["shift"][1:, None]) & tb["field"]
                over = over.view(B, npred * R)
                # the last level forbids nothing, so it is always valid and argmax finds a True
                first2 = torch.argmax((over < limit).to(torch.uint8), dim=1, keepdim=True)
                et = torch.where(ok, et, ct2.view(B, -1).gather(1, first2).squeeze(1))
                el = torch.where(ok, el, cl2.view(B, -1).gather(1, first2).squeeze(1))
                level = torch.where(ok, 0, 1 + first2.squeeze(1) // R)
                overlap = torch.where(ok, overlap, over.gather(1, first2).squeeze(1).to(overlap.dtype))
                allowed = (cover & tb["keep_mask"][level].view(B, 1, 1)) == 0
                fallbacks += int((~ok).sum())
            enc_maps.append(self._rects(et, el, eh, ew) & allowed.view(B, H * W))
            counts.append(eh * ew - overlap)
        return torch.stack(enc_maps), torch.stack(counts), (top, left), (ph, pw), fallbacks

    def _sample(self, batch_size: int):
        enc_maps, counts, (top, left), (ph, pw), fallbacks = self.sample_maps(batch_size)
        B, W = batch_size, self.width
        k_enc = int(counts.min())                                              # the one host sync
        self.last_fallbacks = fallbacks
        if fallbacks:
            log.warning("mask sampler: %d context block(s) dropped target regions to keep more than "
                        "min_keep=%d patches", fallbacks, self.min_keep)
        # the first k_enc kept patches of every row, ascending (masked_select is row-major)
        keep = enc_maps & (enc_maps.cumsum(-1, dtype=torch.int16) <= k_enc)
        pos = self._tables["pos"]
        masks_enc = list(pos.expand_as(keep).masked_select(keep).view(self.nenc, B, k_enc).unbind(0))
        # targets are unconstrained rectangles: their ascending indices follow from the corner
        offsets = (pos[:ph, None] * W + pos[:pw]).view(-1)
        pred = (top * W + left)[..., None] + offsets                           # [B, npred, ph*pw]
        return masks_enc, list(pred.transpose(0, 1).unbind(0))

    def __call__(self, batch_size: int):
        if self._stream is None:
            return self._sample(batch_size)
        main = torch.cuda.current_stream(self.device)
        if self._first_call:   # the lookup tables were written on the main stream
            self._stream.wait_stream(main)
            self._first_call = False
        # no wait on the main stream otherwise: the sampler reads only its own tensors, so its
        # kernels (and the host reads of K) need not queue behind the training step
        with torch.cuda.stream(self._stream):
            masks_enc, masks_pred = self._sample(batch_size)
        main.wait_stream(self._stream)
        for m in masks_enc + masks_pred:   # memory made on the side stream is used on the main one
            m.record_stream(main)
        return masks_enc, masks_pred

    def sample_ragged(self, batch_size: int):
        """Untruncated masks, [sample][block] lists of 1-D index tensors (for packed predictors)."""
        enc_maps, _, (top, left), (ph, pw), fallbacks = self.sample_maps(batch_size)
        self.last_fallbacks = fallbacks
        pred_maps = self._rects(top, left, ph, pw).transpose(0, 1)   # [npred, B, H*W]

        def split(maps):   # [nblocks, B, HW] -> per block a tuple of B index tensors
            return [torch.split(m.nonzero()[:, 1], m.sum(-1).tolist()) for m in maps]

        return [list(x) for x in zip(*split(enc_maps))], [list(x) for x in zip(*split(pred_maps))]
