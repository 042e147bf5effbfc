"""DeepSpeed ZeRO 0-3 behind the ``Strategy`` interface: a thin adapter, the loop is ``engine.train``'s.

What runs where
---------------
* The DeepSpeed engine wraps the ``IJEPA`` model itself with its target encoder unregistered
  (``IJEPA.detach_target``): it partitions and trains the context encoder and the predictor,
  and its forward is ``IJEPA.forward`` -- the single-process step, unchanged. The optimizer is
  the reference's four AdamW groups (torch's, fused per ``optimization.fused_optimizer``); the
  lr/wd schedules are written into those groups before every optimizer step.
* The EMA target encoder lives OUTSIDE the engine: never trainable, forward-only, with an fp32
  master that the EMA updates from the engine's fp32 master weights (not from the bf16 module
  weights: with m >= 0.996 a bf16 target updated in place stops moving, and a bf16-rounded
  source biases it). How it is stored depends on the stage:

  ============ =============================================== ==========================
  stage/dtype  target storage per rank                         EMA source, communication
  ============ =============================================== ==========================
  0-2, fp32    replicated fp32 module (it is the master)        engine module params (fp32,
                                                                 replicated); none
  0, bf16      replicated fp32 master + bf16 working copy       the bf16 optimizer's fp32
                                                                 copies; none
  1-2, bf16    bf16 working copy (replicated) + fp32 master     fp32 master fragments this
               of the fragments this rank's optimizer owns      rank owns; one bf16
                                                                 all-gather of the target
  3            partitioned like the encoder (same per-param     local fp32 master shard
               split over the same group), fp32 local shadow    (``safe_get_local_fp32_param``);
               (+ bf16 shard when bf16)                         none for the EMA, per-block
                                                                 all-gather for the forward
  ============ =============================================== ==========================

* Non-finite steps (``train.nonfinite: skip``): fp32 stages and ZeRO-3 skip them in DeepSpeed's
  own overflow check (one host read of the gradient norm per step, DeepSpeed's); bf16 ZeRO 0-2
  skip them on the device: the inner AdamW reads the engine's all-reduced gradient norm (or
  its own gradients, ZeRO-0) as ``found_inf``.
* Checkpoints: one file per rank of fp32 fragments (``engine.checkpoint``, sharded layout), so a
  run resumes under another stage, another rank count or a single process.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from functools import partial

import torch
import torch.nn as nn

import kernels.ema as kema
from engine.checkpoint import SHARD_FORMAT, fragments_of, paths, prune_tags, rank_file, save_atomic, write_latest
from engine.config import IJEPAConfig
from engine.distributed import detect_launch_env, init_distributed
from engine.errors import ConfigError, first_line
from engine.model import IJEPA, build_model, param_group_names
from engine.strategy import Strategy, build_optimizer

log = logging.getLogger("ijepa")


# ============================================================================ DeepSpeed config
def resolve_zero_stage(cfg: IJEPAConfig, zero_stage=None) -> int:
    ds = cfg.deepspeed or {}
    zo = ds.get("zero_optimization") or {}
    if not isinstance(zo, dict):
        raise ConfigError("deepspeed.zero_optimization: expected a mapping")
    from_cfg = zo.get("stage")
    if zero_stage is None:
        zero_stage = 0 if from_cfg is None else from_cfg
    elif from_cfg is not None and from_cfg != zero_stage:
        log.warning("--zero %s overrides deepspeed.zero_optimization.stage=%s", zero_stage, from_cfg)
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: {zero_stage!r}; choose 0, 1, 2 or 3")
    return int(zero_stage)


def _load_user_ds_config(cfg: IJEPAConfig) -> dict:
    import json
    user = copy.deepcopy(cfg.deepspeed or {})
    path = user.pop("config_file", None)
    if path is not None:
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ConfigError(f"deepspeed.config_file: {path!r} is not a file")
        try:
            with open(path) as f:
                base = json.load(f)
        except ValueError as e:
            raise ConfigError(f"deepspeed.config_file: {path} is not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object")
        user = _deep_merge(base, user)   # inline keys win over the file
    return user


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: IJEPAConfig, zero_stage: int, world_size: int) -> dict:
    """The user's ``deepspeed:`` section merged with what the engine decides.

    The engine sets micro batch (``data.batch_size``), accumulation
    (``optimization.grad_accum_steps``), the global batch, gradient clipping (always
    explicit: DeepSpeed's default is 1.0, the reference does not clip), the ZeRO stage and
    bf16; a conflicting user value is an error naming the engine key to change instead.
    ``optimizer``/``scheduler`` are refused: the engine builds the reference's AdamW groups
    and drives lr/wd itself. Everything else (bucket sizes, overlap_comm, communication
    dtype, ...) passes through to DeepSpeed.
    """
    user = _load_user_ds_config(cfg)
    o = cfg.optimization
    micro, accum = cfg.data.batch_size, o.grad_accum_steps
    bf16 = cfg.precision == "bf16"
    want = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(o.clip_grad or 0.0),
    }
    source = {"train_micro_batch_size_per_gpu": "data.batch_size",
              "gradient_accumulation_steps": "optimization.grad_accum_steps",
              "train_batch_size": "data.batch_size x optimization.grad_accum_steps x world size",
              "gradient_clipping": "optimization.clip_grad"}
    for key, value in want.items():
        got = user.get(key)
        if got is not None and got != "auto" and got != value:
            raise ConfigError(f"deepspeed.{key}: {got!r} conflicts with the engine's value {value!r} "
                              f"(from {source[key]}); remove it and set {source[key].split(' x ')[0]} instead")
        user[key] = value
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"deepspeed.{key}: not accepted; the engine builds the reference's AdamW groups and "
                              f"applies the optimization.* schedules itself (remove the '{key}' section)")
    if (user.get("fp16") or {}).get("enabled"):
        raise ConfigError("deepspeed.fp16: not supported (the reference trains in bf16); use meta.use_bfloat16 "
                          "or train.precision=bf16")
    user_bf16 = (user.get("bf16") or {}).get("enabled")
    if user_bf16 is not None and user_bf16 != "auto" and bool(user_bf16) != bf16:
        raise ConfigError(f"deepspeed.bf16.enabled: {user_bf16!r} conflicts with the run's precision "
                          f"{cfg.precision!r}; set train.precision (or meta.use_bfloat16) instead")
    user["bf16"] = {**(user.get("bf16") or {}), "enabled": bf16}
    if bf16:   # a non-finite step is skipped on the device (ZeroStrategy._wrap_inner_step); DeepSpeed's
        # own check would read the gradient norm back to the host every step
        user["bf16"].setdefault("check_grad_overflow", False)
    user.pop("fp16", None)
    zo = dict(user.get("zero_optimization") or {})
    zo["stage"] = zero_stage
    for off in ("offload_optimizer", "offload_param"):
        dev = (zo.get(off) or {}).get("device", "none") if isinstance(zo.get(off), dict) else "none"
        if dev not in (None, "none"):
            raise ConfigError(f"deepspeed.zero_optimization.{off}: offloading is not supported with the EMA "
                              f"target encoder (its update reads the fp32 master on the training device); "
                              f"remove it")
    if zo.get("compute_grad_norm") is False:
        raise ConfigError("deepspeed.zero_optimization.compute_grad_norm: false is not supported; the engine "
                          "reads the gradient norm to skip a non-finite step on the device; remove it")
    if int(zo.get("zero_hpz_partition_size", 1) or 1) > 1 or zo.get("zero_quantized_weights"):
        raise ConfigError("deepspeed.zero_optimization: hpZ / quantized weights are not supported with the EMA "
                          "target encoder; remove zero_hpz_partition_size / zero_quantized_weights")
    user["zero_optimization"] = zo
    user.setdefault("steps_per_print", 2 ** 31 - 1)   # the engine logs; keep DeepSpeed quiet
    user.setdefault("wall_clock_breakdown", False)
    return user




# ============================================================================ EMA target encoders
class _Target:
    """Forward-only EMA target encoder kept outside the DeepSpeed engine.

    Subclasses differ in where the fp32 master lives and what the EMA reads. All keep, per
    rank, a *shard*: fragments ``(name, start, numel)`` of the flattened fp32 target parameters
    plus their values; the union over ranks is the whole target, each element exactly once
    (that is what the sharded checkpoint stores).
    """

    def __init__(self, module: nn.Module, ema_backend: str):
        self.module = module
        self.shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
        self._ema = kema.EMAPlan(ema_backend)
        self._ema_frozen = kema.EMAPlan(ema_backend)


class ReplicatedTarget(_Target):
    """Every rank holds the whole target. fp32 runs: the module is the fp32 master. bf16 runs:
    an fp32 master list plus a bf16 module for the forward, both written by one EMA pass."""

    def __init__(self, fp32_copy: nn.Module, sources, lowp_dtype, rank, ema_backend):
        names = [n for n, _ in fp32_copy.named_parameters()]
        if lowp_dtype is None:
            module, self.masters, self.lowp = fp32_copy, [p for _, p in fp32_copy.named_parameters()], None
        else:
            self.masters = [p.detach().clone() for _, p in fp32_copy.named_parameters()]
            module = fp32_copy.to(lowp_dtype)
            self.lowp = [p for _, p in module.named_parameters()]
        for p in module.parameters():
            p.requires_grad_(False)
        super().__init__(module, ema_backend)
        self.names, self.rank = names, rank
        self.sources = sources            # callable -> list of fp32 tensors in ``names`` order

    def update(self, m):
        self._ema(self.masters, self.sources(), m, self.lowp)

    def shard(self):
        if self.rank != 0:                # one copy is enough: rank 0 writes the whole target
            return {"fragments": [], "data": torch.zeros(0)}
        return {"fragments": [(n, 0, t.numel()) for n, t in zip(self.names, self.masters)],
                "data": torch.cat([t.detach().reshape(-1).float().cpu() for t in self.masters])}

    @torch.no_grad()
    def load_full(self, full):
        for i, n in enumerate(self.names):
            self.masters[i].copy_(full[n].view(self.shapes[n]))
            if self.lowp is not None:
                self.lowp[i].copy_(self.masters[i])


class FragmentTarget(_Target):
    """ZeRO-1/2 with bf16: the fp32 masters are partitioned in the optimizer (one contiguous
    slice of each flattened parameter group per rank). Each rank keeps the fp32 EMA only for
    the fragments its optimizer owns (``param._hp_mapping``), updates them from those fp32
    master fragments with no communication, writes the bf16 result into a send buffer, and
    one all-gather refreshes the replicated bf16 working copy. Frozen parameters (the fixed
    position embedding) are not in the optimizer; every rank updates them in full."""

    BUCKET = 1 << 25      # elements gathered per collective (bounds the receive buffer)

    def __init__(self, fp32_copy, engine_encoder, frozen_fp32, lowp_dtype, group, ema_backend):
        import torch.distributed as dist
        names = [n for n, _ in fp32_copy.named_parameters()]
        init = {n: p.detach().clone() for n, p in fp32_copy.named_parameters()}
        module = fp32_copy.to(lowp_dtype)
        for p in module.parameters():
            p.requires_grad_(False)
        super().__init__(module, ema_backend)
        self.group, self.names = group, names
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        device = next(module.parameters()).device
        # the bf16 target is one flat buffer so that gathered fragments land with few copies
        total = sum(p.numel() for p in module.parameters())
        self.flat = torch.empty(total, dtype=lowp_dtype, device=device)
        self.offset, o = {}, 0
        for n, p in module.named_parameters():
            k = p.numel()
            self.flat[o:o + k].copy_(p.detach().reshape(-1))
            p.data = self.flat[o:o + k].view_as(p)
            self.offset[n], o = o, o + k
        enc = dict(engine_encoder.named_parameters())
        self.frozen = [n for n in names if not enc[n].requires_grad]
        self.frozen_masters = [init[n].clone() for n in self.frozen]
        self.frozen_sources = [frozen_fp32[n] for n in self.frozen]
        self.frozen_lowp = [dict(module.named_parameters())[n] for n in self.frozen]
        self.owned = []                   # (name, start, numel, engine param)
        for n in names:
            p = enc[n]
            if p.requires_grad:
                hm = getattr(p, "_hp_mapping", "missing")
                if hm == "missing":
                    raise RuntimeError(f"ZeRO parameter {n} has no fp32 master mapping; DeepSpeed layout changed?")
                if hm is not None:
                    a = hm.lp_fragment_address
                    self.owned.append((n, int(a.start), int(a.numel), p))
        mine = [(n, s, k) for n, s, k, _ in self.owned]
        maps = [None] * self.world
        dist.all_gather_object(maps, mine, group=group)
        self._check_coverage(maps, enc)
        self.maps = maps
        self.max_len = max(1, max(sum(k for _, _, k in m) for m in maps))
        my_len = sum(k for _, _, k in mine)
        self.send = torch.zeros(self.max_len, dtype=lowp_dtype, device=device)
        self.shadow = torch.empty(my_len, dtype=torch.float32, device=device)
        self.shadow_views, self.send_views, o = [], [], 0
        for n, s, k in mine:
            self.shadow[o:o + k].copy_(init[n].reshape(-1)[s:s + k])
            self.shadow_views.append(self.shadow[o:o + k])
            self.send_views.append(self.send[o:o + k])
            o += k
        # copies from rank r's send buffer into the flat target, adjacent fragments merged
        self.runs = []
        for m in maps:
            runs, src = [], 0
            for n, s, k in m:
                dst = self.offset[n] + s
                if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                    runs[-1][2] += k
                else:
                    runs.append([src, dst, k])
                src += k
            self.runs.append(runs)
        bucket = max(1 << 20, self.BUCKET // self.world)
        self.recv = torch.empty(self.world * min(bucket, self.max_len), dtype=lowp_dtype, device=device)
        self.bucket = min(bucket, self.max_len)

    def _check_coverage(self, maps, enc):
        cover = {}
        for m in maps:
            for n, s, k in m:
                cover.setdefault(n, []).append((s, k))
        for n, p in enc.items():
            if not p.requires_grad:
                continue
            spans, pos = sorted(cover.get(n, [])), 0
            for s, k in spans:
                if s != pos:
                    raise RuntimeError(f"fp32 master fragments of {n} do not tile it (gap/overlap at {pos})")
                pos += k
            if pos != p.numel():
                raise RuntimeError(f"fp32 master fragments of {n} cover {pos} of {p.numel()} elements")

    @torch.no_grad()
    def update(self, m):
        import torch.distributed as dist
        # fetched every step: DeepSpeed may re-link the fragments (e.g. after loading a checkpoint)
        sources = [p._hp_mapping.hp_fragment for _, _, _, p in self.owned]
        self._ema(self.shadow_views, sources, m, self.send_views)
        self._ema_frozen(self.frozen_masters, self.frozen_sources, m, self.frozen_lowp)
        for c0 in range(0, self.max_len, self.bucket):
            c1 = min(self.max_len, c0 + self.bucket)
            recv = self.recv[: self.world * (c1 - c0)]
            dist.all_gather_into_tensor(recv, self.send[c0:c1].contiguous(), group=self.group)
            width = c1 - c0
            for r, runs in enumerate(self.runs):
                for src, dst, k in runs:
                    lo, hi = max(src, c0), min(src + k, c1)
                    if lo < hi:
                        self.flat[dst + lo - src: dst + hi - src].copy_(recv[r * width + lo - c0: r * width + hi - c0])

    def shard(self):
        frags = [(n, s, k) for n, s, k, _ in self.owned]
        data = [self.shadow.float().cpu()]
        if self.rank == 0:
            frags += [(n, 0, t.numel()) for n, t in zip(self.frozen, self.frozen_masters)]
            data += [t.reshape(-1).float().cpu() for t in self.frozen_masters]
        return {"fragments": frags, "data": torch.cat(data)}

    @torch.no_grad()
    def load_full(self, full):
        for (n, s, k, _), v in zip(self.owned, self.shadow_views):
            v.copy_(full[n].reshape(-1)[s:s + k])
        for n, t in zip(self.frozen, self.frozen_masters):
            t.copy_(full[n].view_as(t))
        for n in self.names:
            o = self.offset[n]
            self.flat[o:o + full[n].numel()].copy_(full[n].reshape(-1))


class Zero3Target(_Target):
    """ZeRO-3: the target is partitioned with ``deepspeed.zero.Init`` over the engine's
    data-parallel group. Partitioning is per parameter (flatten, pad to a multiple of the
    world size, rank r owns slice r), so each target shard is element-aligned with the
    encoder's shard and with its fp32 master shard: the EMA runs on local shards only,
    with no gather. bf16 runs keep an fp32 shadow of the local shard and write the bf16
    shard in the same pass. The forward gathers one block at a time (forward hooks around
    ``GatheredParameters``), so at most one block of the target is materialised."""

    def __init__(self, fp32_copy, engine_encoder, frozen_fp32, lowp_dtype, ds_config, group, ema_backend):
        import deepspeed
        import torch.distributed as dist
        names = [n for n, _ in fp32_copy.named_parameters()]
        init = {n: p.detach().clone() for n, p in fp32_copy.named_parameters()}
        for p in fp32_copy.parameters():
            p.requires_grad_(False)
        dtype = lowp_dtype or torch.float32
        # zero.Init(module=...) partitions the tensors as they are (its dtype only applies to
        # modules constructed inside the context): cast first so the shard is bf16
        fp32_copy.to(dtype)
        deepspeed.zero.Init(module=fp32_copy, data_parallel_group=group, config_dict_or_path=ds_config,
                            dtype=dtype, mem_efficient_linear=False)
        super().__init__(fp32_copy, ema_backend)
        self.shapes = {n: tuple(init[n].shape) for n in names}
        self.names, self.group = names, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        tparams = dict(fp32_copy.named_parameters())
        enc = dict(engine_encoder.named_parameters())
        self.t = [tparams[n] for n in names]
        self.e = [enc[n] for n in names]
        self.frozen_src = {}
        for n, t, e in zip(names, self.t, self.e):
            if not hasattr(e, "ds_tensor") or not hasattr(t, "ds_tensor"):
                raise RuntimeError(f"{n}: expected ZeRO-3 partitioned parameters")
            if t.ds_tensor.numel() != e.ds_tensor.numel() or t.ds_numel != e.ds_numel:
                raise RuntimeError(f"{n}: target shard ({t.ds_tensor.numel()}) is not aligned with the encoder "
                                   f"shard ({e.ds_tensor.numel()})")
            if not e.requires_grad:
                self.frozen_src[n] = self._local(frozen_fp32[n], t.ds_tensor.numel())
        self.ps = [t.ds_tensor.numel() for t in self.t]
        if lowp_dtype is None:
            self.shadow, self.lowp = [t.ds_tensor for t in self.t], None
        else:
            self.shadow = [self._local(init[n], k) for n, k in zip(names, self.ps)]
            self.lowp = [t.ds_tensor for t in self.t]
        self._hooks = _GatherHooks(fp32_copy)

    def _local(self, full: torch.Tensor, ps: int) -> torch.Tensor:
        """This rank's slice of a flattened tensor, zero-padded to the partition size."""
        flat = full.detach().reshape(-1).float()
        out = torch.zeros(ps, dtype=torch.float32, device=flat.device)
        s = self.rank * ps
        k = max(0, min(ps, flat.numel() - s))
        if k:
            out[:k].copy_(flat[s:s + k])
        return out

    def _sources(self):
        from deepspeed.utils import safe_get_local_fp32_param
        return [self.frozen_src.get(n) if n in self.frozen_src else safe_get_local_fp32_param(e)
                for n, e in zip(self.names, self.e)]

    @torch.no_grad()
    def update(self, m):
        self._ema(self.shadow, self._sources(), m, self.lowp)

    def _valid(self, i):
        return max(0, min(self.ps[i], math.prod(self.shapes[self.names[i]]) - self.rank * self.ps[i]))

    def shard(self):
        frags, data = [], []
        for i, n in enumerate(self.names):
            k = self._valid(i)
            if k:
                frags.append((n, self.rank * self.ps[i], k))
                data.append(self.shadow[i][:k].float().cpu())
        return {"fragments": frags, "data": torch.cat(data) if data else torch.zeros(0)}

    @torch.no_grad()
    def load_full(self, full):
        for i, n in enumerate(self.names):
            v = self._local(full[n].to(self.shadow[i].device), self.ps[i])
            self.shadow[i].copy_(v)
            if self.lowp is not None:
                self.lowp[i].copy_(v)


class _GatherHooks:
    """Gather a ZeRO-3 partitioned module unit by unit around each unit's forward: the root's
    own parameters (the position embedding) for the whole forward, and each non-container
    child (patch embedding, every block, final norm) around its own call."""

    def __init__(self, root: nn.Module):
        import deepspeed
        self._gp = deepspeed.zero.GatheredParameters
        self._stack = []
        units = []
        if list(root.parameters(recurse=False)):
            units.append((root, list(root.parameters(recurse=False))))

        def walk(m):
            for child in m.children():
                if isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                    walk(child)
                elif list(child.parameters()):
                    units.append((child, list(child.parameters())))
        walk(root)
        for mod, params in units:
            mod.register_forward_pre_hook(partial(self._enter, params))
            mod.register_forward_hook(partial(self._exit, params))

    def _enter(self, params, module, args):
        ctx = self._gp(params, modifier_rank=None)
        ctx.__enter__()
        self._stack.append(ctx)

    def _exit(self, params, module, args, output):
        self._stack.pop().__exit__(None, None, None)


# ============================================================================ the strategy
class ZeroStrategy(Strategy):
    """DeepSpeed ZeRO at ``stage`` on every rank of the launch (one process is fine too)."""

    def __init__(self, cfg: IJEPAConfig, stage: int):
        import deepspeed
        import torch.distributed as dist
        self.cfg, self.stage, self.name, self.precision = cfg, stage, f"zero{stage}", cfg.precision
        build_ds_config(cfg, stage, detect_launch_env().world_size)   # config errors before any rank connects
        self.dstate = init_distributed(cfg)
        self.rank, self.world, self.device = self.dstate.rank, self.dstate.world_size, self.dstate.device
        self.ds_config = build_ds_config(cfg, stage, self.world)
        bf16 = self.precision == "bf16"
        model = build_model(cfg, self.device)        # seeded: identical weights on every rank
        model.target_stats_across_ranks = True
        fp32_target = model.detach_target()          # the engine must never see it
        init_fp32 = {n: p.detach().clone() for n, p in _named(model)}
        # frozen encoder params (the fixed position table) are not trained: they are their own
        # fp32 EMA source, as in the reference
        frozen_fp32 = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if not p.requires_grad}
        self.param_names = param_group_names(dict(_named(model)))
        optimizer = build_optimizer(model, cfg)
        try:
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        except (ValueError, AssertionError, TypeError) as e:
            raise ConfigError(f"deepspeed: the merged DeepSpeed config was rejected: {first_line(e)}") from None
        self.engine, self.model, self.inner = engine, engine.module, optimizer
        self.group = dist_group(engine)
        self.group_rank = dist.get_rank(self.group)
        self.trainable = [(n, p) for n, p in _named(self.model) if p.requires_grad]
        if stage == 0 and bf16:
            # DeepSpeed's non-ZeRO bf16 wrapper takes one optimizer step with zero gradients at
            # construction, to create Adam's state. That step counts (bias correction one step
            # ahead: the first real update ~0.74x the reference's) and decays the weights once.
            # Measured: 4.7e-3 loss drift after 5 steps. Undo both.
            optimizer.state.clear()
        self._wrap_inner_step()
        if bf16:   # DeepSpeed builds its fp32 masters from the bf16-cast module: start from the fp32 init
            self._load_weights(init_fp32)
        enc = self.model.encoder
        lowp = torch.bfloat16 if bf16 else None
        if stage == 3:
            self.target = Zero3Target(fp32_target, enc, frozen_fp32, lowp, self.ds_config, self.group,
                                      cfg.kernels.ema)
        elif bf16 and stage in (1, 2):
            self.target = FragmentTarget(fp32_target, enc, frozen_fp32, lowp, self.group, cfg.kernels.ema)
        else:
            encp = dict(enc.named_parameters())
            masters = _zero0_bf16_masters(engine.optimizer) if bf16 else {}
            srcs = [frozen_fp32[n] if n in frozen_fp32 else masters.get(id(encp[n]), encp[n])
                    for n, _ in enc.named_parameters()]
            self.target = ReplicatedTarget(fp32_target, lambda s=srcs: s, lowp, self.group_rank, cfg.kernels.ema)
        self.model.__dict__["target_encoder"] = self.target.module
        del init_fp32

    # ---------------------------------------------------------------- the step
    def forward(self, images, masks_enc, masks_pred):
        return self.engine(images, masks_enc, masks_pred, parts=True)

    def backward(self, loss):
        self.engine.backward(loss)   # scales by 1/accumulation steps itself
        self._found_inf = None
        self.engine.step()           # updates only at the accumulation boundary

    def set_lr_wd(self, lr, wd):
        from engine.schedules import apply_lr_wd
        apply_lr_wd(self.engine.optimizer, lr, wd)

    def step(self, clip_grad):
        # clipping is DeepSpeed's (gradient_clipping in its config); the update already ran in
        # the last backward(); a step DeepSpeed itself discarded never reached the inner AdamW
        if self._found_inf is None:
            return torch.ones((), device=self.device)
        return self._found_inf

    def _wrap_inner_step(self):
        """The inner AdamW learns about a non-finite step from the all-reduced gradient norm the
        ZeRO optimizer computed just before (ZeRO-0: from its own, full gradients)."""
        inner, zero_opt, original = self.inner, self.engine.optimizer, self.inner.step
        fused = bool(inner.defaults.get("fused"))

        def step(*args, **kwargs):
            if self._found_inf is None:
                norm = getattr(zero_opt, "_global_grad_norm", None) if zero_opt is not inner else None
                if isinstance(norm, torch.Tensor):
                    found = (~torch.isfinite(norm.float())).float().reshape(())
                else:
                    found = torch.zeros((), device=self.device)
                    grads = [p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None]
                    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=self.device))
                self._found_inf = found.to(self.device)
            if fused:
                inner.found_inf = self._found_inf
                try:
                    return original(*args, **kwargs)
                finally:
                    del inner.found_inf
            if not bool(self._found_inf):   # a non-fused AdamW cannot skip on the device: one host sync
                return original(*args, **kwargs)
        inner.step = step

    def update_target(self, momentum):
        self.target.update(momentum)

    def sum_over_ranks(self, t):
        import torch.distributed as dist
        dist.all_reduce(t, group=self.group)
        return t

    # ---------------------------------------------------------------- fp32 masters and moments
    def _fragments(self):
        """Per trainable parameter name: this rank's pieces ``(start, numel, fp32 view, moment(key))``
        of the flattened fp32 master (``moment(key)`` views Adam's state of that piece)."""
        inner, opt, out = self.inner, self.engine.optimizer, {}
        state = lambda t, key, a=0, k=None: inner.state[t][key].view(-1).narrow(0, a, k or t.numel())  # noqa: E731
        if self.stage == 0:
            masters = _zero0_bf16_masters(opt) if self.precision == "bf16" else {}
            for n, p in self.trainable:
                m = masters.get(id(p), p)
                out[n] = [(0, p.numel(), m.data.view(-1), partial(state, m))]
        elif self.stage in (1, 2):
            group_of = {id(p): i for i, g in enumerate(opt.bit16_groups) for p in g}
            for n, p in self.trainable:
                hm = p._hp_mapping
                if hm is None:
                    out[n] = []
                    continue
                flat = opt.single_partition_of_fp32_groups[group_of[id(p)]]
                a, k = int(hm.hp_fragment_address.start), int(hm.hp_fragment_address.numel)
                out[n] = [(int(hm.lp_fragment_address.start), k, flat.narrow(0, a, k),
                           lambda key, f=flat, a=a, k=k: state(f, key, a, k))]
        else:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
            for n, p in self.trainable:
                ps = p.ds_tensor.numel()
                k = max(0, min(ps, p.ds_numel - self.group_rank * ps))
                out[n] = [(self.group_rank * ps, k, safe_get_local_fp32_param(p).view(-1)[:k],
                           lambda key, p=p, k=k: safe_get_local_optimizer_state(p, key).view(-1)[:k])] if k else []
        return out

    @torch.no_grad()
    def _load_weights(self, full: dict, moments=None, adam_step: int = 0):
        """Write full fp32 weights (and Adam moments + step) into this rank's pieces, then refresh
        the module's (bf16) weights from the fp32 masters."""
        if moments is not None:
            self._materialise_adam_state()
        for n, pieces in self._fragments().items():
            for start, k, view, moment in pieces:
                view.copy_(full[n].reshape(-1)[start:start + k])
                if moments is not None:
                    for key in ("exp_avg", "exp_avg_sq"):
                        moment(key).copy_(moments[key][n].reshape(-1)[start:start + k])
        if moments is not None:
            for st in self.inner.state.values():
                st["step"].fill_(float(adam_step))
        self._refresh_module_weights()

    def _materialise_adam_state(self):
        """Adam creates its state at the first step; a resume before any step needs it now: zero
        moments and step count for every fp32 tensor the inner AdamW updates, as AdamW makes them."""
        opt, inner = self.engine.optimizer, self.inner
        if self.stage in (1, 2):
            tensors = list(opt.single_partition_of_fp32_groups)
        elif self.stage == 3:
            tensors = list(opt.fp32_partitioned_groups_flat)
        else:
            masters = _zero0_bf16_masters(opt) if self.precision == "bf16" else {}
            tensors = [masters.get(id(p), p) for _, p in self.trainable]
        fused = bool(inner.defaults.get("fused"))
        for t in tensors:
            if "exp_avg" not in inner.state.get(t, {}):
                inner.state[t] = {"step": torch.zeros((), device=t.device if fused else "cpu"),
                                  "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                                  "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format)}

    def _refresh_module_weights(self):
        opt = self.engine.optimizer
        if self.stage in (1, 2):
            opt.update_lp_params()
        elif self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param
            for _, p in self.trainable:
                p.ds_tensor.data.copy_(safe_get_local_fp32_param(p).view_as(p.ds_tensor))
        elif self.precision == "bf16":
            masters = _zero0_bf16_masters(opt)
            for _, p in self.trainable:
                p.data.copy_(masters[id(p)].view_as(p))

    # ---------------------------------------------------------------- checkpoints
    def save(self, folder, tag, progress, kind):
        """Collective: every rank writes its fragments; rank 0 then points ``latest`` at the tag."""
        import torch.distributed as dist
        root = paths(folder, tag)["sharded"]
        every = self.cfg.checkpoint.save_every_epochs
        milestone = kind == "epoch" and every and progress["epoch"] % every == 0
        ckpt_tag = f"ep{progress['epoch']}" if milestone else f"step{progress['step']:08d}"
        tagdir = os.path.join(root, ckpt_tag)
        pieces = self._fragments()
        mine = {n: ps for n, ps in pieces.items() if ps and (self.stage > 0 or self.group_rank == 0)}
        tensors = {"weights": _pack([(n, s, k, v) for n, ps in mine.items() for s, k, v, _ in ps])}
        adam = bool(self.inner.state) and any("exp_avg" in st for st in self.inner.state.values())
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[key] = _pack([(n, s, k, m(key)) for n, ps in mine.items() for s, k, _, m in ps] if adam else [])
        frozen = {n: p for n, p in _named(self.model) if not p.requires_grad}
        if self.group_rank == 0:   # fixed tables: whole, once
            extra = fragments_of(frozen)
            w = tensors["weights"]
            tensors["weights"] = {"fragments": w["fragments"] + extra["fragments"],
                                  "data": torch.cat([w["data"], extra["data"]])}
        tensors["target"] = self.target.shard()
        steps = [st["step"] for st in self.inner.state.values() if "step" in st]
        state = {"format": SHARD_FORMAT, "rank": self.group_rank, "world_size": self.world, "strategy": self.name,
                 "precision": self.precision, "config": self.cfg.to_dict(),
                 "adam_step": int(float(steps[0])) if steps and adam else 0, "param_names": self.param_names,
                 "param_hparams": [{k: v for k, v in g.items() if k != "params"} for g in self.inner.param_groups],
                 "progress": progress, "tensors": tensors,
                 "shapes": {"weights": {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in _named(self.model)},
                            "target": dict(self.target.shapes)}}
        save_atomic(state, rank_file(tagdir, self.group_rank))
        dist.barrier(group=self.group)
        if self.group_rank == 0:
            write_latest(root, ckpt_tag)
            prune_tags(root, self.cfg.checkpoint.keep_last)
        return tagdir

    def load(self, snap):
        trainable = [n for n, _ in self.trainable]
        full = {n: snap.tensor("weights", n) for n in trainable}
        moments = None
        if snap.meta["adam_step"]:
            moments = {key: {n: snap.tensor(key, n) for n in trainable} for key in ("exp_avg", "exp_avg_sq")}
        self._load_weights(full, moments, snap.meta["adam_step"])
        hp = snap.meta.get("param_hparams")
        for g, saved in zip(self.inner.param_groups, hp or []):
            g.update({k: v for k, v in saved.items() if k in ("betas", "eps", "weight_decay", "WD_exclude")})
        self.target.load_full({n: snap.tensor("target", n) for n in self.target.shapes})

    def close(self):
        import torch.distributed as dist
        if self.dstate.owns_pg and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()   # without it, interpreter exit sometimes aborts (gloo)


