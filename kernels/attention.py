"""Multi-head attention for every encoder / predictor block: one entry point, four backends.

``attention(q, k, v, cu_seqlens=None, max_seqlen=None, backend="auto", scale=None)``

Layouts (non-causal self-attention; output has q's layout and dtype):

* dense  ``[B, H, N, d]``;
* packed ``[total_tokens, H, d]`` plus ``cu_seqlens`` (int32 ``[S+1]``, cumulative lengths):
  block-diagonal, a token attends only to tokens of its own sequence.

Backends (resolved by the project's single rule, ``kernels.dispatch.select``):

* ``triton``: this file's flash-attention kernels (forward + backward): bf16 / fp16 on CUDA,
  plus fp32 under the Triton interpreter (CPU tests); head dims ``SUPPORTED_HEAD_DIMS`` (80 and
  96 run padded to 128 inside the kernel, masked); any sequence length; packed sequences.
  No N x N buffer in either pass.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (``BlockDiagonalMask`` when packed).
  CUDA only.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (jagged nested tensors when packed).
* ``chunked``: exact attention in plain PyTorch for the CPU: one batched GEMM per chunk of
  (batch x head) slices, the scale folded into q (an N x d multiply instead of N x N), softmax in
  fp32, and only the per-row log-sum-exp saved; the backward recomputes each chunk's
  probabilities. No N x N buffer outlives its chunk (chunks hold at most ``CHUNK_BYTES`` of fp32
  scores). It exists because on CPUs PyTorch's SDPA kernel in bf16 runs far below the bf16 GEMM
  rate (benchmarks/RESULTS.md).
* ``naive``: the reference's math, ``softmax(q @ k^T * scale) @ v`` with the score matrix
  materialised. For tests and baselines only.
* ``auto``: ``IJEPA_ATTENTION_BACKEND`` if set. On CUDA a model resolves ``auto`` when it is built
  (``choose_attention``): the fastest of triton (head dims it covers), xformers (when it runs)
  and SDPA, measured once per device and shape class and kept in a table file; per call without
  a model, ``triton`` when the head dim is covered, then ``xformers``, then ``sdpa``. On CPU
  ``chunked`` for dense bf16 / fp16 inputs and ``sdpa`` otherwise (fp32, packed), measured.

Explicitly requested backends that cannot run raise ``BackendUnavailable``; nothing falls back
silently.

Kernel design (all three kernels are plain pointer arithmetic, no block pointers, so they keep
working on Triton 3.9 where ``tl.make_block_ptr`` is gone):

* forward: one program per (sequence, head, query block); online softmax in base 2 (scores are
  pre-multiplied by ``scale * log2(e)`` so every exponential is an ``exp2``), fp32 accumulators.
  Saves the per-row log-sum-exp (base 2) for the backward pass.
* backward: ``_attn_bwd_dq_kernel`` first computes ``delta = rowsum(dO * O)`` for its query
  block (the usual preprocess pass, fused: it already holds that block of dO and O), stores it,
  and accumulates dQ over key blocks. Then ``_attn_bwd_dkdv_kernel`` owns one key block and
  accumulates dK and dV over query blocks, recomputing P from the saved log-sum-exp.
  Every output element has exactly one writer: no atomics, deterministic.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import BackendUnavailable, select, why_unavailable

__all__ = ["attention", "attention_backend", "choose_attention", "attention_chunked", "attention_naive", "aot_specs",
           "SUPPORTED_HEAD_DIMS", "BackendUnavailable"]

_ALLOWED = ("triton", "xformers", "sdpa", "chunked", "naive")

# Under the interpreter a bf16 tl.dot multiplies the raw uint16 bit patterns (garbage), so
# operands are upcast there. The flag is a constexpr: on GPU the branch compiles away.
_INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# ------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class Tile:
    block_m: int      # query rows per tile
    block_n: int      # key rows per tile
    num_warps: int
    num_stages: int


SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Compiled for GPUs. fp32 runs only under the interpreter (tests): a spill-free fp32 tile needs
# either TF32 (silently less precise than torch's fp32) or FMA dots (slow); on CUDA, fp32 goes
# to xformers / SDPA instead (the engine trains in bf16 autocast anyway).
_GPU_DTYPES = ("bf16", "fp16")


def _block_d(head_dim: int) -> int:
    return 1 << (head_dim - 1).bit_length()


def _tiles(block_d: int) -> dict[str, Tile]:
    """Tile per kernel for one padded head dim (bf16 and fp16 alike).

    Every entry was checked by AOT compilation for sm_80 and sm_90: zero spills, shared memory
    within limits, HMMA / HGMMA present (``tests/test_attention_aot.py``). The MMA "M" side of
    every dot (the query block for forward / dQ, the key block for dK/dV) is >= 64 so Hopper can
    use warpgroup MMA. Untuned for speed: no GPU was available to time alternatives.
    """
    if block_d <= 64:
        return {"fwd": Tile(128, 64, 8, 2), "bwd_dq": Tile(64, 64, 4, 2), "bwd_dkdv": Tile(32, 64, 4, 2)}
    # d 80/96/128 run as 128: dK/dV keeps four [64, 128] tiles live (k, v, two fp32 accumulators).
    return {"fwd": Tile(128, 64, 8, 2), "bwd_dq": Tile(64, 64, 8, 2), "bwd_dkdv": Tile(64, 64, 8, 2)}


# The one table the launcher and ``aot_specs`` both read: (dtype, head_dim) -> kernel -> Tile.
CONFIGS: dict[tuple[str, int], dict[str, Tile]] = {
    (dt, d): _tiles(_block_d(d)) for dt in _GPU_DTYPES for d in SUPPORTED_HEAD_DIMS
}

# Tests shrink tiles to exercise multi-block loops on tiny shapes under the interpreter.
_TILE_OVERRIDE: Optional[dict[str, Tile]] = None


def _tile(dtype: torch.dtype, head_dim: int, kernel: str) -> Tile:
    if _TILE_OVERRIDE is not None and kernel in _TILE_OVERRIDE:
        return _TILE_OVERRIDE[kernel]
    name = _DTYPES[dtype]
    return CONFIGS[(name if name in _GPU_DTYPES else "bf16", head_dim)][kernel]


# ------------------------------------------------------------------------------------ kernels
# Runtime scalars that may happen to equal 1 (one head, one token, varlen flag) or a multiple of
# 16: left unspecialised so one compiled variant serves every shape, and it is exactly the
# variant ``aot_specs`` compiles.
_NO_SPECIALIZE = ["seqlen_dense", "n_heads", "varlen", "s_lz", "s_lh"]


@triton.jit
def _mma(a, b, acc):
    if _INTERP:
        # exact products of 16-bit values in fp32, which is what tensor cores accumulate
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _seq_bounds(CU_SEQLENS, z, seqlen_dense, varlen):
    # Dense inputs: every "sequence" is a batch row of length seqlen_dense starting at 0.
    start = z * 0
    seqlen = seqlen_dense
    if varlen != 0:
        start = tl.load(CU_SEQLENS + z)
        seqlen = tl.load(CU_SEQLENS + z + 1) - start
    return start, seqlen


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    sm_scale, seqlen_dense, n_heads, varlen,
    s_qz, s_qh, s_qn, s_kz, s_kh, s_kn, s_vz, s_vh, s_vn, s_oz, s_oh, s_on, s_lz, s_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh = tl.program_id(0)
    pid_m = tl.program_id(1)
    z = zh // n_heads
    h = zh % n_heads
    start, seqlen = _seq_bounds(CU_SEQLENS, z, seqlen_dense, varlen)
    if pid_m * BLOCK_M >= seqlen:
        return
    # 64-bit bases: a batch of long packed sequences can exceed 2**31 elements.
    z64 = z.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    Q += z64 * s_qz + h64 * s_qh + t64 * s_qn
    K += z64 * s_kz + h64 * s_kh + t64 * s_kn
    V += z64 * s_vz + h64 * s_vh + t64 * s_vn
    O += z64 * s_oz + h64 * s_oh + t64 * s_on
    LSE += z64 * s_lz + h64 * s_lh + t64

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM          # head dim padded to a power of two (80 -> 128)
    m_ok = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * s_qn + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        kv_idx = start_n + offs_n
        n_ok = kv_idx < seqlen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_idx[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        # m_new is finite: every tile that runs holds >= 1 valid key (start_n < seqlen), and
        # padded query rows are zeros, so their scores are 0, not -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_idx[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * s_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, CU_SEQLENS,
    sm_scale, seqlen_dense, n_heads, varlen,
    s_qz, s_qh, s_qn, s_kz, s_kh, s_kn, s_vz, s_vh, s_vn, s_oz, s_oh, s_on,
    s_doz, s_doh, s_don, s_dqz, s_dqh, s_dqn, s_lz, s_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh = tl.program_id(0)
    pid_m = tl.program_id(1)
    z = zh // n_heads
    h = zh % n_heads
    start, seqlen = _seq_bounds(CU_SEQLENS, z, seqlen_dense, varlen)
    if pid_m * BLOCK_M >= seqlen:
        return
    z64 = z.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    Q += z64 * s_qz + h64 * s_qh + t64 * s_qn
    K += z64 * s_kz + h64 * s_kh + t64 * s_kn
    V += z64 * s_vz + h64 * s_vh + t64 * s_vn
    O += z64 * s_oz + h64 * s_oh + t64 * s_on
    DO += z64 * s_doz + h64 * s_doh + t64 * s_don
    DQ += z64 * s_dqz + h64 * s_dqh + t64 * s_dqn
    LSE += z64 * s_lz + h64 * s_lh + t64
    DELTA += z64 * s_lz + h64 * s_lh + t64

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    row_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * s_qn + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * s_don + offs_d[None, :], mask=row_mask, other=0.0)
    o = tl.load(O + offs_m[:, None] * s_on + offs_d[None, :], mask=row_mask, other=0.0)
    # The dK/dV kernel (launched next) reads delta for every query row.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=m_ok)
    # +inf makes P exactly 0 on padded rows.
    lse = tl.load(LSE + offs_m, mask=m_ok, other=float("inf"))

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        kv_idx = start_n + offs_n
        kv_mask = (kv_idx < seqlen)[:, None] & d_ok[None, :]
        k = tl.load(K + kv_idx[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_idx[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32))
        # Padded keys get a nonzero ds here, but their k rows are zeros, so they add nothing to dq.
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * s_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,
    sm_scale, seqlen_dense, n_heads, varlen,
    s_qz, s_qh, s_qn, s_kz, s_kh, s_kn, s_vz, s_vh, s_vn,
    s_doz, s_doh, s_don, s_dkz, s_dkh, s_dkn, s_dvz, s_dvh, s_dvn, s_lz, s_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    zh = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = zh // n_heads
    h = zh % n_heads
    start, seqlen = _seq_bounds(CU_SEQLENS, z, seqlen_dense, varlen)
    if pid_n * BLOCK_N >= seqlen:
        return
    z64 = z.to(tl.int64)
    h64 = h.to(tl.int64)
    t64 = start.to(tl.int64)
    Q += z64 * s_qz + h64 * s_qh + t64 * s_qn
    K += z64 * s_kz + h64 * s_kh + t64 * s_kn
    V += z64 * s_vz + h64 * s_vh + t64 * s_vn
    DO += z64 * s_doz + h64 * s_doh + t64 * s_don
    DK += z64 * s_dkz + h64 * s_dkh + t64 * s_dkn
    DV += z64 * s_dvz + h64 * s_dvh + t64 * s_dvn
    LSE += z64 * s_lz + h64 * s_lh + t64
    DELTA += z64 * s_lz + h64 * s_lh + t64

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (offs_n < seqlen)[:, None] & d_ok[None, :]
    k = tl.load(K + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Works on transposed tiles (keys x queries) so that dK and dV come out of plain dots
    # with the key block as the MMA M dimension.
    for start_m in range(0, seqlen, BLOCK_M):
        q_idx = start_m + offs_m
        q_ok = q_idx < seqlen
        row_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_idx[:, None] * s_qn + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO + q_idx[:, None] * s_don + offs_d[None, :], mask=row_mask, other=0.0)
        lse = tl.load(LSE + q_idx, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + q_idx, mask=q_ok, other=0.0)
        s_t = _mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32)) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = _mma(p_t.to(do.dtype), do, dv)
        dp_t = _mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _mma(ds_t.to(q.dtype), q, dk)
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * s_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * s_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


# ------------------------------------------------------------------------------------ launchers
_KERNELS = {"fwd": _attn_fwd_kernel, "bwd_dq": _attn_bwd_dq_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel}
# Allocation hook: tests replace it with a NaN-filling allocator to prove every output element
# that should be written is written.
_empty = torch.empty


def _alloc_like_out(q: torch.Tensor) -> torch.Tensor:
    """An output with q's shape. Dense outputs are stored token-major ([B, N, H, d] memory,
    viewed as [B, H, N, d]) so the caller's ``transpose(1, 2).reshape(B, N, H*d)`` is free."""
    if q.dim() == 4:
        B, H, N, d = q.shape
        return _empty((B, N, H, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    return _empty(q.shape, dtype=q.dtype, device=q.device)


def _lse_shape(q: torch.Tensor) -> tuple[int, ...]:
    return tuple(q.shape[:3]) if q.dim() == 4 else (q.shape[1], q.shape[0])


def _strides(*xs: torch.Tensor) -> list[int]:
    """(per-sequence, per-head, per-token) element strides of each tensor, flattened. Packed
    tensors have no sequence stride: a sequence's first token comes from cu_seqlens."""
    return [s for x in xs for s in ((x.stride(0), x.stride(1), x.stride(2)) if x.dim() == 4
                                    else (0, x.stride(1), x.stride(0)))]


def _lse_strides(lse: torch.Tensor) -> tuple[int, int]:
    return (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))


def _unit_last(*xs: torch.Tensor):
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


@functools.lru_cache(maxsize=None)
def _dummy_cu(device: torch.device) -> torch.Tensor:
    return torch.zeros(2, dtype=torch.int32, device=device)


def _launch_geometry(q, cu_seqlens, max_seqlen):
    """(number of sequences, heads, dense length or 0, max length, varlen flag, cu tensor), or None
    when there is nothing to compute."""
    if cu_seqlens is None:
        B, H, N, _ = q.shape
        geometry = B, H, N, N, 0, _dummy_cu(q.device)
    else:
        geometry = cu_seqlens.numel() - 1, q.shape[1], 0, max_seqlen, 1, cu_seqlens
    return geometry if geometry[0] * geometry[1] > 0 and geometry[3] > 0 else None


def _device_guard(x: torch.Tensor):
    # Triton launches on the *current* CUDA device, which need not be x's.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch(kname, tensors, stats, geometry, scale):
    """One kernel over (sequence x head, row block): ``tensors`` are the [.., N, d] operands in
    the kernel's argument order, ``stats`` the fp32 per-row log-sum-exp (and delta)."""
    Z, H, n_dense, max_len, varlen, cu = geometry
    d = tensors[0].shape[-1]
    t = _tile(tensors[0].dtype, d, kname)
    # forward / dQ own a query block, dK/dV a key block
    rows = t.block_n if kname == "bwd_dkdv" else t.block_m
    _KERNELS[kname][(Z * H, triton.cdiv(max_len, rows))](
        *tensors, *stats, cu, scale, n_dense, H, varlen, *_strides(*tensors), *_lse_strides(stats[0]),
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        num_warps=t.num_warps, num_stages=t.num_stages)


def _flash_fwd_launch(q, k, v, cu_seqlens, max_seqlen, scale):
    q, k, v = _unit_last(q, k, v)
    geometry = _launch_geometry(q, cu_seqlens, max_seqlen)
    o, lse = _alloc_like_out(q), _empty(_lse_shape(q), dtype=torch.float32, device=q.device)
    if geometry is not None:
        _launch("fwd", (q, k, v, o), (lse,), geometry, scale)
    return o, lse


def _flash_bwd_launch(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    do, q, k, v, o = _unit_last(do, q, k, v, o)
    geometry = _launch_geometry(q, cu_seqlens, max_seqlen)
    dq, dk, dv = _alloc_like_out(q), _alloc_like_out(k), _alloc_like_out(v)
    if geometry is None:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty(lse.shape, dtype=torch.float32, device=q.device)
    _launch("bwd_dq", (q, k, v, o, do, dq), (lse, delta), geometry, scale)
    _launch("bwd_dkdv", (q, k, v, do, dk, dv), (lse, delta), geometry, scale)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ torch.library
# Opaque custom ops: torch.compile keeps them as single graph nodes (no graph break) and never
# traces into Triton, so the same registration works on GPU and under the interpreter.
@torch.library.custom_op("ijepa::flash_attn_fwd", mutates_args=())
def _flash_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                  max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    with _device_guard(q):
        return _flash_fwd_launch(q, k, v, cu_seqlens, max_seqlen, scale)


@_flash_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    # same allocation code as the real op, so shapes and strides agree by construction
    return _alloc_like_out(q), torch.empty(_lse_shape(q), dtype=torch.float32, device=q.device)


@torch.library.custom_op("ijepa::flash_attn_bwd", mutates_args=())
def _flash_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _device_guard(q):
        return _flash_bwd_launch(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale)


@_flash_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    return _alloc_like_out(q), _alloc_like_out(k), _alloc_like_out(v)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_bwd_op(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_flash_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------ other backends
def _bounds(cu_seqlens, seqlens):
    """(start, end) of every packed sequence, from host lengths when the caller has them (reading
    ``cu_seqlens`` back would wait for the device)."""
    ends = list(itertools.accumulate(cu_seqlens.diff().tolist() if seqlens is None else seqlens))
    return list(zip([0] + ends, ends))


def _per_sequence(fn, q, k, v, bounds):
    """``fn`` on each packed sequence's [H, n, d] slices, outputs packed back to [total, H, d]."""
    outs = [fn(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1) for a, b in bounds]
    return torch.cat(outs, 0) if outs else torch.empty_like(q)


def attention_naive(q, k, v, scale=None, cu_seqlens=None, seqlens=None):
    """The reference's attention (I-JEPA ``src/models/vision_transformer.py``): scores are
    materialised, scaled after the matmul, softmaxed in the input dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        attn = (q @ k.transpose(-2, -1)) * scale
        return attn.softmax(dim=-1) @ v
    return _per_sequence(lambda *qkv: attention_naive(*qkv, scale), q, k, v, _bounds(cu_seqlens, seqlens))


CHUNK_BYTES = 32 << 20   # fp32 scores per chunk: 218 slices of 196 x 196 (ViT-B/16, 12 heads, batch 18)


def _chunks(slices: int, n_q: int, n_k: int):
    per = max(1, CHUNK_BYTES // max(1, n_q * n_k * 4))
    return [(a, min(slices, a + per)) for a in range(0, slices, per)]


class _ChunkedAttention(torch.autograd.Function):
    """Dense ``[..., N, d]`` attention over chunks of the flattened leading dims; see the module
    docstring. GEMMs run in the input dtype (bf16 GEMMs are ~5x the fp32 rate on AVX-512-BF16
    CPUs); softmax and its statistics in fp32 (fp64 stays fp64), with the dtype conversions
    fused into the softmax kernels as autocast does for the reference."""

    @staticmethod
    def forward(ctx, q, k, v, scale, save):
        q3, k3, v3 = (x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1]) for x in (q, k, v))
        qs = q3 * scale
        acc = torch.promote_types(q.dtype, torch.float32)
        slices, n = q3.shape[0], q3.shape[1]
        lse = torch.empty(slices, n, dtype=acc, device=q.device) if save else None
        outs = []
        for a, b in _chunks(slices, n, n):
            s = torch.bmm(qs[a:b], k3[a:b].transpose(1, 2))
            p = torch.softmax(s, -1, dtype=acc)
            if save:   # log-sum-exp from the row maximum: lse = max(s) - log(max(p))
                torch.sub(s.amax(-1), p.amax(-1).log_(), out=lse[a:b])
            outs.append(torch.bmm(p.to(q.dtype), v3[a:b]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if save:
            ctx.save_for_backward(qs, k3, v3, lse)
        ctx.scale, ctx.shape = scale, q.shape
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, do):
        qs, k3, v3, lse = ctx.saved_tensors
        do3 = do.reshape(qs.shape).to(qs.dtype)
        acc = lse.dtype
        grads = [[], [], []]
        for a, b in _chunks(qs.shape[0], qs.shape[1], qs.shape[1]):
            s = torch.bmm(qs[a:b], k3[a:b].transpose(1, 2))
            p = torch.sub(s, lse[a:b].unsqueeze(-1)).exp_()          # fp32 (type promotion)
            grads[2].append(torch.bmm(p.to(qs.dtype).transpose(1, 2), do3[a:b]))
            dp = torch.bmm(do3[a:b], v3[a:b].transpose(1, 2)).to(acc)
            ds = torch._softmax_backward_data(dp, p, -1, acc).to(qs.dtype)   # p * (dp - rowsum(p*dp))
            grads[0].append(torch.bmm(ds, k3[a:b]).mul_(ctx.scale))
            grads[1].append(torch.bmm(ds.transpose(1, 2), qs[a:b]))
        dq, dk, dv = (g[0] if len(g) == 1 else torch.cat(g) for g in grads)
        return dq.view(ctx.shape), dk.view(ctx.shape), dv.view(ctx.shape), None, None


def attention_chunked(q, k, v, scale=None, cu_seqlens=None, seqlens=None):
    """The ``chunked`` backend (dense; packed sequences one at a time)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # a custom Function's forward always runs without grad mode: decide here what to save
    save = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    with torch.autocast(q.device.type, enabled=False):   # dtypes are chosen inside; no autocast casts
        if cu_seqlens is None:
            return _ChunkedAttention.apply(q, k, v, scale, save)
        return _per_sequence(lambda *qkv: _ChunkedAttention.apply(*qkv, scale, save), q, k, v,
                             [(a, b) for a, b in _bounds(cu_seqlens, seqlens) if b > a])


def _attention_sdpa(q, k, v, scale, cu_seqlens, max_seqlen, seqlens=None):
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # Packed: jagged nested tensors ([S, j, H, d] -> [S, H, j, d]); runs on CPU and CUDA, with
    # autograd to the packed values, and never builds a T x T mask.
    offsets = cu_seqlens.to(torch.int64)
    min_len = min(seqlens) if seqlens else int(offsets.diff().min())
    q, k, v = (torch.nested.nested_tensor_from_jagged(x, offsets, min_seqlen=min_len, max_seqlen=max_seqlen)
               .transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).values()


def _attention_xformers(q, k, v, scale, cu_seqlens, seqlens=None):
    import xformers.ops as xops
    if cu_seqlens is None:                       # xformers wants [B, N, H, d]
        return xops.memory_efficient_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale).transpose(1, 2)
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    bias = BlockDiagonalMask.from_seqlens(seqlens if seqlens is not None else cu_seqlens.diff().tolist())
    return xops.memory_efficient_attention(*(x.unsqueeze(0) for x in (q, k, v)), attn_bias=bias, scale=scale).squeeze(0)


# ------------------------------------------------------------------------------------ entry points
def triton_supports(head_dim: Optional[int], dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> Optional[str]:
    """None if the Triton kernels can take this head dim / dtype on this device, else why not."""
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} has no shipped kernel config (supported: {SUPPORTED_HEAD_DIMS})"
    if dtype is not None:
        if dtype not in _DTYPES:
            return f"dtype {dtype} not supported (float32 under the interpreter, bfloat16, float16)"
        if device is not None and device.type == "cuda" and _DTYPES[dtype] not in _GPU_DTYPES:
            return (f"{dtype} has no GPU kernel config (only bf16/fp16 are compiled for CUDA); "
                    "run under bf16/fp16 autocast or use 'sdpa'")
    return None


def attention_backend(device, backend: str = "auto", head_dim: Optional[int] = None,
                      dtype: Optional[torch.dtype] = None, packed: bool = False) -> str:
    """The backend ``attention`` runs for this device / request (for logging), or raises
    ``BackendUnavailable``. Without ``head_dim`` / ``dtype`` those Triton checks are skipped."""
    device = torch.device(device)
    reason = triton_supports(head_dim, dtype, device)
    if device.type == "cpu":
        # measured on CPU (benchmarks/RESULTS.md): SDPA is the fastest fp32 path, but its bf16
        # kernel runs far below the bf16 GEMM rate, which the chunked path uses
        pref = ("chunked",) if dtype in (torch.bfloat16, torch.float16) and not packed else ("sdpa",)
    else:
        pref = ("triton", "xformers", "sdpa") if reason is None else ("xformers", "sdpa")
    chosen = select("attention", backend, device, pref, _ALLOWED)
    if chosen == "triton" and reason is not None:
        raise BackendUnavailable(f"attention: backend 'triton' cannot run here: {reason}")
    return chosen


# ------------------------------------------------------------------------------------ measured `auto` (CUDA)
TABLE_ENV = "IJEPA_ATTENTION_TABLE"     # where measured choices are kept (``make gpu-check`` fills it too)


def table_path() -> str:
    return os.environ.get(TABLE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ijepa-engine",
        "attention.json")


def shape_class(seqlen: int) -> int:
    """Sequence lengths are measured per power-of-two class (at least 64)."""
    return max(64, 1 << (max(1, int(seqlen)) - 1).bit_length())


def _time_fwd_bwd(backend, device, head_dim, dtype, packed, seqlen, tokens=1 << 16, heads=8) -> float:
    """Median ms of one forward+backward at this shape class, from CUDA events (own generator: the
    global RNG, which reference-mode masks draw from, is never touched)."""
    n = shape_class(seqlen)
    seqs = max(1, tokens // (n * heads))
    g = torch.Generator(device=device).manual_seed(0)
    shape = (seqs * n, heads, head_dim) if packed else (seqs, heads, n, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    cu = torch.arange(0, seqs * n + 1, n, device=device, dtype=torch.int32) if packed else None
    kw = dict(cu_seqlens=cu, max_seqlen=n, seqlens=[n] * seqs) if packed else {}
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = attention(q, k, v, backend=backend, **kw)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        end.record()
        torch.cuda.synchronize(device)
        if i >= 3:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measured_backend(key: str, candidates: dict, timer) -> tuple[str, str]:
    """The fastest of ``candidates`` (``{backend: None or why it cannot run}``) for ``key``, timed
    once with ``timer(backend) -> ms`` and kept in the table file; ``(backend, why)``."""
    path = table_path()
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    if key in table and table[key].get("backend") in candidates and candidates[table[key]["backend"]] is None:
        return table[key]["backend"], f"measured {table[key]['why']} ({path})"
    timings, notes = {}, [f"{b}: {why}" for b, why in candidates.items() if why is not None]
    for b in [b for b, why in candidates.items() if why is None]:
        try:
            timings[b] = float(timer(b))
        except Exception as e:   # a backend that has no kernel for this shape, out of memory, ...
            notes.append(f"{b}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    if not timings:
        raise BackendUnavailable(f"attention: no backend runs {key}: " + "; ".join(notes))
    best = min(timings, key=timings.get)
    why = ", ".join(f"{b} {ms:.3f} ms" for b, ms in sorted(timings.items(), key=lambda kv: kv[1]))
    why += "".join(f"; {n}" for n in notes)
    table[key] = {"backend": best, "why": why, "timings_ms": timings}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only home: measured again next time
    return best, f"measured {why}"


def choose_attention(device, requested: str, head_dim: int, dtype: torch.dtype, packed: bool = False,
                     seqlen: Optional[int] = None) -> tuple[str, str]:
    """The backend a model should use and why. ``auto`` on CUDA with a known sequence length: the
    fastest that runs, measured once per device and shape class (``measured_backend``); a head dim
    the Triton kernels do not cover goes to xformers or SDPA, whichever runs and is faster. An
    explicit request is used as is, or refused (``BackendUnavailable``)."""
    device = torch.device(device)
    if requested != "auto" or device.type != "cuda" or seqlen is None or os.environ.get("IJEPA_ATTENTION_BACKEND"):
        chosen = attention_backend(device, requested, head_dim, dtype, packed)
        return chosen, "requested" if requested != "auto" else "the static rule (no shape to measure)"
    candidates = {"triton": triton_supports(head_dim, dtype, device) or why_unavailable("triton", device),
                  "xformers": why_unavailable("xformers", device), "sdpa": None}
    key = (f"{torch.cuda.get_device_name(device)}|d{head_dim}|{str(dtype)[6:]}|{'packed' if packed else 'dense'}"
           f"|n{shape_class(seqlen)}")
    return measured_backend(key, candidates, lambda b: _time_fwd_bwd(b, device, head_dim, dtype, packed, seqlen))


def _check_inputs(q, k, v, cu_seqlens):
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (self-attention); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError(f"dense attention takes [B, H, N, d]; got shape {tuple(q.shape)} "
                             "(packed [total, H, d] needs cu_seqlens)")
        return
    if q.dim() != 3:
        raise ValueError(f"packed attention takes [total_tokens, H, d]; got shape {tuple(q.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S+1]")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    # On CUDA this check would cost a device sync per call, so there cu_seqlens is trusted.
    if cu_seqlens.device.type == "cpu" and (cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0]
                                            or bool((cu_seqlens.diff() < 0).any())):
        raise ValueError(f"cu_seqlens must rise from 0 to total_tokens={q.shape[0]}; got {cu_seqlens.tolist()}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
              max_seqlen: Optional[int] = None, backend: str = "auto",
              scale: Optional[float] = None, seqlens: Optional[list] = None) -> torch.Tensor:
    """Non-causal softmax attention. See the module docstring for layouts and backends.

    ``max_seqlen`` / ``seqlens`` (packed only): the longest sequence and every sequence's length,
    as host numbers; computed from ``cu_seqlens`` (a device sync) when not given.
    """
    _check_inputs(q, k, v, cu_seqlens)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    b = attention_backend(q.device, backend, head_dim=q.shape[-1], dtype=q.dtype, packed=cu_seqlens is not None)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = max(seqlens) if seqlens else int(cu_seqlens.diff().max())   # >= 2 entries (checked)
        max_seqlen = int(max_seqlen)
    if b == "triton":
        return _flash_fwd_op(q, k, v, cu_seqlens, q.shape[2] if max_seqlen is None else max_seqlen, scale)[0]
    if b == "sdpa":
        return _attention_sdpa(q, k, v, scale, cu_seqlens, max_seqlen, seqlens)
    run = {"xformers": _attention_xformers, "chunked": attention_chunked, "naive": attention_naive}[b]
    return run(q, k, v, scale, cu_seqlens, seqlens)


# ------------------------------------------------------------------------------------ AOT specs
_FIXED_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32", "sm_scale": "fp32"}


def aot_specs() -> list[dict]:
    """Every kernel configuration the launcher can run on a GPU, for the AOT compile report.

    Signature types follow what the JIT sees for the engine's tensors: 16-bit or fp32 data,
    fp32 log-sum-exp / delta, int32 cu_seqlens, i32 scalars and strides. ``div16`` lists the
    pointers and q/k/v/o strides, which are multiples of 16 for every shipped head dim (the
    token stride is a multiple of d, or of 3*H*d for the fused qkv projection); lse strides
    (H*N, N) are not, so they are left out.
    """
    specs = []
    for (dt, d), tiles in CONFIGS.items():
        for kname, kernel in _KERNELS.items():
            t = tiles[kname]
            constexprs = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=t.block_m, BLOCK_N=t.block_n)
            # data pointers take the dtype; scalars and strides are lower case
            sig = {a: _FIXED_TYPES.get(a, "i32" if a.islower() else f"*{dt}")
                   for a in kernel.arg_names if a not in constexprs}
            div16 = [a for a in sig if sig[a][0] == "*" or (a.startswith("s_") and a not in ("s_lz", "s_lh"))]
            specs.append(dict(name=f"attn_{kname}_{dt}_d{d}", kernel=kernel, signature=sig, constexprs=constexprs,
                              num_warps=t.num_warps, num_stages=t.num_stages, div16=div16, uses_mma=True))
    return specs
