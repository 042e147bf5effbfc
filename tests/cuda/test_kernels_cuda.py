"""Every Triton kernel compiled for the device, at the shipped tile configurations and real shapes,
forward and backward, against the fp64 reference under the suite's rule:

    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + atol

(tests/test_attention.py explains the rule; on a GPU the 16-bit casts round to nearest, so atol
only absorbs summation order). The dry run uses tiny shapes and the interpreter."""
import pytest
import torch

import kernels.attention as A
import kernels.ema as E
import kernels.gather as G
from conftest import ON_GPU, gpu_only

REAL = ON_GPU
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3 if REAL else 5e-3, torch.bfloat16: 1e-2 if REAL else 2e-2}
DTYPES = [torch.bfloat16, torch.float16] if REAL else [torch.float32, torch.bfloat16]


def rule(ours, same, ref, dtype, what):
    err = (ours.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    assert err <= 2 * base + ATOL[dtype], f"{what}: max err {err:.3g} > 2 * {base:.3g} + {ATOL[dtype]:g}"


def grads(fn, q, k, v, do, dtype=None):
    leaves = [(x if dtype is None else x.to(dtype)).detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, do if dtype is None else do.to(dtype))]


def compare(fn, q, k, v, do, dtype, label):
    ours = grads(fn, q, k, v, do)
    same = grads(A.attention_naive, q, k, v, do)
    ref = grads(A.attention_naive, q, k, v, do, torch.float64)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, same, ref):
        assert a.dtype == dtype and a.shape == c.shape
        rule(a, b, c, dtype, f"{label} {name}")


# (B, H, N): ViT-H/14 (256 tokens, context ~69, predictor ~113), ViT-L/16 (196), odd lengths
DENSE = [(4, 16, 256), (8, 16, 69), (4, 12, 113), (2, 16, 196), (3, 5, 1)] if REAL else [(1, 2, 13), (2, 1, 37)]


@pytest.mark.parametrize("d", A.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_dense_every_head_dim(device, d, dtype):
    for B, H, N in DENSE:
        g = torch.Generator(device=device).manual_seed(N * d)
        q, k, v, do = (torch.randn(B, H, N, d, device=device, generator=g).to(dtype) for _ in range(4))
        compare(lambda q, k, v: A.attention(q, k, v, backend="triton"), q, k, v, do, dtype, f"{B}x{H}x{N}x{d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_on_strided_qkv_views(device, dtype):
    """q, k, v as the model makes them: views into one fused qkv projection (no copy)."""
    B, N, H, d = (8, 256, 16, 80) if REAL else (2, 19, 2, 32)
    g = torch.Generator(device=device).manual_seed(1)
    qkv = torch.randn(B, N, 3, H, d, device=device, generator=g).to(dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    assert not q.is_contiguous()
    do = torch.randn(B, H, N, d, device=device, generator=g).to(dtype)
    compare(lambda q, k, v: A.attention(q, k, v, backend="triton"), q, k, v, do, dtype, "strided")


@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_packed_equals_each_sequence(device, d, dtype):
    lens = [69, 1, 113, 256, 44, 130, 7] if REAL else [5, 1, 12, 3]
    H = 16 if REAL else 2
    g = torch.Generator(device=device).manual_seed(d)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, H, d, device=device, generator=g).to(dtype) for _ in range(4))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    packed = grads(lambda q, k, v: A.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lens), seqlens=lens,
                                               backend="triton"), q, k, v, do)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = [x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v, do)]
        same = grads(A.attention_naive, *one)
        ref = grads(A.attention_naive, *one, torch.float64)
        for name, p, s, r in zip(("out", "dq", "dk", "dv"), packed, same, ref):
            rule(p[a:b].transpose(0, 1).unsqueeze(0), s, r, dtype, f"packed seq {a}:{b} {name}")


