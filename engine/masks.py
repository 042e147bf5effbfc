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

log = logging.getLogger(__name__)

_MAX_TRIES_PAPER = 1000


def _as_pair(x):
    return (x, x) if isinstance(x, (int, float)) else tuple(x)


def block_size(u: float, scale, aspect, height: int, width: int, mode: str = "reference",
               u_aspect: float | None = None) -> tuple[int, int]:
    """Block (h, w) for a uniform draw ``u`` (and, in paper mode, a separate ``u_aspect``)."""
    min_s, max_s = scale
    s = min_s + u * (max_s - min_s)
    max_keep = int(height * width * s)
    min_ar, max_ar = aspect
    ua = u if (mode == "reference" or u_aspect is None) else u_aspect
    ar = min_ar + ua * (max_ar - min_ar)
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    if mode == "reference":
        # reference clamp: a block is at most (H-1) x (W-1)
        while h >= height:
            h -= 1
        while w >= width:
            w -= 1
    else:
        h, w = max(1, min(h, height)), max(1, min(w, width))
    return h, w


def _size_range(scale, aspect, height, width, mode):
    """(min, max) of h*w over every size the sampler can draw (sizes are step functions of u)."""
    areas = []
    n = 2001
    for i in range(n):
        u = i / (n - 1) if i < n - 1 else 1.0 - 1e-12
        if mode == "reference":
            h, w = block_size(u, scale, aspect, height, width, mode)
            areas.append(h * w)
        else:
            for ua in (0.0, 0.5, 1.0 - 1e-12):
                h, w = block_size(u, scale, aspect, height, width, mode, ua)
                areas.append(h * w)
    return min(areas), max(areas)


def check_mask_config(input_size, patch_size, enc_mask_scale, pred_mask_scale, aspect_ratio,
                      min_keep, mode="reference", npred=4, allow_overlap=False) -> None:
    """Reject configs for which sampling can never finish.

    The reference redraws a block until it holds more than ``min_keep`` patches; a target
    block whose drawn size is ``h*w <= min_keep`` therefore loops forever (crop 96 / patch 16 /
    min_keep 4 hangs on a 2x2 target). Every drawable size must be large enough.
    """
    from engine.config import ConfigError
    hh, ww = (_as_pair(input_size)[0] // patch_size, _as_pair(input_size)[1] // patch_size)
    lo, hi = _size_range(pred_mask_scale, aspect_ratio, hh, ww, mode)
    if lo <= min_keep:
        raise ConfigError(
            f"mask: target blocks on a {hh}x{ww} grid can be as small as {lo} patches, not more than "
            f"mask.min_keep={min_keep}, so sampling would never finish; lower mask.min_keep below {lo} "
            f"or raise mask.pred_mask_scale")
    elo, _ = _size_range(enc_mask_scale, (1.0, 1.0), hh, ww, mode)
    if elo <= min_keep:
        raise ConfigError(
            f"mask: context blocks on a {hh}x{ww} grid can be as small as {elo} patches, not more than "
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
        input_size = _as_pair(input_size)
        self.patch_size = patch_size
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        self.enc_mask_scale = tuple(enc_mask_scale)
        self.pred_mask_scale = tuple(pred_mask_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.nenc, self.npred = nenc, npred
        self.min_keep = min_keep
        self.allow_overlap = allow_overlap
        self.mode = mode
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

    # ------------------------------------------------------------------ sampling
    def _sizes(self, g: torch.Generator):
        if self.mode == "reference":
            u = torch.rand(1, generator=g).item()
            p = block_size(u, self.pred_mask_scale, self.aspect_ratio, self.height, self.width)
            u = torch.rand(1, generator=g).item()
            e = block_size(u, self.enc_mask_scale, (1.0, 1.0), self.height, self.width)
        else:
            u, ua = torch.rand(2, generator=g).tolist()
            p = block_size(u, self.pred_mask_scale, self.aspect_ratio, self.height, self.width, "paper", ua)
            u = torch.rand(1, generator=g).item()
            e = block_size(u, self.enc_mask_scale, (1.0, 1.0), self.height, self.width, "paper", 0.0)
        return p, e

    def _block(self, size, regions, gen):
        """One block: (ascending flat indices, complement map). Redraws until > min_keep."""
        h, w = size
        H, W = self.height, self.width
        tries, timeout = 0, 20
        # reference: exclusive upper bound (never the last row/column); paper: inclusive
        hi_top, hi_left = (H - h, W - w) if self.mode == "reference" else (H - h + 1, W - w + 1)
        attempts = 0
        while True:
            top = int(torch.randint(0, hi_top, (1,), generator=gen))
            left = int(torch.randint(0, hi_left, (1,), generator=gen))
            mask = torch.zeros((H, W), dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if regions is not None:
                # the reference drops the LAST acceptable regions first after every 20 failures
                for k in range(max(len(regions) - tries, 0)):
                    mask *= regions[k]
            idx = torch.nonzero(mask.flatten()).squeeze(-1)
            if len(idx) > self.min_keep:
                break
            timeout -= 1
            attempts += 1
            if timeout == 0:
                tries += 1
                timeout = 20
                log.warning("mask sampler: no valid mask found, dropping acceptable regions [%d]", tries)
            if self.mode == "paper" and attempts > _MAX_TRIES_PAPER:
                raise RuntimeError(f"mask sampler: no block of size {h}x{w} holds more than "
                                   f"min_keep={self.min_keep} patches after {attempts} tries")
        comp = torch.ones((H, W), dtype=torch.int32)
        comp[top:top + h, left:left + w] = 0
        return idx, comp

    def sample_ragged(self, batch_size: int):
        """Untruncated masks: lists (per sample) of lists (per block) of 1-D int64 tensors."""
        seed = self.step()
        g = torch.Generator()
        g.manual_seed(seed)
        p_size, e_size = self._sizes(g)
        if self.mode == "reference":
            pos_gen = None   # the global RNG, as the reference does
        else:
            pos_gen = torch.Generator()
            pos_gen.manual_seed(((seed + 1) * 1_000_003 + self.seed_offset) % (2 ** 63))
        enc, pred = [], []
        for _ in range(batch_size):
            masks_p, comps = [], []
            for _ in range(self.npred):
                idx, comp = self._block(p_size, None, pos_gen)
                masks_p.append(idx)
                comps.append(comp)
            regions = None if self.allow_overlap else comps
            masks_e = [self._block(e_size, regions, pos_gen)[0] for _ in range(self.nenc)]
            pred.append(masks_p)
            enc.append(masks_e)
        return enc, pred

    def __call__(self, batch_size: int):
        enc, pred = self.sample_ragged(batch_size)
        return collate_truncated(enc), collate_truncated(pred)


def collate_truncated(per_sample: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """[sample][block] index lists -> per block a [B, K] tensor, K = shortest mask of the batch.

    Indices are ascending, so truncation keeps the lowest flat indices (the reference's quirk).
    """
    k = min(len(m) for ms in per_sample for m in ms)
    nblocks = len(per_sample[0])
    return [torch.stack([ms[j][:k] for ms in per_sample]) for j in range(nblocks)]
