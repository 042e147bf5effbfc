"""kernels/gather.py: Triton kernels (under the interpreter) against the PyTorch reference.

Shapes cover batch 1 and 7, token counts 13..256 with K < N, widths 192/384/1280 and
repeated, unsorted indices, without the full cross product (the interpreter is slow).
Every buffer a kernel must fill is poisoned with NaN first, so an unwritten element fails.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import gather as G
from kernels.dispatch import BackendUnavailable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (B, N, D, M, K): batch, tokens, width, masks, kept tokens per mask
FORWARD_SHAPES = [
    (1, 13, 192, 1, 5),
    (7, 61, 384, 2, 23),
    (1, 97, 1280, 4, 40),
    (7, 113, 192, 3, 50),
    (2, 196, 384, 4, 33),
    (1, 256, 1280, 2, 100),
]
BACKWARD_SHAPES = [
    (1, 13, 192, 3, 9),
    (7, 61, 384, 2, 23),
    (1, 97, 1280, 2, 40),
    (2, 196, 192, 2, 60),
]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(G, "_new_output", nan_filled)


def make_masks(B, N, M, K, seed):
    """M masks [B, K] with repeated and unsorted indices (drawn with replacement)."""
    g = torch.Generator().manual_seed(seed)
    masks = [torch.randint(0, N, (B, K), generator=g) for _ in range(M)]
    masks[0][:, -1] = masks[0][:, 0]              # at least one duplicate per row
    return masks


def make_tokens(B, N, D, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:   # rows that are not packed: x is a slice of a wider buffer
        return torch.randn(B, N, D + 16, generator=g).to(dtype)[:, :, 8:D + 8]
    return torch.randn(B, N, D, generator=g).to(dtype)


# (name, x dtype or None, pos dtype or None, exact?)
VARIANTS = [
    ("x fp32", torch.float32, None, True),
    ("x bf16", torch.bfloat16, None, True),
    ("x+pos fp32", torch.float32, torch.float32, True),
    ("x bf16 + pos fp32 -> fp32", torch.bfloat16, torch.float32, True),
    ("x+pos bf16", torch.bfloat16, torch.bfloat16, False),   # interpreter truncates the bf16 sum
    ("pos only fp32", None, torch.float32, True),
]


@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=lambda s: "B{}N{}D{}M{}K{}".format(*s))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_gather_tokens_forward(shape, variant):
    B, N, D, M, K = shape
    _, x_dt, pos_dt, exact = variant
    x = make_tokens(B, N, D, x_dt, seed=1, strided=(B == 7)) if x_dt else None
    pos = make_tokens(1, N, D, pos_dt, seed=2)[0] if pos_dt else None
    masks = make_masks(B, N, M, K, seed=3)
    out = G.gather_tokens(x, masks, pos, backend="triton")
    ref = G.gather_tokens_ref(x, masks, pos)
    assert out.shape == (M * B, K, D) and out.dtype == ref.dtype
    if exact:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-2)


def test_gather_tokens_layout_is_mask_major():
    B, N, D, M, K = 3, 13, 192, 2, 4
    x = make_tokens(B, N, D, torch.float32, seed=4)
    masks = make_masks(B, N, M, K, seed=5)
    out = G.gather_tokens(x, masks, backend="triton")
    for i in range(M):
        for b in range(B):
            assert torch.equal(out[i * B + b], x[b, masks[i][b]])


def test_gather_tokens_accepts_mask_forms_and_pos_shapes():
    B, N, D, M, K = 2, 13, 192, 3, 6
    x = make_tokens(B, N, D, torch.float32, seed=6)
    pos = make_tokens(1, N, D, torch.float32, seed=7)
    masks = make_masks(B, N, M, K, seed=8)
    ref = G.gather_tokens_ref(x, masks, pos)
    assert torch.equal(G.gather_tokens(x, torch.stack(masks), pos, backend="triton"), ref)
    assert torch.equal(G.gather_tokens(x, [m.int() for m in masks], pos[0], backend="triton"), ref)
    single = G.gather_tokens(x, masks[1], pos, backend="triton")
    assert torch.equal(single, G.gather_tokens_ref(x, [masks[1]], pos))


def reference_grads(x, masks, pos, grad):
    """Gradients of the reference in float64 (the Triton sums run in fp32)."""
    x64 = x.detach().double().requires_grad_(x.requires_grad) if x is not None else None
    pos64 = pos.detach().double().requires_grad_(pos.requires_grad) if pos is not None else None
    out = G.gather_tokens_ref(x64, masks, pos64)
    wrt = [t for t in (x64, pos64) if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wrt, grad.double())


@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "B{}N{}D{}M{}K{}".format(*s))
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_gather_tokens_backward_fp32(shape, deterministic):
    B, N, D, M, K = shape
    x = make_tokens(B, N, D, torch.float32, seed=10).requires_grad_()
    pos = make_tokens(1, N, D, torch.float32, seed=11)[0].requires_grad_()
    masks = make_masks(B, N, M, K, seed=12)
    out = G.gather_tokens(x, masks, pos, backend="triton", deterministic=deterministic)
    grad = torch.randn_like(out)
    gx, gpos = torch.autograd.grad(out, (x, pos), grad)
    rx, rpos = reference_grads(x, masks, pos, grad)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gpos.double(), rpos, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(B, N, dtype=torch.bool)
    for m in masks:
        untouched.scatter_(1, m, False)
    assert untouched.any() and (gx[untouched] == 0).all()     # written, not left poisoned


@pytest.mark.parametrize("variant", [(torch.bfloat16, None), (torch.bfloat16, torch.float32), (None, torch.bfloat16)],
                         ids=["x bf16", "x bf16 + pos fp32", "pos only bf16"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_gather_tokens_backward_bf16(variant, deterministic):
    B, N, D, M, K = 7, 61, 192, 2, 23
    x_dt, pos_dt = variant
    x = make_tokens(B, N, D, x_dt, seed=13).requires_grad_() if x_dt else None
    pos = make_tokens(1, N, D, pos_dt, seed=14)[0].requires_grad_() if pos_dt else None
    masks = make_masks(B, N, M, K, seed=15)
    out = G.gather_tokens(x, masks, pos, backend="triton", deterministic=deterministic)
    grad = torch.randn_like(out)
    wrt = [t for t in (x, pos) if t is not None]
    got = torch.autograd.grad(out, wrt, grad)
    want = reference_grads(x, masks, pos, grad)
    for g, r, t in zip(got, want, wrt):
        assert g.dtype == t.dtype
        # One bf16 rounding of an fp32 sum (the interpreter truncates: up to 1 ulp).
        torch.testing.assert_close(g.double(), r, rtol=2 ** -7, atol=1e-2)


def test_gather_tokens_backward_x_only_and_frozen_pos():
    B, N, D, M, K = 7, 61, 384, 2, 23
    x = make_tokens(B, N, D, torch.float32, seed=16).requires_grad_()
    pos = make_tokens(1, N, D, torch.float32, seed=17)     # frozen sin-cos table
    masks = make_masks(B, N, M, K, seed=18)
    out = G.gather_tokens(x, masks, pos, backend="triton")
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, (x,), grad)
    torch.testing.assert_close(gx.double(), reference_grads(x, masks, pos, grad)[0], rtol=1e-6, atol=1e-6)
    assert pos.grad is None


def test_sorted_backward_is_bitwise_reproducible_and_sums_in_mask_order():
    B, N, D, M, K = 1, 13, 192, 4, 12
    x = make_tokens(B, N, D, torch.float32, seed=19).requires_grad_()
    masks = [torch.full((B, K), 5)] * M                      # every entry hits token 5
    out = G.gather_tokens(x, masks, backend="triton", deterministic=True)
    grad = torch.randn_like(out) * torch.logspace(-6, 6, M * K).reshape(M * B, K, 1)
    g1 = torch.autograd.grad(out, x, grad, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, x, grad)[0]
    assert torch.equal(g1, g2)
    sequential = torch.zeros(D)
    for row in grad.reshape(M * K, D):                        # mask-major, then token order
        sequential += row
    assert torch.equal(g1[0, 5], sequential)


def test_out_of_range_indices_give_nan_rows_and_no_gradient():
    B, N, D, K = 2, 13, 192, 4
    x = make_tokens(B, N, D, torch.float32, seed=20).requires_grad_()
    mask = torch.tensor([[0, 13, 3, -1], [12, 2, 99, 2]])
    out = G.gather_tokens(x, mask, backend="triton")
    bad = (mask < 0) | (mask >= N)
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    for deterministic in (True, False):
        out = G.gather_tokens(x, mask, backend="triton", deterministic=deterministic)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out).masked_fill(bad[..., None], 0))
        assert gx.sum().item() == pytest.approx(float((~bad).sum() * D))
        assert not torch.isnan(gx).any()
    with pytest.raises(RuntimeError):
        G.gather_tokens(x, mask, backend="torch")           # torch.gather checks bounds


LN_CASES = [
    (1, 13, 192, 1, 5, torch.float32),
    (7, 61, 384, 2, 23, torch.float32),
    (1, 97, 1280, 4, 40, torch.float32),
    (2, 196, 192, 4, 33, torch.bfloat16),
    (7, 113, 1280, 2, 17, torch.bfloat16),
]


@pytest.mark.parametrize("case", LN_CASES, ids=lambda c: "B{}N{}D{}M{}K{}-{}".format(*c[:5], str(c[5])[6:]))
def test_gather_layernorm(case):
    B, N, D, M, K, dtype = case
    g = torch.Generator().manual_seed(21)
    # An offset and spread per token, as encoder outputs have: the statistics must be exact.
    h = (torch.randn(B, N, D, generator=g) * torch.rand(B, N, 1, generator=g) * 4
         + torch.randn(B, N, 1, generator=g) * 3).to(dtype)
    if B == 7:
        h = torch.cat([h, h[:, :3]], dim=1)[:, :N]          # non-packed batch stride
    masks = make_masks(B, N, M, K, seed=22)
    with torch.no_grad():
        out = G.gather_layernorm(h, masks, eps=1e-6, backend="triton")
    same_dtype = G.gather_layernorm_ref(h, masks, eps=1e-6)
    exact = G.gather_layernorm_ref(h.double(), masks, eps=1e-6)
    assert out.dtype == dtype and out.shape == (M * B, K, D)
    assert not torch.isnan(out).any()
    # flash-attention's rule: at most twice the error of torch in the same dtype (against
    # fp64), plus a small floor. The bf16 twice covers the interpreter's truncating cast.
    err = (out.double() - exact).abs().max().item()
    torch_err = (same_dtype.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + (1e-6 if dtype == torch.float32 else 1e-3), (err, torch_err)


def test_gather_layernorm_refuses_grad():
    h = torch.randn(1, 13, 192, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        G.gather_layernorm(h, torch.zeros(1, 3, dtype=torch.long), backend="triton")


@pytest.mark.parametrize("bad", ["mask shapes", "batch", "pos shape", "nothing", "float masks"])
def test_gather_tokens_rejects_bad_inputs(bad):
    x = torch.randn(2, 13, 192)
    masks = [torch.zeros(2, 4, dtype=torch.long)]
    pos = None
    error = ValueError
    if bad == "mask shapes":
        masks = [torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)]
    elif bad == "batch":
        masks = [torch.zeros(3, 4, dtype=torch.long)]
    elif bad == "pos shape":
        pos = torch.randn(12, 192)
    elif bad == "nothing":
        x = None
    elif bad == "float masks":
        masks = [torch.zeros(2, 4)]
        error = TypeError
    with pytest.raises(error):
        G.gather_tokens(x, masks, pos, backend="triton")


def test_opcheck_custom_ops():
    B, N, D, M, K = 2, 13, 192, 2, 5
    x = make_tokens(B, N, D, torch.float32, seed=23).requires_grad_()
    pos = make_tokens(1, N, D, torch.float32, seed=24)[0].requires_grad_()
    idx = torch.stack(make_masks(B, N, M, K, seed=25))
    torch.library.opcheck(torch.ops.ijepa.gather_tokens.default, (x, pos, idx, True))
    torch.library.opcheck(torch.ops.ijepa.gather_tokens.default, (None, pos, idx, False))
    grad = torch.randn(M * B, K, D)
    torch.library.opcheck(torch.ops.ijepa.scatter_token_grads.default, (grad, idx, N, torch.float32, True, False))
    torch.library.opcheck(torch.ops.ijepa.gather_layernorm.default, (x.detach(), idx, 1e-5))


# ------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_forward_backward(backend):
    B, N, D, M, K = 2, 13, 192, 2, 5
    x = make_tokens(B, N, D, torch.float32, seed=26).requires_grad_()
    pos = make_tokens(1, N, D, torch.float32, seed=27)
    h = make_tokens(B, N, D, torch.float32, seed=28)
    masks = make_masks(B, N, M, K, seed=29)

    def step(x, pos, h, masks):
        pred = G.gather_tokens(x, masks, pos, backend=backend)
        with torch.no_grad():
            target = G.gather_layernorm(h, masks, backend=backend)
        return torch.nn.functional.smooth_l1_loss(pred, target)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, pos, h, masks)
    (grad,) = torch.autograd.grad(loss, x)
    ref_loss = step(x, pos, h, masks)
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_compile_inductor_calls_custom_op():
    B, N, D, M, K = 2, 13, 192, 2, 5
    x = make_tokens(B, N, D, torch.float32, seed=30).requires_grad_()
    masks = make_masks(B, N, M, K, seed=31)

    def f(x, masks):
        return (G.gather_tokens(x * 2, masks, backend="triton") ** 2).sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True)(x, masks)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, f(x, masks))
    torch.testing.assert_close(grad, torch.autograd.grad(f(x, masks), x)[0])


# ------------------------------------------------------------------ dispatch


def test_auto_picks_torch_on_cpu_and_env_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("IJEPA_GATHER_BACKEND", raising=False)
    assert G._resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("IJEPA_GATHER_BACKEND", "triton")
    assert G._resolve_backend("auto", cpu) == "triton"        # the interpreter is on in tests
    x = torch.randn(1, 13, 192)
    mask = torch.tensor([[0, 13]])                               # out of range: NaN only on triton
    assert torch.isnan(G.gather_tokens(x, mask)).any()
    with pytest.raises(BackendUnavailable):
        G.gather_tokens(x, mask, backend="xformers")


def test_explicit_triton_without_interpreter_raises():
    code = textwrap.dedent("""
        import torch
        from kernels import gather
        from kernels.dispatch import BackendUnavailable
        x = torch.randn(1, 13, 192); m = torch.zeros(1, 4, dtype=torch.long)
        assert gather.gather_tokens(x, m).shape == (1, 4, 192)          # auto -> torch
        try:
            gather.gather_tokens(x, m, backend="triton")
        except BackendUnavailable as e:
            assert "TRITON_INTERPRET" in str(e) and "cpu" in str(e), e
            print("raised")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IJEPA_GATHER_BACKEND")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "raised"
