"""Fused masked-token gather for I-JEPA (context tokens, predictor positions, targets).

The reference keeps the tokens named by each mask with
``torch.gather(x, 1, idx.unsqueeze(-1).repeat(1, 1, D))`` and concatenates the masks
on dim 0, so the output is **mask-major**: row ``i*B + b`` holds ``x[b, masks[i][b]]``.
That materialises a ``[B, K, D]`` int64 index per mask and a copy per ``cat``.

Here one launch covers every mask. ``gather_tokens`` optionally adds a positional
embedding in the same pass (``x[b, idx] + pos[idx]``, or ``pos[idx]`` alone), and
``gather_layernorm`` normalises only the rows it keeps (the targets of I-JEPA).

Numerics: values are read, summed and normalised in fp32, then stored in the output
dtype, which follows torch's type promotion (``bf16 x + fp32 pos -> fp32``, as the
reference's ``x + pos_embed`` does). Indices must lie in ``[0, N)``; the torch backend
raises on others (torch.gather does), the Triton kernels write NaN rows for them and
give them no gradient, so a bad mask shows up without a device-to-host sync.

Backward scatters the gradient rows back into ``x`` (and ``pos`` when it needs a
gradient). Duplicate and unsorted indices are allowed. ``deterministic=True`` (the
default) sorts the indices once and lets one program own each destination row, so the
sum order is fixed (mask-major, then token order) and no atomics are used;
``deterministic=False`` accumulates with fp32 atomics, which is cheaper when there are
few duplicates but not bitwise reproducible on a GPU.

Backends: ``triton`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) and ``torch``
(the reference). ``auto`` follows ``kernels.dispatch.select``; ``IJEPA_GATHER_BACKEND``
overrides it. The Triton path is registered as ``torch.ops.ijepa.*`` custom ops with
fake and autograd rules, so ``torch.compile(fullgraph=True)`` traces through it as an
opaque call; the gather is a memory-bound leaf, so nothing is lost by inductor not
fusing into it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import select

__all__ = ["gather_tokens", "gather_layernorm", "gather_tokens_ref", "gather_layernorm_ref",
           "ENGINE_WIDTHS", "gather_tile", "layernorm_tile", "scatter_tile", "aot_specs"]

BACKENDS = ("triton", "torch")
MasksLike = Union[torch.Tensor, Sequence[torch.Tensor]]

# ---------------------------------------------------------------------------------------
# Launch configurations. The launchers below and aot_specs() both read these functions,
# so what the AOT report checks is what the engine launches.
# ---------------------------------------------------------------------------------------

# Embedding widths of the ViT-Ti/S/B/L/H/g encoders and predictors the engine trains.
ENGINE_WIDTHS = (192, 384, 768, 1024, 1280, 1408)


@dataclasses.dataclass(frozen=True)
class Tile:
    block_k: int    # tokens (rows) per program
    block_d: int    # features per inner step
    num_warps: int


def gather_tile(D: int, elem_bytes: int) -> Tile:
    # 256-byte row pieces (16 lanes x 16-byte vectors per row) and 32 rows per program: each
    # thread keeps four 16-byte loads in flight per step. Wider tiles cost registers fast
    # (kernels.aot, fp32 on sm_80: 32x64 48 regs, 32x128 94, 64x128 156), and for a
    # memory-bound copy resident programs hide DRAM latency better than per-thread work.
    # Chosen from the compile report, not tuned on a GPU.
    # BLOCK_D is halved (not below 64 elements) until it divides D, so the inner loop over D
    # has no half-masked last step at the engine widths.
    widest = block_d = 256 // elem_bytes
    while block_d > min(64, widest) and D % block_d:
        block_d //= 2
    return Tile(32, block_d, 4)


def layernorm_tile(D: int) -> Tile:
    # The statistics need the whole row, so it stays in registers: BLOCK_D is D rounded up
    # to a power of two and rows per program are chosen for ~16 fp32 values per thread.
    block_d = triton.next_power_of_2(D)
    num_warps = 4 if block_d <= 512 else 8
    return Tile(max(1, num_warps * 32 * 16 // block_d), block_d, num_warps)


def scatter_tile(D: int, elem_bytes: int) -> Tile:
    # The deterministic backward walks BLOCK_N destination rows per program with the
    # forward's tile shape (the reads are the same gathered rows, in the other direction).
    return gather_tile(D, elem_bytes)


def _out_dtype(x_dtype: Optional[torch.dtype], pos_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype of ``x + pos`` under torch's type promotion (None: that input is absent)."""
    if x_dtype is None:
        return pos_dtype
    return x_dtype if pos_dtype is None else torch.promote_types(x_dtype, pos_dtype)


