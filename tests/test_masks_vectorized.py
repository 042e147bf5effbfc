"""VectorizedMaskSampler: same format and the same distribution as the loop sampler.

The statistical comparisons use fixed seeds, so each test is deterministic; the
thresholds (p > 1e-3 to accept, p < 1e-6 to reject) leave a wide margin both ways.
"""
import logging

import pytest
import torch

from engine.masks import MultiBlockMaskSampler, VectorizedMaskSampler, collate_truncated
from stats_util import chi2_homogeneity_p, ks_2samp_p, mean_close

# the reference configs' values on the ViT-H/14 grid (16 x 16)
REF = dict(input_size=224, patch_size=14, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
           aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10, allow_overlap=False)
# small movable context blocks and big targets: about half of the samples need the
# reference's region-dropping fallback, so its distribution is exercised
FALLBACK = dict(input_size=224, patch_size=16, enc_mask_scale=(0.2, 0.3), pred_mask_scale=(0.25, 0.35),
                aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=20, allow_overlap=False)
BATCHES, B = 300, 16


def collect(sampler, cfg, batches=BATCHES, bsz=B):
    """Per-batch target sizes and pooled statistics of the untruncated masks."""
    grid = cfg["input_size"] // cfg["patch_size"]
    sizes, tops, lefts, ctx_counts, kept_levels, k_enc, overlaps, last = [], [], [], [], [], [], 0, 0
    for _ in range(batches):
        enc, pred = sampler.sample_ragged(bsz)
        first = pred[0][0]
        rows, cols = first // grid, first % grid
        sizes.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)))
        k_enc.append(min(len(m) for ms in enc for m in ms))
        for b in range(bsz):
            for t in pred[b]:
                tops.append(int(t[0]) // grid)
                lefts.append(int(t[0]) % grid)
                last += int(t[-1]) // grid == grid - 1 or int(t[-1]) % grid == grid - 1
            ctx = set(enc[b][0].tolist())
            ctx_counts.append(len(ctx))
            # how many leading targets the context avoids: npred unless the fallback dropped regions
            k = 0
            while k < len(pred[b]) and not (ctx & set(pred[b][k].tolist())):
                k += 1
            kept_levels.append(k)
            overlaps += any(ctx & set(t.tolist()) for t in pred[b])
    hist = lambda xs, n: torch.bincount(torch.tensor(xs), minlength=n)  # noqa: E731
    return dict(sizes=sizes, top=hist(tops, grid), left=hist(lefts, grid),
                ctx=hist(ctx_counts, grid * grid + 1), ctx_raw=torch.tensor(ctx_counts), kept=hist(kept_levels, cfg["npred"] + 1),
                k_enc=torch.tensor(k_enc, dtype=torch.double), overlaps=overlaps, last_row_col=last)


@pytest.fixture(scope="module")
def ref_stats():
    torch.manual_seed(0)   # the loop sampler's positions come from the global RNG
    loop = collect(MultiBlockMaskSampler(**REF), REF)
    vec = collect(VectorizedMaskSampler(**REF), REF)
    return loop, vec


def test_output_format_matches_the_loop_sampler():
    v = VectorizedMaskSampler(**REF)
    enc, pred = v(8)
    assert len(enc) == 1 and len(pred) == 4
    for m in enc + pred:
        assert m.dtype == torch.int64 and m.shape[0] == 8 and m.device.type == "cpu"
        assert (torch.diff(m, dim=1) > 0).all()                        # ascending
    assert len({m.shape[1] for m in pred}) == 1
    G = 16
    used = torch.cat([m.flatten() for m in enc + pred])
    assert (used // G).max() <= G - 2 and (used % G).max() <= G - 2   # reference: never last row/col
    for b in range(8):                                                 # no target patch in the context
        assert not set(enc[0][b].tolist()) & set(torch.cat([p[b] for p in pred]).tolist())
    # __call__ is the untruncated masks cut to the batch minimum, like the loop's collate
    a, b = VectorizedMaskSampler(**REF), VectorizedMaskSampler(**REF)
    for _ in range(3):
        e1, p1 = a(8)
        e2, p2 = (collate_truncated(x) for x in b.sample_ragged(8))
        assert all(torch.equal(x, y) for x, y in zip(e1 + p1, e2 + p2))


def test_deterministic_per_counter_and_state_round_trip():
    a = VectorizedMaskSampler(**REF)
    a(4)
    state = a.state_dict()
    x = a(4)
    b = VectorizedMaskSampler(**REF)
    b.load_state_dict(state)
    torch.manual_seed(123)                   # the global RNG plays no part
    y = b(4)
    assert all(torch.equal(p, q) for p, q in zip(x[0] + x[1], y[0] + y[1]))
    c = VectorizedMaskSampler(**REF, seed_offset=1)   # per-rank offset gives other positions
    c.load_state_dict(state)
    z = c(4)
    assert not all(torch.equal(p, q) for p, q in zip(x[1], z[1]))


def test_block_sizes_identical_per_batch_counter(ref_stats):
    loop, vec = ref_stats
    assert loop["sizes"] == vec["sizes"]
    assert len(set(loop["sizes"])) > 3                                 # sizes really vary by batch


def test_position_marginals_match_the_loop_sampler(ref_stats):
    loop, vec = ref_stats
    assert loop["last_row_col"] == 0 and vec["last_row_col"] == 0      # exclusive bound
    assert chi2_homogeneity_p(loop["top"], vec["top"]) > 1e-3
    assert chi2_homogeneity_p(loop["left"], vec["left"]) > 1e-3
    # the reference configs' context is the fixed top-left 15x15 square minus the targets
    assert loop["overlaps"] == 0 and vec["overlaps"] == 0
    assert chi2_homogeneity_p(loop["ctx"], vec["ctx"]) > 1e-3


class _InclusiveBound(VectorizedMaskSampler):
    """A wrong sampler: positions may touch the last row/column in reference mode."""

    def _pos_high(self, h, w):
        return self.height - h + 1, self.width - w + 1


def test_the_position_test_rejects_an_inclusive_bound(ref_stats):
    loop, _ = ref_stats
    bad = collect(_InclusiveBound(**REF), REF)
    assert bad["last_row_col"] > 0
    assert chi2_homogeneity_p(loop["top"], bad["top"]) < 1e-6
    assert chi2_homogeneity_p(loop["left"], bad["left"]) < 1e-6


def test_token_counts_match_the_loop_sampler(ref_stats):
    loop, vec = ref_stats
    lk, vk = loop["k_enc"], vec["k_enc"]   # context tokens per batch after truncation
    assert mean_close(lk, vk)
    assert ks_2samp_p(lk, vk) > 1e-3
    for q in (0.1, 0.5, 0.9):
        assert abs(torch.quantile(lk, q) - torch.quantile(vk, q)) <= 0.25 * lk.std()


@pytest.fixture(scope="module")
def fallback_stats():
    torch.manual_seed(1)
    logging.disable(logging.WARNING)   # both samplers warn on every fallback
    try:
        loop = collect(MultiBlockMaskSampler(**FALLBACK), FALLBACK, batches=150)
        vec = collect(VectorizedMaskSampler(**FALLBACK), FALLBACK, batches=150)
    finally:
        logging.disable(logging.NOTSET)
    return loop, vec


def test_region_dropping_fallback_matches_the_loop_sampler(fallback_stats):
    loop, vec = fallback_stats
    n = 150 * B
    # the fallback really happens, at the same rate, and drops regions in the same order
    assert 0.3 * n < loop["overlaps"] < 0.7 * n
    assert abs(loop["overlaps"] - vec["overlaps"]) < 0.06 * n
    assert chi2_homogeneity_p(loop["kept"], vec["kept"]) > 1e-3
    assert chi2_homogeneity_p(loop["top"], vec["top"]) > 1e-3
    # context sizes after removing the targets
    assert ks_2samp_p(loop["ctx_raw"], vec["ctx_raw"]) > 1e-3
    assert mean_close(loop["ctx_raw"].double(), vec["ctx_raw"].double())


class _FiveDraws(VectorizedMaskSampler):
    """A wrong sampler: drops a target region after 5 failed draws instead of the reference's 20."""
    CANDIDATES_PER_LEVEL = 5


def test_the_fallback_test_rejects_a_different_redraw_budget(fallback_stats):
    loop, _ = fallback_stats
    logging.disable(logging.WARNING)
    try:
        bad = collect(_FiveDraws(**FALLBACK), FALLBACK, batches=150)
    finally:
        logging.disable(logging.NOTSET)
    assert chi2_homogeneity_p(loop["kept"], bad["kept"]) < 1e-6
    assert ks_2samp_p(loop["ctx_raw"], bad["ctx_raw"]) < 1e-6


def test_fallback_count_is_reported_and_patch_counts_are_exact():
    v = VectorizedMaskSampler(**FALLBACK)
    total = 0
    for _ in range(10):
        enc, pred = v(16)
        total += v.last_fallbacks
        assert enc[0].shape[1] > FALLBACK["min_keep"]                  # strictly more than min_keep
    assert total > 0
    # the counts that set K come from the integral images; they must equal the maps' sums
    for cfg in (REF, FALLBACK, dict(FALLBACK, allow_overlap=True), dict(FALLBACK, nenc=2)):
        s = VectorizedMaskSampler(**cfg)
        for _ in range(5):
            maps, counts, *_ = s.sample_maps(32)
            assert torch.equal(maps.sum(-1), counts.long())


def test_allow_overlap_and_paper_mode_follow_the_loop_sampler():
    cfg = dict(FALLBACK, allow_overlap=True)
    torch.manual_seed(2)
    loop = collect(MultiBlockMaskSampler(**cfg), cfg, batches=100)
    vec = collect(VectorizedMaskSampler(**cfg), cfg, batches=100)
    assert chi2_homogeneity_p(loop["ctx"], vec["ctx"]) > 1e-3   # a plain rectangle: size only
    assert vec["overlaps"] > 0
    paper = dict(REF, mode="paper")
    loop = collect(MultiBlockMaskSampler(**paper), paper, batches=100)
    vec = collect(VectorizedMaskSampler(**paper), paper, batches=100)
    assert loop["sizes"] == vec["sizes"]
    assert vec["last_row_col"] > 0                                     # inclusive bound in paper mode
    assert abs(loop["last_row_col"] - vec["last_row_col"]) < 0.1 * loop["last_row_col"]
    assert chi2_homogeneity_p(loop["top"], vec["top"]) > 1e-3
    assert chi2_homogeneity_p(loop["left"], vec["left"]) > 1e-3


def test_too_many_target_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="MultiBlockMaskSampler"):
        VectorizedMaskSampler(**dict(REF, npred=17, pred_mask_scale=(0.02, 0.03), min_keep=1))
