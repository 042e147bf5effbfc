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
