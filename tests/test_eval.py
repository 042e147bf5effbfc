"""Evaluation: probe, k-NN, collapse diagnostics, Fashion-MNIST / image-folder data, the eval CLI
and the PNG helpers."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine.cli import main as cli
from engine.tools.eval import (IMAGENET_MEAN, IMAGENET_STD, collapse_stats, evaluate, extract_features,
                         extract_pooled, fmnist_to_tensor, knn, labelled_subset, linear_probe, load_encoder,
                         load_fmnist, pool_tokens, random_encoder_like, raw_pixel_probe)
from engine.tools.plots import PALETTE, save_line_plot, save_table_png
from ijepa_tiny_ckpt import make_engine_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar")
    make_engine_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def fmnist():
    return load_fmnist("train"), load_fmnist("test")


def blobs(n_per_class, n_classes=3, dim=20, spread=0.3, noise_seed=0):
    """Gaussian blobs around fixed class centres; ``noise_seed`` draws a fresh sample."""
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(y), dim, generator=torch.Generator().manual_seed(noise_seed))
    return centres[y] + spread * noise, y


# ----------------------------------------------------------------------------- probe and k-NN
def test_probe_and_knn_separate_separable_data():
    x_tr, y_tr = blobs(40)
    x_te, y_te = blobs(40, noise_seed=1)
    lp = linear_probe(x_tr, y_tr, x_te, y_te)
    assert lp["top1"] == 100.0 and lp["converged"]
    assert set(lp["test_top1"]) == {0.01, 0.1, 1.0, 10.0} and lp["C"] in lp["test_top1"]
    for vote in ("weighted", "majority"):
        assert knn(x_tr, y_tr, x_te, y_te, k=5, vote=vote)["top1"] == 100.0


def test_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    x_tr, x_te = torch.randn(300, 20, generator=g), torch.randn(600, 20, generator=g)
    y_tr, y_te = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (600,), generator=g)
    assert linear_probe(x_tr, y_tr, x_te, y_te)["top1"] < 45.0     # chance is 33 %
    assert knn(x_tr, y_tr, x_te, y_te)["top1"] < 45.0


def test_probe_picks_C_on_held_out_labels(monkeypatch):
    """C is the one with the best accuracy on a held-out part of the labelled set (fitted on the
    rest), then refitted on all labels; ties go to the stronger regularisation."""
    import engine.tools.eval as ev
    x_tr, y_tr = blobs(10)
    x_te, y_te = blobs(5, noise_seed=1)
    truth = {tuple(r): int(c) for r, c in zip(torch.cat([x_tr, x_te]).double().numpy(), torch.cat([y_tr, y_te]))}
    fits = []

    class Oracle:   # right for C = 0.1 and 10 only; otherwise always class 0
        def __init__(self, C):
            self.C = C

        def predict(self, x):
            return np.array([truth[tuple(r)] if self.C in (0.1, 10.0) else 0 for r in x])

    def fake_fit(x, y, C, max_iter, tol):
        fits.append((C, len(y)))
        return Oracle(C), 1
    monkeypatch.setattr(ev, "_fit", fake_fit)
    lp = ev.linear_probe(x_tr, y_tr, x_te, y_te, Cs=(0.01, 0.1, 1.0, 10.0))
    assert lp["C"] == 0.1 and lp["top1"] == 100.0
    assert lp["val_top1"][0.1] == lp["val_top1"][10.0] == 100.0 and lp["val_top1"][0.01] < 50
    held_out = 30 - sorted({n for _, n in fits})[0]
    assert held_out == 6 and sorted(fits) == sorted([(c, 24) for c in (0.01, 0.1, 1.0, 10.0)] +
                                                    [(c, 30) for c in (0.01, 0.1, 1.0, 10.0)])


def test_probe_on_raw_fashion_mnist_pixels(fmnist):
    (tr, tr_y), (te, te_y) = fmnist
    idx = labelled_subset(tr_y, 500)
    r = raw_pixel_probe(tr[idx], tr_y[idx], te[:500], te_y[:500])
    # documented sklearn number at 1,000 labels on the full test set: 80.1 %
    assert 70.0 <= r["top1"] <= 90.0, r
    assert r["n_train"] == 500 and r["dim"] == 784 and r["converged"]
    k = knn(torch.from_numpy(tr[idx].reshape(500, -1)).float(), tr_y[idx],
            torch.from_numpy(te[:500].reshape(500, -1)).float(), te_y[:500])
    assert 60.0 <= k["top1"] <= 90.0, k


# ----------------------------------------------------------------------------- features
def test_extract_features_is_fp32_under_autocast_and_accepts_loaders(ckpt):
    enc = load_encoder(ckpt)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = extract_features(enc, x, batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = extract_features(enc, x, batch_size=2)
    assert plain.dtype == under_autocast.dtype == torch.float32 and plain.shape == (5, 48)
    assert torch.equal(plain, under_autocast), "autocast must not reach the encoder"
    from_loader = extract_features(enc, [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(2))])
    torch.testing.assert_close(from_loader, plain, atol=1e-6, rtol=0)
    tokens = extract_features(enc, x, pool=None)
    assert tokens.shape == (5, 64, 48)
    torch.testing.assert_close(tokens.mean(1), plain, atol=1e-6, rtol=0)


def test_grid_pooling_averages_each_cell_and_keeps_layout():
    # tokens numbered row-major on a 4x4 grid, feature = (row, col) of the token
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    tokens = torch.stack([rows.flatten(), cols.flatten()], -1).unsqueeze(0)          # [1, 16, 2]
    g2 = pool_tokens(tokens, "grid2").view(2, 2, 2)
    # cell (i, j) covers rows 2i..2i+1 and cols 2j..2j+1: its mean position is (2i + 0.5, 2j + 0.5)
    for i in range(2):
        for j in range(2):
            assert g2[i, j].tolist() == [2 * i + 0.5, 2 * j + 0.5]
    torch.testing.assert_close(pool_tokens(tokens, "mean"), tokens.mean(1))
    torch.testing.assert_close(pool_tokens(tokens, "grid1"), tokens.mean(1))
    assert torch.equal(pool_tokens(tokens, "grid4"), tokens.flatten(1))
    # the point of the grid: two images with the same tokens in different places
    flipped = tokens.flip(1)
    assert torch.equal(pool_tokens(flipped, "mean"), pool_tokens(tokens, "mean"))
    assert not torch.equal(pool_tokens(flipped, "grid2"), pool_tokens(tokens, "grid2"))


@pytest.mark.parametrize("pool,needle", [("max", "use mean or gridK"), ("grid0", "use mean or gridK"),
                                         ("grid9", "square patch grid of at least 9x9")])
def test_bad_pool_is_a_usage_error(pool, needle):
    from engine.errors import UsageError
    with pytest.raises(UsageError, match=needle):
        pool_tokens(torch.zeros(1, 64, 3), pool)


def test_extract_pooled_gives_every_pool_from_one_pass(ckpt):
    enc = load_encoder(ckpt)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    both = extract_pooled(enc, x, ("mean", "grid2"), batch_size=2)
    tokens = extract_features(enc, x, pool=None)
    torch.testing.assert_close(both["mean"], tokens.mean(1), atol=1e-6, rtol=0)
    assert both["grid2"].shape == (3, 4 * 48)
    torch.testing.assert_close(both["grid2"], pool_tokens(tokens, "grid2"), atol=1e-6, rtol=0)


def test_load_encoder_target_context_and_random_baseline(ckpt):
    assert engine.load_encoder is load_encoder
    tgt, ctx = load_encoder(ckpt, "target"), load_encoder(ckpt, "context")
    assert not tgt.training and not any(p.requires_grad for p in tgt.parameters())
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert torch.equal(tgt.blocks[0].attn.qkv.weight, sd["target_encoder"]["module.blocks.0.attn.qkv.weight"])
    assert torch.equal(ctx.blocks[0].attn.qkv.weight, sd["encoder"]["module.blocks.0.attn.qkv.weight"])
    assert not torch.equal(tgt.blocks[0].attn.qkv.weight, ctx.blocks[0].attn.qkv.weight)
    rng_before = torch.get_rng_state()
    r1, r2 = random_encoder_like(tgt, seed=0), random_encoder_like(tgt, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "the baseline must not consume the global RNG"
    assert all(torch.equal(a, b) for a, b in zip(r1.state_dict().values(), r2.state_dict().values()))
    assert r1.state_dict().keys() == tgt.state_dict().keys()
    assert torch.equal(r1.pos_embed, tgt.pos_embed)                  # fixed sin-cos, not random
    assert not torch.equal(r1.blocks[0].mlp.fc1.weight, tgt.blocks[0].mlp.fc1.weight)
    assert abs(r1.blocks[1].attn.proj.weight.std().item() - 0.02) < 0.003   # the reference's re-init


# ----------------------------------------------------------------------------- collapse
def test_collapse_stats_flags_constant_and_low_rank_features():
    const = torch.full((200, 32), 0.7)
    s = collapse_stats(const)
    assert s["collapsed"] and s["effective_rank"] == 0.0 and s["dead_fraction"] == 1.0 and s["std_mean"] == 0.0
    g = torch.Generator().manual_seed(0)
    rank1 = torch.randn(200, 1, generator=g) @ torch.randn(1, 32, generator=g) + 3.0
    s = collapse_stats(rank1)
    assert s["collapsed"] and s["effective_rank"] < 1.01
    # the calibration's collapsed run: per-dim std ~0.004 on unit-scale features
    tiny_spread = torch.randn(1, 32, generator=g) + 0.004 * torch.randn(200, 32, generator=g)
    s = collapse_stats(tiny_spread)
    assert s["collapsed"] and "std" in s["reason"]


def test_collapse_stats_passes_random_features():
    g = torch.Generator().manual_seed(0)
    s = collapse_stats(torch.randn(500, 64, generator=g) + 2.0)
    assert not s["collapsed"] and s["reason"] == ""
    assert s["effective_rank"] > 50 and s["dead_fraction"] == 0.0
    s = collapse_stats(torch.randn(500, 64, generator=g))
    assert 0.8 < s["std_normalized"] / s["std_normalized_healthy"] < 1.2
    with pytest.raises(ValueError):
        collapse_stats(torch.randn(1, 8))


# ----------------------------------------------------------------------------- data
def test_fashion_mnist_reader_and_label_subset(fmnist):
    (tr, tr_y), (te, te_y) = fmnist
    assert tr.shape == (60000, 28, 28) and te.shape == (10000, 28, 28) and tr.dtype == np.uint8
    assert np.bincount(tr_y).tolist() == [6000] * 10 and np.bincount(te_y).tolist() == [1000] * 10
    idx = labelled_subset(tr_y, 1000)
    assert np.array_equal(idx, np.random.default_rng(0).permutation(60000)[:1000])
    per = labelled_subset(tr_y, per_class=7)
    assert np.bincount(tr_y[per]).tolist() == [7] * 10


def test_fashion_mnist_pad_and_resize_rules(fmnist):
    (tr, _), _ = fmnist
    imgs = tr[:4]
    x = fmnist_to_tensor(imgs, 32, 3)
    assert x.shape == (4, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = x * std + mean
    torch.testing.assert_close(pixels[:, :, 2:30, 2:30], torch.from_numpy(imgs).float().div(255).unsqueeze(1)
                               .expand(-1, 3, -1, -1), atol=1e-6, rtol=0)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert pixels[:, :, border].abs().max() < 1e-6, "padding is black (0) before normalisation"
    # smaller crops see the padded 32 px image, as pretraining does; one channel: mean/std 0.5
    grey = fmnist_to_tensor(imgs, 16, 1)
    padded = torch.nn.functional.pad(torch.from_numpy(imgs).float().div(255).unsqueeze(1), (2, 2, 2, 2))
    expect = torch.nn.functional.interpolate(padded, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(grey * 0.5 + 0.5, expect, atol=1e-6, rtol=0)
    # larger crops: the 28 px image resized directly (no padding)
    resized = fmnist_to_tensor(imgs, 64, 3)
    direct = torch.nn.functional.interpolate(torch.from_numpy(imgs).float().div(255).unsqueeze(1), size=(64, 64),
                                             mode="bilinear", antialias=True)
    torch.testing.assert_close(resized * std + mean, direct.expand(-1, 3, -1, -1), atol=1e-6, rtol=0)


def test_imagefolder_data(ckpt, tmp_path, fmnist):
    (tr, tr_y), _ = fmnist
    for split, start in (("train", 0), ("val", 1000)):
        for c in (0, 1):
            (tmp_path / split / f"class{c}").mkdir(parents=True)
            for i in np.flatnonzero(tr_y[start:start + 400] == c)[:12]:
                Image.fromarray(tr[start + i]).convert("RGB").save(tmp_path / split / f"class{c}" / f"{i}.png")
    r = evaluate(ckpt, f"imagefolder:{tmp_path}", protocol="linear", workers=0, log=lambda *_: None)
    assert r["data"]["n_train"] == 24 and r["data"]["n_test"] == 24
    assert r["linear"]["top1"] >= 70.0   # T-shirt vs trouser; 24 labels make the number noisy


# ----------------------------------------------------------------------------- CLI
def test_eval_cli_with_random_baseline_writes_json(ckpt, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", ckpt, "--labels", "300", "--test-limit", "300", "--baseline", "random",
                "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe top-1" in printed and "random-init encoder" in printed and "gain over random" in printed
    r = json.loads(out.read_text())
    assert r["format"] == "engine" and r["encoder"] == "target" and r["data"]["n_train"] == 300
    for res in (r, r["baseline_random"]):
        assert 30.0 < res["linear"]["top1"] <= 100.0 and 20.0 < res["knn"]["top1"] <= 100.0
        assert not res["collapse"]["collapsed"]
    assert r["gain_over_random"]["linear"] == pytest.approx(r["linear"]["top1"] - r["baseline_random"]["linear"]["top1"])


def test_eval_cli_grid_pool(ckpt, tmp_path):
    out = tmp_path / "eval.json"
    assert cli(["eval", "--checkpoint", ckpt, "--labels", "200", "--test-limit", "200", "--protocol", "linear",
                "--pool", "grid2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["pool"] == "grid2" and r["linear"]["dim"] == 4 * 48 and "2x2 cells" in r["features"]
    assert r["collapse"]["dim"] == 48      # collapse figures stay on the mean-pooled features


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint", "/nonexistent/x.pth.tar"], "no such file"),
    (["--labels", "0"], "--labels 0"),
    (["--data", "imagefolder:/nonexistent"], "no train/ subfolder"),
    (["--data", "mnist"], "--data 'mnist'"),
    (["--pool", "max"], "--pool 'max'"),
    (["--pool", "grid9"], "at least 9x9"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_eval_cli_bad_input(ckpt, capsys, args, needle):
    argv = ["eval", "--checkpoint", ckpt] + args if args[0] != "--checkpoint" else ["eval"] + args
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ijepa: error:") and needle in err[0], err


def test_eval_cli_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert cli(["eval", "--checkpoint", str(tmp_path / "notes.txt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- PNG helpers
def test_line_plot_png(tmp_path):
    steps = np.arange(0, 500, 5)
    path = save_line_plot(str(tmp_path / "loss.png"), {"loss": (steps, 0.5 * np.exp(-steps / 100) + 0.01),
                                                       "other": (steps, np.full(len(steps), np.nan))},
                          title="loss", xlabel="step", ylabel="loss", logy=True)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (560, 900, 3)
    near_series = (np.abs(img.astype(int) - 255 * np.array(PALETTE[0])).sum(-1) < 60).sum()
    assert near_series > 300, "the series line is drawn"
    assert (img.sum(-1) < 100).sum() > 500, "axes and text are drawn"


def test_table_png(tmp_path):
    path = save_table_png(str(tmp_path / "t.png"), [["encoder", "top-1 %"], ["raw pixels", "80.1"],
                                                    ["random init", "72.4"]], title="probe")
    img = np.asarray(Image.open(path).convert("L"))
    assert img.shape[0] > 100 and img.shape[1] > 150 and (img < 100).sum() > 200


# ----------------------------------------------------------------------------- make demo's evaluation
def test_demo_skip_train_reports_both_poolings(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    make_engine_checkpoint(str(run / "jepa-latest.pth.tar"))
    (run / "jepa_r0.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    assert cli(["demo", "--skip-train", "--out", str(run), "--labels", "200"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 % mean-pooled" in printed and "top-1 % 2x2 grid" in printed
    r = json.loads((run / "demo.json").read_text())
    assert r["pools"] == ["mean", "grid2"] and [row["encoder"] for row in r["rows"]][2] == "raw pixels"
    pre, rand, raw = r["rows"]
    for pool in ("mean", "grid2"):
        assert r["gain_over_random"][pool] == pytest.approx(pre["top1"][pool] - rand["top1"][pool])
        assert 20.0 < pre["top1"][pool] <= 100.0
    assert raw["top1"]["mean"] == raw["top1"]["grid2"] > 60.0
    assert r["losses"] == [0.5, 0.4]
    assert (run / "demo.png").stat().st_size > 0 and (run / "demo_loss.png").stat().st_size > 0
