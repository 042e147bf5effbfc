"""DeepSpeed ZeRO training (stages 0-3, one machine to many) with an exact EMA target encoder.

What runs where
---------------
* The DeepSpeed engine owns a module holding the context encoder and the predictor
  (``Student``); the optimizer is the reference's four AdamW groups (client torch AdamW
  on CPU, DeepSpeed FusedAdam on GPU), lr/wd schedules are written into those groups
  before every optimizer step, exactly as ``engine.train.train_step`` does.
* The EMA target encoder lives OUTSIDE the engine: never trainable, forward-only, with
  an fp32 master that the EMA updates from the engine's fp32 master weights (not from
  the bf16 module weights: with m >= 0.996 a bf16 target updated in place stops moving,
  and a bf16-rounded source biases it). How it is stored depends on the stage:

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

* The logged loss is the all-reduced global mean (the reference's ``AllReduce``);
  gradients are averaged by DeepSpeed.
* Masks: each rank samples its own. In ``reference`` mask mode every rank seeds its
  global RNG with ``train.seed`` and counts batches from 0, as the reference does (all
  its ranks use seed 0), so corresponding batches get the same masks on every rank; in
  ``paper`` mode the sampler is offset by the rank and masks differ across ranks.

Checkpoints are DeepSpeed's sharded format (``{folder}/{write_tag}-ds/<tag>/``) plus one
``ijepa_rank{r}.pt`` per rank with the engine's own state (fp32 target shard, step and
data position, mask-sampler counter, RNG states); ``ijepa export`` consolidates one into
the reference ``.pth.tar`` layout or the engine's single-file format.
"""
from __future__ import annotations

import copy
import csv
import datetime
import logging
import math
import os
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ConfigError, IJEPAConfig

log = logging.getLogger("ijepa")

DEFAULT_TIMEOUT_S = 1800          # DeepSpeed's own default process-group timeout
RANK_FILE = "ijepa_rank{rank:05d}.pt"
RANK_FORMAT = 1


class PeerFailure(RuntimeError):
    """A collective failed or timed out: another rank died or hung."""


# ============================================================================ launch environment
@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str            # torchrun | deepspeed | slurm | single


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM host list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launch_env(environ=None) -> LaunchEnv:
    """Rank/world/master from torchrun or the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), else from SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
    master = first host of the job's node list), else a single process."""
    env = os.environ if environ is None else environ

    def as_int(key):
        try:
            return int(env[key])
        except ValueError:
            raise ConfigError(f"environment: {key}={env[key]!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        rank, world = as_int("RANK"), as_int("WORLD_SIZE")
        local = as_int("LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = as_int("MASTER_PORT") if "MASTER_PORT" in env else 29500
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = as_int("SLURM_PROCID"), as_int("SLURM_NTASKS")
        local = as_int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodes) if nodes else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = as_int("MASTER_PORT")
        else:   # one port per job, so two jobs sharing a node do not collide
            port = 20000 + (int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    else:
        launcher, rank, world, local = "single", 0, 1, 0
        addr, port = "127.0.0.1", int(env.get("MASTER_PORT") or _free_port())
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"environment: rank {rank} / world size {world} is not a valid rank assignment")
    return LaunchEnv(rank, world, local, addr, port, launcher)


@dataclass
class DistState:
    env: LaunchEnv
    device: torch.device
    backend: str
    owns_pg: bool            # this call created the process group (and destroys it at the end)

    @property
    def rank(self):
        return self.env.rank

    @property
    def world_size(self):
        return self.env.world_size


def _import_deepspeed(device_type: str):
    if device_type == "cpu":
        # pick the CPU accelerator explicitly (auto-detection prints a warning per rank)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"DeepSpeed is not installed ({e}); pip install deepspeed==0.19.8") from None
    # The CPU accelerator JIT-compiles an inference-only shared-memory all-reduce op at
    # init_distributed (~2 minutes with g++); training collectives go through gloo. The table
    # is private but is the only switch that exists.
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:
        pass
    return deepspeed


def dist_timeout_s() -> float:
    raw = os.environ.get("IJEPA_DIST_TIMEOUT_S")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"IJEPA_DIST_TIMEOUT_S={raw!r} must be a number of seconds") from None
    if v <= 0:
        raise ConfigError(f"IJEPA_DIST_TIMEOUT_S={raw!r} must be > 0")
    return v


def init_distributed(cfg: IJEPAConfig) -> DistState:
    """Set up the process group for torchrun / deepspeed / SLURM / a single process.

    CPU -> gloo, GPU -> nccl (one GPU per rank, ``cuda:LOCAL_RANK``). Every collective
    times out after ``IJEPA_DIST_TIMEOUT_S`` seconds (default 1800), so a rank that dies
    or hangs ends the others with an error instead of blocking them forever.
    """
    import torch.distributed as dist
    env = detect_launch_env()
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is visible; use train.device=cpu or auto")
    use_cuda = want in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                              f"start one process per GPU")
        torch.cuda.set_device(env.local_rank)
        device, backend = torch.device("cuda", env.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed = _import_deepspeed(device.type)
    timeout = dist_timeout_s()
    owns = not (dist.is_available() and dist.is_initialized())
    if owns:
        # DeepSpeed reads these; the SLURM and single-process paths have to provide them
        os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                           "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.master_addr,
                           "MASTER_PORT": str(env.master_port)})
        td = datetime.timedelta(seconds=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=td)
        # ZeRO's collectives run on DeepSpeed's clone of the world group, which it creates with
        # new_group() and torch's 30-minute default, not the timeout above: create the clone
        # first, with the timeout (measured: without this a hung peer blocks the others for 30 min)
        from deepspeed.utils import groups as ds_groups
        if getattr(ds_groups, "_WORLD_GROUP", "absent") is None:
            ds_groups._WORLD_GROUP = dist.new_group(ranks=list(range(env.world_size)), timeout=td)
    else:
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
        env = LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.master_addr,
                        env.master_port, env.launcher)
        backend = dist.get_backend()
    return DistState(env, device, backend, owns)


