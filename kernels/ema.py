"""Fused EMA of the I-JEPA target encoder: ``t = m*t + (1-m)*s`` for every parameter pair.

The reference updates each parameter with ``t.mul_(m).add_((1-m)*s)``: three kernels and
a temporary per tensor. Here a handful of launches (one per dtype group) cover any number
of tensors of any sizes: the host builds int64 tables of data pointers and sizes once
(``MultiTensorEMA``) and every program handles one fixed-size chunk of one tensor.

Numerics, the part that matters: the targets are fp32 master values and the update is
done in fp32 (sources may be bf16). If the target encoder runs with bf16 weights, an
in-place bf16 EMA loses every update smaller than half a bf16 ulp, which at momentum
0.996..0.99999 and weight magnitudes ~1e-2 is nearly all of them: the target freezes.
Passing ``targets_lowp`` writes the rounded copy of the new fp32 value in the same pass,
so the bf16 weights follow the fp32 trajectory to within one rounding.

The kernel evaluates ``t + w*(s - t)`` with ``w = 1 - m``: the same value as
``m*t + (1-m)*s``, with one fused multiply-add per element, and only ``w`` has to be
accurate. ``w`` is computed in double precision on the host for a Python momentum; for
a device momentum (a 0-dim tensor, so a schedule needs no host sync) it is computed in
the tensor's precision, so keep that tensor float64 near m = 0.99999 (fp32 cannot
represent 1 - 1e-5 to better than ~0.1%).

Backends: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``torch``
(``torch._foreach_lerp_``, one pass per tensor group) and ``naive`` (the reference loop,
``ema_ref_``). ``auto`` follows ``kernels.dispatch.select``; ``IJEPA_EMA_BACKEND``
overrides it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from kernels.dispatch import select

__all__ = ["fused_ema_", "MultiTensorEMA", "EMAPlan", "ema_ref_", "ema_foreach_", "ema_tile", "aot_specs"]

BACKENDS = ("triton", "torch", "naive")
Momentum = Union[float, torch.Tensor]
LOWP_DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class EMATile:
    block: int              # elements per inner step
    blocks_per_chunk: int   # a program's share of one tensor is block * blocks_per_chunk
    num_warps: int

    @property
    def chunk(self) -> int:
        return self.block * self.blocks_per_chunk


def ema_tile() -> EMATile:
    # 16 fp32 per thread per step (four 16-byte loads of t and of s in flight); 32K-element
    # chunks keep a ViT-H (632 M params) at ~20K programs while a 192-element bias still
    # costs one program.
    return EMATile(block=2048, blocks_per_chunk=16, num_warps=4)


# ---------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------

@triton.jit
def _ema_block(t_ptr, s_ptr, l_ptr, offs, n, w, HAS_LOWP: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        ok = offs < n
        t = tl.load(t_ptr + offs, mask=ok)
        s = tl.load(s_ptr + offs, mask=ok).to(tl.float32)
        new = t + w * (s - t)
        tl.store(t_ptr + offs, new, mask=ok)
        if HAS_LOWP:
            tl.store(l_ptr + offs, new.to(l_ptr.dtype.element_ty), mask=ok)
    else:
        # Unmasked full blocks: with ALIGNED these become 16-byte vector loads/stores.
        t = tl.load(t_ptr + offs)
        s = tl.load(s_ptr + offs).to(tl.float32)
        new = t + w * (s - t)
        tl.store(t_ptr + offs, new)
        if HAS_LOWP:
            tl.store(l_ptr + offs, new.to(l_ptr.dtype.element_ty))


@triton.jit
def _ema_multi_tensor_kernel(
    target_ptrs, source_ptrs, lowp_ptrs, numels, chunks,
    weight, momentum_ptr,
    SRC_DTYPE: tl.constexpr, LOWP_DTYPE: tl.constexpr, HAS_LOWP: tl.constexpr,
    MOMENTUM_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, BLOCKS_PER_CHUNK: tl.constexpr,
):
    """Program p updates chunk chunks[p] = (tensor, chunk index) of tensor `tensor`."""
    pid = tl.program_id(0)
    tensor = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1).to(tl.int64) * (BLOCK * BLOCKS_PER_CHUNK)
    n = tl.load(numels + tensor)
    t_ptr = tl.load(target_ptrs + tensor).to(tl.pointer_type(tl.float32))
    s_ptr = tl.load(source_ptrs + tensor).to(tl.pointer_type(SRC_DTYPE))
    l_ptr = tl.load(lowp_ptrs + tensor).to(tl.pointer_type(LOWP_DTYPE))
    if ALIGNED:
        # The host checked every pointer of this group is 16-byte aligned; without the
        # hint, pointers read from memory give scalar 4-byte accesses.
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        l_ptr = tl.multiple_of(l_ptr, 16)
    if MOMENTUM_ON_DEVICE:
        w = (1.0 - tl.load(momentum_ptr)).to(tl.float32)
    else:
        w = weight
    # Only the blocks this chunk has: a 192-element bias costs one step, not a chunk's worth.
    n_blocks = tl.minimum(tl.cdiv(n - start, BLOCK), BLOCKS_PER_CHUNK)
    for blk in range(0, n_blocks):
        base = start + blk * BLOCK
        offs = base + tl.arange(0, BLOCK)
        if base + BLOCK <= n:
            _ema_block(t_ptr, s_ptr, l_ptr, offs, n, w, HAS_LOWP, False)
        elif base < n:
            _ema_block(t_ptr, s_ptr, l_ptr, offs, n, w, HAS_LOWP, True)


# ---------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------

def ema_ref_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], momentum: Momentum,
             targets_lowp: Optional[Sequence[torch.Tensor]] = None) -> None:
    """The reference's loop, in the targets' own dtype (so bf16 targets show the freeze)."""
    with torch.no_grad():
        for i, (t, s) in enumerate(zip(targets, sources)):
            t.mul_(momentum).add_((1 - momentum) * s)
            if targets_lowp is not None:
                targets_lowp[i].copy_(t)


def ema_foreach_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], momentum: Momentum,
                 targets_lowp: Optional[Sequence[torch.Tensor]] = None) -> None:
    """One ``_foreach_lerp_`` pass (timm's ModelEmaV3 formulation); sources of another dtype
    are upcast first (a temporary), a device momentum stays on the device."""
    targets = list(targets)
    with torch.no_grad():
        sources = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(targets, sources)]
        weight = 1.0 - momentum
        if isinstance(momentum, torch.Tensor):
            weight = [weight.to(targets[0].dtype)] * len(targets) if targets else []
        torch._foreach_lerp_(targets, sources, weight)
        if targets_lowp is not None:
            torch._foreach_copy_(list(targets_lowp), targets)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

def _check_pairs(targets, sources, targets_lowp) -> None:
    if len(targets) != len(sources):
        raise ValueError(f"fused_ema_: {len(targets)} targets but {len(sources)} sources")
    if targets_lowp is not None and len(targets_lowp) != len(targets):
        raise ValueError(f"fused_ema_: {len(targets)} targets but {len(targets_lowp)} low-precision copies")
    lowps = targets_lowp if targets_lowp is not None else [None] * len(targets)
    for i, (t, s, lp) in enumerate(zip(targets, sources, lowps)):
        if t.shape != s.shape:
            raise ValueError(f"fused_ema_: pair {i}: target {tuple(t.shape)} vs source {tuple(s.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"fused_ema_: pair {i}: targets must be fp32 master values, got {t.dtype} "
                            "(keep an fp32 copy and pass the bf16 weights as targets_lowp)")
        if not s.is_floating_point():
            raise TypeError(f"fused_ema_: pair {i}: source dtype {s.dtype} is not floating point")
        if t.device != s.device:
            raise ValueError(f"fused_ema_: pair {i}: target on {t.device}, source on {s.device}")
        if lp is not None and (lp.shape != t.shape or lp.device != t.device):
            raise ValueError(f"fused_ema_: pair {i}: low-precision copy {tuple(lp.shape)} on {lp.device} "
                             f"does not match target {tuple(t.shape)} on {t.device}")
        if lp is not None and lp.dtype not in LOWP_DTYPES:
            raise TypeError(f"fused_ema_: pair {i}: low-precision copy must be bf16 or fp16, got {lp.dtype}")


def _check_momentum(momentum: Momentum, device: torch.device) -> None:
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1 or not momentum.is_floating_point():
            raise ValueError(f"fused_ema_: momentum tensor must hold one float, got {momentum.dtype} "
                             f"of shape {tuple(momentum.shape)}")
        if momentum.device != device:
            raise ValueError(f"fused_ema_: momentum on {momentum.device}, parameters on {device}")


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class MultiTensorEMA:
    """Fused EMA over a fixed set of tensors; build once, call every step.

    The pointer tables are built here, so the tensors must keep their storage (rebuild
    after anything reallocates parameters, e.g. ZeRO-3 re-partitioning or ``.to()``).
    Every tensor must be contiguous (they are updated as flat arrays).
    """

    def __init__(self, targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor],
                 targets_lowp: Optional[Sequence[torch.Tensor]] = None, tile: Optional[EMATile] = None):
        self.targets, self.sources = list(targets), list(sources)
        self.targets_lowp = list(targets_lowp) if targets_lowp is not None else None
        _check_pairs(self.targets, self.sources, self.targets_lowp)
        for kind, group in (("target", self.targets), ("source", self.sources),
                            ("low-precision copy", self.targets_lowp or [])):
            for i, t in enumerate(group):
                if not t.is_contiguous():
                    raise ValueError(f"fused_ema_: {kind} {i} (shape {tuple(t.shape)}, stride {t.stride()}) "
                                     "is not contiguous; the fused EMA updates tensors as flat arrays")
        self.tile = tile or ema_tile()
        self.device = self.targets[0].device if self.targets else torch.device("cpu")
        self.launches = self._build_launches()

    def _build_launches(self) -> list[dict]:
        """One launch per (source dtype, low-precision dtype, alignment) group."""
        groups: dict[tuple, list[tuple]] = {}
        for t, s, lp in zip(self.targets, self.sources, self.targets_lowp or [None] * len(self.targets)):
            if t.numel():
                aligned = all(p.data_ptr() % 16 == 0 for p in (t, s, lp) if p is not None)
                groups.setdefault((s.dtype, lp.dtype if lp is not None else None, aligned), []).append((t, s, lp))
        launches = []
        for (src_dtype, lowp_dtype, aligned), members in groups.items():
            # Rows: target, source and low-precision pointers (0: none), element counts.
            ptrs = torch.tensor([[t.data_ptr(), s.data_ptr(), lp.data_ptr() if lp is not None else 0, t.numel()]
                                 for t, s, lp in members], dtype=torch.int64).T.contiguous()
            n_chunks = (ptrs[3] + self.tile.chunk - 1) // self.tile.chunk
            tensor_of_chunk = torch.repeat_interleave(torch.arange(len(members)), n_chunks)
            first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
            chunk_in_tensor = torch.arange(len(tensor_of_chunk)) - first_chunk[tensor_of_chunk]
            chunks = torch.stack([tensor_of_chunk, chunk_in_tensor], 1).to(torch.int32)
            launches.append(dict(ptrs=ptrs.to(self.device), chunks=chunks.to(self.device), n_chunks=len(chunks),
                                 SRC_DTYPE=_TL_DTYPE[src_dtype], LOWP_DTYPE=_TL_DTYPE[lowp_dtype or torch.bfloat16],
                                 HAS_LOWP=lowp_dtype is not None, ALIGNED=aligned))
        return launches

    @torch.no_grad()
    def __call__(self, momentum: Momentum) -> None:
        _check_momentum(momentum, self.device)
        on_device = isinstance(momentum, torch.Tensor)
        for launch in self.launches:
            _ema_multi_tensor_kernel[(launch["n_chunks"],)](
                *launch["ptrs"], launch["chunks"],
                0.0 if on_device else 1.0 - float(momentum),
                momentum if on_device else launch["ptrs"],      # placeholder pointer, never read
                **{k: launch[k] for k in ("SRC_DTYPE", "LOWP_DTYPE", "HAS_LOWP", "ALIGNED")},
                MOMENTUM_ON_DEVICE=on_device, BLOCK=self.tile.block, BLOCKS_PER_CHUNK=self.tile.blocks_per_chunk,
                num_warps=self.tile.num_warps)


class EMAPlan:
    """``fused_ema_`` for a training loop: called every step on the same tensors, it builds the
    Triton pointer tables once and rebuilds them only when a tensor's storage moved (compared on
    the host, no device sync; DeepSpeed may re-link its fp32 fragments after a checkpoint load)."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._key, self._plan = None, None

    def __call__(self, targets, sources, momentum: Momentum, targets_lowp=None) -> None:
        targets, sources = list(targets), list(sources)
        if not targets:
            return
        chosen = select("ema", self.backend, targets[0].device, preference=("triton", "torch"), allowed=BACKENDS)
        if chosen != "triton":
            fused_ema_(targets, sources, momentum, targets_lowp=targets_lowp, backend=chosen)
            return
        key = tuple(t.data_ptr() for t in targets + sources + list(targets_lowp or []))
        if key != self._key:
            self._plan, self._key = MultiTensorEMA(targets, sources, targets_lowp), key
        self._plan(momentum)