def _named(model):
    return [(f"{part}.{n}", p) for part in ("encoder", "predictor") for n, p in getattr(model, part).named_parameters()]


def _pack(items) -> dict:
    """``[(name, start, numel, tensor)]`` -> one rank-file entry of fragments."""
    return {"fragments": [(n, s, k) for n, s, k, _ in items],
            "data": torch.cat([t.detach().reshape(-1).float().cpu() for *_, t in items]) if items else torch.zeros(0)}


def dist_group(engine):
    """The data-parallel group ZeRO partitions over (the world group without model parallelism)."""
    import torch.distributed as dist
    g = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    return g if g is not None else dist.group.WORLD


def _zero0_bf16_masters(optimizer) -> dict:
    """id(bf16 module param) -> its fp32 copy in DeepSpeed's ZeRO-0 bf16 optimizer wrapper."""
    out = {}
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        for lp_group, hp_group in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                out[id(lp)] = hp
    elif hasattr(optimizer, "fp32_groups_flat") and hasattr(optimizer, "fp16_groups"):
        for lp_group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            o = 0
            for lp in lp_group:
                out[id(lp)] = flat.narrow(0, o, lp.numel()).view_as(lp)
                o += lp.numel()
    else:
        raise ConfigError(f"ZeRO-0 with bf16: DeepSpeed chose {type(optimizer).__name__}, whose fp32 master "
                          f"weights the engine cannot find; use --zero 1 or higher")
    return out