def _is_comm_error(e: BaseException) -> bool:
    import torch.distributed as dist
    if isinstance(e, (PeerFailure, getattr(dist, "DistError", ()), getattr(dist, "DistBackendError", ()))):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and any(k in msg for k in (
        "Connection reset", "Connection closed", "Connection refused", "Broken pipe", "Timed out",
        "timed out", "Timeout", "NCCL", "gloo", "ProcessGroup", "Socket"))


# ============================================================================ DeepSpeed config
ENGINE_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
               "gradient_clipping")


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
    user.pop("fp16", None)
    zo = dict(user.get("zero_optimization") or {})
    zo["stage"] = zero_stage
    for off in ("offload_optimizer", "offload_param"):
        dev = (zo.get(off) or {}).get("device", "none") if isinstance(zo.get(off), dict) else "none"
        if dev not in (None, "none"):
            raise ConfigError(f"deepspeed.zero_optimization.{off}: offloading is not supported with the EMA "
                              f"target encoder (its update reads the fp32 master on the training device); "
                              f"remove it")
    if int(zo.get("zero_hpz_partition_size", 1) or 1) > 1 or zo.get("zero_quantized_weights"):
        raise ConfigError("deepspeed.zero_optimization: hpZ / quantized weights are not supported with the EMA "
                          "target encoder; remove zero_hpz_partition_size / zero_quantized_weights")
    user["zero_optimization"] = zo
    user.setdefault("steps_per_print", 2 ** 31 - 1)   # the engine logs; keep DeepSpeed quiet
    user.setdefault("wall_clock_breakdown", False)
    return user


# ============================================================================ modules
class Student(nn.Module):
    """What the DeepSpeed engine trains: context encoder + predictor. ``forward`` takes the
    targets computed outside (by the EMA target encoder) and returns the smooth-L1 loss,
    the same computation as ``IJEPA.forward_parts`` minus the target branch."""

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, images, masks_enc, masks_pred, h):
        z = self.encoder(images, masks_enc)
        z = self.predictor(z, masks_enc, masks_pred)
        return F.smooth_l1_loss(z, h)


def _targets_from(target: nn.Module, images, masks_enc, masks_pred, gather_backend, target_norm="layer"):
    """``IJEPA.targets`` with an explicit target module: full-image forward, LayerNorm without
    affine, target blocks, repeated per context block. ``target_norm`` center/batch use the
    statistics of the global batch (all ranks)."""
    import kernels.gather as kgather
    from engine.model import normalise_over_batch, repeat_interleave_batch
    h = normalise_over_batch(target(images), target_norm, across_ranks=True)
    h = kgather.gather_layernorm(h, list(masks_pred), eps=1e-5, backend=gather_backend)
    return repeat_interleave_batch(h, len(images), repeat=len(masks_enc))


def _named(module: nn.Module, prefix: str = ""):
    return [(prefix + n, p) for n, p in module.named_parameters()]


# ============================================================================ EMA target encoders
class _Target:
    """Forward-only EMA target encoder kept outside the DeepSpeed engine.

    Subclasses differ in where the fp32 master lives and what the EMA reads. All keep, per
    rank, a *shard* description used by checkpoints: fragments ``(name, start, numel)`` of
    the flattened fp32 target parameters plus their values; the union over ranks is the
    whole target, each element exactly once.
    """

    def __init__(self, module: nn.Module, ema_backend: str, gather_backend: str):
        self.module = module
        self.ema_backend = ema_backend
        self.gather_backend = gather_backend
        self.target_norm = "layer"   # loss.target_norm, set by the engine
        self.shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}

    @torch.no_grad()
    def targets(self, images, masks_enc, masks_pred):
        return _targets_from(self.module, images, masks_enc, masks_pred, self.gather_backend,
                             self.target_norm)

    def _ema(self, targets, sources, m, lowp=None):
        import kernels.ema as kema
        if targets:
            kema.fused_ema_(targets, sources, m, targets_lowp=lowp, backend=self.ema_backend)

    def shard(self) -> dict:
        raise NotImplementedError

    def load_full(self, full: dict) -> None:
        raise NotImplementedError


class ReplicatedTarget(_Target):
    """Every rank holds the whole target. fp32 runs: the module is the fp32 master. bf16 runs:
    an fp32 master list plus a bf16 module for the forward, both written by one EMA pass."""

    def __init__(self, fp32_copy: nn.Module, sources, lowp_dtype, rank, ema_backend, gather_backend):
        names = [n for n, _ in fp32_copy.named_parameters()]
        if lowp_dtype is None:
            module, self.masters, self.lowp = fp32_copy, [p for _, p in fp32_copy.named_parameters()], None
        else:
            self.masters = [p.detach().clone() for _, p in fp32_copy.named_parameters()]
            module = fp32_copy.to(lowp_dtype)
            self.lowp = [p for _, p in module.named_parameters()]
        for p in module.parameters():
            p.requires_grad_(False)
        super().__init__(module, ema_backend, gather_backend)
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

    def __init__(self, fp32_copy, engine_encoder, frozen_fp32, lowp_dtype, group, ema_backend, gather_backend):
        import torch.distributed as dist
        names = [n for n, _ in fp32_copy.named_parameters()]
        init = {n: p.detach().clone() for n, p in fp32_copy.named_parameters()}
        module = fp32_copy.to(lowp_dtype)
        for p in module.parameters():
            p.requires_grad_(False)
        super().__init__(module, ema_backend, gather_backend)
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
        self._ema(self.frozen_masters, self.frozen_sources, m, self.frozen_lowp)
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

    def __init__(self, fp32_copy, engine_encoder, frozen_fp32, lowp_dtype, ds_config, group, ema_backend,
                 gather_backend):
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
        super().__init__(fp32_copy, ema_backend, gather_backend)
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
        out = []
        for n, e in zip(self.names, self.e):
            out.append(self.frozen_src[n] if n in self.frozen_src else safe_get_local_fp32_param(e))
        return out

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


