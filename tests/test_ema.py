"""kernels/ema.py: the multi-tensor Triton EMA (under the interpreter) against the references."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import ema as E
from kernels.dispatch import BackendUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = E.ema_tile().chunk

# Odd sizes around the block and chunk edges, an empty tensor, and one spanning 3 chunks.
ODD_SIZES = [1, 3, 7, 191, 193, 2047, 2049, 0, 5000, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 77]


def odd_sizes(count, seed):
    g = torch.Generator().manual_seed(seed)
    extra = torch.randint(1, 700, (max(0, count - len(ODD_SIZES)),), generator=g).tolist()
    return ODD_SIZES[:count] + extra


def make_params(sizes, src_dtype, seed, shapes_2d=False):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(n, generator=g) * 0.02 for n in sizes]
    sources = [(t + torch.randn(n, generator=g) * 0.01).to(src_dtype) for t, n in zip(targets, sizes)]
    if shapes_2d:     # real parameters are matrices; only numel matters to the kernel
        targets = [t.reshape(1, -1) for t in targets]
        sources = [s.reshape(1, -1) for s in sources]
    return targets, sources


def exact_ema(targets, sources, m):
    return [t.double() * m + (1 - m) * s.double() for t, s in zip(targets, sources)]


def momentum_value(momentum):
    return momentum.item() if isinstance(momentum, torch.Tensor) else momentum


def assert_fp32_update(got, before, sources, momentum):
    """Flash-attention's rule: at most twice the error of the reference loop (vs fp64)."""
    m = momentum_value(momentum)
    exact = exact_ema(before, sources, m)
    loop = [t.clone() for t in before]
    E.ema_ref_(loop, sources, momentum)
    for g, x, r in zip(got, exact, loop):
        if g.numel():
            err = (g.double() - x).abs().max().item()
            ref_err = (r.double() - x).abs().max().item()
            assert err <= 2 * ref_err + 1e-9, (err, ref_err)


def assert_rounded_copy(lowp, master):
    """lowp is master rounded to its dtype: nearest on a GPU, truncated by the interpreter,
    so within one ulp either way, and never left poisoned."""
    rel_ulp, subnormal_ulp = {torch.bfloat16: (2 ** -7, 2 ** -133), torch.float16: (2 ** -10, 2 ** -24)}[lowp.dtype]
    assert not torch.isnan(lowp).any()
    assert ((lowp.float() - master).abs() <= master.abs() * rel_ulp + subnormal_ulp).all()


MOMENTA = {
    "float": lambda: 0.996,
    "fp32 tensor": lambda: torch.tensor(0.996),
    "fp64 tensor 0.99999": lambda: torch.tensor(0.99999, dtype=torch.float64),
}


@pytest.mark.parametrize("momentum", list(MOMENTA), ids=list(MOMENTA))
@pytest.mark.parametrize("src_dtype,lowp_dtype", [
    (torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16)], ids=["fp32", "fp32+bf16copy", "bf16src+bf16copy", "fp32+fp16copy"])
def test_fused_ema_many_odd_tensors(momentum, src_dtype, lowp_dtype):
    momentum = MOMENTA[momentum]()
    targets, sources = make_params(odd_sizes(40, seed=1), src_dtype, seed=2, shapes_2d=True)
    before = [t.clone() for t in targets]
    lowp = [torch.full_like(t, float("nan"), dtype=lowp_dtype) for t in targets] if lowp_dtype else None
    E.fused_ema_(targets, sources, momentum, lowp, backend="triton")
    assert_fp32_update(targets, before, sources, momentum)
    if lowp is not None:
        for lp, t in zip(lowp, targets):
            assert_rounded_copy(lp, t)


def test_thousands_of_tensors_in_one_launch_per_group():
    targets, sources = make_params(odd_sizes(1500, seed=3), torch.float32, seed=4)
    before = [t.clone() for t in targets]
    plan = E.MultiTensorEMA(targets, sources)
    assert len(plan.launches) == 1
    plan(0.99)
    assert_fp32_update(targets, before, sources, 0.99)


def test_plan_reused_with_device_schedule():
    targets, sources = make_params(odd_sizes(30, seed=5), torch.bfloat16, seed=6)
    lowp = [torch.empty_like(t, dtype=torch.bfloat16) for t in targets]
    reference = [t.double() for t in targets]
    plan = E.MultiTensorEMA(targets, sources, lowp)
    schedule = torch.linspace(0.996, 1.0, 5, dtype=torch.float64)       # lives on the device
    for step in range(5):
        plan(schedule[step])
        m = schedule[step].item()
        reference = [r * m + (1 - m) * s.double() for r, s in zip(reference, sources)]
    for t, r, lp in zip(targets, reference, lowp):
        torch.testing.assert_close(t.double(), r, rtol=1e-6, atol=1e-9)
        assert_rounded_copy(lp, t)