def fused_ema_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], momentum: Momentum,
               targets_lowp: Optional[Sequence[torch.Tensor]] = None, backend: str = "auto") -> None:
    """``t = m*t + (1-m)*s`` in fp32 for every pair, in place; also writes ``targets_lowp``.

    targets: fp32 tensors (the EMA master values). sources: same shapes, fp32/bf16/fp16.
    momentum: a Python float or a one-element float tensor on the parameters' device.
    targets_lowp: optional bf16/fp16 tensors that receive the rounded new values.
    A training loop should build ``MultiTensorEMA`` once instead (this rebuilds the tables).
    """
    targets, sources = list(targets), list(sources)
    if not targets:
        return
    chosen = select("ema", backend, targets[0].device, preference=("triton", "torch"), allowed=BACKENDS)
    _check_pairs(targets, sources, targets_lowp)
    _check_momentum(momentum, targets[0].device)
    if chosen == "naive":
        ema_ref_(targets, sources, momentum, targets_lowp)
    elif chosen == "torch":
        ema_foreach_(targets, sources, momentum, targets_lowp)
    else:
        MultiTensorEMA(targets, sources, targets_lowp)(momentum)


# ---------------------------------------------------------------------------------------
# AOT specs: the groups the engine launches (fp32 masters; fp32 or bf16 online weights;
# with and without a bf16 working copy; schedule on the device or a Python float)
# ---------------------------------------------------------------------------------------