def assemble_target(shards: list, shapes: dict) -> dict:
    """Full fp32 target ``{name: tensor}`` from every rank's shard; each element exactly once."""
    full = {n: torch.zeros(math.prod(s), dtype=torch.float32) for n, s in shapes.items()}
    seen = {n: 0 for n in shapes}
    for sh in shards:
        off = 0
        data = sh["data"]
        for n, s, k in sh["fragments"]:
            if n not in full:
                raise ConfigError(f"target shard names unknown parameter {n}")
            full[n][s:s + k] = data[off:off + k].float()
            seen[n] += k
            off += k
    missing = [n for n in shapes if seen[n] != full[n].numel()]
    if missing:
        raise ConfigError(f"target encoder shards are incomplete or overlap for {len(missing)} parameter(s), "
                          f"e.g. {missing[0]} ({seen[missing[0]]} of {full[missing[0]].numel()} elements); "
                          f"is a rank file missing?")
    return {n: t.view(shapes[n]) for n, t in full.items()}


# ============================================================================ trainer
def _build_optimizer(model, device):
    """The reference's four AdamW groups. GPU: DeepSpeed FusedAdam (AdamW mode); if its CUDA op
    cannot be built, torch's fused AdamW (same update rule). CPU: torch AdamW, which needs no
    compilation."""
    groups = model.param_groups()
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adam_w_mode=True)
        except Exception as e:   # missing nvcc/ninja: fall back, loudly
            log.warning("DeepSpeed FusedAdam unavailable (%s); using torch AdamW(fused=True)", str(e).splitlines()[0])
            return torch.optim.AdamW(groups, fused=True)
    return torch.optim.AdamW(groups)


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


