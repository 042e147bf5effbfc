"""Collapse diagnostics fire on collapsed features and stay quiet on healthy ones."""
import torch

from engine.diagnostics import collapse_stats, effective_rank, step_stats, warnings_for


def test_constant_features_are_flagged():
    f = torch.ones(64, 32) * 0.3 + 1e-6 * torch.randn(64, 32)
    st = {k: float(v) for k, v in collapse_stats(f).items()}
    assert st["feature_std"] < 1e-3 and st["dead_dims"] == 1.0
    z = torch.randn(16, 9, 32)
    h = torch.ones(16, 9, 32)                       # every image has the same target features
    msgs = warnings_for({k: float(v) for k, v in step_stats(z, h).items()})
    assert any("collapse" in m for m in msgs)


def test_random_features_do_not_fire():
    torch.manual_seed(0)
    z, h = torch.randn(64, 9, 48), torch.randn(64, 9, 48)
    stats = {k: float(v) for k, v in step_stats(z, h).items()}
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
    low = {k: float(v) for k, v in step_stats(torch.randn(512, 3, 192), rows_of_rank(4)).items()}
    ok = {k: float(v) for k, v in step_stats(torch.randn(512, 3, 192), rows_of_rank(16)).items()}
    assert low["target_erank"] < 6 and any("effective rank" in m for m in warnings_for(low))
    assert ok["target_erank"] > 6 and warnings_for(ok) == []
    # a batch of 8 rows cannot show a rank of 6 even when healthy: the cap keeps it quiet
    small = {k: float(v) for k, v in step_stats(torch.randn(8, 3, 48), torch.randn(8, 3, 48)).items()}
    assert small["target_erank"] < 8 and warnings_for(small) == []