def _forward_tile(D: int, x_dtype: Optional[torch.dtype], pos_dtype: Optional[torch.dtype]) -> Tile:
    dtypes = [dt for dt in (x_dtype, pos_dtype) if dt is not None] + [_out_dtype(x_dtype, pos_dtype)]
    return gather_tile(D, max(dt.itemsize for dt in dtypes))


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _gather_rows_kernel(
    x_ptr, pos_ptr, idx_ptr, out_ptr,
    B, K, N, D,
    stride_xb, stride_xn, stride_pn,
    HAS_X: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r, k, :] = x[r % B, idx[r, k], :] + pos[idx[r, k], :] for r in [0, M*B)."""
    pid_k = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)          # i*B + b: mask-major output row
    b = row % B
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    tok = tl.load(idx_ptr + row * K + offs_k, mask=k_ok, other=0)
    in_range = (tok >= 0) & (tok < N)
    src_ok = k_ok & in_range
    tok = tl.where(src_ok, tok, 0)               # keep addresses legal for bad indices
    x_rows = b * stride_xb + tok * stride_xn
    pos_rows = tok * stride_pn
    out_rows = (row * K + offs_k) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        load_ok = src_ok[:, None] & d_ok[None, :]
        if HAS_X:
            val = tl.load(x_ptr + x_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
            if HAS_POS:     # sum in fp32, round once: what torch does for x + pos
                val = val.to(tl.float32) + tl.load(pos_ptr + pos_rows[:, None] + offs_d[None, :],
                                                   mask=load_ok, other=0.0).to(tl.float32)
        else:
            val = tl.load(pos_ptr + pos_rows[:, None] + offs_d[None, :], mask=load_ok, other=0.0)
        # (in fp32: exact for every stored dtype, and the interpreter has no bf16 scalars)
        val = tl.where(in_range[:, None], val.to(tl.float32), float("nan"))
        tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], val.to(out_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_layernorm_kernel(
    h_ptr, idx_ptr, out_ptr,
    B, K, N, D,
    stride_hb, stride_hn, eps,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[r, k, :] = layer_norm(h[r % B, idx[r, k], :]) without affine, fp32 statistics."""
    pid_k = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    b = row % B
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    tok = tl.load(idx_ptr + row * K + offs_k, mask=k_ok, other=0)
    in_range = (tok >= 0) & (tok < N)
    src_ok = k_ok & in_range
    tok = tl.where(src_ok, tok, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    v = tl.load(h_ptr + (b * stride_hb + tok * stride_hn)[:, None] + offs_d[None, :],
                mask=src_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=1) / D
    # Two-pass variance on the centred row (the row is in registers, so this is free and
    # avoids the cancellation of E[x^2] - E[x]^2).
    centred = tl.where(d_ok[None, :], v - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / D
    y = centred * tl.math.rsqrt(var + eps)[:, None]
    y = tl.where(in_range[:, None], y, float("nan"))
    tl.store(out_ptr + ((row * K + offs_k) * D)[:, None] + offs_d[None, :], y.to(out_ptr.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_rows_sorted_kernel(
    grad_ptr, src_ptr, seg_ptr, out_ptr,
    N, D, L,
    stride_ob, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, n, :] = sum of the gradient rows that gathered token n of batch b.

    src[b] lists the gradient rows of batch b's L = M*K gathered entries, ordered by the
    token they gathered (stably: mask-major, then position); seg[b, n]:seg[b, n+1] is
    token n's run. A program owns BLOCK_N destination rows and walks their runs side by
    side, each row adding its own run in order: reproducible without atomics, and every
    row is written (zeros where no token was gathered)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    start = tl.load(seg_ptr + b * (N + 1) + offs_n, mask=n_ok, other=0)
    count = tl.load(seg_ptr + b * (N + 1) + offs_n + 1, mask=n_ok, other=0) - start
    longest = tl.max(count, axis=0)
    dst_rows = b * stride_ob + offs_n.to(tl.int64) * stride_on
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for j in range(0, longest):
            live = j < count
            src_rows = tl.load(src_ptr + b * L + start + j, mask=live, other=0).to(tl.int64) * D
            acc += tl.load(grad_ptr + src_rows[:, None] + offs_d[None, :],
                           mask=live[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptr + dst_rows[:, None] + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _scatter_rows_atomic_kernel(
    grad_ptr, idx_ptr, acc_ptr,
    B, K, N, D,
    stride_ab, stride_an,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc[b, idx[r, k], :] += grad[r, k, :] with fp32 atomics (stride_ab = 0 folds the batch,
    which is the gradient of a shared positional embedding)."""
    pid_k = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    b = row % B
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    tok = tl.load(idx_ptr + row * K + offs_k, mask=k_ok, other=0)
    ok = k_ok & (tok >= 0) & (tok < N)
    dst_rows = b * stride_ab + tl.where(ok, tok, 0) * stride_an
    src_rows = (row * K + offs_k) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = ok[:, None] & (offs_d < D)[None, :]
        g = tl.load(grad_ptr + src_rows[:, None] + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(acc_ptr + dst_rows[:, None] + offs_d[None, :], g, mask=m, sem="relaxed")


# ---------------------------------------------------------------------------------------
# PyTorch references (the I-JEPA formulation; also the CPU backend)
# ---------------------------------------------------------------------------------------

def gather_tokens_ref(x: Optional[torch.Tensor], masks: MasksLike,
                      pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(masks, torch.Tensor) and masks.dim() == 2:
        masks = [masks]
    masks = list(masks)                         # [B, K] masks (an [M, B, K] tensor unbinds on dim 0)
    src = x
    if pos is not None:
        pos = pos.reshape(1, *pos.shape[-2:])
        src = pos.repeat(masks[0].shape[0], 1, 1) if x is None else x + pos
    D = src.shape[-1]
    return torch.cat([torch.gather(src, 1, m.unsqueeze(-1).repeat(1, 1, D)) for m in masks], dim=0)


def gather_layernorm_ref(h: torch.Tensor, masks: MasksLike, eps: float = 1e-5) -> torch.Tensor:
    stats_dtype = torch.promote_types(h.dtype, torch.float32)     # fp32 statistics, fp64 kept
    normed = F.layer_norm(h.to(stats_dtype), (h.shape[-1],), eps=eps).to(h.dtype)
    return gather_tokens_ref(normed, masks)


# ---------------------------------------------------------------------------------------
# Host side. The launchers are torch.library custom ops (torch.ops.ijepa.*): opaque to
# torch.compile, with fake and autograd rules.
# ---------------------------------------------------------------------------------------

def _new_output(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fill comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _stack_masks(masks: MasksLike, batch: Optional[int], device: torch.device) -> torch.Tensor:
    """[M, B, K] contiguous int64 index, validated without reading its values."""
    if isinstance(masks, torch.Tensor):
        idx = masks.unsqueeze(0) if masks.dim() == 2 else masks
        if idx.dim() != 3:
            raise ValueError(f"masks: expected a [B, K] or [M, B, K] tensor, got shape {tuple(masks.shape)}")
    else:
        masks = list(masks)
        if not masks:
            raise ValueError("masks: need at least one mask")
        shapes = {tuple(m.shape) for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"masks: every mask must be [B, K] with the same B and K, got {sorted(shapes)}")
        idx = torch.stack(masks)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"masks: expected integer token indices, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"masks are on {idx.device} but the tokens are on {device}")
    if batch is not None and idx.shape[1] != batch:
        raise ValueError(f"masks have batch {idx.shape[1]} but x has batch {batch}")
    return idx.to(torch.int64).contiguous()


def _row_major(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Kernels index the last dim with unit stride; other strides are passed through.
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _dtypes(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.dtype], ...]:
    return tuple(t.dtype if t is not None else None for t in tensors)


@torch.library.custom_op("ijepa::gather_tokens", mutates_args=())
def _gather_tokens_op(x: Optional[torch.Tensor], pos: Optional[torch.Tensor], idx: torch.Tensor,
                      deterministic: bool) -> torch.Tensor:
    # `deterministic` only matters to the backward; it rides along so the autograd rule sees it.
    M, B, K = idx.shape
    ref = x if x is not None else pos
    N, D = ref.shape[-2:]
    dtypes = _dtypes(x, pos)
    out = _new_output((M * B, K, D), _out_dtype(*dtypes), ref.device)
    if out.numel() == 0:
        return out
    tile = _forward_tile(D, *dtypes)
    stride_xb, stride_xn = x.stride()[:2] if x is not None else (0, 0)
    _gather_rows_kernel[(triton.cdiv(K, tile.block_k), M * B)](
        x if x is not None else out, pos if pos is not None else out,    # placeholder pointers, never read
        idx, out, B, K, N, D, stride_xb, stride_xn, pos.stride(0) if pos is not None else 0,
        HAS_X=x is not None, HAS_POS=pos is not None,
        BLOCK_K=tile.block_k, BLOCK_D=tile.block_d, num_warps=tile.num_warps)
    return out


@_gather_tokens_op.register_fake
def _(x, pos, idx, deterministic):
    ref = x if x is not None else pos
    M, B, K = idx.shape
    return ref.new_empty((M * B, K, ref.shape[-1]), dtype=_out_dtype(*_dtypes(x, pos)))


def _gather_setup_context(ctx, inputs, output):
    x, pos, idx, ctx.deterministic = inputs
    ctx.save_for_backward(idx)
    ctx.num_tokens = (x if x is not None else pos).shape[-2]
    ctx.dtypes = _dtypes(x, pos)


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    grads = [None] * 4                  # x: [B, N, D]; pos: [N, D], summed over the batch
    for i in (0, 1):
        if ctx.needs_input_grad[i]:
            grads[i] = _scatter_token_grads_op(grad, idx, ctx.num_tokens, ctx.dtypes[i], ctx.deterministic, i == 1)
    return tuple(grads)


torch.library.register_autograd("ijepa::gather_tokens", _gather_backward, setup_context=_gather_setup_context)


@torch.library.custom_op("ijepa::gather_layernorm", mutates_args=())
def _gather_layernorm_op(h: torch.Tensor, idx: torch.Tensor, eps: float) -> torch.Tensor:
    M, B, K = idx.shape
    N, D = h.shape[1:]
    out = _new_output((M * B, K, D), h.dtype, h.device)
    if out.numel() == 0:
        return out
    tile = layernorm_tile(D)
    _gather_layernorm_kernel[(triton.cdiv(K, tile.block_k), M * B)](
        h, idx, out, B, K, N, D, h.stride(0), h.stride(1), eps,
        BLOCK_K=tile.block_k, BLOCK_D=tile.block_d, num_warps=tile.num_warps)
    return out


@_gather_layernorm_op.register_fake
def _(h, idx, eps):
    M, B, K = idx.shape
    return h.new_empty((M * B, K, h.shape[-1]))


def _sorted_segments(idx: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For idx [M, B, K]: src [B, M*K] int32, the gradient row (i*B + b)*K + k of each of
    batch b's entries ordered by token (a stable sort, so mask-major then position within
    a run), and seg [B, N+1] int32, where each token's run starts. Out-of-range tokens sort
    outside [seg[b, 0], seg[b, N]) and are skipped."""
    M, B, K = idx.shape
    if M * B * K >= 2 ** 31:
        raise ValueError(f"gather backward: {M}x{B}x{K} gathered rows overflow the int32 row table")
    tokens, order = torch.sort(idx.permute(1, 0, 2).reshape(B, M * K), dim=1, stable=True)
    grad_rows = torch.arange(M * B * K, device=idx.device, dtype=torch.int32).reshape(M, B, K)
    src = torch.gather(grad_rows.permute(1, 0, 2).reshape(B, M * K), 1, order)
    bounds = torch.arange(num_tokens + 1, device=idx.device).expand(B, num_tokens + 1).contiguous()
    return src.contiguous(), torch.searchsorted(tokens, bounds, out_int32=True)


@torch.library.custom_op("ijepa::scatter_token_grads", mutates_args=())
def _scatter_token_grads_op(grad: torch.Tensor, idx: torch.Tensor, num_tokens: int, out_dtype: torch.dtype,
                            deterministic: bool, fold_batch: bool) -> torch.Tensor:
    """Adjoint of the gather: [B, N, D] (or [N, D] summed over the batch when fold_batch)."""
    grad = grad.contiguous()
    if fold_batch:                               # row i*B + b becomes mask i*B + b of batch 0
        idx = idx.reshape(idx.shape[0] * idx.shape[1], 1, idx.shape[2])
    M, B, K = idx.shape
    N, D = num_tokens, grad.shape[-1]
    if deterministic:
        out = _new_output((B, N, D), out_dtype, grad.device)
        if out.numel():
            src, seg = _sorted_segments(idx, N)
            tile = scatter_tile(D, grad.element_size())
            _scatter_rows_sorted_kernel[(triton.cdiv(N, tile.block_k), B)](
                grad, src, seg, out, N, D, M * K, out.stride(0), out.stride(1),
                BLOCK_N=tile.block_k, BLOCK_D=tile.block_d, num_warps=tile.num_warps)
    else:
        out = torch.zeros((B, N, D), dtype=torch.float32, device=grad.device)
        if grad.numel():
            tile = gather_tile(D, grad.element_size())
            _scatter_rows_atomic_kernel[(triton.cdiv(K, tile.block_k), M * B)](
                grad, idx, out, B, K, N, D, out.stride(0), out.stride(1),
                BLOCK_K=tile.block_k, BLOCK_D=tile.block_d, num_warps=tile.num_warps)
        out = out.to(out_dtype)
    return out[0] if fold_batch else out


@_scatter_token_grads_op.register_fake
def _(grad, idx, num_tokens, out_dtype, deterministic, fold_batch):
    shape = (num_tokens, grad.shape[-1]) if fold_batch else (idx.shape[1], num_tokens, grad.shape[-1])
    return grad.new_empty(shape, dtype=out_dtype)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device: torch.device) -> str:
    # Under torch.compile the choice is made once, when the graph is traced (it reads the
    # environment), and baked into the graph; dynamo need not trace the dispatch rule.
    return select("gather", backend, device, preference=BACKENDS, allowed=BACKENDS)


def gather_tokens(x: Optional[torch.Tensor], masks: MasksLike, pos: Optional[torch.Tensor] = None,
                  backend: str = "auto", deterministic: bool = True) -> torch.Tensor:
    """Gather the tokens named by ``masks`` (mask-major, ``[M*B, K, D]``), adding ``pos[idx]``.

    x: ``[B, N, D]`` or None (then the output is ``pos[idx]`` for every batch row).
    masks: a ``[B, K]`` tensor, a list of M of them, or an ``[M, B, K]`` tensor.
    pos: ``[N, D]`` or ``[1, N, D]``; it gets a gradient if it requires one.
    deterministic: backward without atomics, reproducible bit for bit (Triton backend).
    """
    if x is None and pos is None:
        raise ValueError("gather_tokens: give x, pos, or both")
    if x is not None and x.dim() != 3:
        raise ValueError(f"gather_tokens: x must be [B, N, D], got shape {tuple(x.shape)}")
    if pos is not None:
        if pos.dim() == 3 and pos.shape[0] == 1:
            pos = pos[0]
        if pos.dim() != 2:
            raise ValueError(f"gather_tokens: pos must be [N, D] or [1, N, D], got shape {tuple(pos.shape)}")
        if x is not None and (tuple(pos.shape) != tuple(x.shape[1:]) or pos.device != x.device):
            raise ValueError(f"gather_tokens: pos {tuple(pos.shape)} on {pos.device} does not match "
                             f"x {tuple(x.shape)} on {x.device}")
    device = (x if x is not None else pos).device
    if _resolve_backend(backend, device) == "torch":
        return gather_tokens_ref(x, masks, pos)
    idx = _stack_masks(masks, x.shape[0] if x is not None else None, device)
    return _gather_tokens_op(_row_major(x), _row_major(pos), idx, deterministic)


def gather_layernorm(h: torch.Tensor, masks: MasksLike, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """``layer_norm(h)`` (no affine, fp32 statistics, over D) of only the gathered rows,
    mask-major ``[M*B, K, D]`` in h's dtype. Targets are stop-gradient: no backward."""
    if h.dim() != 3:
        raise ValueError(f"gather_layernorm: h must be [B, N, D], got shape {tuple(h.shape)}")
    if _resolve_backend(backend, h.device) == "torch":
        return gather_layernorm_ref(h, masks, eps)
    if h.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("gather_layernorm (triton) has no backward: the targets are stop-gradient, "
                           "call it under torch.no_grad() or pass h.detach()")
    return _gather_layernorm_op(_row_major(h), _stack_masks(masks, h.shape[0], h.device), float(eps))


# ---------------------------------------------------------------------------------------
# AOT specs (kernels/aot.py compiles these for sm_80 / sm_90 and checks the resources)
# ---------------------------------------------------------------------------------------

_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (x dtype or None, pos dtype or None): what the engine gathers. Context encoder without a
# fused pos add, and the target/predictor token gather: x only. Encoder input after patch
# embedding under bf16 autocast: bf16 tokens + fp32 pos table. Predictor positions: pos only.
_GATHER_VARIANTS = ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32),
                    (torch.float32, torch.float32), (None, torch.float32))
# Gradient dtype -> parameter dtype for the deterministic backward.
_SCATTER_VARIANTS = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                     (torch.bfloat16, torch.bfloat16))


def _spec(kernel, name: str, D: int, tile: Tile, pointers: dict[str, str], **constexprs) -> dict:
    """One spec: pointer args typed by ``pointers``, the other runtime args i32 (eps fp32).
    Pointers, D and the row strides count as 16-divisible: the engine widths are."""
    constexprs["BLOCK_N" if "BLOCK_N" in kernel.arg_names else "BLOCK_K"] = tile.block_k
    constexprs["BLOCK_D"] = tile.block_d
    signature = {a: pointers.get(a, "fp32" if a == "eps" else "i32") for a in kernel.arg_names if a not in constexprs}
    return dict(name=f"{name} {tile.block_k}x{tile.block_d}", kernel=kernel, signature=signature,
                constexprs=constexprs, num_warps=tile.num_warps, num_stages=2,
                div16=[a for a, ty in signature.items() if ty[0] == "*" or a == "D" or a.startswith("stride")],
                widths=[D])


def _dedupe(specs: list[dict]) -> list[dict]:
    """Specs that compile to the same kernel (D is a runtime argument) are merged, keeping
    the widths they serve in the name."""
    merged: dict[tuple, dict] = {}
    for spec in specs:
        key = (spec["kernel"].__name__, tuple(sorted(spec["signature"].items())),
               tuple(sorted(spec["constexprs"].items())), spec["num_warps"])
        merged.setdefault(key, dict(spec, widths=[]))["widths"] += spec["widths"]
    for spec in merged.values():
        spec["name"] = f"{spec['name']} D={'/'.join(map(str, spec.pop('widths')))}"
    return list(merged.values())


def aot_specs() -> list[dict]:
    assert all(D % 16 == 0 for D in ENGINE_WIDTHS)    # so D and the row strides are 16-divisible
    specs = []
    for D in ENGINE_WIDTHS:
        for x_dt, pos_dt in _GATHER_VARIANTS:
            out = _TL_NAME[_out_dtype(x_dt, pos_dt)]
            label = "+".join(f"{n}:{_TL_NAME[dt]}" for n, dt in (("x", x_dt), ("pos", pos_dt)) if dt is not None)
            specs.append(_spec(_gather_rows_kernel, f"gather_fwd {label}->{out}", D, _forward_tile(D, x_dt, pos_dt),
                               {"x_ptr": f"*{_TL_NAME.get(x_dt, out)}", "pos_ptr": f"*{_TL_NAME.get(pos_dt, out)}",
                                "idx_ptr": "*i64", "out_ptr": f"*{out}"},
                               HAS_X=x_dt is not None, HAS_POS=pos_dt is not None))
        for dt in (torch.float32, torch.bfloat16):
            specs.append(_spec(_gather_layernorm_kernel, f"gather_layernorm {_TL_NAME[dt]}", D, layernorm_tile(D),
                               {"h_ptr": f"*{_TL_NAME[dt]}", "idx_ptr": "*i64", "out_ptr": f"*{_TL_NAME[dt]}"}))
        for g_dt, p_dt in _SCATTER_VARIANTS:
            specs.append(_spec(_scatter_rows_sorted_kernel, f"scatter_bwd sorted {_TL_NAME[g_dt]}->{_TL_NAME[p_dt]}",
                               D, scatter_tile(D, g_dt.itemsize),
                               {"grad_ptr": f"*{_TL_NAME[g_dt]}", "src_ptr": "*i32", "seg_ptr": "*i32",
                                "out_ptr": f"*{_TL_NAME[p_dt]}"}))
        for g_dt in (torch.float32, torch.bfloat16):
            specs.append(_spec(_scatter_rows_atomic_kernel, f"scatter_bwd atomic {_TL_NAME[g_dt]}->fp32", D,
                               gather_tile(D, g_dt.itemsize),
                               {"grad_ptr": f"*{_TL_NAME[g_dt]}", "idx_ptr": "*i64", "acc_ptr": "*fp32"}))
    return _dedupe(specs)