class ZeroTrainer:
    """The I-JEPA step through a DeepSpeed engine plus the EMA target encoder outside it."""

    def __init__(self, cfg: IJEPAConfig, zero_stage: int, dstate: DistState):
        import deepspeed
        from engine.model import build_model
        self.cfg, self.stage, self.dstate = cfg, zero_stage, dstate
        self.device, self.precision = dstate.device, cfg.precision
        bf16 = self.precision == "bf16"
        self.ds_config = build_ds_config(cfg, zero_stage, dstate.world_size)
        model = build_model(cfg, dstate.device)        # seeded: identical weights on every rank
        self.ema_backend, self.gather_backend = model.ema_backend, model.encoder.gather_backend
        fp32_target = model.target_encoder
        model.target_encoder = None                    # the engine must never see it
        init_fp32 = {n: p.detach().clone() for n, p in _named(model.encoder, "encoder.") + _named(model.predictor, "predictor.")}
        # frozen encoder params (the fixed position table) are not in the optimizer: they are their
        # own fp32 EMA source, as in the reference
        frozen_fp32 = {n: p.detach().clone() for n, p in model.encoder.named_parameters() if not p.requires_grad}
        self.param_names = self._group_names(model)
        optimizer = _build_optimizer(model, dstate.device)
        student = Student(model.encoder, model.predictor)
        try:
            engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=self.ds_config)
        except (ValueError, AssertionError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"deepspeed: the merged DeepSpeed config was rejected: {first[:300]}") from None
        self.engine = engine
        group = dist_group(engine)
        if bf16:
            self._restore_fp32_masters(init_fp32)
        enc = engine.module.encoder
        lowp = torch.bfloat16 if bf16 else None
        if zero_stage == 3:
            self.target = Zero3Target(fp32_target, enc, frozen_fp32, lowp, self.ds_config, group,
                                      self.ema_backend, self.gather_backend)
        elif bf16 and zero_stage in (1, 2):
            self.target = FragmentTarget(fp32_target, enc, frozen_fp32, lowp, group, self.ema_backend,
                                         self.gather_backend)
        else:
            names = [n for n, _ in enc.named_parameters()]
            encp = dict(enc.named_parameters())
            if bf16:   # ZeRO-0 bf16: the optimizer wrapper keeps full fp32 copies on every rank
                masters = _zero0_bf16_masters(engine.optimizer)
                srcs = [frozen_fp32[n] if n in frozen_fp32 else masters[id(encp[n])] for n in names]
            else:      # fp32: the (replicated) module params are the master weights
                srcs = [frozen_fp32[n] if n in frozen_fp32 else encp[n] for n in names]
            self.target = ReplicatedTarget(fp32_target, lambda s=srcs: s, lowp, dstate.rank,
                                           self.ema_backend, self.gather_backend)
        self.target.target_norm = cfg.loss.target_norm
        del init_fp32

    @staticmethod
    def _group_names(model):
        """Parameter names of the reference's 4 AdamW groups, in optimizer order."""
        id2name = {id(p): n for n, p in _named(model.encoder, "encoder.") + _named(model.predictor, "predictor.")}
        return [[id2name[id(p)] for p in g["params"]] for g in model.param_groups()]

    @torch.no_grad()
    def _restore_fp32_masters(self, init_fp32):
        """DeepSpeed bf16 builds its fp32 masters from the bf16-cast module; put the original
        fp32 initial weights back so training starts from the reference's fp32 init."""
        import torch.distributed as dist
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
        params = dict(self.engine.module.named_parameters())
        if self.stage == 0:
            # DeepSpeed's non-ZeRO bf16/fp16 wrappers take one optimizer step with zero gradients
            # at construction, to create Adam's state. That step counts (Adam's bias correction
            # is then one step ahead: the first real update is ~0.74x the reference's) and
            # applies one weight decay. Measured: 4.7e-3 loss drift after 5 steps. Undo both.
            inner = self.engine.optimizer.optimizer
            inner.state.clear()
            for g in inner.param_groups:
                if "step" in g:          # FusedAdam counts per group
                    g["step"] = 0
            masters = _zero0_bf16_masters(self.engine.optimizer)
            for n, p in params.items():
                if id(p) in masters:
                    masters[id(p)].copy_(init_fp32[n].view_as(masters[id(p)]))
            return
        rank = dist.get_rank(dist_group(self.engine))
        for n, p in params.items():
            if not p.requires_grad:
                continue
            if self.stage == 3:
                # the local setter, with this rank's slice padded to the partition size (the full
                # setter narrows past the end when numel is not a multiple of the world size)
                ps = p.ds_tensor.numel()
                flat = init_fp32[n].reshape(-1)
                local = torch.zeros(ps, dtype=torch.float32, device=self.device)
                k = max(0, min(ps, flat.numel() - rank * ps))
                local[:k] = flat[rank * ps: rank * ps + k]
                safe_set_local_fp32_param(p, local)
            else:
                safe_set_full_fp32_param(p, init_fp32[n].to(self.device))

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, micro_batches, *, lr, wd, momentum, flags=()):
        """One optimizer step over ``[(images, masks_enc, masks_pred), ...]`` (this rank's micro
        batches). Returns ``(global mean loss, summed flags)``: one all-reduce carries the loss
        and any stop flags, so every rank takes the same decision."""
        import torch.distributed as dist
        from engine.schedules import apply_lr_wd
        from engine.train import autocast
        apply_lr_wd(self.engine.optimizer, lr, wd)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for images, masks_enc, masks_pred in micro_batches:
            with autocast(self.device, self.precision):
                h = self.target.targets(images, masks_enc, masks_pred)
                loss = self.engine(images, masks_enc, masks_pred, h)
            self.engine.backward(loss)
            self.engine.step()          # optimizer step only at the accumulation boundary
            total += loss.detach().float()
        self.target.update(momentum)
        red = torch.tensor([float(total) / len(micro_batches), *[float(f) for f in flags]],
                           dtype=torch.float64, device=self.device)
        dist.all_reduce(red, group=dist_group(self.engine))
        world = self.dstate.world_size
        return float(red[0]) / world, [float(x) for x in red[1:]]

    # ---------------------------------------------------------------- full states (collective)
    def full_target(self) -> dict:
        import torch.distributed as dist
        shards = [None] * self.dstate.world_size
        dist.all_gather_object(shards, self.target.shard(), group=dist_group(self.engine))
        return assemble_target(shards, self.target.shapes)

    def full_student_fp32(self) -> dict:
        """``{"encoder.x": fp32, "predictor.y": fp32}`` of the trainable weights (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        masters = _zero0_bf16_masters(self.engine.optimizer) if self.stage == 0 and self.precision == "bf16" else None
        for n, p in self.engine.module.named_parameters():
            if not p.requires_grad:
                continue
            if self.stage == 0:
                v = masters[id(p)] if masters is not None else p
            else:
                v = safe_get_full_fp32_param(p)
            out[n] = v.detach().float().cpu().view(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
        return out

    # ---------------------------------------------------------------- checkpoints
    def save(self, ckdir: str, tag: str, rank_state: dict) -> None:
        """Collective: DeepSpeed's sharded checkpoint + this rank's ``ijepa_rank{r}.pt``."""
        import torch.distributed as dist
        from engine.checkpoint import save_atomic
        client = {"ijepa": {k: rank_state[k] for k in ("step", "epoch", "batch_in_epoch") if k in rank_state}}
        self.engine.save_checkpoint(ckdir, tag=tag, client_state=client, save_latest=False)
        state = dict(rank_state)
        state.update({"format": RANK_FORMAT, "rank": self.dstate.rank, "world_size": self.dstate.world_size,
                      "zero_stage": self.stage, "precision": self.precision, "config": self.cfg.to_dict(),
                      "param_groups": self.param_names,
                      "frozen": [n for n, p in self.engine.module.named_parameters() if not p.requires_grad],
                      "target": {**self.target.shard(), "shapes": {n: list(s) for n, s in self.target.shapes.items()}}})
        save_atomic(state, os.path.join(ckdir, tag, RANK_FILE.format(rank=self.dstate.rank)))
        dist.barrier(group=dist_group(self.engine))
        if self.dstate.rank == 0:
            write_latest(ckdir, tag)

    def load(self, ckdir: str, tag: str) -> dict:
        """Collective: restore engine + target; returns this rank's saved state."""
        rank_path = os.path.join(ckdir, tag, RANK_FILE.format(rank=self.dstate.rank))
        st = _load_rank_file(rank_path)
        problems = [f"{k} {st.get(k)!r} (now {v!r})" for k, v in
                    (("world_size", self.dstate.world_size), ("zero_stage", self.stage), ("precision", self.precision))
                    if st.get(k) != v]
        if problems:
            raise ConfigError(f"--resume: {os.path.join(ckdir, tag)} was written with " + ", ".join(problems) +
                              "; resume with the same ranks/stage/precision, or 'ijepa export' it and start anew")
        path, _ = self.engine.load_checkpoint(ckdir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"--resume: DeepSpeed could not load {os.path.join(ckdir, tag)}")
        shards = [_load_rank_file(os.path.join(ckdir, tag, RANK_FILE.format(rank=r)))["target"]
                  for r in range(st["world_size"])]
        self.target.load_full(assemble_target(shards, {n: tuple(s) for n, s in shards[0]["shapes"].items()}))
        return st


def dist_group(engine):
    """The data-parallel group ZeRO partitions over (the world group without model parallelism)."""
    import torch.distributed as dist
    g = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    return g if g is not None else dist.group.WORLD


