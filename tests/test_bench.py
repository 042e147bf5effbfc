"""Benchmarks and profiling: FLOP model, e2e harness against a fake reference checkout,
profile phases and trace, kernel-benchmark runner, CLI errors. No timing is asserted."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from engine import IJEPAConfig
from engine.tools.flops import (device_peak_tflops, expected_tokens, flops_from_config, paper_reference_figure,
                          step_flops)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
BENCH = os.path.join(ROOT, "configs", "bench_vit_tiny.yaml")
VITH14 = os.path.join(ROOT, "configs", "in1k_vith14_ep300.yaml")


from engine.cli import main  # noqa: E402


# ------------------------------------------------------------------ a fake reference checkout
# Same module layout, names and signatures as facebookresearch/ijepa, built from the engine's
# own modules, so the harness's import and adaptation code runs without the real checkout.
FAKE = {
    "src/models/vision_transformer.py": """
        from engine.config import VIT_SIZES
        from engine.model import VisionTransformer, VisionTransformerPredictor

        def vit_predictor(**kw):
            p = VisionTransformerPredictor(num_patches=kw["num_patches"], embed_dim=kw["embed_dim"],
                                           predictor_embed_dim=kw["predictor_embed_dim"], depth=kw["depth"],
                                           num_heads=kw["num_heads"], attn_backend="naive")
            p.skip_unused_rows = False   # the reference computes every row
            return p

        def vit_tiny(patch_size=16, **kw):
            d, depth, heads, ratio = VIT_SIZES["vit_tiny"]
            return VisionTransformer(img_size=kw.get("img_size", [224])[0], patch_size=patch_size, embed_dim=d,
                                     depth=depth, num_heads=heads, mlp_ratio=ratio, attn_backend="naive")
        """,
    "src/helper.py": """
        import logging, sys
        import torch
        import src.models.vision_transformer as vit
        from engine.model import _reinit
        from engine.schedules import Schedules
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)

        def init_model(device, patch_size=16, model_name='vit_base', crop_size=224, pred_depth=6, pred_emb_dim=384):
            torch.randn(7)   # a different RNG stream from the engine's build: weights must be copied over
            enc = vit.__dict__[model_name](img_size=[crop_size], patch_size=patch_size)
            pred = vit.vit_predictor(num_patches=enc.patch_embed.num_patches, embed_dim=enc.embed_dim,
                                     predictor_embed_dim=pred_emb_dim, depth=pred_depth, num_heads=enc.num_heads)
            _reinit(enc); _reinit(pred)
            print(enc)   # the real one logs the whole model to stdout
            return enc.to(device), pred.to(device)

        class _Sched:
            def __init__(self, opt, fn, wd):
                self.opt, self.fn, self.wd, self.k = opt, fn, wd, 0
            def step(self):
                v = self.fn(self.k); self.k += 1
                for g in self.opt.param_groups:
                    if not self.wd:
                        g["lr"] = v
                    elif not g.get("WD_exclude", False):
                        g["weight_decay"] = v
                return v

        def init_opt(encoder, predictor, iterations_per_epoch, start_lr, ref_lr, warmup, num_epochs, wd=1e-6,
                     final_wd=1e-6, final_lr=0.0, use_bfloat16=False, ipe_scale=1.25):
            def split(m, decay):
                return [p for n, p in m.named_parameters() if (("bias" not in n) and p.ndim != 1) == decay]
            opt = torch.optim.AdamW([{"params": split(encoder, True)}, {"params": split(predictor, True)},
                                     {"params": split(encoder, False), "WD_exclude": True, "weight_decay": 0},
                                     {"params": split(predictor, False), "WD_exclude": True, "weight_decay": 0}])
            s = Schedules(ipe=iterations_per_epoch, epochs=num_epochs, warmup=warmup, start_lr=start_lr, ref_lr=ref_lr,
                          final_lr=final_lr, ref_wd=wd, final_wd=final_wd, ema=(0.996, 1.0), ipe_scale=ipe_scale)
            return opt, None, _Sched(opt, s.lr, False), _Sched(opt, s.wd, True)
        """,
    "src/masks/utils.py": """
        import torch

        def apply_masks(x, masks):
            out = []
            for m in masks:
                g = torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, x.size(-1)))
                out.append(g * 1.5 if SHIFT else g)   # SHIFT: deliberately wrong (loss-mismatch test)
            return torch.cat(out, 0)
        SHIFT = False
        """,
    "src/utils/tensors.py": """
        from engine.model import repeat_interleave_batch
        """,
    "src/utils/logging.py": """
        import torch
        CALLS = []

        def grad_logger(named_params):
            norms = [float(torch.norm(p.grad)) for n, p in named_params
                     if p.grad is not None and not (n.endswith('.bias') or p.ndim == 1)]
            CALLS.append(len(norms))
            return norms
        """,
}


def make_fake_reference(root, wrong_targets=False):
    for rel, text in FAKE.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = textwrap.dedent(text)
        if wrong_targets:
            text = text.replace("SHIFT = False", "SHIFT = True")
        with open(path, "w") as f:
            f.write(text)
    return str(root)


def tiny_factory_config(tmp_path):
    """vit_tiny (a factory size, as the reference needs) on an 8x8 grid: fast on a CPU."""
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent("""
        meta: {model_name: vit_tiny, pred_depth: 1, pred_emb_dim: 24, use_bfloat16: false}
        data: {dataset: synthetic, batch_size: 4, crop_size: 32, num_workers: 0, pin_mem: false}
        mask: {patch_size: 4, min_keep: 4}
        optimization: {epochs: 2, warmup: 1}
        logging: {folder: runs/tiny, tensorboard: false}
        train: {threads: 1}
        """))
    return str(path)


# ------------------------------------------------------------------ FLOP model
def test_flops_match_hand_computed_tiny_model():
    # 8x8 image, patch 4 -> N = 4 patches, 3 channels, D = 8, 1 layer, MLP ratio 4 (hidden 32);
    # predictor width 4, 1 layer; K_ctx = 2, K_pred = 1; 1 context block, 2 target blocks.
    sf = step_flops(num_patches=4, in_chans=3, patch_size=4, embed_dim=8, depth=1, mlp_ratio=4.0, pred_dim=4,
                    pred_depth=1, k_ctx=2, k_pred=1, nenc=1, npred=2)
    patch = 2 * 4 * (3 * 4 * 4) * 8              # conv as a matmul per patch: 4 x 48 x 8 MACs = 3072
    per_tok = 2 * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8)   # qkv, proj, fc1, fc2 = 1536
    target = patch + 4 * per_tok + 2 * 2 * 4 * 4 * 8   # + QK^T and AV on 4 tokens: 512 -> 9728
    ctx_fwd = patch + 2 * per_tok + 2 * 2 * 2 * 2 * 8  # 2 tokens: 3072 + 3072 + 128 = 6272
    ctx_bwd = patch + 2 * (2 * per_tok + 128)          # conv: weight grad only -> 9472
    p_tok = 2 * (4 * 12 + 4 * 4 + 4 * 16 + 16 * 4)     # 384 per token
    pred_fwd = (2 * 3 * p_tok                      # 2 sequences of 3 tokens: 2304
                + 2 * 2 * 2 * 3 * 3 * 4            # attention: 2 seqs x 4 x 9 x 4 = 288
                + 2 * 2 * 8 * 4                    # predictor_embed on 2 context tokens: 128
                + 2 * 2 * 1 * 4 * 8)               # predictor_proj on 2 x 1 query tokens: 128 -> 2848
    assert (target, ctx_fwd, ctx_bwd, pred_fwd) == (9728, 6272, 9472, 2848)
    assert sf.parts["target_fwd"].total == target
    assert sf.parts["context_fwd"].total == ctx_fwd
    assert sf.parts["context_bwd"].total == ctx_bwd
    assert sf.parts["predictor_fwd"].total == pred_fwd
    assert sf.parts["predictor_bwd"].total == 2 * pred_fwd
    assert sf.total == 34016
    assert sf.parts["target_fwd"].attention == 512 and sf.parts["target_fwd"].patch == 3072


def test_vith14_total_and_paper_figure():
    cfg = IJEPAConfig.from_yaml(VITH14, validate=False)
    sf = flops_from_config(cfg, k_ctx=69, k_pred=44)
    assert sf.total == pytest.approx(656e9, rel=0.03)
    g = {k: v / sf.total for k, v in sf.group().items()}
    assert g["target encoder fwd"] == pytest.approx(0.51, abs=0.02)
    assert g["context encoder fwd+bwd"] == pytest.approx(0.40, abs=0.02)
    assert g["predictor fwd+bwd"] == pytest.approx(0.09, abs=0.02)
    assert sf.split()["attention"] / sf.total < 0.05
    pr = paper_reference_figure(sf.total)
    assert pr["images_per_s_per_gpu"] == pytest.approx(92.7, abs=0.1)
    assert pr["mfu"] == pytest.approx(0.195, abs=0.01)
    assert any("312" in line for line in pr["arithmetic"])


def test_device_peak_table():
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert device_peak_tflops("NVIDIA H200") == 989
    assert device_peak_tflops("NVIDIA A100-PCIE-40GB") == 312
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756 and device_peak_tflops("NVIDIA H100 NVL") == 835
    assert device_peak_tflops("NVIDIA H200 NVL") == 835
    assert device_peak_tflops("Tesla T4") is None and device_peak_tflops(None) is None


def test_expected_tokens_follow_the_mask_config():
    cfg = IJEPAConfig.from_yaml(BENCH)
    state = torch.get_rng_state()
    kc, kp = expected_tokens(cfg, batches=6)
    assert torch.equal(state, torch.get_rng_state())   # the caller's RNG is left alone
    # 14x14 grid: context is the 13x13 square minus 4 target blocks of ~29-39 patches, cut to the batch min
    assert 10 < kp <= 45 and 10 < kc < 169
    assert expected_tokens(cfg, batches=6) == (kc, kp)


# ------------------------------------------------------------------ e2e against a fake reference
def test_e2e_against_fake_reference(tmp_path):
    ref = make_fake_reference(tmp_path / "ref")
    cfg = tiny_factory_config(tmp_path)
    out, png, md = tmp_path / "e2e.json", tmp_path / "e2e.png", tmp_path / "e2e.md"
    rc = main(["bench", "e2e", "--config", cfg, "--reference", ref, "--device", "cpu", "--steps", "2",
               "--warmup", "1", "--mem-steps", "1", "--json", str(out), "--plot", str(png), "--markdown", str(md)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["sides"]) == {"engine", "reference"}
    e, r = rep["sides"]["engine"], rep["sides"]["reference"]
    assert len(e["losses"]) == len(r["losses"]) == 3
    # the fake builds its weights from another RNG stream: equal step-0 losses prove the copy
    assert rep["losses"]["agree"] and rep["losses"]["max_rel_diff"] < 1e-5
    assert e["losses"][-1] != e["losses"][0]          # it trained
    calls = sys.modules["src.utils.logging"].CALLS   # the reference's grad_logger ran once per step
    assert len(calls) == 3 and all(c > 0 for c in calls)
    for side in (e, r):
        assert side["images_per_s"] > 0 and side["step"]["n"] == 2
        assert side["memory"]["peak_rss_above_build_mib"] > 0, side["memory"]
    assert rep["ratio"]["images_per_s"] > 0 and rep["ratio"]["peak_memory"] > 0
    for k in ("device", "cpu_model", "threads", "torch", "git_commit", "date", "command"):
        assert rep["meta"][k] not in (None, "")
    assert "--reference" in rep["meta"]["command"]
    assert rep["flops"]["per_image_flops"] > 0
    text = md.read_text()
    assert "engine / reference" in text and "Losses agree" in text and rep["meta"]["torch"] in text
    im = Image.open(png)
    assert im.size[0] > 600 and im.size[1] > 400


def test_e2e_reports_disagreeing_losses(tmp_path, capsys):
    ref = make_fake_reference(tmp_path / "ref", wrong_targets=True)
    rc = main(["bench", "e2e", "--config", tiny_factory_config(tmp_path), "--reference", ref, "--steps", "1",
               "--warmup", "0", "--no-memory", "--device", "cpu"])
    assert rc == 1
    cap = capsys.readouterr()
    assert "DISAGREE" in cap.out and "not valid" in cap.err


def test_e2e_engine_alone(tmp_path):
    out = tmp_path / "e.json"
    rc = main(["bench", "e2e", "--config", SMOKE, "--steps", "2", "--warmup", "0", "--no-memory", "--device",
               "cpu", "--batch-size", "4", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert list(rep["sides"]) == ["engine"] and rep["settings"]["batch_size"] == 4 and not rep["ratio"]


# ------------------------------------------------------------------ profile
def test_profile_writes_trace_and_phase_table(tmp_path, capsys):
    trace, out = tmp_path / "trace.json", tmp_path / "prof.json"
    rc = main(["profile", "--config", SMOKE, "--steps", "2", "--warmup", "1",
               "--trace", str(trace), "--json", str(out), "--device", "cpu"])
    assert rc == 0
    events = json.loads(trace.read_text())["traceEvents"]
    names = {ev.get("name") for ev in events}
    assert {"ijepa::target_forward", "ijepa::backward", "ijepa::ema"} <= names
    rep = json.loads(out.read_text())
    phases = {p["phase"]: p for p in rep["sides"]["engine"]["phases"]}
    # optimizer and ema are ranges inside engine.train.train_step: the profile times the real step
    assert {"data", "mask_sampling", "target_forward", "context_forward", "predictor", "backward", "optimizer",
            "ema"} <= set(phases)
    assert sum(p["percent"] for p in phases.values()) == pytest.approx(100.0, abs=0.01)
    assert all(p["ms_per_step"] >= 0 for p in phases.values()) and phases["backward"]["ms_per_step"] > 0
    assert any(o["op"].startswith("aten::") for o in rep["sides"]["engine"]["top_ops"])
    assert "| phase |" in capsys.readouterr().out


def test_profile_with_fake_reference_interleaves_same_masks(tmp_path):
    ref = make_fake_reference(tmp_path / "ref")
    out = tmp_path / "p.json"
    rc = main(["profile", "--config", tiny_factory_config(tmp_path), "--reference", ref, "--steps", "2",
               "--warmup", "0", "--json", str(out), "--device", "cpu"])
    assert rc == 0
    rep = json.loads(out.read_text())
    e, r = rep["sides"]["engine"], rep["sides"]["reference"]
    assert e["losses"] == pytest.approx(r["losses"], rel=1e-5)   # same images, masks and weights
    assert "grad_logger" in {p["phase"] for p in r["phases"]}


# ------------------------------------------------------------------ kernels runner
GATHER_SCRIPT = """
import argparse, json
p = argparse.ArgumentParser(); p.add_argument("--json"); a = p.parse_args()
json.dump({"environment": {"device": "cpu"}, "rows": [
    {"case": "B16 K64", "provider": "ref", "ms": 1.5}, {"case": "B16 K64", "provider": "triton", "ms": 0.5},
    {"case": "B16 K32", "provider": "ref", "ms": 2.0}, {"case": "B16 K32", "provider": "triton", "ms": 1.0}]},
    open(a.json, "w"))