# ============================================================================ memory per rank
def count_params(cfg: IJEPAConfig) -> dict:
    """Parameter counts of the model ``cfg`` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = IJEPA(cfg)
    enc = sum(p.numel() for p in m.encoder.parameters())
    enc_train = sum(p.numel() for p in m.encoder.parameters() if p.requires_grad)
    pred_train = sum(p.numel() for p in m.predictor.parameters() if p.requires_grad)
    pred = sum(p.numel() for p in m.predictor.parameters())
    return {"encoder": enc, "predictor": pred, "trainable": enc_train + pred_train, "target": enc}


def zero_memory_table(cfg: IJEPAConfig, world: int, precision: str | None = None) -> list:
    """Model-state memory per rank (GiB) for ZeRO stages 0-3 at ``world`` ranks: COMPUTED from
    parameter counts, not measured. Activations, temporary buffers, the CUDA context and
    allocator fragmentation are not included.

    Psi = trainable parameters (encoder + predictor), T = target encoder parameters.
    bf16: fp32 master 4Psi, Adam moments 8Psi, bf16 params 2Psi, bf16 grads 2Psi; ZeRO-1
    partitions master + moments, ZeRO-2 also grads, ZeRO-3 also params. Target as this module
    stores it: ZeRO-0 fp32 master 4T + bf16 copy 2T; ZeRO-1/2 bf16 copy 2T + fp32 shard 4T/N
    (+ a bounded all-gather bucket); ZeRO-3 bf16 shard 2T/N + fp32 shadow 4T/N.
    fp32: params 4Psi (they are the master), grads 4Psi, Adam 8Psi; target fp32 4T, ZeRO-3 4T/N.
    """
    n = count_params(cfg)
    P, T, N = n["trainable"], n["target"], world
    bf16 = (precision or cfg.precision) == "bf16"
    gib = 1024 ** 3
    rows = []
    for stage in (0, 1, 2, 3):
        if bf16:
            master = 4 * P / (N if stage >= 1 else 1)
            adam = 8 * P / (N if stage >= 1 else 1)
            params = 2 * P / (N if stage == 3 else 1)
            grads = 2 * P / (N if stage >= 2 else 1)
            target = {0: 6 * T, 1: 2 * T + 4 * T / N, 2: 2 * T + 4 * T / N, 3: 6 * T / N}[stage]
        else:
            master = 0.0                 # the fp32 params are the master weights
            adam = 8 * P / (N if stage >= 1 else 1)
            params = 4 * P / (N if stage == 3 else 1)
            grads = 4 * P / (N if stage >= 2 else 1)
            target = 4 * T / (N if stage == 3 else 1)
        total = master + adam + params + grads + target
        rows.append({"stage": stage, "world": N, "fp32_master": master / gib, "adam": adam / gib,
                     "params": params / gib, "grads": grads / gib, "target": target / gib, "total": total / gib})
    return rows


def format_memory_table(rows: list, precision: str = "bf16") -> str:
    lp = "bf16" if precision == "bf16" else "fp32"
    head = (f"| ZeRO | ranks | fp32 master | Adam m+v | {lp} params | {lp} grads | target (EMA) | total / rank |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['world']} | {r['fp32_master']:.2f} | {r['adam']:.2f} | {r['params']:.2f} | "
                     f"{r['grads']:.2f} | {r['target']:.2f} | **{r['total']:.2f}** |")
    return "\n".join(lines)
