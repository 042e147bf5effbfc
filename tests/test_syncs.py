"""No host sync per training step: losses, skip flags and diagnostics stay on the device and are
read once per logging window (tests/sync_audit.py counts the reads; a GPU run would stall on each)."""
import os

import pytest

from engine import IJEPAConfig
from engine.strategy import LocalStrategy
from engine.train import RunLog, train
from sync_audit import count_syncs, steady_syncs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def run(tmp_path, *overrides):
    cfg = IJEPAConfig.from_yaml(SMOKE, [f"logging.folder={tmp_path}", "train.progress=false", "logging.log_every=4",
                                        "train.max_steps=12", *overrides])
    with count_syncs(mark=[(RunLog, "flush"), (LocalStrategy, "save")]) as events:
        out = train(cfg)
    return steady_syncs(events), out


@pytest.mark.parametrize("extra", [[], ["logging.diagnostics_every=1"], ["mask.sampler=vectorized", "mask.mode=paper"],
                                   ["train.precision=bf16"]])
def test_a_window_of_default_steps_reads_nothing_back(tmp_path, extra):
    syncs, out = run(tmp_path, *extra)
    assert syncs == [], "\n".join(f"{e[1]} at {e[2]}" for e in syncs)
    assert out["steps"] == 12 and len(out["losses"]) == 12


def test_the_counter_sees_a_per_step_sync(tmp_path):
    """Control: with torch's unfused AdamW the strategy decides each skip on the host, once per step
    (the single-tensor AdamW also reads its CPU step counters, which would not sync on a GPU).
    12 steps; the counting starts after the first window (4 steps)."""
    syncs, _ = run(tmp_path, "optimization.fused_optimizer=false")
    ours = [e for e in syncs if e[2].startswith("[elif not bool(found_inf):]")]
    assert len(ours) == 8, syncs


def test_a_skipped_nonfinite_step_costs_no_sync(tmp_path, monkeypatch):
    """Epoch 2's images are NaN: every step of it is skipped on the device, with no sync, and the
    window read counts them."""
    from engine import data
    orig = data.SyntheticDataset.__getitem__

    def poisoned(self, i):
        img, label, bad = orig(self, i)
        return (img * float("nan") if self.epoch == 1 else img), label, bad
    monkeypatch.setattr(data.SyntheticDataset, "__getitem__", poisoned)
    syncs, out = run(tmp_path, "logging.log_every=2")
    assert syncs == [], syncs
    assert out["skipped"] == 4 and all(l != l for l in out["losses"][8:])
