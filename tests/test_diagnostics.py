"""Collapse diagnostics fire on collapsed features and stay quiet on healthy ones."""
import torch

from engine.diagnostics import collapse_stats, effective_rank, step_stats, summarise, warnings_for


def stats_of(z, h):
    """What the training loop logs for one step: kept on the device, summarised at the window."""
    kept = step_stats(z, h)
    return {**{k: float(v) for k, v in summarise(kept).items()}, "target_rows": kept["target_rows"]}


def test_constant_features_are_flagged():
    f = torch.ones(64, 32) * 0.3 + 1e-6 * torch.randn(64, 32)
    st = {k: float(v) for k, v in collapse_stats(f).items()}
    assert st["feature_std"] < 1e-3 and st["std_relative"] < 1e-2
    z = torch.randn(16, 9, 32)
    h = torch.ones(16, 9, 32)                       # every image has the same target features
    msgs = warnings_for(stats_of(z, h))
    assert any("collapse" in m for m in msgs)


def test_random_features_do_not_fire():
    torch.manual_seed(0)
    z, h = torch.randn(64, 9, 48), torch.randn(64, 9, 48)
    stats = stats_of(z, h)
    assert warnings_for(stats) == []
    assert stats["target_erank"] > 20


def test_effective_rank_of_rank_one_and_isotropic_data():
    u = torch.randn(100, 1)
    assert float(effective_rank(u @ torch.randn(1, 16))) < 1.01
    assert float(effective_rank(torch.randn(4000, 16))) > 15


def test_rank_threshold_from_the_recorded_runs_and_capped_for_small_batches():
    # 512 pooled rows (batch 128 x 4 blocks) of rank ~5: the collapsed run's signature fires;
    # rank ~10 (what the healthy runs kept) does not
    torch.manual_seed(1)
    def rows_of_rank(r, n=512, d=192):
        return (torch.randn(n, 1, r) @ torch.randn(r, d)).expand(n, 3, d).contiguous()
    low = stats_of(torch.randn(512, 3, 192), rows_of_rank(4))
    ok = stats_of(torch.randn(512, 3, 192), rows_of_rank(16))
    assert low["target_erank"] < 6 and any("effective rank" in m for m in warnings_for(low))
    assert ok["target_erank"] > 6 and warnings_for(ok) == []
    # a batch of 8 rows cannot show a rank of 6 even when healthy: the cap keeps it quiet
    small = stats_of(torch.randn(8, 3, 48), torch.randn(8, 3, 48))
    assert small["target_erank"] < 8 and warnings_for(small) == []