"""


def test_kernels_runner_reads_json_and_reports_missing_and_failing(tmp_path):
    bd = tmp_path / "benchmarks"
    bd.mkdir()
    (bd / "bench_gather.py").write_text(GATHER_SCRIPT)
    (bd / "bench_ema.py").write_text("import sys; print('no GPU', file=sys.stderr); sys.exit(3)\n")
    out, png = tmp_path / "k.json", tmp_path / "k.png"
    rc = main(["bench", "kernels", "--bench-dir", str(bd), "--json", str(out), "--png", str(png)])
    assert rc == 0
    rep = json.loads(out.read_text())
    st = {s["script"]: s["status"] for s in rep["scripts"]}
    assert st["bench_gather.py"] == "ok" and st["bench_attention.py"] == "not present"
    assert st["bench_ema.py"].startswith("failed (exit 3)") and "no GPU" in st["bench_ema.py"]
    assert [r["speedup"] for r in rep["results"]] == [pytest.approx(3.0), 2.0]
    assert Image.open(png).size[0] >= 720


def test_kernel_json_layouts():
    from engine.tools.bench import normalise_kernel_json
    with pytest.raises(ValueError):
        normalise_kernel_json({"oops": 1}, "x")
    # long layout of benchmarks/_common.py: one row per provider, the baseline among them
    gather = {"environment": {"device": "CPU: X"}, "rows": [
        {"case": "ctx", "provider": "ref", "ms": 3.0, "gb_per_s": 1.0},
        {"case": "ctx", "provider": "index_select", "ms": 1.5, "gb_per_s": 2.0},
        {"case": "tgt", "provider": "ref", "ms": 2.0}, {"case": "tgt", "provider": "triton sorted", "ms": 0.5}]}
    rows = normalise_kernel_json(gather, "g")
    assert [(r["case"], r["impl"], r["baseline"], r["speedup"]) for r in rows] == [
        ("ctx", "index_select", "ref", 2.0), ("tgt", "triton sorted", "ref", 4.0)]
    attn = {"env": {"device": "CPU"}, "speed": [
        {"backend": "naive", "B": 4, "N": 69, "d": 32, "dtype": "float32", "fwd_ms": 2.0, "fwd_bwd_ms": 6.0,
         "fwd_tflops": 0.1},
        {"backend": "sdpa", "B": 4, "N": 69, "d": 32, "dtype": "float32", "fwd_ms": 1.0, "fwd_bwd_ms": 4.0},
        {"backend": "triton", "B": 4, "N": 69, "d": 32, "dtype": "float32", "error": "needs CUDA"}]}
    rows = normalise_kernel_json(attn, "a")
    assert {(r["case"], r["impl"], r["speedup"]) for r in rows} == {
        ("B=4, N=69, d=32, dtype=float32 [fwd]", "sdpa", 2.0), ("B=4, N=69, d=32, dtype=float32 [fwd_bwd]", "sdpa", 1.5)}


# ------------------------------------------------------------------ CLI errors: one line, exit 2
# ``python -m engine.cli`` from this checkout, without the shared venv's editable-install finder
# (it resolves modules this checkout lacks, e.g. another branch's subcommands, to another checkout)
_DRIVER = ("import runpy, sys; "
           "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
           "sys.argv[0] = 'ijepa'; runpy.run_module('engine.cli', run_name='__main__', alter_sys=True)")


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", _DRIVER, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


@pytest.mark.parametrize("action", [["bench", "e2e"], ["profile"]])
def test_bad_reference_path_is_one_line_exit_2(tmp_path, action):
    p = _cli(*action, "--config", SMOKE, "--reference", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no such directory" in p.stderr
    (tmp_path / "empty").mkdir()
    p = _cli(*action, "--config", SMOKE, "--reference", str(tmp_path / "empty"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no src/" in p.stderr


def test_reference_cannot_build_overridden_sizes(tmp_path):
    ref = make_fake_reference(tmp_path / "ref")
    p = _cli("bench", "e2e", "--config", SMOKE, "--reference", ref)   # smoke overrides depth/width
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "model.*" in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_one_line(tmp_path):
    p = _cli("bench", "e2e", "--config", SMOKE, "--device", "cuda")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--device cpu" in p.stderr


def test_figure_with_provenance_footer(tmp_path):
    from engine.tools import plots
    fig, (ax,) = plots.new_figure(width=7.2, height=4.2, footer=["device: cpu | commit abc"] * 3)
    ax.bar(["a", "b"], [1.0, 2.5])
    im = Image.open(plots.save(fig, str(tmp_path / "f.png")))
    assert im.size[0] == 720 and im.size[1] > 420      # the footer adds height, not overlap


def test_bench_flops_command(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert main(["bench", "flops", "--config", VITH14, "--k-ctx", "69", "--k-pred", "44", "--images-per-s", "92.7",
                 "--gpu", "A100", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["per_image_flops"] == pytest.approx(656e9, rel=0.03) and rep["peak_tflops"] == 312
    assert rep["paper_reference"]["images_per_s_per_gpu"] == pytest.approx(92.7, abs=0.1)
    assert "bench flops" in rep["meta"]["command"]
    text = capsys.readouterr().out
    assert "% MFU of 312 TFLOP/s" in text and "19.5 % MFU" in text


@pytest.mark.parametrize("nenc", [1, 2])
def test_flop_model_equals_torch_flop_counter_on_the_reference_path(nenc):
    """The analytic model (engine/tools/flops.py) against torch.utils.flop_counter.FlopCounterMode
    on a real forward+backward of the reference-semantics path (naive attention, every predictor
    row computed): the same matmul and convolution FLOPs, exactly."""
    from torch.utils.flop_counter import FlopCounterMode
    from engine.masks import MultiBlockMaskSampler
    from engine.model import build_model
    from engine.tools.flops import step_flops
    cfg = IJEPAConfig.from_dict({
        "meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 24},
        "model": {"embed_dim": 48, "depth": 2, "num_heads": 3}, "data": {"dataset": "synthetic", "crop_size": 32},
        "mask": {"patch_size": 4, "min_keep": 4, "num_enc_masks": nenc, "allow_overlap": nenc > 1},
        "kernels": {"attention": "naive", "gather": "torch"}, "train": {"skip_unused_rows": False}})
    model = build_model(cfg)
    torch.manual_seed(0)
    me, mp = MultiBlockMaskSampler.from_config(cfg)(4)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(4, 3, 32, 32), me, mp).backward()
    sf = step_flops(num_patches=64, in_chans=3, patch_size=4, embed_dim=48, depth=2, mlp_ratio=4.0, pred_dim=24,
                    pred_depth=2, k_ctx=me[0].shape[1], k_pred=mp[0].shape[1], nenc=nenc, npred=4)
    assert counter.get_total_flops() == sf.total * 4