def _load_rank_file(path: str) -> dict:
    from engine.checkpoint import CheckpointError, load_file
    try:
        st = load_file(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if st.get("format") != RANK_FORMAT or "target" not in st:
        raise ConfigError(f"{path}: not an ijepa DeepSpeed rank state file")
    return st


def ds_checkpoint_dir(cfg: IJEPAConfig) -> str:
    return os.path.join(cfg.logging.folder, f"{cfg.logging.write_tag}-ds")


def read_latest(ckdir: str):
    p = os.path.join(ckdir, "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return f.read().strip() or None


def write_latest(ckdir: str, tag: str) -> None:
    """Atomic replacement of DeepSpeed's ``latest`` file, written only once every rank's
    files of ``tag`` are complete (a run killed mid-save keeps pointing at the previous one)."""
    tmp = os.path.join(ckdir, f".latest.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckdir, "latest"))


def prune_tags(ckdir: str, keep_last: int) -> None:
    import shutil
    latest = read_latest(ckdir)
    tags = sorted(t for t in os.listdir(ckdir) if re.fullmatch(r"step\d{8}", t) and t != latest)
    for t in tags[: max(0, len(tags) - keep_last)]:
        shutil.rmtree(os.path.join(ckdir, t), ignore_errors=True)


# ============================================================================ the training loop
def _test_fault(rank: int, step: int) -> None:
    """Failure injection for the tests only: IJEPA_TEST_FAULT=rank:step:exit|hang."""
    spec = os.environ.get("IJEPA_TEST_FAULT")
    if not spec:
        return
    r, s, mode = spec.split(":")
    if int(r) == rank and int(s) == step:
        print(f"ijepa: test fault: rank {rank} {mode}s at step {step}", file=sys.stderr, flush=True)
        if mode == "hang":
            while True:
                time.sleep(3600)
        os._exit(1)


def train_deepspeed(cfg: IJEPAConfig, zero_stage=None, resume: bool = False, *, hard_exit=None) -> dict:
    """Pretrain with DeepSpeed ZeRO at ``zero_stage`` (default: the config's, else 0).

    With more than one rank, an error after the process group exists ends this process with
    ``os._exit`` once the message is printed (exit code 2 for config errors, 1 otherwise):
    interpreter shutdown with a broken process group can hang or abort, and the other ranks
    then fail fast on their next collective (or after ``IJEPA_DIST_TIMEOUT_S``).
    """
    cfg.validate()
    stage = resolve_zero_stage(cfg, zero_stage)
    build_ds_config(cfg, stage, detect_launch_env().world_size)   # config errors before any rank connects
    dstate = init_distributed(cfg)
    if hard_exit is None:
        hard_exit = dstate.world_size > 1
    try:
        out = _train_loop(cfg, stage, resume, dstate)
    except BaseException as e:
        if not hard_exit:
            raise
        r = dstate.rank
        if isinstance(e, ConfigError):
            print(f"ijepa: error: rank {r}: {e}", file=sys.stderr, flush=True)
            code = 2
        elif _is_comm_error(e):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            print(f"ijepa: error: rank {r}/{dstate.world_size}: a collective failed, so another rank died or hung "
                  f"(see the first failing rank's log); stopping. [{type(e).__name__}: {first}]",
                  file=sys.stderr, flush=True)
            code = 1
        elif type(e).__name__ == "NonFiniteError":
            print(f"ijepa: stopped: rank {r}: {e}", file=sys.stderr, flush=True)
            code = 1
        elif isinstance(e, KeyboardInterrupt):
            print(f"ijepa: rank {r}: interrupted", file=sys.stderr, flush=True)
            code = 130
        else:
            traceback.print_exc()
            print(f"ijepa: error: rank {r}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if dstate.owns_pg:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()   # without it, interpreter exit sometimes aborts (gloo)
    return out


def _train_loop(cfg, stage, resume, dstate):
    import signal
    import torch.distributed as dist
    from engine.data import build_loader
    from engine.masks import MultiBlockMaskSampler
    from engine.schedules import Schedules
    from engine.train import CSV_COLUMNS, NonFiniteError, _Progress, _StopFlag, _tensorboard
    rank, world, device = dstate.rank, dstate.world_size, dstate.device
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    folder, wtag = cfg.logging.folder, cfg.logging.write_tag
    os.makedirs(folder, exist_ok=True)
    ckdir = ds_checkpoint_dir(cfg)
    loader = build_loader(cfg, rank, world, device)
    accum = cfg.optimization.grad_accum_steps
    ipe = len(loader) // accum
    if ipe == 0:
        raise ConfigError(f"optimization.grad_accum_steps: {accum} exceeds the {len(loader)} batches per epoch "
                          f"per rank ({world} ranks)")
    sched = Schedules.from_config(cfg, ipe)
    sampler = MultiBlockMaskSampler.from_config(cfg, **({"seed_offset": rank} if cfg.mask.mode == "paper" else {}))
    trainer = ZeroTrainer(cfg, stage, dstate)
    if cfg.train.nonfinite == "skip" and rank == 0:
        log.debug("train.nonfinite=skip: DeepSpeed cannot skip an optimizer step; a non-finite loss stops the run "
                 "(the last checkpoint is kept)")
    torch.manual_seed(cfg.train.seed)   # reference mode: every rank draws mask positions identically

    step, epoch, batch_in_epoch, skipped_total, last_loss = 0, 0, 0, 0, float("nan")
    if resume:
        tag = read_latest(ckdir)
        if tag is None:
            raise ConfigError(f"--resume: no DeepSpeed checkpoint in {ckdir}; run without --resume to start fresh")
        st = trainer.load(ckdir, tag)
        sampler.load_state_dict(st["sampler"])
        torch.set_rng_state(st["rng_cpu"])
        if device.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], device)
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        skipped_total, last_loss = st.get("skipped_steps", 0), st.get("loss", float("nan"))
        if rank == 0:
            log.info("resumed from %s/%s at step %d (epoch %d, batch %d)", ckdir, tag, step, epoch + 1,
                     batch_in_epoch)
    if rank == 0:
        from kernels.attention import attention_backend
        log.info("DeepSpeed ZeRO-%d, %d rank(s) (%s, %s), %s, attention %s, %d steps/epoch, global batch %d",
                 stage, world, dstate.env.launcher, dstate.backend, cfg.precision,
                 attention_backend(device, cfg.kernels.attention), ipe, cfg.data.batch_size * accum * world)
        import yaml
        with open(os.path.join(folder, "params-ijepa.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    csv_path = os.path.join(folder, f"{wtag}_r{rank}.csv")
    new_csv = not (resume and os.path.isfile(csv_path))
    csv_file = open(csv_path, "w" if new_csv else "a", newline="")
    writer = csv.writer(csv_file)
    if new_csv:
        writer.writerow(CSV_COLUMNS)
    tb = _tensorboard(cfg, folder) if rank == 0 else None
    max_steps = min(sched.total_steps, cfg.train.max_steps or sched.total_steps)
    progress = _Progress(max_steps, cfg.train.progress and rank == 0)
    progress.start = step
    losses, stop_reason, t_start = [], "finished", time.time()
    # a resumed run must not re-save the step it loaded (it would rewrite the tag it depends on)
    last_saved = {"step": step if resume else -1, "tag": read_latest(ckdir) if resume else None}

    def save(kind):
        if last_saved["step"] == step:
            return
        every = cfg.checkpoint.save_every_epochs
        milestone = kind == "epoch" and every and epoch % every == 0
        tag = f"ep{epoch}" if milestone else f"step{step:08d}"
        rank_state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "loss": last_loss,
                      "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                      "skipped_steps": skipped_total, "bad_files": list(loader.bad_files)}
        trainer.save(ckdir, tag, rank_state)
        if rank == 0:
            prune_tags(ckdir, cfg.checkpoint.keep_last)
        last_saved.update(step=step, tag=tag)

    with _StopFlag() as stop:
        while step < max_steps and epoch < cfg.optimization.epochs:
            batches = loader.epoch_batches(epoch, batch_in_epoch)
            while batch_in_epoch + accum <= ipe * accum and step < max_steps:
                _test_fault(rank, step)
                t0 = time.time()
                micro = []
                for _ in range(accum):
                    images, _labels = next(batches)
                    masks_enc, masks_pred = sampler(len(images))
                    micro.append((images, [m.to(device) for m in masks_enc], [m.to(device) for m in masks_pred]))
                out_of_time = bool(cfg.train.max_minutes and (time.time() - t_start) / 60 >= cfg.train.max_minutes)
                loss, (n_sig, n_time) = trainer.train_step(
                    micro, lr=sched.lr(step), wd=sched.wd(step), momentum=sched.momentum(step),
                    flags=(stop.signal is not None, out_of_time))
                if not math.isfinite(loss):
                    csv_file.close()
                    raise NonFiniteError(f"non-finite loss at step {step} (loss={loss}); DeepSpeed cannot skip a "
                                         f"step, the last good checkpoint is {ckdir}/{last_saved['tag']}")
                last_loss = loss
                dt = time.time() - t0
                ips = accum * len(micro[0][0]) * world / max(dt, 1e-9)
                losses.append(loss)
                row = [epoch + 1, batch_in_epoch // accum, f"{loss:.5f}", micro[0][1][0].shape[1],
                       micro[0][2][0].shape[1], int(dt * 1000), f"{ips:.1f}", f"{sched.lr(step):.3e}",
                       f"{sched.wd(step):.3e}", skipped_total]
                writer.writerow(row + [""] * (len(CSV_COLUMNS) - len(row)))   # no collapse stats here
                if tb is not None:
                    tb.add_scalar("train/loss", loss, step)
                    tb.add_scalar("train/lr", sched.lr(step), step)
                    tb.add_scalar("train/images_per_s", ips, step)
                step += 1
                batch_in_epoch += accum
                progress.update(step - 1, epoch, loss, sched.lr(step - 1), ips, skipped_total,
                                force=(step % cfg.logging.log_every == 0))
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    save("step")
                    csv_file.flush()
                if n_sig or n_time:
                    stop_reason = ((f"signal {signal.Signals(stop.signal).name}" if stop.signal is not None
                                    else "signal on another rank") if n_sig else "time limit")
                    break
            if stop_reason != "finished":
                break
            if batch_in_epoch + accum > ipe * accum:
                epoch += 1
                batch_in_epoch = 0
                save("epoch")
        progress.close()
        if stop_reason == "finished" and step >= max_steps and batch_in_epoch != 0:
            stop_reason = "max_steps"
        save("final")
    csv_file.close()
    if tb is not None:
        tb.close()
    dist.barrier()
    return {"steps": step, "epoch": epoch, "losses": losses, "skipped": skipped_total, "stop_reason": stop_reason,
            "checkpoint": os.path.join(ckdir, last_saved["tag"] or ""), "checkpoint_dir": ckdir, "csv": csv_path,
            "folder": folder, "bad_files": list(loader.bad_files), "zero_stage": stage, "world_size": world,
            "trainer": trainer}


# ============================================================================ export
def _ds_load(path: str) -> dict:
    """Load one of DeepSpeed's checkpoint files without running code from it: tensors and plain
    data, plus the three DeepSpeed value classes these files are known to hold."""
    _import_deepspeed("cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint file missing: {path}")
    try:
        with torch.serialization.safe_globals([fragment_address, ZeroStageEnum, LossScaler]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{path}: not a readable DeepSpeed checkpoint file ({first})") from None


def _split_flat(flat: torch.Tensor, shapes: list, paddings=None) -> list:
    out, o = [], 0
    for i, shape in enumerate(shapes):
        k = math.prod(shape)
        out.append(flat[o:o + k].view(shape).clone())
        o += k + (paddings[i] if paddings is not None else 0)
    return out


def _step_of(state: dict, hparams: list):
    """Adam's step count: per parameter in torch's AdamW, per group in DeepSpeed's FusedAdam."""
    if "step" in state:
        return state["step"]
    steps = [g["step"] for g in hparams if "step" in g]
    if not steps:
        raise ConfigError("optimizer state has no step count; cannot rebuild the AdamW state")
    return steps[0]


# the hyper-parameters taken from the checkpoint's groups; the rest are torch AdamW's own
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "WD_exclude")


def _consolidate_student(tagdir: str, stage: int, precision: str, world: int, group_names: list, frozen: set):
    """Per trainable parameter: fp32 weight, exp_avg, exp_avg_sq; plus the AdamW step count and
    the hyper-parameters of the 4 groups, read from DeepSpeed's files of one tag."""
    weights, m1, m2 = {}, {}, {}
    step_count, hparams = None, None
    if stage == 0:
        ms = _ds_load(os.path.join(tagdir, "mp_rank_00_model_states.pt"))
        opt = ms["optimizer"]
        if precision == "fp32":    # the client AdamW itself: indices over all params, frozen included
            flat_names = [n for g in group_names for n in g]
            weights = {n: v.float() for n, v in ms["module"].items() if n not in frozen}
            inner = opt
        else:                      # bf16 wrapper: fp32 copies of the trainable params only
            inner = opt["optimizer_state_dict"]
            train_groups = [[n for n in g if n not in frozen] for g in group_names]
            flat_names = [n for g in train_groups for n in g]
            if "fp32_groups" in opt:
                for names, tensors in zip(train_groups, opt["fp32_groups"]):
                    weights.update({n: t.float().clone() for n, t in zip(names, tensors)})
            elif "fp32_groups_flat" in opt:
                shapes = {n: tuple(v.shape) for n, v in ms["module"].items()}
                for names, flat in zip(train_groups, opt["fp32_groups_flat"]):
                    weights.update(zip(names, _split_flat(flat.float(), [shapes[n] for n in names])))
            else:
                raise ConfigError(f"{tagdir}: unknown ZeRO-0 bf16 optimizer state layout")
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
        for idx, st in inner["state"].items():
            n = flat_names[int(idx)]
            m1[n], m2[n] = st["exp_avg"].float(), st["exp_avg_sq"].float()
            step_count = _step_of(st, hparams)
        return weights, m1, m2, step_count, hparams

    prefix = "bf16_" if precision == "bf16" else ""
    optim = [_ds_load(os.path.join(tagdir, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))["optimizer_state_dict"]
             for r in range(world)]
    model_file = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    param_shapes = _ds_load(os.path.join(tagdir, model_file))["param_shapes"]
    if stage in (1, 2):
        base = [o["base_optimizer_state"] for o in optim]
        paddings = optim[0].get("param_alignment_paddings")
        for g, shapes in enumerate(param_shapes):
            names, shp = list(shapes.keys()), [tuple(v) for v in shapes.values()]
            pad = paddings[g] if paddings is not None else None
            for dest, parts in ((weights, [o["single_partition_of_fp32_groups"][g] for o in optim]),
                                (m1, [b["state"][g]["exp_avg"] for b in base]),
                                (m2, [b["state"][g]["exp_avg_sq"] for b in base])):
                dest.update(zip(names, _split_flat(torch.cat([p.float() for p in parts]), shp, pad)))
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in base[0]["param_groups"]]
        step_count = _step_of(base[0]["state"][0], hparams)
    else:
        # ZeRO-3: per rank, each parameter's partition (ceil(numel / world) elements) follows the
        # previous one through the rank's flat groups; rebuilt by zipping the ranks together
        shapes = {n: tuple(v) for d in param_shapes for n, v in d.items()}
        inner = [o["optimizer_state_dict"] for o in optim]
        for dest, flats in ((weights, [torch.cat([t.float() for t in o["fp32_flat_groups"]]) for o in optim]),
                            (m1, [torch.cat([st["exp_avg"].float() for _, st in sorted(i["state"].items())]) for i in inner]),
                            (m2, [torch.cat([st["exp_avg_sq"].float() for _, st in sorted(i["state"].items())]) for i in inner])):
            o = 0
            for n, shp in shapes.items():
                k = math.prod(shp)
                ps = -(-k // world)
                dest[n] = torch.cat([f[o:o + ps] for f in flats])[:k].view(shp).clone()
                o += ps
            if o != flats[0].numel():
                raise ConfigError(f"{tagdir}: ZeRO-3 partitions hold {flats[0].numel()} elements per rank, the "
                                  f"parameters need {o}; checkpoint and model do not match")
        hparams = [{k: v for k, v in g.items() if k != "params"} for g in inner[0]["param_groups"]]
        step_count = _step_of(next(iter(inner[0]["state"].values())), hparams)
    return weights, m1, m2, step_count, hparams


def consolidate(ckdir: str, tag: str | None = None) -> dict:
    """Everything one DeepSpeed checkpoint tag holds, as full fp32 tensors (offline, one process)."""
    from engine.cli import UsageError
    if not os.path.isdir(ckdir):
        raise UsageError(f"--checkpoint: {ckdir} is not a directory (expected {{logging.folder}}/{{write_tag}}-ds)")
    tag = tag or read_latest(ckdir)
    if tag is None:
        raise UsageError(f"--checkpoint: {ckdir} has no 'latest' file; pass --tag (one of: "
                         f"{', '.join(sorted(os.listdir(ckdir))[:8]) or 'none'})")
    tagdir = os.path.join(ckdir, tag)
    if not os.path.isdir(tagdir):
        raise UsageError(f"--tag: {tagdir} does not exist")
    r0 = _load_rank_file(os.path.join(tagdir, RANK_FILE.format(rank=0)))
    world, stage, precision = r0["world_size"], r0["zero_stage"], r0["precision"]
    ranks = [r0] + [_load_rank_file(os.path.join(tagdir, RANK_FILE.format(rank=r))) for r in range(1, world)]
    shapes = {n: tuple(s) for n, s in r0["target"]["shapes"].items()}
    target = assemble_target([rf["target"] for rf in ranks], shapes)
    weights, m1, m2, step_count, hparams = _consolidate_student(tagdir, stage, precision, world,
                                                                r0["param_groups"], set(r0["frozen"]))
    if len(hparams) != len(r0["param_groups"]):
        raise ConfigError(f"{tagdir}: {len(hparams)} optimizer groups, expected {len(r0['param_groups'])}")
    return {"tag": tag, "rank0": r0, "target": target, "weights": weights, "exp_avg": m1, "exp_avg_sq": m2,
            "step_count": step_count, "hparams": hparams}


def export_checkpoint(ckdir: str, output: str, tag: str | None = None, fmt: str = "reference") -> dict:
    """Consolidate a ZeRO checkpoint into one file: ``reference`` = the reference's
    ``.pth.tar`` keys (``encoder``/``predictor``/``target_encoder`` with ``module.`` prefix,
    ``opt`` with the 4 AdamW groups, ``epoch``, ...); ``engine`` = the same plus the engine's
    resume entry (what ``engine/checkpoint.py`` writes)."""
    from engine.checkpoint import build_state, save_atomic
    from engine.masks import MultiBlockMaskSampler
    from engine.model import build_model
    if fmt not in ("reference", "engine"):
        from engine.cli import UsageError
        raise UsageError(f"--format: {fmt!r}; choose reference or engine")
    c = consolidate(ckdir, tag)
    r0 = c["rank0"]
    cfg = IJEPAConfig.from_dict(r0["config"], validate=False)
    model = build_model(cfg)               # frozen parameters (fixed sin-cos tables) come from here
    sd = {"encoder": dict(model.encoder.state_dict()), "predictor": dict(model.predictor.state_dict()),
          "target_encoder": dict(c["target"])}
    for n, v in c["weights"].items():
        part, key = n.split(".", 1)
        if key not in sd[part]:
            raise ConfigError(f"checkpoint parameter {n} does not exist in the model built from its config")
        sd[part][key] = v.view_as(sd[part][key])
    model.load_reference_state_dict(sd, strict=True)
    optimizer = torch.optim.AdamW(model.param_groups())
    fresh_groups = optimizer.state_dict()["param_groups"]
    opt_state = {"state": {}, "param_groups": []}
    i = 0
    for g, names in enumerate(r0["param_groups"]):
        ids = []
        for n in names:
            if n in c["exp_avg"]:
                opt_state["state"][i] = {"step": torch.tensor(float(c["step_count"]), dtype=torch.float32),
                                         "exp_avg": c["exp_avg"][n], "exp_avg_sq": c["exp_avg_sq"][n]}
            ids.append(i)
            i += 1
        saved = {k: v for k, v in c["hparams"][g].items() if k in ADAMW_KEYS}
        opt_state["param_groups"].append({**fresh_groups[g], **saved, "params": ids})
    optimizer.load_state_dict(opt_state)   # validates group sizes and shapes
    sampler = MultiBlockMaskSampler.from_config(cfg)
    if r0.get("sampler"):
        sampler.load_state_dict(r0["sampler"])
    state = build_state(model, optimizer, cfg, epoch=r0["epoch"], step=r0["step"],
                        batch_in_epoch=r0["batch_in_epoch"], loss=r0.get("loss", float("nan")), sampler=sampler,
                        world_size=r0["world_size"],
                        extra={"skipped_steps": r0.get("skipped_steps", 0), "bad_files": r0.get("bad_files", []),
                               "deepspeed": {"checkpoint": os.path.abspath(ckdir), "tag": c["tag"],
                                             "zero_stage": r0["zero_stage"], "world_size": r0["world_size"],
                                             "precision": r0["precision"]}})
    state["engine"]["rng_cpu"] = r0["rng_cpu"]          # rank 0's generator, not this process's
    state["engine"]["rng_cuda"] = []
    if fmt == "reference":
        state.pop("engine")
    save_atomic(state, output)
    return state


def _run_export(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    state = export_checkpoint(args.checkpoint, args.output, tag=args.tag, fmt=args.format)
    n_enc = sum(v.numel() for v in state["encoder"].values())
    print(f"exported {args.checkpoint} (epoch {state['epoch']}, {n_enc:,} encoder parameters) -> {args.output} "
          f"[{args.format}]", file=sys.stderr)
    return 0


def add_parser(sub):
    p = sub.add_parser("export", help="consolidate a DeepSpeed ZeRO checkpoint into one .pth.tar file",
                       description="Consolidate a sharded DeepSpeed ZeRO checkpoint written by 'ijepa train --zero N' "
                                   "into the reference .pth.tar layout (encoder/predictor/target_encoder with the "
                                   "module. prefix, AdamW state) or the engine's single-file format (adds the exact "
                                   "resume point). Runs offline in one process, no GPU needed.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the DeepSpeed checkpoint folder, {logging.folder}/{write_tag}-ds")
    p.add_argument("--tag", default=None, help="checkpoint tag inside DIR (default: the one named in DIR/latest)")
    p.add_argument("--output", required=True, metavar="FILE", help="output file (.pth.tar)")
    p.add_argument("--format", choices=["reference", "engine"], default="reference",
                   help="reference: the reference's layout; engine: plus the engine's resume entry (default reference)")
    p.set_defaults(func=_run_export)


# ============================================================================ memory per rank
def count_params(cfg: IJEPAConfig) -> dict:
    """Parameter counts of the model ``cfg`` describes (built on the meta device: no memory)."""
    from engine.model import IJEPA
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