def test_misaligned_views_take_the_unaligned_path():
    flat_t = torch.randn(10_000) * 0.02
    flat_s = torch.randn(10_000) * 0.02
    cuts = [(1, 2049), (2049, 2050), (2050, 9001), (9004, 10_000)]    # element offsets 1, 2049, ...
    targets = [flat_t[a:b] for a, b in cuts]
    sources = [flat_s[a:b] for a, b in cuts]
    before = [t.clone() for t in targets]
    untouched = flat_t[9001:9004].clone()
    plan = E.MultiTensorEMA(targets, sources)
    assert {launch["ALIGNED"] for launch in plan.launches} == {True, False}
    plan(0.9)
    assert_fp32_update(targets, before, sources, 0.9)
    assert torch.equal(flat_t[9001:9004], untouched) and flat_t[0] == flat_t[0]


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("momentum", ["float", "fp32 tensor"])
def test_torch_backends_agree(backend, momentum):
    momentum = MOMENTA[momentum]()
    targets, sources = make_params(odd_sizes(12, seed=7), torch.bfloat16, seed=8)
    before = [t.clone() for t in targets]
    lowp = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in targets]
    E.fused_ema_(targets, sources, momentum, lowp, backend=backend)
    assert_fp32_update(targets, before, sources, momentum)
    for lp, t in zip(lowp, targets):
        assert torch.equal(lp, t.to(torch.bfloat16))     # torch rounds to nearest


def test_bf16_copy_tracks_fp32_while_naive_bf16_ema_freezes():
    """m = 0.996, weights ~N(0, 0.02), online weights ~5% away and still training.

    Each step moves a weight by ~(1-m)*1e-3 = 4e-6, far below half a bf16 ulp at 0.01-0.05
    (3e-5..1.2e-4): an EMA kept in bf16 rounds every update away, whereas the fp32 master
    accumulates them and its bf16 copy moves whenever the master crosses a rounding edge."""
    m, steps, n = 0.996, 100, 4096
    g = torch.Generator().manual_seed(9)
    start = torch.randn(n, generator=g) * 0.02
    online = start + torch.randn(n, generator=g) * 1e-3
    online_bf16 = online.to(torch.bfloat16)            # what a bf16 online model holds
    master, exact = start.clone(), start.double()
    working = start.to(torch.bfloat16)                 # fused: rounded copy of the master
    naive = start.to(torch.bfloat16)                   # the reference loop run in bf16
    visible = start.abs() >= 0.01
    naive_ever_changed = torch.zeros(n, dtype=torch.bool)
    fused = E.MultiTensorEMA([master], [online_bf16], [working])
    for _ in range(steps):
        online.add_(torch.randn(n, generator=g) * 1e-5)
        online_bf16.copy_(online)
        previous = working.clone()
        fused(m)
        assert (working != previous).any(), "the bf16 copy must move every step"
        exact = exact * m + (1 - m) * online_bf16.double()
        before_naive = naive.clone()
        E.ema_ref_([naive], [online_bf16], m)
        naive_ever_changed |= naive != before_naive
    moved = (exact - start.double()).abs().mean().item()
    assert ((working.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-12).all()
    assert (working.double() - exact).abs().mean().item() < 0.3 * moved
    assert naive_ever_changed[visible].float().mean().item() < 0.05          # frozen
    assert (naive.double() - exact).abs().mean().item() > 0.8 * moved        # lost the update


@pytest.mark.parametrize("problem", ["non-contiguous", "bf16 target", "shape", "lowp fp32", "momentum shape",
                                     "count"])
def test_fused_ema_rejects_bad_inputs(problem):
    targets, sources = make_params([6, 12], torch.float32, seed=10)
    lowp, momentum, error, match = None, 0.99, ValueError, None
    if problem == "non-contiguous":
        base = torch.zeros(4, 6)
        targets[1], sources[1] = base.t(), torch.zeros(6, 4)
        match = "contiguous"
    elif problem == "bf16 target":
        targets[0] = targets[0].bfloat16()
        error, match = TypeError, "fp32 master"
    elif problem == "shape":
        sources[0] = torch.zeros(7)
    elif problem == "lowp fp32":
        lowp = [torch.zeros(6), torch.zeros(12)]
        error = TypeError
    elif problem == "momentum shape":
        momentum = torch.tensor([0.9, 0.99])
    elif problem == "count":
        sources = sources[:1]
    with pytest.raises(error, match=match):
        E.fused_ema_(targets, sources, momentum, lowp, backend="triton")


def test_auto_picks_torch_on_cpu_and_env_overrides(monkeypatch):
    targets, sources = make_params([5], torch.float32, seed=11)
    calls = []
    monkeypatch.setattr(E, "ema_foreach_", lambda *a: calls.append("torch"))
    monkeypatch.setattr(E, "ema_ref_", lambda *a: calls.append("naive"))
    monkeypatch.delenv("IJEPA_EMA_BACKEND", raising=False)
    E.fused_ema_(targets, sources, 0.9)
    monkeypatch.setenv("IJEPA_EMA_BACKEND", "naive")
    E.fused_ema_(targets, sources, 0.9)
    assert calls == ["torch", "naive"]
    with pytest.raises(BackendUnavailable):
        E.fused_ema_(targets, sources, 0.9, backend="xformers")


def test_explicit_triton_without_interpreter_raises():
    code = textwrap.dedent("""
        import torch
        from kernels import ema
        from kernels.dispatch import BackendUnavailable
        t, s = [torch.zeros(3)], [torch.ones(3)]
        ema.fused_ema_(t, s, 0.5)                                   # auto -> torch
        assert torch.equal(t[0], torch.full((3,), 0.5))
        try:
            ema.fused_ema_(t, s, 0.5, backend="triton")
        except BackendUnavailable as e:
            assert "TRITON_INTERPRET" in str(e), e
            print("raised")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IJEPA_EMA_BACKEND")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "raised"