# (source, low-precision copy, momentum on device: a float64 schedule tensor)
_ENGINE_GROUPS = ((torch.float32, torch.bfloat16, True), (torch.float32, None, True),
                  (torch.bfloat16, torch.bfloat16, True), (torch.float32, None, False))


def aot_specs() -> list[dict]:
    tile = ema_tile()
    return [dict(
        name=f"ema fp32<-{_TL_DTYPE[src]} lowp={_TL_DTYPE[lowp] if lowp is not None else 'none'} "
             f"m={'device fp64' if on_device else 'host'} {tile.block}x{tile.blocks_per_chunk}",
        kernel=_ema_multi_tensor_kernel,
        signature={"target_ptrs": "*i64", "source_ptrs": "*i64", "lowp_ptrs": "*i64", "numels": "*i64",
                   "chunks": "*i32", "weight": "fp32", "momentum_ptr": "*fp64" if on_device else "*i64"},
        constexprs={"SRC_DTYPE": _TL_DTYPE[src], "LOWP_DTYPE": _TL_DTYPE[lowp or torch.bfloat16],
                    "HAS_LOWP": lowp is not None, "MOMENTUM_ON_DEVICE": on_device, "ALIGNED": True,
                    "BLOCK": tile.block, "BLOCKS_PER_CHUNK": tile.blocks_per_chunk},
        num_warps=tile.num_warps, num_stages=2,
        div16=["target_ptrs", "source_ptrs", "lowp_ptrs", "numels", "chunks", "momentum_ptr"],
    ) for src, lowp, on_device in _ENGINE_GROUPS]
