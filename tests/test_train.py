"""Training loop: exact resume, checkpoints that survive crashes, signals, bad data, non-finite steps."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine import IJEPAConfig
from engine.checkpoint import load_file, save_atomic
from engine.errors import CheckpointError, NonFiniteError
from engine.strategy import LocalStrategy
from engine.train import train, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def smoke(tmp_path, *overrides):
    return IJEPAConfig.from_yaml(SMOKE, [f"logging.folder={tmp_path}", "train.progress=false", *overrides])


def test_loss_falls_and_logs_are_written(tmp_path):
    out = train(smoke(tmp_path))
    assert out["steps"] == 16 and out["stop_reason"] == "finished"
    assert np.mean(out["losses"][-4:]) < np.mean(out["losses"][:4])
    header = open(out["csv"]).readline().strip().split(",")
    assert header[:6] == ["epoch", "itr", "loss", "mask-A", "mask-B", "time (ms)"] and "images/s" in header
    ck = load_file(out["checkpoint"])
    assert {"encoder", "predictor", "target_encoder", "opt", "epoch", "loss", "batch_size", "world_size",
            "lr"} <= set(ck)
    assert ck["epoch"] == 2 and ck["engine"]["step"] == 16
    assert next(iter(ck["encoder"])).startswith("module.")


@pytest.mark.parametrize("stop_at", [5, 8])   # mid-epoch and at an epoch boundary
def test_resume_is_bit_exact(tmp_path, stop_at):
    straight = train(smoke(tmp_path / "a"))["losses"]
    first = train(smoke(tmp_path / "b", f"train.max_steps={stop_at}"))
    assert first["steps"] == stop_at
    second = train(smoke(tmp_path / "b"), resume=True)
    assert first["losses"] + second["losses"] == straight      # bitwise-equal floats
    a, b = load_file(str(tmp_path / "a" / "jepa-latest.pth.tar")), load_file(str(tmp_path / "b" / "jepa-latest.pth.tar"))
    for k in a["target_encoder"]:
        assert torch.equal(a["target_encoder"][k], b["target_encoder"][k])


def test_resume_with_grad_accumulation_and_clipping_is_exact(tmp_path):
    ov = ["optimization.grad_accum_steps=2", "optimization.clip_grad=0.5"]
    straight = train(smoke(tmp_path / "a", *ov))["losses"]
    assert len(straight) == 8
    first = train(smoke(tmp_path / "b", *ov, "train.max_steps=3"))
    second = train(smoke(tmp_path / "b", *ov), resume=True)
    assert first["losses"] + second["losses"] == straight


def test_step_checkpoints_keep_last_k(tmp_path):
    train(smoke(tmp_path, "checkpoint.every_steps=3", "checkpoint.keep_last=2"))
    steps = sorted(f for f in os.listdir(tmp_path) if "-step" in f)
    assert steps == ["jepa-step00000012.pth.tar", "jepa-step00000015.pth.tar"]


def test_sigkill_while_saving_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ck.pth.tar"
    save_atomic({"marker": torch.tensor(1)}, str(path))
    code = ("import sys, torch; sys.path.insert(0, %r)\n"
            "from engine.checkpoint import save_atomic\n"
            "big = {'marker': torch.tensor(2), 'x': torch.randn(40_000_000)}\n"
            "print('go', flush=True)\n"
            "while True: save_atomic(big, %r)\n") % (ROOT, str(path))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go"
    time.sleep(0.3)   # the first 160 MB write is under way
    p.kill()
    p.wait()
    ck = load_file(str(path))
    assert int(ck["marker"]) in (1, 2)
    if int(ck["marker"]) == 2:
        assert ck["x"].numel() == 40_000_000


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > %s" % (tmp_path / "pwned"),))
    path = tmp_path / "evil.pth.tar"
    torch.save({"encoder": Evil()}, str(path))
    with pytest.raises(CheckpointError, match="refused"):
        load_file(str(path))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_file(str(tmp_path / "junk.pth.tar"))


def test_sigterm_saves_and_exits_zero(tmp_path):
    cmd = [sys.executable, "-m", "engine.cli", "train", "--config", SMOKE, "--quiet",
           "--override", f"logging.folder={tmp_path}", "--override", "optimization.epochs=200",
           "--override", "optimization.warmup=1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv_path = tmp_path / "jepa_r0.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (csv_path.exists() and csv_path.stat().st_size > 200):
        time.sleep(0.2)
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert time.time() - t0 < 10
    assert "SIGTERM" in err
    ck = load_file(str(tmp_path / "jepa-latest.pth.tar"))
    assert 0 < ck["engine"]["step"] < 200 * 8


def _jpeg_folder(root, n_per_class=12):
    from PIL import Image
    from engine.data import load_fmnist
    imgs, labels = load_fmnist("train")
    for c in range(2):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i, j in enumerate(np.nonzero(labels == c)[0][:n_per_class]):
            Image.fromarray(imgs[j]).convert("RGB").save(root / f"class{c}" / f"{i:03d}.jpg", quality=90)
    good = (root / "class0" / "000.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "class1" / "notes.jpg").write_text("this is not an image")


def test_corrupt_images_are_counted_and_skipped_not_fatal(tmp_path):
    _jpeg_folder(tmp_path / "imgs")
    cfg = smoke(tmp_path / "run", "data.dataset=imagefolder", f"data.root_path={tmp_path / 'imgs'}",
                "data.batch_size=4", "optimization.epochs=1", "optimization.warmup=0")
    out = train(cfg)
    assert out["steps"] == 26 // 4   # every batch of the epoch was trained
    assert sorted(os.path.basename(b.split(" ")[0]) for b in set(out["bad_files"])) == ["notes.jpg", "truncated.jpg"]
    ck = load_file(out["checkpoint"])
    assert len(ck["engine"]["bad_files"]) >= 2


def _nan_batch(cfg, model, poison=True):
    from engine.masks import MultiBlockMaskSampler
    s = MultiBlockMaskSampler.from_config(cfg)
    me, mp = s(2)
    x = torch.randn(2, 3, 32, 32)
    if poison:
        x[0, 0, 0, 0] = float("nan")
    return [(x, me, mp)]


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_step_is_skipped_but_ema_goes_on(tmp_path, fused):
    cfg = smoke(tmp_path, f"optimization.fused_optimizer={str(fused).lower()}")
    strategy = LocalStrategy(cfg)
    model, opt = strategy.model, strategy.optimizer
    train_step(strategy, _nan_batch(cfg, model, poison=False), lr=1e-3, wd=0.04, momentum=0.9)  # Adam has state
    enc = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    moments = {(i, k): v.clone() for i, st in enumerate(opt.state.values()) for k, v in st.items()}
    with torch.no_grad():
        model.target_encoder.norm.weight.add_(1.0)   # so the EMA visibly moves the target
    tgt = model.target_encoder.norm.weight.clone()
    loss, skipped = train_step(strategy, _nan_batch(cfg, model), lr=1e-3, wd=0.04, momentum=0.9)
    assert skipped and not torch.isfinite(loss)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc[k])
    assert all(torch.equal(v, moments[i, k]) for i, st in enumerate(opt.state.values()) for k, v in st.items())
    assert not torch.equal(model.target_encoder.norm.weight, tgt)
    tgt = model.target_encoder.norm.weight.clone()
    with pytest.raises(NonFiniteError):
        train_step(strategy, _nan_batch(cfg, model), lr=1e-3, wd=0.04, momentum=0.9, nonfinite="stop")
    assert torch.equal(model.target_encoder.norm.weight, tgt)   # stop mode: not even the EMA moved


def test_nonfinite_stop_mode_keeps_a_checkpoint(tmp_path, monkeypatch):
    from engine import data
    orig = data.SyntheticDataset.__getitem__

    def poisoned(self, i):
        img, label, bad = orig(self, i)
        return (img * float("nan") if self.epoch == 1 else img), label, bad
    monkeypatch.setattr(data.SyntheticDataset, "__getitem__", poisoned)
    with pytest.raises(NonFiniteError):
        train(smoke(tmp_path, "train.nonfinite=stop"))
    ck = load_file(str(tmp_path / "jepa-latest.pth.tar"))
    assert ck["engine"]["step"] == 8          # the state before the bad step
    out = train(smoke(tmp_path / "skip"))     # same data, skip mode: trains through
    assert out["skipped"] == 8 and out["steps"] == 16
    rows = open(out["csv"]).read().strip().splitlines()
    col = rows[0].split(",").index("skipped")
    assert rows[-1].split(",")[col] == "8"


def test_vectorized_sampler_trains_and_resumes_exactly(tmp_path):
    ov = ["mask.sampler=vectorized", "mask.mode=paper"]
    straight = train(smoke(tmp_path / "a", *ov))["losses"]
    first = train(smoke(tmp_path / "b", *ov, "train.max_steps=5"))
    second = train(smoke(tmp_path / "b", *ov), resume=True)
    assert first["losses"] + second["losses"] == straight


def test_progress_in_a_log_file_is_one_line_per_window(tmp_path, caplog):
    # stderr is not a terminal here (as under SLURM or `> run.log`): no carriage-return bar, a plain line
    # per log window instead
    with caplog.at_level("INFO", logger="ijepa"):
        train(smoke(tmp_path, "train.progress=true", "logging.log_every=4"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["4/16", "8/16", "12/16", "16/16"]
    assert all(" loss " in ln and " img/s" in ln for ln in lines)


def test_an_infinite_loss_with_finite_gradients_is_skipped(tmp_path, monkeypatch):
    from engine.model import IJEPA
    orig = IJEPA.forward

    def inf_loss(self, *a, **kw):   # +inf added as a constant: the gradients stay finite
        loss, z, h = orig(self, *a, parts=True)
        return loss + float("inf"), z, h
    strategy = LocalStrategy(smoke(tmp_path))
    train_step(strategy, _nan_batch(strategy.cfg, strategy.model, poison=False), lr=1e-3, wd=0.04, momentum=0.9)
    enc = {k: v.clone() for k, v in strategy.model.encoder.state_dict().items()}
    monkeypatch.setattr(IJEPA, "forward", inf_loss)
    loss, skipped = train_step(strategy, _nan_batch(strategy.cfg, strategy.model, poison=False),
                               lr=1e-3, wd=0.04, momentum=0.9)
    assert loss == float("inf") and skipped
    assert all(torch.equal(v, enc[k]) for k, v in strategy.model.encoder.state_dict().items())
