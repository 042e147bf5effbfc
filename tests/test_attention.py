"""kernels/attention.py on CPU: the Triton kernels under the interpreter, SDPA, naive, dispatch.

Numerics rule (flash-attention's, anchors.md 3.2): for outputs and every gradient,
    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + atol
where ref64 is the naive math in float64 on the same (already rounded) inputs and
torch_same_dtype is the naive math in the input dtype, i.e. the reference implementation.

atol, why:
* fp32 1e-5: both sides are ~1e-7 accurate; 1e-5 only absorbs summation-order noise of a
  few hundred terms of magnitude ~1.
* fp16 5e-3 / bf16 2e-2: the interpreter's fp32 -> 16-bit cast truncates instead of rounding
  to nearest, so our stored result can be a full ulp off where torch's is half an ulp. One ulp
  at magnitude 2..4 is 3.9e-3 (fp16) and 1.6e-2 (bf16). Values here stay below ~4.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.attention as A
from kernels.dispatch import BackendUnavailable

ROOT = Path(__file__).resolve().parents[1]
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]   # q, k, v, dout


def _run(fn, q, k, v, do, dtype=None):
    """Output and (dq, dk, dv) of fn, optionally on upcast copies of the inputs."""
    leaves = [(x if dtype is None else x.to(dtype)).detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do if dtype is None else do.to(dtype))
    return out.detach(), [g.detach() for g in grads]


def _check_rule(ours, same, ref, dtype, what):
    err = (ours.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, f"{what}: max err {err:.3g} > 2 * {base:.3g} + {ATOL[dtype]:g}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"


def _compare_all(fn_ours, fn_torch, q, k, v, do, dtype, label):
    o, g = _run(fn_ours, q, k, v, do)
    assert o.dtype == q.dtype and o.shape == q.shape
    o_t, g_t = _run(fn_torch, q, k, v, do)
    o_r, g_r = _run(fn_torch, q, k, v, do, dtype=torch.float64)
    _check_rule(o, o_t, o_r, dtype, f"{label} out")
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g_t, g_r):
        assert a.dtype == dtype
        _check_rule(a, b, c, dtype, f"{label} {name}")


# ----------------------------------------------------------------------------- triton, dense
DENSE_CASES = [
    # (dtype, B, H, N, d): odd lengths, every shipped head-dim class (32, 64, padded 80)
    (torch.float32, 1, 2, 1, 32),
    (torch.float32, 2, 1, 61, 80),
    (torch.float32, 1, 1, 130, 64),       # > one 128-row query block in the shipped forward tile
    (torch.bfloat16, 1, 2, 13, 32),
    (torch.bfloat16, 1, 1, 97, 80),
    (torch.bfloat16, 1, 1, 61, 64),
    (torch.float16, 1, 1, 97, 64),
    (torch.float16, 1, 2, 13, 80),
]


@pytest.mark.parametrize("dtype,B,H,N,d", DENSE_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_triton_dense_matches_fp64_reference(dtype, B, H, N, d):
    q, k, v, do = _inputs((B, H, N, d), dtype, seed=N * 7 + d)
    _compare_all(lambda q, k, v: A.attention(q, k, v, backend="triton"),
                 lambda q, k, v: A.attention_naive(q, k, v), q, k, v, do, dtype, f"{dtype} {B}x{H}x{N}x{d}")


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles: several query and key blocks, ragged last blocks, on tiny shapes."""
    t = A.Tile(16, 16, 4, 2)
    monkeypatch.setattr(A, "_TILE_OVERRIDE", {"fwd": t, "bwd_dq": t, "bwd_dkdv": t})


@pytest.mark.parametrize("dtype,N,d", [(torch.float32, 61, 80), (torch.bfloat16, 37, 32)])
def test_triton_multi_block_loops(small_tiles, dtype, N, d):
    q, k, v, do = _inputs((1, 2, N, d), dtype, seed=3)
    _compare_all(lambda q, k, v: A.attention(q, k, v, backend="triton"),
                 lambda q, k, v: A.attention_naive(q, k, v), q, k, v, do, dtype, f"16x16 tiles N={N} d={d}")


def test_triton_custom_scale_and_output_layout():
    q, k, v, _ = _inputs((2, 2, 13, 32), torch.float32, seed=5)
    out = A.attention(q, k, v, backend="triton", scale=0.3)
    ref = A.attention_naive(q.double(), k.double(), v.double(), scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5
    # token-major storage: the engine's transpose(1, 2).reshape(B, N, C) is a free view
    assert out.transpose(1, 2).is_contiguous()


# ----------------------------------------------------------------------------- packed sequences
def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 80), (torch.bfloat16, 32), (torch.float16, 64)],
                         ids=["fp32-d80", "bf16-d32", "fp16-d64"])
