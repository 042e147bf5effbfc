"""The system around the kernels on a device: a training step with every Triton kernel against the
PyTorch path, no host sync inside a window of default steps, DALI's GPU decoder, DeepSpeed over
NCCL, and compute-sanitizer on tiny shapes."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ON_GPU, gpu_only

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def tiny_cfg(kernels, precision, **extra):
    from engine import IJEPAConfig
    d = {"meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 64},
         "model": {"embed_dim": 128, "depth": 2, "num_heads": 2, "pred_num_heads": 1},   # head dim 64
         "data": {"dataset": "synthetic", "crop_size": 64, "batch_size": 8},
         "mask": {"patch_size": 8, "min_keep": 4}, "optimization": {"epochs": 2, "warmup": 1},
         "kernels": kernels, "train": {"precision": precision}}
    for k, v in extra.items():
        d.setdefault(k, {}).update(v)
    return IJEPAConfig.from_dict(d)


def batches(cfg, device, n):
    from engine.masks import MultiBlockMaskSampler
    sampler = MultiBlockMaskSampler.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        me, mp = sampler(8)
        out.append((torch.randn(8, 3, 64, 64, generator=g).to(device), [m.to(device) for m in me],
                    [m.to(device) for m in mp]))
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp32"] if ON_GPU else ["fp32"])
def test_training_step_with_every_triton_kernel_equals_the_pytorch_path(device, precision):
    from engine.strategy import LocalStrategy
    from engine.train import train_step
    if precision == "fp32" and ON_GPU:
        pytest.skip("the Triton attention is compiled for bf16/fp16 on a GPU; fp32 runs xformers/SDPA")
    losses = {}
    for name, kernels in (("triton", {"attention": "triton", "gather": "triton", "ema": "triton"}),
                          ("torch", {"attention": "sdpa", "gather": "torch", "ema": "torch"})):
        cfg = tiny_cfg(kernels, precision)
        torch.manual_seed(0)
        s = LocalStrategy(cfg, device)
        losses[name] = [float(train_step(s, [b], lr=1e-3, wd=0.04, momentum=0.99)[0])
                        for b in batches(cfg, device, 3)]
    tol = 2e-2 if precision == "bf16" else 1e-5
    for a, b in zip(losses["triton"], losses["torch"]):
        assert abs(a - b) <= tol * abs(b), losses


@gpu_only("torch.cuda.set_sync_debug_mode")
def test_default_steps_never_sync_the_host(device):
    """The default CUDA step (fused AdamW, pinned non-blocking copies, device-side skip): a window
    of steps under torch.cuda.set_sync_debug_mode("error") raises on any synchronising call."""
    from engine.data import to_device
    from engine.strategy import LocalStrategy
    from engine.train import train_step
    cfg = tiny_cfg({"attention": "auto", "gather": "auto", "ema": "auto"}, "bf16")
    s = LocalStrategy(cfg, device)
    host = batches(cfg, "cpu", 4)
    put = lambda b: (to_device(b[0], device), [to_device(m, device) for m in b[1]],  # noqa: E731
                     [to_device(m, device) for m in b[2]])
    train_step(s, [put(host[0])], lr=1e-3, wd=0.04, momentum=0.99)   # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in host[1:]:
            loss, skipped = train_step(s, [put(b)], lr=1e-3, wd=0.04, momentum=0.99)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss) and not bool(skipped)


@gpu_only("nvJPEG (DALI mixed decode)")
def test_dali_mixed_decode_matches_cpu_decode_while_the_gpu_is_busy(tmp_path):
    pytest.importorskip("nvidia.dali", reason="not installed: nvidia-dali")
    from PIL import Image
    from engine.data import load_fmnist
    from engine.data_dali import DaliImageLoader
    imgs, labels = load_fmnist("train")
    for c in range(2):
        os.makedirs(tmp_path / f"c{c}", exist_ok=True)
        for i in range(16):
            Image.fromarray(imgs[c * 100 + i]).convert("RGB").resize((96, 96)).save(tmp_path / f"c{c}" / f"{i}.jpg")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):   # keep the GPU busy meanwhile
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            a = a @ a / 64
    out = {}
    for dev in ("mixed", "cpu"):
        loader = DaliImageLoader(str(tmp_path), 64, 8, decode_device=dev, device=torch.device("cuda"))
        out[dev] = torch.cat([x.float().cpu() for x, _ in loader.epoch_batches(0)])
    torch.cuda.synchronize()
    # nvJPEG and libjpeg-turbo round the IDCT differently: a few grey levels, normalised by std ~0.225
    diff = (out["mixed"] - out["cpu"]).abs()
    assert diff.mean() < 3 / 255 / 0.225 and diff.max() < 40 / 255 / 0.225, (diff.mean(), diff.max())


@gpu_only("NCCL")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_over_nccl_on_every_gpu(tmp_path, stage):
    pytest.importorskip("deepspeed", reason="not installed: deepspeed")
    n = torch.cuda.device_count()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        "-m", "engine.cli", "train", "--config", SMOKE, "--zero", str(stage), "--quiet",
                        "--override", f"logging.folder={tmp_path}", "--override", "train.max_steps=4",
                        "--override", "train.precision=bf16", "--override", "train.device=cuda"],
                       cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trained 4 steps" in p.stderr and f"zero{stage}, {n} rank(s), device cuda" in p.stderr


SANITIZED = textwrap.dedent("""
    import torch, kernels.attention as A, kernels.gather as G, kernels.ema as E
    q, k, v = (torch.randn(2, 2, 37, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    A.attention(q, k, v, backend="triton").sum().backward()
    x = torch.randn(2, 20, 128, device="cuda", requires_grad=True)
    m = [torch.randint(0, 20, (2, 7), device="cuda")]
    G.gather_tokens(x, m, backend="triton").sum().backward()
    G.gather_layernorm(x.detach(), m, backend="triton")
    t = [torch.randn(n, device="cuda") for n in (5, 4097)]
    E.MultiTensorEMA(t, [a.clone() for a in t])(0.99)
    torch.cuda.synchronize()
""")


@gpu_only("compute-sanitizer")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_finds_nothing(tmp_path, tool):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer not installed")
    script = tmp_path / "kernels_once.py"
    script.write_text(SANITIZED)
    p = subprocess.run([exe, "--tool", tool, sys.executable, str(script)], cwd=ROOT, capture_output=True,
                       text=True, timeout=580, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "ERROR SUMMARY: 0 errors" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
