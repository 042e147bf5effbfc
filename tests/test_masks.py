"""Mask sampler: reference quirks, paper mode, and rejection of configs that would hang."""
import pytest
import torch

from engine.config import ConfigError
from engine.masks import MultiBlockMaskSampler, block_size, check_mask_config

REF = dict(input_size=224, patch_size=16, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
           aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10, allow_overlap=False)


def test_reference_context_is_fixed_top_left_square_and_last_row_col_unused():
    torch.manual_seed(0)
    s = MultiBlockMaskSampler(**REF)
    G = 14
    for _ in range(5):
        enc, pred = s(8)
        used = torch.cat([m.flatten() for m in enc + pred])
        rows, cols = used // G, used % G
        assert rows.max() <= G - 2 and cols.max() <= G - 2   # never the last row / column
        assert all(m.shape[0] == 8 for m in enc + pred)
        assert len({m.shape[1] for m in pred}) == 1          # truncated to the batch minimum
        for m in enc[0]:
            assert (torch.diff(m) > 0).all()                  # ascending
        # context never overlaps any of its sample's (untruncated) targets in the kept part
        for b in range(8):
            tgt = set(torch.cat([p[b] for p in pred]).tolist())
            assert not (set(enc[0][b].tolist()) & tgt)


def test_reference_block_size_uses_one_draw_for_scale_and_aspect():
    # the same u drives both: smallest blocks are the widest
    h0, w0 = block_size(0.0, (0.15, 0.2), (0.75, 1.5), 14, 14)
    h1, w1 = block_size(1.0 - 1e-9, (0.15, 0.2), (0.75, 1.5), 14, 14)
    assert h0 <= w0 and h1 > w1
    # enc scale (0.85, 1.0) on 14x14 always gives the clamped 13x13
    assert {block_size(u / 10, (0.85, 1.0), (1.0, 1.0), 14, 14) for u in range(10)} == {(13, 13)}


def test_counter_seeds_sizes_and_state_round_trips():
    s = MultiBlockMaskSampler(**REF)
    torch.manual_seed(1)
    s(2)
    s(2)
    assert s.counter == 1
    state = s.state_dict()
    rng = torch.get_rng_state()
    a = s(4)
    s2 = MultiBlockMaskSampler(**REF)
    s2.load_state_dict(state)
    torch.set_rng_state(rng)
    b = s2(4)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def test_paper_mode_reaches_every_row_and_column_and_is_rng_independent():
    kw = dict(REF, mode="paper")
    s = MultiBlockMaskSampler(**kw)
    G = 14
    seen = torch.zeros(G * G, dtype=torch.bool)
    for _ in range(30):
        enc, pred = s(8)
        for m in pred:
            seen[m.flatten()] = True
    assert seen.view(G, G)[-1].any() and seen.view(G, G)[:, -1].any()
    # positions come from the sampler's own generator: the global RNG does not matter
    a, b = MultiBlockMaskSampler(**kw), MultiBlockMaskSampler(**kw)
    torch.manual_seed(0)
    x = a(4)
    torch.manual_seed(123)
    y = b(4)
    assert all(torch.equal(p, q) for p, q in zip(x[0] + x[1], y[0] + y[1]))


def test_min_keep_is_strict():
    # 3x3 targets (9 patches) with min_keep 8 are fine, with min_keep 9 they would loop forever
    kw = dict(input_size=32, patch_size=4, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.15),
              aspect_ratio=(1.0, 1.0), nenc=1, npred=2)
    assert block_size(0.0, (0.15, 0.15), (1, 1), 8, 8) == (3, 3)
    MultiBlockMaskSampler(min_keep=8, **kw)
    with pytest.raises(ConfigError, match="min_keep"):
        MultiBlockMaskSampler(min_keep=9, **kw)


@pytest.mark.parametrize("crop,patch,min_keep", [(96, 16, 4), (128, 16, 10)])
def test_configs_that_hang_the_reference_are_rejected(crop, patch, min_keep):
    with pytest.raises(ConfigError, match="never finish"):
        check_mask_config(crop, patch, (0.85, 1.0), (0.15, 0.2), (0.75, 1.5), min_keep)