def test_triton_packed_matches_fp64_reference(dtype, d):
    lens = [1, 17, 61]
    cu = _cu(lens)
    q, k, v, do = _inputs((sum(lens), 2, d), dtype, seed=d)
    _compare_all(lambda q, k, v: A.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lens), backend="triton"),
                 lambda q, k, v: A.attention_naive(q, k, v, cu_seqlens=cu), q, k, v, do, dtype,
                 f"packed {lens} {dtype} d={d}")


@pytest.mark.parametrize("backend", ["triton", "sdpa", "chunked", "naive"])
def test_packed_equals_each_sequence_alone(backend, small_tiles):
    """Block-diagonal semantics: a packed batch gives exactly what each sequence gives alone
    (forward and gradients), including an empty sequence and one of length 1."""
    lens = [5, 0, 1, 23]
    cu = _cu(lens)
    q, k, v, do = _inputs((sum(lens), 2, 32), torch.float32, seed=11)
    o, g = _run(lambda q, k, v: A.attention(q, k, v, cu_seqlens=cu, backend=backend), q, k, v, do)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue

        def one(q, k, v):                  # [n, H, d] -> dense [1, H, n, d] and back
            dense = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
            return A.attention(*dense, backend=backend)[0].transpose(0, 1)
        o1, g1 = _run(one, q[a:b], k[a:b], v[a:b], do[a:b])
        torch.testing.assert_close(o[a:b], o1, atol=2e-6, rtol=1e-5)
        for x, y in zip(g, g1):
            torch.testing.assert_close(x[a:b], y, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- sdpa vs naive
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_naive_agree_dense(dtype):
    q, k, v, do = _inputs((2, 3, 69, 64), dtype, seed=1)
    _compare_all(lambda q, k, v: A.attention(q, k, v, backend="sdpa"),
                 lambda q, k, v: A.attention_naive(q, k, v), q, k, v, do, dtype, f"sdpa dense {dtype}")
    assert A.attention_backend("cpu") == "sdpa"


# ----------------------------------------------------------------------------- chunked (CPU)
@pytest.mark.parametrize("dtype,shape", [
    (torch.float32, (2, 3, 69, 64)), (torch.bfloat16, (2, 3, 69, 64)), (torch.float16, (1, 2, 37, 32)),
    (torch.bfloat16, (3, 1, 1, 16)), (torch.float32, (4, 5, 2, 8))], ids=str)
def test_chunked_matches_fp64_reference(dtype, shape):
    q, k, v, do = _inputs(shape, dtype, seed=3)
    _compare_all(lambda q, k, v: A.attention(q, k, v, backend="chunked"),
                 lambda q, k, v: A.attention_naive(q, k, v), q, k, v, do, dtype, f"chunked {dtype} {shape}")


def test_chunked_is_exact_in_fp64_across_chunk_boundaries(monkeypatch):
    # chunks smaller than one slice's scores: every (batch, head) slice is its own chunk
    monkeypatch.setattr(A, "CHUNK_BYTES", 1)
    q, k, v, do = _inputs((3, 2, 21, 16), torch.float64, seed=4)
    o, g = _run(lambda q, k, v: A.attention(q, k, v, backend="chunked", scale=0.37), q, k, v, do)
    o_r, g_r = _run(lambda q, k, v: A.attention_naive(q, k, v, scale=0.37), q, k, v, do)
    torch.testing.assert_close(o, o_r, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_chunked_saves_no_score_matrix():
    """What autograd keeps for backward is O(N d) per slice (q, k, v, log-sum-exp), never N x N."""
    N, d = 300, 16
    q, k, v = (torch.randn(1, 2, N, d, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        A.attention(q, k, v, backend="chunked")
    assert saved and max(saved) <= 2 * N * d, saved
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        A.attention_naive(q, k, v)
    assert max(saved) >= 2 * N * N    # the reference keeps the probabilities


def test_sdpa_packed_matches_padded_dense():
    """Packed (jagged) SDPA equals dense SDPA on zero-padded sequences with a key-padding mask,
    on the real rows."""
    lens = [3, 40, 17]
    cu = _cu(lens)
    q, k, v, do = _inputs((sum(lens), 2, 32), torch.float32, seed=2)
    packed, gp = _run(lambda q, k, v: A.attention(q, k, v, cu_seqlens=cu, backend="sdpa"), q, k, v, do)
    L = max(lens)

    def pad(x):
        out = x.new_zeros(len(lens), L, *x.shape[1:])
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            out[i, : b - a] = x[a:b]
        return out.transpose(1, 2)                       # [S, H, L, d]
    key_ok = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]
    mask = key_ok[:, None, None, :]                       # [S, 1, 1, L]

    def padded(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
        o = o.transpose(1, 2)
        return torch.cat([o[i, :n] for i, n in enumerate(lens)])
    dense, gd = _run(padded, q, k, v, do)
    torch.testing.assert_close(packed, dense, atol=2e-6, rtol=1e-5)
    for x, y in zip(gp, gd):
        torch.testing.assert_close(x, y, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- poisoned memory
@pytest.fixture
def nan_alloc(monkeypatch):
    """Every buffer the launcher allocates starts as NaN: any element not written shows up."""
    def full_nan(shape, dtype=None, device=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(A, "_empty", full_nan)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_triton_poisoned_memory(nan_alloc, small_tiles, packed):
    """Inputs are views into NaN-filled storage (extra head-dim columns beyond d=80, extra
    tokens beyond the sequence), outputs start as NaN: masked loads must not read the
    poison and every output element must be written."""
    d, N = 80, 29
    g = torch.Generator().manual_seed(4)

    def poisoned(shape_valid, shape_buf):
        buf = torch.full(shape_buf, float("nan"))
        view = buf[tuple(slice(0, s) for s in shape_valid)]
        view.copy_(torch.randn(shape_valid, generator=g))
        return view
    if packed:
        lens = [13, 1, 15]
        cu = _cu(lens)
        q, k, v, do = (poisoned((N, 2, d), (N + 3, 2, 128)) for _ in range(4))
        fn = lambda q, k, v: A.attention(q, k, v, cu_seqlens=cu, backend="triton")        # noqa: E731
        ref = lambda q, k, v: A.attention_naive(q, k, v, cu_seqlens=cu)                  # noqa: E731
    else:
        q, k, v, do = (poisoned((2, 2, N, d), (2, 2, N + 3, 128)) for _ in range(4))
        fn = lambda q, k, v: A.attention(q, k, v, backend="triton")                      # noqa: E731
        ref = A.attention_naive
    o, grads = _run(fn, q, k, v, do)
    o_r, grads_r = _run(ref, q, k, v, do, dtype=torch.float64)
    for x, y in zip([o, *grads], [o_r, *grads_r]):
        assert torch.isfinite(x).all()
        assert (x.double() - y).abs().max() < 1e-5


# ----------------------------------------------------------------------------- dispatch
def test_xformers_on_cpu_is_unavailable():
    q, k, v, _ = _inputs((1, 1, 8, 32), torch.float32)
    with pytest.raises(BackendUnavailable, match="xformers"):
        A.attention(q, k, v, backend="xformers")


def test_triton_without_interpreter_is_unavailable():
    code = ("import torch, kernels.attention as A\n"
            "from kernels.dispatch import BackendUnavailable\n"
            "q = torch.randn(1, 1, 8, 32)\n"
            "try:\n    A.attention(q, q, q, backend='triton')\n"
            "except BackendUnavailable as e:\n    print('RAISED', e)\n"
            "print('auto ->', A.attention_backend('cpu', 'auto', 32))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RAISED" in r.stdout and "CUDA device" in r.stdout, r.stdout
    assert "auto -> sdpa" in r.stdout


def test_unsupported_head_dim_and_dtype_are_explicit():
    q, k, v, _ = _inputs((1, 1, 8, 48), torch.float32)
    with pytest.raises(BackendUnavailable, match="head dim 48"):
        A.attention(q, k, v, backend="triton")
    # fp32 has no compiled GPU config: explicit triton refuses, auto moves on
    with pytest.raises(BackendUnavailable, match="float32"):
        A.attention_backend("cuda", "triton", head_dim=64, dtype=torch.float32)
    assert A.attention_backend("cuda", "auto", head_dim=80, dtype=torch.bfloat16) == "triton"
    assert A.attention_backend("cuda", "auto", head_dim=48, dtype=torch.bfloat16) in ("xformers", "sdpa")
    assert A.attention_backend("cuda", "auto", head_dim=64, dtype=torch.float32) in ("xformers", "sdpa")
    assert A.attention_backend("cpu", "auto", head_dim=80, dtype=torch.bfloat16) == "chunked"
    assert A.attention_backend("cpu", "auto", head_dim=64, dtype=torch.float32) == "sdpa"
    assert A.attention_backend("cpu", "auto", head_dim=64, dtype=torch.bfloat16, packed=True) == "sdpa"
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        A.attention_backend("cpu", "flash")


def test_env_override(monkeypatch):
    q, k, v, _ = _inputs((1, 1, 9, 32), torch.float32)
    monkeypatch.setenv("IJEPA_ATTENTION_BACKEND", "naive")
    assert A.attention_backend("cpu") == "naive"
    monkeypatch.setenv("IJEPA_ATTENTION_BACKEND", "xformers")
    with pytest.raises(BackendUnavailable):
        A.attention(q, k, v)


def test_shape_errors():
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        A.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="one shape"):
        A.attention(q, q[:, :, :4], q)
    packed = torch.randn(10, 1, 32)
    with pytest.raises(ValueError, match="rise from 0"):
        A.attention(packed, packed, packed, cu_seqlens=_cu([4, 5]))      # covers 9 of 10 tokens


# ----------------------------------------------------------------------------- torch.library
def test_custom_ops_pass_opcheck():
    q, k, v, do = _inputs((1, 2, 13, 32), torch.float32, seed=9)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(A._flash_fwd_op, (q, k, v, None, 13, 32 ** -0.5))
    cu = _cu([4, 9])
    qp, kp, vp = (x.detach()[0].transpose(0, 1).contiguous().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(A._flash_fwd_op, (qp, kp, vp, cu, 9, 0.2))


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v, do = _inputs((1, 2, 13, 32), torch.float32, seed=10)

    def f(q, k, v):
        return A.attention(q * 2, k, v, backend="triton").sin()
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)   # fullgraph: a break raises
    o_c, g_c = _run(compiled, q, k, v, do)
    o_e, g_e = _run(f, q, k, v, do)
    torch.testing.assert_close(o_c, o_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def test_aot_specs_cover_every_shipped_config():
    specs = A.aot_specs()
    names = {s["name"] for s in specs}
    assert len(names) == len(specs) == 3 * 2 * len(A.SUPPORTED_HEAD_DIMS)
    for dt in ("bf16", "fp16"):
        for d in A.SUPPORTED_HEAD_DIMS:
            for kname in ("fwd", "bwd_dq", "bwd_dkdv"):
                s = next(s for s in specs if s["name"] == f"attn_{kname}_{dt}_d{d}")
                t = A.CONFIGS[(dt, d)][kname]
                assert s["constexprs"] == dict(HEAD_DIM=d, BLOCK_D=1 << math.ceil(math.log2(d)),
                                               BLOCK_M=t.block_m, BLOCK_N=t.block_n)
                assert (s["num_warps"], s["num_stages"]) == (t.num_warps, t.num_stages)
                assert s["signature"]["Q"] == f"*{dt}" and s["uses_mma"]


# ----------------------------------------------------------------------------- measured `auto` on CUDA
def test_measured_choice_picks_the_fastest_that_runs_and_remembers_it(tmp_path, monkeypatch):
    """The choice logic, with a stand-in timer (no GPU here): fastest wins, a backend that fails at
    this shape or cannot run is passed over and named, the table file answers the next time."""
    monkeypatch.setenv(A.TABLE_ENV, str(tmp_path / "table.json"))
    calls = []

    def timer(backend):
        calls.append(backend)
        if backend == "xformers":
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
        return {"triton": 2.0, "sdpa": 1.5}[backend]
    cands = {"triton": None, "xformers": None, "sdpa": None}
    best, why = A.measured_backend("H200|d80|bfloat16|dense|n256", cands, timer)
    assert best == "sdpa" and "sdpa 1.500 ms, triton 2.000 ms" in why and "xformers: failed (NotImplementedError" in why
    assert sorted(calls) == ["sdpa", "triton", "xformers"]
    best, why = A.measured_backend("H200|d80|bfloat16|dense|n256", cands, lambda b: calls.append(b) or 0.1)
    assert best == "sdpa" and len(calls) == 3 and str(tmp_path / "table.json") in why   # from the table
    # a head dim without a Triton config and no xformers: SDPA, and the reasons are in the log line
    best, why = A.measured_backend("H200|d24|bfloat16|dense|n256",
                                   {"triton": "head dim 24 has no shipped kernel config", "sdpa": None,
                                    "xformers": "xformers is not importable"}, lambda b: 3.0)
    assert best == "sdpa" and "head dim 24" in why and "xformers is not importable" in why
    with pytest.raises(BackendUnavailable, match="no backend runs"):
        A.measured_backend("x", {"sdpa": None}, lambda b: 1 / 0)


def test_choose_attention_off_cuda_and_for_explicit_requests():
    assert A.choose_attention("cpu", "auto", 32, torch.bfloat16, seqlen=256) == ("chunked", "the static rule (no shape to measure)") or \
        A.choose_attention("cpu", "auto", 32, torch.bfloat16, seqlen=256)[0] == "chunked"
    assert A.choose_attention("cpu", "sdpa", 24, torch.float32)[0] == "sdpa"
    with pytest.raises(BackendUnavailable):
        A.choose_attention("cpu", "xformers", 64, torch.bfloat16)