@gpu_only("a packed batch of more than 2**31 elements (17 GB)")
def test_attention_packed_batch_over_2_31_elements(device):
    """64-bit offsets: the last sequence of a batch whose q alone holds > 2**31 elements."""
    H, d, n = 16, 128, 128
    seqs = (2 ** 31) // (n * H * d) + 2
    T = seqs * n
    q, k, v = (torch.empty(T, H, d, device=device, dtype=torch.bfloat16).normal_() for _ in range(3))
    assert q.numel() > 2 ** 31
    cu = torch.arange(0, T + 1, n, device=device, dtype=torch.int32)
    out = A.attention(q, k, v, cu_seqlens=cu, max_seqlen=n, seqlens=[n] * seqs, backend="triton")
    tail = slice(T - n, T)
    ref = A.attention_naive(*(x[tail].transpose(0, 1).double() for x in (q, k, v))).transpose(0, 1)
    same = A.attention_naive(*(x[tail].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
    rule(out[tail], same, ref, torch.bfloat16, "last sequence past 2**31")


# ----------------------------------------------------------------------------- gather
SHAPES = [(16, 256, 1280, 4, 44), (16, 256, 1280, 1, 69), (8, 196, 384, 4, 37)] if REAL else [(3, 20, 48, 2, 7)]


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gather_forward_backward_both_modes(device, deterministic, dtype):
    for B, N, D, M, K in SHAPES:
        g = torch.Generator(device=device).manual_seed(B * K)
        x = torch.randn(B, N, D, device=device, generator=g).to(dtype).requires_grad_()
        pos = torch.randn(1, N, D, device=device, generator=g).requires_grad_()
        masks = [torch.randint(0, N, (B, K), device=device, generator=g) for _ in range(M)]
        grad = torch.randn(M * B, K, D, device=device, generator=g)
        out = G.gather_tokens(x, masks, pos=pos, backend="triton", deterministic=deterministic)
        xd, pd = x.detach().double().requires_grad_(), pos.detach().double().requires_grad_()
        ref = G.gather_tokens_ref(xd, masks, pd)
        assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)
        gx, gp = torch.autograd.grad(out, (x, pos), grad.to(out.dtype))
        rx, rp = torch.autograd.grad(ref, (xd, pd), grad.double())
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert torch.allclose(gx.double(), rx, atol=tol, rtol=tol) and torch.allclose(gp.double(), rp, atol=tol, rtol=tol)


def test_gather_layernorm_targets(device):
    for B, N, D, M, K in SHAPES:
        g = torch.Generator(device=device).manual_seed(D)
        h = torch.randn(B, N, D, device=device, generator=g).bfloat16()
        masks = [torch.randint(0, N, (B, K), device=device, generator=g) for _ in range(M)]
        ours = G.gather_layernorm(h, masks, backend="triton")
        same = G.gather_layernorm_ref(h, masks)
        ref = G.gather_layernorm_ref(h.double(), masks)
        rule(ours, same, ref, torch.bfloat16, "layernorm gather")


# ----------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("momentum", ["float", "device fp64"])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ema_real_pointer_tables_and_bf16_copy(device, momentum, src_dtype):
    """ViT-sized parameter lists (odd sizes, matrices): the plan built once, its int64 tables hold
    real device pointers; fp32 master within 2x the reference loop's error, bf16 copy its rounding."""
    g = torch.Generator(device=device).manual_seed(0)
    sizes = [192, 1, 7, 2048 * 3 + 5, 40001] + ([1280 * 1280, 5120 * 1280, 1280] * 3 if REAL else [])
    targets = [torch.randn(n, device=device, generator=g) * 0.02 for n in sizes]
    sources = [(t + torch.randn(n, device=device, generator=g) * 0.01).to(src_dtype) for t, n in zip(targets, sizes)]
    lowp = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in targets]
    m = 0.996 if momentum == "float" else torch.tensor(0.99999, dtype=torch.float64, device=device)
    mv = float(m)
    before = [t.clone() for t in targets]
    plan = E.MultiTensorEMA(targets, sources, lowp)
    plan(m)
    loop = [t.clone() for t in before]
    E.ema_ref_(loop, sources, m)
    for got, b, s, r, lp in zip(targets, before, sources, loop, lowp):
        exact = b.double() * mv + (1 - mv) * s.double()
        assert (got.double() - exact).abs().max() <= 2 * (r.double() - exact).abs().max() + 1e-9
        assert torch.equal(lp, got.bfloat16()) if REAL else not torch.isnan(lp).any()


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_custom_ops_equal_eager(device):
    """Inductor with the kernels' torch.library ops: one graph, same numbers as eager."""
    dtype = torch.bfloat16 if REAL else torch.float32
    B, N, H, d, K = (8, 256, 16, 64, 69) if REAL else (2, 16, 2, 32, 5)
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(B, N, H * d, device=device, generator=g).to(dtype).requires_grad_()
    masks = [torch.randint(0, N, (B, K), device=device, generator=g)]

    def block(x):
        t = G.gather_tokens(x, masks, backend="triton")
        q = t.view(B, K, H, d).transpose(1, 2)
        return A.attention(q, q, q, backend="triton").float().square().mean()
    eager = block(x)
    (ge,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if REAL else "aot_eager")
    comp = compiled(x)
    (gc,) = torch.autograd.grad(comp, x)
    assert torch.allclose(eager, comp, rtol=1e-3, atol=1e-5) and torch.allclose(ge.float(), gc.float(), rtol=1e-2,
                                                                                  atol=1e-4)
